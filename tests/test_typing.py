"""The agent and the hub type-check under ``mypy --strict`` (settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_agent_and_hub_type_check() -> None:
    pytest.importorskip("mypy", reason="mypy is in the test extra: ./dev test installs it")
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
