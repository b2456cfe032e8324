"""The ``headlesskey-hub`` command (the hub itself is not built yet)."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="headlesskey")
def main() -> None:
    """HeadlessKey hub: site registry, federation JWKS, admin console (not built yet)."""
