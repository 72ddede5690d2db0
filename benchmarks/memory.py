"""Memory growth over 10 million tracked calls: does anything on the hot path or in the drainer leak?

    python3 benchmarks/memory.py            # ~55 s: C backend here, pure-Python backend in a child
    python3 benchmarks/memory.py --quick    # ~10 s: 1 million calls after 100,000 of warm-up
    python3 benchmarks/memory.py --json memory.json

Method: a tracked function with one stage inside (two records per call), inferscope's default
settings (counters=default, 65,536-record ring, drainer running) except that no exporter is set up.
After a warm-up of 1 million calls, ``inferscope.snapshot()`` drains the ring, ``gc.collect()``
runs, and the resident set size is read: VmRSS from /proc/self/status (now) and ru_maxrss from
``resource.getrusage`` (the peak so far). Then 10 million calls run in chunks (RSS read after each,
without a collection), then drain, collect and read again. Growth = after - before; the target is
under 2 MB (1 MB = 10**6 bytes). The pure-Python backend runs in a child process with
INFERSCOPE_NO_EXTENSION=1; when 10 million calls would take it more than ``--python-seconds``,
it makes fewer calls, and the report says how many.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from typing import Any

import _common

import inferscope

CALLS = 10_000_000
WARM_UP_CALLS = 1_000_000
CHUNK = 1_000_000
QUICK_CALLS, QUICK_WARM_UP, QUICK_CHUNK = 1_000_000, 100_000, 100_000
TARGET_BYTES = 2_000_000
MODEL = "bench.memory"


@inferscope.track_inference(model=MODEL)
def predict() -> None:
    with inferscope.stage("infer"):
        pass


def rss_bytes() -> int:
    """The resident set size now (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def peak_rss_bytes() -> int:
    """The largest resident set size so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calls(count: int) -> None:
    call = predict
    for _ in range(count):
        call()


def _settled() -> tuple[int, int]:
    inferscope.snapshot()  # drains the ring into the aggregates
    gc.collect()
    return rss_bytes(), peak_rss_bytes()


def measure(*, quick: bool, budget_seconds: float | None) -> dict[str, Any]:
    calls, warm_up, chunk = (
        (QUICK_CALLS, QUICK_WARM_UP, QUICK_CHUNK) if quick else (CALLS, WARM_UP_CALLS, CHUNK)
    )
    inferscope.configure(counters="default", metrics_exporters="none")
    _common.progress(f"memory.py: backend={inferscope.backend()}, warm-up of {warm_up:,} calls")
    start = time.perf_counter()
    _calls(warm_up)
    per_call = (time.perf_counter() - start) / warm_up
    wanted = calls
    if budget_seconds is not None and per_call * calls > budget_seconds:
        calls = max(chunk, int(budget_seconds / per_call) // chunk * chunk)
    rss_before, peak_before = _settled()
    _common.progress(f"memory.py: {calls:,} calls")
    trend = []
    start = time.perf_counter()
    for _ in range(calls // chunk):
        _calls(chunk)
        trend.append(rss_bytes())
    elapsed = time.perf_counter() - start
    rss_after, peak_after = _settled()
    snapshot = inferscope.snapshot()
    recorded = snapshot.row(MODEL).count + snapshot.row(MODEL, "infer").count
    dropped = sum(snapshot.dropped.values())
    inferscope.configure()
    return {
        "backend": inferscope.backend(),
        "environment": _common.environment(),
        "warm_up_calls": warm_up,
        "calls": calls,
        "calls_wanted": wanted,
        "seconds": elapsed,
        "ns_per_call": elapsed / calls * 1e9,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "peak_before_bytes": peak_before,
        "peak_after_bytes": peak_after,
        "rss_growth_bytes": rss_after - rss_before,
        "peak_growth_bytes": peak_after - peak_before,
        "rss_after_each_chunk_bytes": trend,
        "chunk_calls": chunk,
        "records_expected": 2 * (warm_up + calls),
        "records_aggregated": recorded,
        "records_dropped": dropped,
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def report(runs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, r in runs.items():
        calls = f"{r['calls']:,}" + ("" if r["calls"] == r["calls_wanted"] else " (scaled)")
        rows.append(
            (
                label,
                calls,
                _common.ns(r["ns_per_call"]),
                _mb(r["rss_before_bytes"]),
                _mb(r["rss_after_bytes"]),
                _mb(r["rss_growth_bytes"]),
                _mb(r["peak_before_bytes"]),
                _mb(r["peak_after_bytes"]),
                _mb(r["peak_growth_bytes"]),
                _common.verdict(
                    r["rss_growth_bytes"] < TARGET_BYTES and r["peak_growth_bytes"] < TARGET_BYTES
                ),
            )
        )
    first = next(iter(runs.values()))
    lines = [
        "inferscope memory benchmark",
        _common.environment_line(first["environment"]),
        "method: tracked call with one stage, counters=default; "
        f"warm-up of {first['warm_up_calls']:,} calls, then drain + gc.collect() before and after; "
        "RSS = VmRSS, peak = ru_maxrss; MB = 10**6 bytes; "
        f"target: growth < {TARGET_BYTES / 1e6:g} MB",
        "",
        _common.table(
            (
                "backend",
                "calls",
                "ns/call",
                "RSS before",
                "RSS after",
                "RSS growth",
                "peak before",
                "peak after",
                "peak growth",
                "target",
            ),
            rows,
        ),
        "",
    ]
    for label, r in runs.items():
        if r["calls"] != r["calls_wanted"]:
            wanted_seconds = r["calls_wanted"] * r["ns_per_call"] / 1e9
            lines.append(
                f"{label}: {r['calls_wanted']:,} calls would take ~{wanted_seconds:.0f} s; "
                f"scaled down to {r['calls']:,}"
            )
        chunks = r["rss_after_each_chunk_bytes"]
        trend = " ".join(_mb(v) for v in chunks)
        lines.append(
            f"{label}: RSS (MB) after each {r['chunk_calls']:,} calls: {trend} "
            f"(last - first: {_mb(chunks[-1] - chunks[0])})"
        )
        if r["backend"] == "python":
            lines.append(
                f"{label}: the pure-Python ring is a deque of tuples, so its memory follows its fill level "
                "(about 8 MB when 65,536 records are queued) and the RSS after draining depends on what "
                "the allocator kept; peak growth is the steadier sign of a leak there"
            )
        lost = r["records_expected"] - r["records_aggregated"] - r["records_dropped"]
        lines.append(
            f"{label}: records: {r['records_expected']:,} made, {r['records_aggregated']:,} aggregated, "
            f"{r['records_dropped']:,} dropped ({'OK' if lost == 0 else f'MISMATCH: {lost:,} unaccounted'})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--python-seconds",
        type=float,
        default=None,
        help="time allowed for the pure-Python calls (default 25, or 3 with --quick)",
    )
    args = parser.parse_args(argv)
    budget = args.python_seconds if args.python_seconds is not None else (3.0 if args.quick else 25.0)
    if args.child:
        _common.write_json(args.json, measure(quick=args.quick, budget_seconds=budget))
        return 0
    load = _common.MachineLoad()
    own_budget = None if inferscope.backend() == "c" else budget
    runs = {inferscope.backend(): measure(quick=args.quick, budget_seconds=own_budget)}
    if inferscope.backend() == "c":
        child_args = ["--python-seconds", str(budget), *(["--quick"] if args.quick else [])]
        runs["python"] = _common.run_child(__file__, child_args)
    machine_load = load.summary()
    print(report(runs))
    print(_common.load_line(machine_load))
    _common.write_json(args.json, {"runs": runs, "machine_load": machine_load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
