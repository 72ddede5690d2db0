"""The drainer under a serving load: its GIL hold, its wake-ups, and a serving thread's tail latency.

    python3 benchmarks/drainer_load.py            # ~2 min
    python3 benchmarks/drainer_load.py --quick    # ~25 s
    python3 benchmarks/drainer_load.py --rounds 5 --seconds 5 --json drainer_load.json

Needs the C extension (it says so and exits 0 without it).

The load: a serving thread paced at 10,000 inferences/s, each a tracked call with 4 stages (50,000
records/s), ``counters="default"``, each call doing ~20 µs of Python work. It times every call.
Three variants, interleaved, ``--rounds`` rounds of ``--seconds`` each:
- ``native``: the C backend's drainer as shipped. A thread of the extension folds without the GIL
  whenever the ring is half full; once per interval a Python thread takes the fold (the GIL
  released) and merges it into the aggregator; the switch interval is left alone.
- ``python drain``: the same process with the Python drain that the C backend used before
  (``Drainer.native = False``): a Python thread copies the ring and folds with ``fold_records``
  (the GIL released for the fold only), lowering the switch interval while it aggregates.
- ``stopped``: no drainer at all (a ring big enough to hold the run; drained after it).
Per variant:
- the Python drainer thread's CPU per second, and its GIL hold per second: that CPU less its CPU
  inside the calls that release the GIL (``Collector.collect()`` on the native path,
  ``fold_records`` on the Python path);
- the extension's drainer thread's CPU per second (``/proc/self/task/TID/schedstat``);
- wake-ups per second of the drainer threads (their voluntary context switches);
- the serving thread's p50 and p99 per call.
Then an idle process: after 6 s with no calls, ``--seconds`` more, the drainer threads' wake-ups
per 100 ms interval (target: at most one).

Targets (issue "cost under real load"): GIL hold at most 1 ms per second; p99 no worse than with the
drainer stopped, within noise; one wake-up per interval when idle.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import _common
import numpy as np

import inferscope
from inferscope import _pipeline

INFERENCES_PER_SECOND = 10_000
STAGES = 4
WORK_ITERATIONS = 150  # ~20 µs of Python work per call on these VMs
INTERVAL_MILLIS = 100
VARIANTS = ("native", "python drain", "stopped")
NATIVE_THREAD_NAME = "inferscope-fold"


def _task_file(tid: int, name: str) -> str:
    with open(f"/proc/self/task/{tid}/{name}") as f:
        return f.read()


def _run_ns(tid: int | None) -> int:
    return 0 if tid is None else int(_task_file(tid, "schedstat").split()[0])


def _sleeps(tid: int | None) -> int:
    if tid is None:
        return 0
    for line in _task_file(tid, "status").splitlines():
        if line.startswith("voluntary_ctxt_switches"):
            return int(line.split()[1])
    return 0


def _native_tid() -> int | None:
    for task in os.listdir("/proc/self/task"):
        try:
            if _task_file(int(task), "comm").strip() == NATIVE_THREAD_NAME:
                return int(task)
        except OSError:
            continue
    return None


def _python_tid() -> int | None:
    thread = _pipeline.DRAINER._thread
    return None if thread is None else thread.native_id


class _TimedCollector:
    """The drainer's Collector, with the drainer thread's CPU inside collect() counted."""

    def __init__(self, collector: Any, released: list[int]) -> None:
        self._collector = collector
        self._released = released

    def collect(self, *args: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return self._collector.collect(*args)
        finally:
            self._released[0] += time.thread_time_ns() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collector, name)


def _timed_fold(released: list[int]) -> tuple[Any, Any]:
    """Patch fold_records so that its CPU (the GIL released) is counted; returns (module, original)."""
    from inferscope import _native

    original = _native.fold_records

    def fold_records(*args: Any) -> Any:
        t0 = time.thread_time_ns()
        try:
            return original(*args)
        finally:
            released[0] += time.thread_time_ns() - t0

    _native.fold_records = fold_records  # type: ignore[assignment]
    return _native, original


def _work() -> int:
    total = 0
    for i in range(WORK_ITERATIONS):
        total += i * i
    return total


@inferscope.track_inference(model="bench.drainer_load")
def serve() -> int:
    total = 0
    for name in ("decode", "preprocess", "model", "postprocess"):
        with inferscope.stage(name):
            total += _work() // STAGES
    return total


def _serve_for(seconds: float) -> np.ndarray:
    """Calls paced at INFERENCES_PER_SECOND; the latency of each, in ns."""
    n = int(seconds * INFERENCES_PER_SECOND)
    latencies = np.empty(n, np.int64)
    clock = time.perf_counter_ns
    start = clock()
    period = 1e9 / INFERENCES_PER_SECOND
    for i in range(n):
        t0 = clock()
        serve()
        latencies[i] = clock() - t0
        if i % 10 == 9:
            due = start + (i + 1) * period
            ahead = due - clock()
            if ahead > 0:
                time.sleep(ahead / 1e9)
    return latencies


def _configure(variant: str, seconds: float) -> None:
    capacity = 1 << 16
    if variant == "stopped":
        needed = int(seconds * INFERENCES_PER_SECOND * (STAGES + 1) * 1.2)
        capacity = 1 << max(needed - 1, 1).bit_length()
    inferscope.configure(
        counters="default",
        ring_capacity=capacity,
        drain_interval_millis=INTERVAL_MILLIS,
        metrics_exporters="none",
        recorder="off",
    )
    drainer = _pipeline.DRAINER
    drainer.stop()
    drainer.native = variant == "native"
    if variant != "stopped":
        drainer.start(INTERVAL_MILLIS)


def _counts() -> tuple[int, int]:
    """(calls aggregated of the benchmark's model, records dropped for a full ring) so far."""
    snap = inferscope.snapshot()
    calls = sum(r.count for r in snap.rows if r.model == "bench.drainer_load" and r.stage is None)
    return calls, int(snap.dropped.get("ring_full", 0))


def run_variant(variant: str, seconds: float) -> dict[str, Any]:
    _configure(variant, seconds)
    calls0, dropped0 = _counts()
    drainer = _pipeline.DRAINER
    released = [0]
    patched = None
    if variant == "native":
        drainer._collector = _TimedCollector(drainer._native_collector(), released)
    elif variant == "python drain":
        patched = _timed_fold(released)
    time.sleep(0.2)  # the threads are up
    py_tid, native_tid = _python_tid(), (_native_tid() if variant == "native" else None)
    py_thread = drainer._thread
    py_clock = time.pthread_getcpuclockid(py_thread.ident) if py_thread is not None else None
    cpu0 = time.clock_gettime_ns(py_clock) if py_clock is not None else 0
    released[0] = 0
    native0, sleeps0 = _run_ns(native_tid), _sleeps(py_tid) + _sleeps(native_tid)
    t0 = time.perf_counter()
    latencies = _serve_for(seconds)
    elapsed = time.perf_counter() - t0
    py_cpu = (time.clock_gettime_ns(py_clock) - cpu0) if py_clock is not None else 0
    inside = released[0]
    native_cpu = _run_ns(native_tid) - native0
    sleeps = _sleeps(py_tid) + _sleeps(native_tid) - sleeps0
    if variant == "native":
        drainer._collector = drainer._collector._collector
    if patched is not None:
        patched[0].fold_records = patched[1]
    drainer.native = inferscope.backend() == "c"
    calls, dropped = _counts()
    return {
        "variant": variant,
        "seconds": elapsed,
        "calls": len(latencies),
        "aggregated": calls - calls0,
        "dropped": dropped - dropped0,
        "python_cpu_ms_per_s": py_cpu / 1e6 / elapsed,
        "gil_hold_ms_per_s": max(py_cpu - inside, 0) / 1e6 / elapsed,
        "native_cpu_ms_per_s": native_cpu / 1e6 / elapsed,
        "wakeups_per_s": sleeps / elapsed,
        "p50_us": float(np.percentile(latencies, 50)) / 1e3,
        "p99_us": float(np.percentile(latencies, 99)) / 1e3,
    }


def idle(seconds: float) -> dict[str, Any]:
    _configure("native", seconds)
    serve()  # a key: the pipeline runs
    time.sleep(6.0)  # the native thread backs off once nothing has arrived for 5 s
    py_tid, native_tid = _python_tid(), _native_tid()
    sleeps0 = _sleeps(py_tid), _sleeps(native_tid)
    time.sleep(seconds)
    py, native = _sleeps(py_tid) - sleeps0[0], _sleeps(native_tid) - sleeps0[1]
    intervals = seconds * 1000 / INTERVAL_MILLIS
    return {
        "seconds": seconds,
        "python_wakeups": py,
        "native_wakeups": native,
        "wakeups_per_interval": (py + native) / intervals,
    }


def report(data: dict[str, Any]) -> str:
    rows = []
    by_variant = {v: [r for r in data["runs"] if r["variant"] == v] for v in VARIANTS}
    med = {
        v: {k: _common.median(r[k] for r in runs) for k in runs[0] if k != "variant"}
        for v, runs in by_variant.items()
    }
    for variant in VARIANTS:
        m = med[variant]
        rows.append(
            (
                variant,
                f"{m['python_cpu_ms_per_s']:.2f}",
                f"{m['gil_hold_ms_per_s']:.2f}",
                f"{m['native_cpu_ms_per_s']:.2f}",
                f"{m['wakeups_per_s']:.1f}",
                f"{m['p50_us']:.1f}",
                f"{m['p99_us']:.1f}",
                f"{int(m['dropped']):,}",
            )
        )
    native, stopped, python = med["native"], med["stopped"], med["python drain"]
    i = data["idle"]
    lines = [
        "inferscope drainer under load: 10,000 inferences/s with 4 stages each (50,000 records/s), "
        "counters=default",
        _common.environment_line(data["environment"]),
        "",
        f"Medians of {len(by_variant['native'])} rounds of {data['seconds']:g} s, variants interleaved",
        _common.table(
            (
                "drainer",
                "Python thread CPU ms/s",
                "GIL hold ms/s",
                "native thread CPU ms/s",
                "wake-ups/s",
                "p50 µs",
                "p99 µs",
                "dropped",
            ),
            rows,
        ),
        "",
        f"GIL hold, native: {native['gil_hold_ms_per_s']:.2f} ms/s (target <= 1) "
        f"{_common.verdict(native['gil_hold_ms_per_s'] <= 1.0)}; the Python drain's: "
        f"{python['gil_hold_ms_per_s']:.2f} ms/s",
        f"p99 native / stopped: {native['p99_us'] / stopped['p99_us']:.2f}; python drain / stopped: "
        f"{python['p99_us'] / stopped['p99_us']:.2f}",
        f"Idle, {i['seconds']:g} s: {i['python_wakeups']} wake-ups of the Python drainer, "
        f"{i['native_wakeups']} of the native one: {i['wakeups_per_interval']:.2f} per {INTERVAL_MILLIS} ms "
        f"interval {_common.verdict(i['wakeups_per_interval'] <= 1.05)}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=None, help="each run (default 5)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three variants (default 5)")
    args = parser.parse_args(argv)
    if inferscope.backend() != "c":
        print(
            f"drainer_load.py measures the native drainer, and the C extension is not in use: "
            f"{inferscope.BACKEND_REASON}"
        )
        return 0
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    load = _common.MachineLoad()
    data: dict[str, Any] = {"environment": _common.environment(), "seconds": seconds, "runs": []}
    for round_ in range(rounds):
        for variant in VARIANTS:
            _common.progress(f"drainer_load.py: round {round_ + 1} of {rounds}, {variant}")
            data["runs"].append(run_variant(variant, seconds))
    _common.progress("drainer_load.py: idle")
    data["idle"] = idle(seconds)
    inferscope.configure()
    return _common.finish(data, report, load, args.json)


if __name__ == "__main__":
    sys.exit(main())
