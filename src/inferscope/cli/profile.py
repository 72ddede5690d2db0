"""``inferscope profile module:function --data FILE``: cProfile over the calls, split by stage.

The calls of the data file (the files of ``inferscope bench``: ``.npy`` or ``.npz`` hold one call's
arguments, ``.jsonl`` one call's arguments per line), repeated, run on this thread: once under one
profiler per whole call, once under one profiler per stage path, enabled only while that stage is
open. For each, the top functions by cumulative time are printed, and each profile is saved as a
``.pstats`` file for ``python -m pstats`` or snakeviz. Nothing is exported and nothing is written to
the flight recorder. See docs/profile.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from ._command import Command, bounded

__all__ = ["COMMAND"]


def _run(args: argparse.Namespace) -> int:
    import inferscope

    from ..gate.data import load_calls, load_function
    from ..profile.staged import install_stage_switch, profile_calls, uninstall_stage_switch

    # A profile of a model is no production traffic: nothing is exported or recorded.
    inferscope.configure(metrics_exporters=(), traces_exporters=(), recorder="off", canary=False)
    install_stage_switch()  # before the target's module is imported: its stages switch the profiler
    try:
        try:
            func = load_function(args.target)
            calls = load_calls(args.data)
        except (ValueError, OSError) as exc:
            print(f"inferscope profile: {exc}", file=sys.stderr)
            return 2
        try:
            repeat = args.repeat or _repeat_for(func, calls, args.seconds)
            run = profile_calls(
                func,
                calls,
                warmup=0,
                repeat=repeat,
                top=args.top,
                output_dir=args.output,
            )
        except Exception as exc:
            print(f"inferscope profile: {args.target} raised {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    finally:
        uninstall_stage_switch()
    print(json.dumps(run.to_json(), indent=2) if args.json else run.render())
    return 0


def _repeat_for(func: Callable[..., Any], calls: Sequence[Any], seconds: float) -> int:
    """Run the calls once, unprofiled (caches, lazy imports, compilation), and return how many
    passes take about ``seconds``."""
    start = time.perf_counter()
    for args, kwargs in calls:
        func(*args, **kwargs)
    elapsed = time.perf_counter() - start
    return max(1, min(100_000, math.ceil(seconds / elapsed) if elapsed > 0 else 100_000))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", metavar="module:function", help="the function to profile, e.g. serving:predict"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".npy or .npz (the arguments of one call) or .jsonl (one call's arguments per line)",
    )
    parser.add_argument(
        "--repeat",
        type=bounded(int, 1, 100_000),
        help="profile the file's calls N times over (default: as often as fits in --seconds)",
    )
    parser.add_argument(
        "--seconds",
        type=bounded(float, 0.0, 3600.0),
        default=1.0,
        help="without --repeat: repeat the calls until an unprofiled pass takes about this long (default 1)",
    )
    parser.add_argument(
        "--top", type=bounded(int, 1, 1000), default=15, help="functions shown per profile (default 15)"
    )
    parser.add_argument(
        "--output",
        default="inferscope-profile",
        metavar="DIR",
        help="where the .pstats files go (default ./inferscope-profile)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


COMMAND = Command(
    name="profile",
    help="cProfile a function over a data file's calls, one profile per stage",
    run=_run,
    add_arguments=_add_arguments,
    description="Run module:function over the calls of a data file on one thread under cProfile: one "
    "profile of the whole call and one per stage path (the profiler runs while that stage is open). "
    "Prints the top functions of each by cumulative time and saves each as a .pstats file.",
)
