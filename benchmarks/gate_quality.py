"""The performance gate's verdicts: false positives, power and inconclusive results, beside
pytest-benchmark's compare-and-fail on the same pairs.

    python3 benchmarks/gate_quality.py                    # 10 A/A + 10 slowed pairs, ~4 min
    python3 benchmarks/gate_quality.py --pairs 200        # the full run: ~100 min

A pair is two runs of fixed numpy work, one after the other, as a CI job measures a pull request
after the baseline was saved: an **A/A pair** runs the same work twice (any "regression" is a false
positive), a **slowed pair** runs 10% more work the second time (the gate should say regression).

- **inferscope**: the baseline run measures ``--budget`` seconds; the second run measures 40% of it,
  then more (up to the whole budget) while the verdict is inconclusive, and its verdict is
  ``assert_no_regression(max_increase=--max-increase)``: pass, regression or inconclusive.
- **pytest-benchmark**: the same pair through its own command line, in real pytest runs:
  ``--benchmark-save`` for the baseline, then ``--benchmark-compare --benchmark-compare-fail=median:X%``
  with ``--benchmark-max-time`` equal to the budget. It has two outcomes, pass or fail.

The two tools measure the pair back to back, so each sees the same weather. pytest-benchmark comes
from the ``bench`` dependency group (``pip install --group bench``); without it only inferscope's
column is printed. Nothing is asserted: the figures are printed, with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

#: The work of one call: ``units`` sorts of the same 2048 numbers (~20 us a unit here).
_DATA = np.random.default_rng(11).random(2048)
BASE_UNITS = 20
SLOW_UNITS = 22  # 10% more work


def work(units: int) -> float:
    total = 0.0
    for _ in range(units):
        total += float(np.sort(_DATA)[0])
    return total


def inferscope_pair(units: int, budget: float, max_increase: float, index: int) -> tuple[str, float]:
    """(outcome, seconds the second run measured) of one pair through the gate."""
    from inferscope.gate.result import INITIAL_SHARE, BenchResult, Inconclusive, PerformanceRegression
    from inferscope.gate.runner import BenchRunner
    from inferscope.gate.store import StoredBaseline

    model = f"gate-quality-{index}"
    base = BenchRunner(work, [((BASE_UNITS,), {})], model=model, budget_seconds=budget, items=1)
    baseline = StoredBaseline.of_run(base.measure())
    runner = BenchRunner(work, [((units,), {})], model=model, budget_seconds=budget, items=1)
    runner.measure(INITIAL_SHARE)
    result = BenchResult(runner, name=model, baseline=baseline)
    try:
        result.assert_no_regression(max_increase=max_increase)
        outcome = "pass"
    except PerformanceRegression:
        outcome = "regression"
    except Inconclusive:
        outcome = "inconclusive"
    return outcome, runner.run.seconds


_PYTEST_BENCHMARK_TEST = """
import os
import sys

sys.path.insert(0, {here!r})
from gate_quality import work


def test_work(benchmark):
    benchmark(work, int(os.environ["GATE_QUALITY_UNITS"]))
