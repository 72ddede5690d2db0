"""``inferscope bench module:function --data FILE``: the pytest gate, outside pytest.

It benchmarks the function over the calls of the data file (``.npy``, ``.npz``, or ``.jsonl`` with
one call's arguments per line; see ``inferscope.gate.data``), prints per-stage p50/p95/p99, CPU
per call and per item and the machine canary, and, given ``--baseline``, the verdict against it.
``--save-baseline`` writes the run as a baseline in the format of ``inferscope baseline``.

Exit status: 0 when every check passed (or none was asked for), 1 on a regression or a limit
exceeded, 3 when a check stayed inconclusive within the budget, 2 on a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from ._command import Command, bounded

__all__ = ["COMMAND", "EXIT_INCONCLUSIVE", "EXIT_REGRESSION"]

EXIT_REGRESSION = 1
EXIT_INCONCLUSIVE = 3


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.3f}"


def _print_table(result: Any) -> None:
    run = result.run
    print(f"{result.model}: {result.calls} calls ({run.warmup_calls} warm-up), {run.seconds:.2f} s")
    print(f"{'stage':<24} {'count':>8} {'p50 ms':>10} {'p95 ms':>10} {'p99 ms':>10} {'cpu ms/call':>12}")
    for path, s in result.stages.items():
        print(
            f"{path or '(inference)':<24} {s.count:>8} {_ms(s.p50):>10} {_ms(s.p95):>10} {_ms(s.p99):>10} "
            f"{_ms(s.cpu_per_call):>12}"
        )
    print(
        f"exact per call: p50 {_ms(result.p50)} ms, p99 {_ms(result.p99)} ms, "
        f"CPU {_ms(result.cpu_per_call)} ms, "
        f"CPU per item {result.cpu_per_item * 1e6:.2f} us ({result.run.items_per_call:g} items per call)"
    )
    canary = result.canary_cpu_seconds
    if canary is not None:
        print(f"machine canary: {canary * 1e6:.1f} us CPU per run (median of {len(result.run.canary_cpu)})")


def _run(args: argparse.Namespace) -> int:
    from ..baseline import BaselineFormatError
    from ..gate import Inconclusive, PerformanceRegression, bench_calls
    from ..gate.data import load_calls, load_function
    from ..gate.report import write_report
    from ..gate.result import INITIAL_SHARE
    from ..gate.store import StoredBaseline, read_baselines, write_baselines

    try:
        func = load_function(args.target)
        calls = load_calls(args.data)
    except (ValueError, OSError) as error:
        print(f"inferscope bench: {error}", file=sys.stderr)
        return 2
    model = args.model or args.target
    baseline = None
    if args.baseline is not None:
        try:
            stored = read_baselines(args.baseline)
        except (OSError, BaselineFormatError) as error:
            print(f"inferscope bench: --baseline: {error}", file=sys.stderr)
            return 2
        baseline = stored.get(model)
        if baseline is None:
            if len(stored) == 1 and args.model is None:
                baseline = next(iter(stored.values()))
            else:
                print(
                    f"inferscope bench: {args.baseline} holds no baseline of {model!r} (it holds "
                    f"{', '.join(sorted(stored)) or 'none'}); name it with --model",
                    file=sys.stderr,
                )
                return 2
    checking = baseline is not None or args.p99_below is not None
    result = bench_calls(
        func,
        calls,
        model=model,
        budget_seconds=args.budget,
        items=args.items,
        baseline=baseline,
        initial_share=INITIAL_SHARE if checking else 1.0,
    )
    status = 0
    try:
        if args.p99_below is not None:
            result.assert_p99_below(args.p99_below)
        if baseline is not None:
            result.assert_no_regression(args.max_increase, quantile=args.quantile)
    except PerformanceRegression:
        status = EXIT_REGRESSION
    except Inconclusive:
        status = EXIT_INCONCLUSIVE
    if args.save_baseline is not None:
        try:
            write_baselines(args.save_baseline, [StoredBaseline.of_run(result.run)])
        except OSError as error:
            print(f"inferscope bench: cannot write {args.save_baseline}: {error}", file=sys.stderr)
            return 2
    if args.markdown is not None:
        write_report(args.markdown, [result], kind="markdown")
    if args.json:
        print(json.dumps(result.to_json(), indent=2, allow_nan=False, default=str))
        return status
    _print_table(result)
    for verdict in result.verdicts:
        print(f"{verdict.metric}: {verdict.message}")
    if args.save_baseline is not None:
        print(f"baseline saved to {args.save_baseline}")
    return status


def _fraction(text: str) -> float:
    return bounded(float, 0.0, 10.0)(text)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target", metavar="MODULE:FUNCTION", help="the function to benchmark, e.g. serve:predict"
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help=".npy (one argument), .npz (arr_0.. positional, other names keyword) or .jsonl (one call's "
        "arguments per line: a list, an object of keyword arguments, or one value)",
    )
    parser.add_argument("--model", help="the model name in the baseline (default: MODULE:FUNCTION)")
    parser.add_argument(
        "--budget",
        type=bounded(float, 0.05, 3600.0),
        default=3.0,
        metavar="SECONDS",
        help="measuring time, extra samples for an undecided check included (default 3)",
    )
    parser.add_argument(
        "--items",
        type=bounded(float, 1e-9, 1e12),
        default=None,
        help="items per call for CPU per item (default: the length of the first argument, else 1)",
    )
    parser.add_argument("--baseline", metavar="FILE", help="compare with this baseline file")
    parser.add_argument(
        "--max-increase",
        type=_fraction,
        default=0.10,
        metavar="FRACTION",
        help="with --baseline: the tolerated slowdown (default 0.10, i.e. 10%%)",
    )
    parser.add_argument(
        "--quantile",
        type=bounded(float, 0.01, 0.99),
        default=0.5,
        help="with --baseline: the quantile of the time per call compared (default 0.5)",
    )
    parser.add_argument(
        "--p99-below",
        type=bounded(float, 1e-9, 3600.0),
        metavar="SECONDS",
        help="fail when p99 is above this",
    )
    parser.add_argument("--save-baseline", metavar="FILE", help="write this run as a baseline file")
    parser.add_argument("--markdown", metavar="FILE", help="write a Markdown summary")
    parser.add_argument("--json", action="store_true", help="print the figures and verdicts as JSON")


COMMAND = Command(
    name="bench",
    help="benchmark a function over a data file and check it against a baseline (the pytest gate)",
    run=_run,
    add_arguments=_add_arguments,
    description="Benchmark MODULE:FUNCTION over the calls of a data file, as the inferscope_bench pytest "
    "fixture does: per-stage p50/p95/p99, CPU per call and per item, the machine canary, and a verdict "
    "(pass, regression, inconclusive) against a baseline. Exit status: 0 pass, 1 regression, 3 "
    "inconclusive, 2 error.",
)
