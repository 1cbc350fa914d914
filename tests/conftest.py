"""Shared fixtures: paths to the real tile sets in tests/data and a CLI runner."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture
def data_dir() -> Path:
    return DATA


def read_positions(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m tilefuse ARGS`` in a subprocess, capturing output."""
    return subprocess.run([sys.executable, "-m", "tilefuse", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