"""


def pytest_benchmark_available() -> bool:
    found = subprocess.run(
        [sys.executable, "-c", "import pytest_benchmark"], capture_output=True, text=True, check=False
    )
    return found.returncode == 0


def pytest_benchmark_pair(units: int, budget: float, max_increase: float, folder: Path) -> str:
    """pytest-benchmark's outcome of one pair: "pass" or "regression" (its compare-fail), or
    "error" when pytest itself failed twice (py-cpuinfo, which it runs at start-up, can fail on
    a machine out of processes)."""
    for attempt in range(2):
        try:
            return _pytest_benchmark_pair(units, budget, max_increase, folder / str(attempt))
        except RuntimeError as error:
            print(f"pytest-benchmark: {str(error).splitlines()[0]}", file=sys.stderr)
    return "error"


def _pytest_benchmark_pair(units: int, budget: float, max_increase: float, folder: Path) -> str:
    folder.mkdir(parents=True)
    test = folder / "test_work.py"
    test.write_text(textwrap.dedent(_PYTEST_BENCHMARK_TEST.format(here=str(Path(__file__).parent))))
    storage = folder / "storage"
    common = [
        sys.executable, "-m", "pytest", str(test), "-q", "-p", "no:cacheprovider",
        "-p", "no:inferscope", f"--benchmark-storage=file://{storage}",
        f"--benchmark-max-time={budget}", "--rootdir", str(folder),
    ]  # fmt: skip
    env = {**os.environ, "GATE_QUALITY_UNITS": str(BASE_UNITS)}
    saved = subprocess.run([*common, "--benchmark-save=base"], env=env, capture_output=True, text=True)
    if saved.returncode != 0:
        raise RuntimeError(f"pytest-benchmark failed to save its baseline (exit {saved.returncode})")
    env["GATE_QUALITY_UNITS"] = str(units)
    compared = subprocess.run(
        [*common, "--benchmark-compare", f"--benchmark-compare-fail=median:{max_increase * 100:g}%"],
        env=env,
        capture_output=True,
        text=True,
    )
    if compared.returncode not in (0, 1):
        raise RuntimeError(f"pytest-benchmark's comparison failed (exit {compared.returncode})")
    return "regression" if compared.returncode == 1 else "pass"


def _rate(count: int, total: int) -> str:
    return f"{count}/{total} ({100 * count / total:.1f}%)" if total else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pairs", type=int, default=10, help="A/A pairs, and as many slowed pairs (default 10)"
    )
    parser.add_argument(
        "--budget", type=float, default=3.0, help="seconds of measuring per verdict (default 3)"
    )
    parser.add_argument(
        "--max-increase",
        type=float,
        default=0.05,
        help="the tolerance of both tools (default 0.05: a 10%% slowdown is twice it)",
    )
    parser.add_argument("--no-peer", action="store_true", help="leave pytest-benchmark out")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    peer = not args.no_peer and pytest_benchmark_available()
    if not args.no_peer and not peer:
        print("pytest-benchmark is not installed (pip install --group bench): its column is left out")
    kinds = {"A/A (same work)": BASE_UNITS, "slowed (+10% work)": SLOW_UNITS}
    outcomes: dict[str, dict[str, list[str]]] = {k: {"inferscope": [], "pytest-benchmark": []} for k in kinds}
    seconds: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gate-quality-") as temporary:
        for index in range(args.pairs):
            for kind, units in kinds.items():
                outcome, measured = inferscope_pair(units, args.budget, args.max_increase, index)
                outcomes[kind]["inferscope"].append(outcome)
                seconds.append(measured)
                if peer:
                    folder = Path(temporary) / f"{index}-{units}"
                    outcomes[kind]["pytest-benchmark"].append(
                        pytest_benchmark_pair(units, args.budget, args.max_increase, folder)
                    )
            print(
                f"pair {index + 1}/{args.pairs}: "
                + ", ".join(f"{k}: {v['inferscope'][-1]}" for k, v in outcomes.items())
                + (
                    " | pytest-benchmark "
                    + ", ".join(f"{v['pytest-benchmark'][-1]}" for v in outcomes.values())
                    if peer
                    else ""
                ),
                flush=True,
            )

    n = args.pairs
    aa, slow = outcomes["A/A (same work)"], outcomes["slowed (+10% work)"]
    rows = [
        (
            "false positives (A/A called regression)",
            _rate(aa["inferscope"].count("regression"), n),
            _rate(aa["pytest-benchmark"].count("regression"), n) if peer else "-",
        ),
        ("A/A inconclusive", _rate(aa["inferscope"].count("inconclusive"), n), "(no such outcome)"),
        (
            "A/A passed",
            _rate(aa["inferscope"].count("pass"), n),
            _rate(aa["pytest-benchmark"].count("pass"), n) if peer else "-",
        ),
        (
            "power (slowed pair called regression)",
            _rate(slow["inferscope"].count("regression"), n),
            _rate(slow["pytest-benchmark"].count("regression"), n) if peer else "-",
        ),
        ("slowed inconclusive", _rate(slow["inferscope"].count("inconclusive"), n), "(no such outcome)"),
        (
            "slowed passed (missed)",
            _rate(slow["inferscope"].count("pass"), n),
            _rate(slow["pytest-benchmark"].count("pass"), n) if peer else "-",
        ),
        (
            "pytest-benchmark runs that failed to run",
            "-",
            _rate(aa["pytest-benchmark"].count("error") + slow["pytest-benchmark"].count("error"), 2 * n)
            if peer
            else "-",
        ),
    ]
    print()
    print(
        f"{n} A/A pairs and {n} pairs slowed by 10%, budget {args.budget:g} s per verdict, "
        f"tolerance {args.max_increase * 100:g}%"
    )
    print(f"{'':42} {'inferscope gate':>22} {'pytest-benchmark':>22}")
    for name, ours, theirs in rows:
        print(f"{name:42} {ours:>22} {theirs:>22}")
    print(
        f"inferscope: seconds measured per verdict, median {statistics.median(seconds):.2f}, "
        f"max {max(seconds):.2f} (budget {args.budget:g})"
    )
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{time.monotonic() - started:.0f} s in all"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"pairs": n, "budget": args.budget, "max_increase": args.max_increase, "outcomes": outcomes}
            )
        )


if __name__ == "__main__":
    main()
