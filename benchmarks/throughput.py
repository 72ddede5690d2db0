"""Sustained producer rate with the drainer running, and the drainer's own throughput.

    python3 benchmarks/throughput.py                     # ~65 s: producers on the C backend
    python3 benchmarks/throughput.py --quick             # ~10 s
    python3 benchmarks/throughput.py --backend python    # the producers run on the pure-Python backend
    python3 benchmarks/throughput.py --seconds 5 --json throughput.json

Part 1, producers, with inferscope's default settings (65,536-record ring; the drainer takes the
records every 100 ms, and on the C backend its native thread drains and folds them, without the
GIL, as soon as a producer finds the ring half full; the pure-Python drainer is woken then):
- free runs: one thread, then two, then eight, call a tracked no-op as fast as they can for
  ``--seconds``, with counters=minimal and with counters=default (target: 8 threads, default
  counters, 0 dropped);
- paced runs, counters=minimal: calls in a busy loop, the clock checked every 1,000 calls, aiming at
  1,000,000 calls/s for ``--seconds``. When ahead of schedule the producer either sleeps (and so
  releases the GIL, as a server waiting for requests does) or spins on the clock for
  ``--seconds / 2`` (it never releases the GIL of its own accord, as a serving thread busy in Python
  code). If the target is missed or records are dropped, lower rates are tried for 1/10 of
  ``--seconds`` each, to find the highest rate without drops.
Each run uses a model name of its own, so its numbers are exact: "aggregated" is its count in
``inferscope.snapshot()``, "exported" the count of its ``inferscope.inference.duration`` point as
exported through an OTel MeterProvider (an in-memory exporter, flushed after the run), and "dropped"
the growth of ``snapshot().dropped["ring_full"]`` during the run. The check is
exported == calls - dropped == aggregated. No other exporter is set up (``metrics_exporters="none"``).

Part 2, the drainer alone, on one core (the main thread pinned to one CPU): a ring of each backend
is filled with N records over 20 keys (durations spread log-normally around 2 ms) by ``Ring.push``
outside the timed region; then ``Ring.drain`` into a 16,384-record buffer (the drainer's batch)
and ``Aggregator.add`` are timed alone and together; medians over the repeats. Then
``Aggregator.add`` runs on a background thread, as in the drainer, first while the main thread
sleeps and then while it runs Python code without pause: what the GIL leaves to the drainer.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import _common
import numpy as np
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

import inferscope
from inferscope import _purepy
from inferscope._keys import KeyRegistry
from inferscope._records import empty_records
from inferscope.aggregator import Aggregator
from inferscope.testing import InMemoryMetricExporter

#: Producer threads of the free runs; 8 is the target's case ("8 free-running producers: 0 dropped").
FREE_THREADS = (1, 2, 8)
#: Calls between two looks at the clock.
BATCH = 1000
PACED_TARGET = 1_000_000
DRAIN_BATCH = 16384  # the drainer's buffer (inferscope._pipeline._DRAIN_BATCH)
DRAIN_KEYS = 20
DRAIN_TARGET = 10_000_000
DURATION_METRIC = "inferscope.inference.duration"
MODEL_ATTRIBUTE = "inferscope.model.name"


def noop() -> None:
    pass


# --- part 1: producers -----------------------------------------------------------------------------


class Export:
    """An OTel MeterProvider that inferscope rides along with; flushed on demand after each run."""

    def __init__(self) -> None:
        self.exporter = InMemoryMetricExporter()
        reader = PeriodicExportingMetricReader(self.exporter, export_interval_millis=3_600_000)
        self.provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)

    def exported_count(self, model: str) -> int:
        self.exporter.clear()
        self.provider.force_flush()
        return sum(
            int(point.count)
            for point in self.exporter.latest_points(DURATION_METRIC)
            if point.attributes.get(MODEL_ATTRIBUTE) == model
        )


def _ring_full() -> int:
    return int(inferscope.snapshot().dropped.get("ring_full", 0))


def _aggregated(model: str) -> int:
    snapshot = inferscope.snapshot()
    return sum(row.count for row in snapshot.rows if row.model == model and row.stage is None)


def _free_run(
    func: Callable[[], Any], seconds: float, counts: list[int], index: int, go: threading.Barrier
) -> None:
    batch = range(BATCH)
    clock = time.perf_counter
    go.wait()
    deadline = clock() + seconds
    calls = 0
    while True:
        for _ in batch:
            func()
        calls += BATCH
        if clock() >= deadline:
            break
    counts[index] = calls


def _paced_run(func: Callable[[], Any], target_rate: float, seconds: float, wait: str) -> tuple[int, float]:
    """Calls in a busy loop, the clock checked every BATCH calls; ahead of schedule, wait.

    ``wait="sleep"`` sleeps (the GIL is released), as a server waits for its next request;
    ``wait="spin"`` spins on the clock, so the thread never gives up the GIL of its own accord: the
    worst case for the drainer thread, like a serving thread that is busy in Python code.
    """
    batch = range(BATCH)
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    calls = 0
    while True:
        for _ in batch:
            func()
        calls += BATCH
        now = clock()
        if now >= deadline:
            break
        due = min(start + calls / target_rate, deadline)
        if wait == "sleep":
            if due > now:
                time.sleep(due - now)
        else:
            while clock() < due:
                pass
    return calls, clock() - start


class Producers:
    def __init__(self, export: Export) -> None:
        self.export = export
        self.runs = 0

    def _tracked(self, label: str) -> tuple[str, Callable[[], None]]:
        self.runs += 1
        model = f"bench.throughput.{self.runs}.{label}"
        return model, inferscope.track_inference(model=model)(noop)

    def _configure(self, counters: str) -> None:
        inferscope.configure(counters=counters, metrics_exporters="none", meter_provider=self.export.provider)

    def _finish(self, row: dict[str, Any], model: str, dropped_before: int) -> dict[str, Any]:
        row["dropped"] = _ring_full() - dropped_before
        row["aggregated"] = _aggregated(model)
        row["exported"] = self.export.exported_count(model)
        row["check_ok"] = row["exported"] == row["calls"] - row["dropped"] == row["aggregated"]
        return row

    def free(self, counters: str, threads: int, seconds: float) -> dict[str, Any]:
        self._configure(counters)
        model, func = self._tracked(f"{counters}.{threads}t")
        counts = [0] * threads
        go = threading.Barrier(threads + 1)
        workers = [
            threading.Thread(target=_free_run, args=(func, seconds, counts, i, go), name=f"producer-{i}")
            for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        dropped_before = _ring_full()
        go.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - start
        calls = sum(counts)
        row = {
            "run": f"free, {threads} thread{'s' if threads > 1 else ''}",
            "counters": counters,
            "threads": threads,
            "seconds": elapsed,
            "calls": calls,
            "calls_per_second": calls / elapsed,
        }
        return self._finish(row, model, dropped_before)

    def paced(self, counters: str, target_rate: float, seconds: float, wait: str) -> dict[str, Any]:
        self._configure(counters)
        model, func = self._tracked(f"{counters}.paced.{wait}.{int(target_rate)}")
        dropped_before = _ring_full()
        calls, elapsed = _paced_run(func, target_rate, seconds, wait)
        row = {
            "run": f"paced {target_rate / 1e6:.2f} M/s, {wait}",
            "counters": counters,
            "threads": 1,
            "wait": wait,
            "target_per_second": target_rate,
            "seconds": elapsed,
            "calls": calls,
            "calls_per_second": calls / elapsed,
        }
        return self._finish(row, model, dropped_before)


def _reached(row: dict[str, Any]) -> bool:
    return bool(row["calls_per_second"] >= 0.99 * row["target_per_second"])


def paced_series(
    producers: Producers, wait: str, seconds: float, step_seconds: float
) -> list[dict[str, Any]]:
    """A paced run at PACED_TARGET; on a miss (rate not reached, or drops), up to three lower rates."""
    _common.progress(
        f"throughput.py: paced run at {PACED_TARGET:,} calls/s ({wait} when ahead), {seconds:g} s"
    )
    runs = [producers.paced("minimal", PACED_TARGET, seconds, wait)]
    while len(runs) < 4:
        last = runs[-1]
        if _reached(last) and last["dropped"] == 0:
            break
        target = last["calls_per_second"] * 0.9 if not _reached(last) else last["target_per_second"] / 2
        _common.progress(f"throughput.py: paced run at {target:,.0f} calls/s ({wait}), {step_seconds:g} s")
        runs.append(producers.paced("minimal", target, step_seconds, wait))
    return runs


def producer_runs(seconds: float) -> dict[str, Any]:
    producers = Producers(Export())
    rows = []
    for counters in ("minimal", "default"):
        for threads in FREE_THREADS:
            _common.progress(
                f"throughput.py: free run, counters={counters}, {threads} thread(s), {seconds:g} s"
            )
            rows.append(producers.free(counters, threads, seconds))
    step_seconds = max(0.5, seconds / 10)
    paced = paced_series(producers, "sleep", seconds, step_seconds)
    paced += paced_series(producers, "spin", seconds / 2, step_seconds)
    inferscope.configure()
    return {"free": rows, "paced": paced}


# --- part 2: the drainer ---------------------------------------------------------------------------


def _record_columns(count: int, cpu_measured: bool, keys: list[int]) -> dict[str, np.ndarray]:
    """Synthetic records: 20 keys, wall times log-normal around 2 ms, CPU time a fraction of it."""
    rng = np.random.default_rng(20261128)
    wall = np.maximum(rng.lognormal(math.log(2e6), 1.0, size=count), 1_000).astype(np.int64)
    return {
        "key": rng.choice(np.array(keys), size=count),
        "start_ns": np.cumsum(wall) + 1_000_000_000,
        "wall_ns": wall,
        "cpu_ns": (wall * rng.uniform(0.2, 1.0, size=count)).astype(np.int64)
        if cpu_measured
        else np.full(count, -1, dtype=np.int64),
    }


def _records(count: int, cpu_measured: bool, keys: list[int]) -> list[tuple[int, int, int, int]]:
    c = _record_columns(count, cpu_measured, keys)
    columns = (c["key"].tolist(), c["start_ns"].tolist(), c["wall_ns"].tolist(), c["cpu_ns"].tolist())
    return list(zip(*columns, strict=True))


def _capacity_for(count: int) -> int:
    return 1 << max(10, (count - 1).bit_length())


def drain_case(ring_type: type, count: int, cpu_measured: bool, repeats: int) -> dict[str, Any]:
    registry = KeyRegistry()
    keys = [registry.inference_key(f"bench.drain.{i}") for i in range(DRAIN_KEYS)]
    values = _records(count, cpu_measured, keys)
    ring = ring_type(_capacity_for(count))
    buffer = empty_records(DRAIN_BATCH)
    aggregator = Aggregator(registry)

    def fill() -> None:
        push = ring.push
        for key, start, wall, cpu in values:
            push(key, 0, 0, start, wall, cpu)
        if len(ring) != count:
            raise RuntimeError(f"the ring holds {len(ring)} records, not {count}")

    def drain_only() -> float:
        fill()
        t0 = time.perf_counter()
        drained = []
        while True:
            n = ring.drain(buffer)
            drained.append(n)
            if n < DRAIN_BATCH:
                break
        elapsed = time.perf_counter() - t0
        if sum(drained) != count:
            left = len(ring)
            raise RuntimeError(f"drained {sum(drained)} of {count} records in batches {drained}; {left} left")
        return elapsed

    def drained_batches() -> list[np.ndarray]:
        fill()
        batches = []
        while True:
            n = ring.drain(buffer)
            if n:
                batches.append(buffer[:n].copy())
            if n < DRAIN_BATCH:
                return batches

    def aggregate_only(batches: list[np.ndarray]) -> float:
        t0 = time.perf_counter()
        for batch in batches:
            aggregator.add(batch)
        return time.perf_counter() - t0

    def both() -> float:
        fill()
        t0 = time.perf_counter()
        while True:
            n = ring.drain(buffer)
            if n:
                aggregator.add(buffer[:n])
            if n < DRAIN_BATCH:
                break
        return time.perf_counter() - t0

    batches = drained_batches()
    aggregate_only(batches[:2])  # the first add creates the 20 series; steady state is what matters
    samples: dict[str, list[float]] = {"drain": [], "aggregate": [], "drain + aggregate": []}
    for _ in range(repeats):
        samples["drain"].append(count / drain_only())
        samples["aggregate"].append(count / aggregate_only(batches))
        samples["drain + aggregate"].append(count / both())
    return {
        "ring": ring_type.__module__,
        "records": count,
        "cpu_measured": cpu_measured,
        "records_per_second": {name: _common.median(values) for name, values in samples.items()},
        "samples_records_per_second": samples,
    }


def aggregate_under_contention(cpu_measured: bool, seconds: float) -> dict[str, Any]:
    """``Aggregator.add`` of drainer-sized batches on a background thread (as the drainer runs)
    while the main thread runs Python code without pause, as a busy serving thread does."""
    registry = KeyRegistry()
    keys = [registry.inference_key(f"bench.contention.{i}") for i in range(DRAIN_KEYS)]
    batch = empty_records(DRAIN_BATCH)
    for name, column in _record_columns(DRAIN_BATCH, cpu_measured, keys).items():
        batch[name] = column
    aggregator = Aggregator(registry)
    aggregator.add(batch)
    stop = threading.Event()
    added = [0, 0.0]  # records, seconds spent in add()

    def drainer() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            aggregator.add(batch)
            added[1] += time.perf_counter() - t0
            added[0] += DRAIN_BATCH

    def aggregate_for(busy: bool) -> float:
        added[:] = [0, 0.0]
        stop.clear()
        thread = threading.Thread(target=drainer, name="bench-drainer")
        thread.start()
        deadline = time.perf_counter() + seconds
        if busy:
            while time.perf_counter() < deadline:
                pass
        else:
            time.sleep(seconds)
        stop.set()
        thread.join()
        return added[0] / added[1]

    return {
        "cpu_measured": cpu_measured,
        "records_per_second_idle": aggregate_for(busy=False),
        "records_per_second_busy": aggregate_for(busy=True),
    }


def drain_runs(quick: bool) -> dict[str, Any]:
    ring_types: list[tuple[type, int]] = []
    try:
        from inferscope import _native

        ring_types.append((_native.Ring, 1 << (18 if quick else 20)))
    except ImportError:
        _common.progress("throughput.py: the C extension is not built; the C ring is left out")
    ring_types.append((_purepy.Ring, 1 << (16 if quick else 17)))
    repeats = 3 if quick else 5
    one_cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {one_cpu})  # 0 = this thread on Linux: the drain runs on one core
    try:
        alone = []
        for ring_type, count in ring_types:
            for cpu_measured in (False, True):
                _common.progress(
                    f"throughput.py: drain {ring_type.__module__}.Ring, {count:,} records, "
                    f"cpu_ns {'measured' if cpu_measured else 'not measured'}"
                )
                alone.append(drain_case(ring_type, count, cpu_measured, repeats))
    finally:
        os.sched_setaffinity(0, before)
    _common.progress("throughput.py: Aggregator.add on a background thread, main thread idle and then busy")
    contention = [aggregate_under_contention(cpu, 0.5 if quick else 1.0) for cpu in (False, True)]
    return {"alone": alone, "contention": contention}


# --- the report ------------------------------------------------------------------------------------


def _check(row: dict[str, Any]) -> str:
    return "OK" if row["check_ok"] else "MISMATCH"


def paced_summary(runs: list[dict[str, Any]]) -> str:
    first = runs[0]
    wait = first["wait"]
    if _reached(first) and first["dropped"] == 0:
        return (
            f"paced ({wait}): {_common.rate(first['calls_per_second'])} held for {first['seconds']:.0f} s "
            "with 0 drops"
        )
    why = "not reached" if not _reached(first) else f"reached, but {first['dropped']:,} records were dropped"
    clean = [r for r in runs if r["dropped"] == 0]
    if clean:
        best = max(clean, key=lambda r: r["calls_per_second"])
        best_rate = _common.rate(best["calls_per_second"])
        found = f"highest rate with 0 drops: {best_rate} ({best['seconds']:.0f} s run)"
    else:
        lowest = min(r["calls_per_second"] for r in runs)
        found = f"every paced run dropped records, down to {_common.rate(lowest)}"
    return f"paced ({wait}): 1 M/s {why} on this machine; {found}"


def report(data: dict[str, Any]) -> str:
    producers, drains = data["producers"], data["drain"]
    free_rows = [
        (
            r["run"],
            r["counters"],
            f"{r['seconds']:.1f}",
            f"{r['calls']:,}",
            _common.rate(r["calls_per_second"]),
            f"{r['aggregated']:,}",
            f"{r['exported']:,}",
            f"{r['dropped']:,}",
            _check(r),
        )
        for r in producers["free"] + producers["paced"]
    ]
    paced_lines = [
        paced_summary([r for r in producers["paced"] if r["wait"] == wait]) for wait in ("sleep", "spin")
    ]
    drain_rows = []
    found = []
    repeats = len(drains["alone"][0]["samples_records_per_second"]["drain"])
    for d in drains["alone"]:
        per = d["records_per_second"]
        label = "C" if d["ring"].endswith("_native") else "pure Python"
        counters = "default (cpu_ns)" if d["cpu_measured"] else "minimal"
        drain_rows.append(
            (
                label,
                counters,
                f"{d['records']:,}",
                _common.rate(per["drain"]),
                _common.rate(per["aggregate"]),
                _common.rate(per["drain + aggregate"]),
                _common.ns(1e9 / per["drain + aggregate"]),
            )
        )
        if label == "C":
            found.append((f"C ring, {counters} records", per["drain + aggregate"]))
    env = data["environment"]
    lines = [
        "inferscope throughput benchmark",
        _common.environment_line(env),
        "",
        f"Producers: a tracked no-op as fast as possible, backend={env['backend']}, default ring and drainer "
        "(exported = count in the OTel export; check: exported == calls - dropped == aggregated)",
        _common.table(
            ("run", "counters", "s", "calls", "rate", "aggregated", "exported", "dropped", "check"),
            free_rows,
            left=2,
        ),
        *paced_lines,
        "",
        f"Drainer on one core: Ring.drain into {DRAIN_BATCH:,}-record batches + Aggregator.add, "
        f"{DRAIN_KEYS} keys, median of {repeats} repeats",
        _common.table(
            ("ring", "records", "N", "drain", "aggregate", "drain + aggregate", "ns/record"),
            drain_rows,
            left=2,
        ),
        "",
        f"Aggregator.add of {DRAIN_BATCH:,}-record batches on a background thread (where the drainer runs), "
        "while the main thread sleeps, then while it runs Python code without pause (GIL contention)",
        _common.table(
            ("records", "main thread asleep", "main thread busy", "slowdown"),
            [
                (
                    "default (cpu_ns)" if c["cpu_measured"] else "minimal",
                    _common.rate(c["records_per_second_idle"]),
                    _common.rate(c["records_per_second_busy"]),
                    f"{c['records_per_second_idle'] / c['records_per_second_busy']:,.0f}x",
                )
                for c in drains["contention"]
            ],
        ),
        "",
        "Targets (informational, nothing is asserted)",
        _common.table(
            ("target", "measured", "result"),
            [
                (
                    f"drain + aggregation >= 10 M records/s, {what}",
                    _common.rate(value),
                    _common.verdict(value >= DRAIN_TARGET),
                )
                for what, value in found
            ],
            left=2,
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="length of each producer run (default 10)"
    )
    parser.add_argument(
        "--backend", choices=("c", "python"), default="c", help="backend of the producer runs"
    )
    args = parser.parse_args(argv)
    if args.backend == "python" and inferscope.backend() != "python":
        # The backend is chosen at import: start again with the extension disabled.
        os.environ[_common.NO_EXTENSION_VARIABLE] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])])
    seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    load = _common.MachineLoad()
    data: dict[str, Any] = {"environment": _common.environment(), "seconds": seconds}
    data["producers"] = producer_runs(seconds)
    data["drain"] = drain_runs(args.quick)
    return _common.finish(data, report, load, args.json)


if __name__ == "__main__":
    sys.exit(main())
