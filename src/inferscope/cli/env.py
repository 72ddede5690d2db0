"""``inferscope env``: the environment as JSON; with ``--diff A B``, what changed from A to B."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._command import Command

__all__ = ["COMMAND", "env"]


def _load(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(f"inferscope env --diff: cannot read {path}: {error}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        print(
            f"inferscope env --diff: {path} is not a JSON object (save one with `inferscope env > FILE`)",
            file=sys.stderr,
        )
        return None
    return data


def env(diff_paths: Sequence[str] | None) -> int:
    """Print the environment; or print the differences between two saved ones and exit like
    ``diff``: 0 when they are the same, 1 when they differ, 2 when a file cannot be read."""
    from ..system.fingerprint import diff, environment, render_diff

    if not diff_paths:
        print(json.dumps(environment(), indent=2))
        return 0
    before, after = (_load(path) for path in diff_paths)
    if before is None or after is None:
        return 2
    changes = diff(before, after)
    print(f"{diff_paths[0]} -> {diff_paths[1]}")
    print(render_diff(changes))
    return 1 if changes else 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("A_JSON", "B_JSON"),
        help="print what changed between two saved `inferscope env` outputs; "
        "exit 1 when they differ, 0 when not, 2 when a file cannot be read",
    )


COMMAND = Command(
    name="env",
    help="print the environment (versions, CPU, cgroup, thread pools, GPU) as JSON, or diff two",
    description="Print what this process runs on (package versions, CPU, cgroup limits, thread pools, "
    "GPU) as JSON, with a fingerprint that changes when any of it does. Save it before and after a "
    "deploy and compare the two with --diff.",
    add_arguments=_add_arguments,
    run=lambda args: env(args.diff),
)
