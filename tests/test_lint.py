"""The whole repository passes ``ruff check`` (rules and per-file exceptions in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_repository_passes_ruff() -> None:
    pytest.importorskip("ruff", reason="ruff is in the test extra: ./dev test installs it")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
