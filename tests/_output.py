"""Running the project's commands and scripts as a user would, and reading the tables they print."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str, env: dict[str, str] | None = None, expect: int = 0) -> str:
    """stdout of ``python ARGV...`` run from the repository root; fails unless it exits ``expect``."""
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == expect, result.stdout + result.stderr
    return result.stdout


def rows(table: str) -> dict[tuple[str, str], list[str]]:
    """(first word of the model, stage) -> [count, p50, p95, p99, cpu/wall, errors] from a table
    that ``Snapshot.table()`` printed."""
    found = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[-6].isdigit():
            found[(parts[0], parts[-7])] = parts[-6:]
    return found


def copy_of_the_checkout(into: Path) -> Path:
    """The checkout without build outputs or environments, so that a build or an install from it
    leaves the working tree untouched (an editable install writes its egg-info beside the code)."""
    source = into / "checkout"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.so"
        ),
    )
    return source
