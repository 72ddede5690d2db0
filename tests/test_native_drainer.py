"""The native drainer (``_native.Collector``, ``_native/collector.h``): a thread of the C extension
drains the ring and folds the records without the GIL; Python takes the fold once per interval.

The C-level concurrency (4 pthread producers, the thread, a reader) runs under ThreadSanitizer and
ASan in tests/test_ring_tsan.py. Here: the Python object, parity with the numpy drainer, what is
kept for Python, the bounds, and the drainer's use of it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest

import inferscope
from inferscope import _pipeline
from inferscope._keys import KeyRegistry
from inferscope._records import (
    COUNTER_SLOTS,
    FLAG_ABANDONED,
    FLAG_TRACED,
    RECORD_DTYPE,
    empty_records,
)
from inferscope.aggregator import Aggregator, batch_fold_of_native
from inferscope.histogram import SCALE, _sub_bucket_tables

from .conftest import _native, run_python

pytestmark = pytest.mark.skipif(_native is None, reason="the native drainer is part of the C extension")


def make_collector() -> object:
    below, next_start = _sub_bucket_tables(SCALE)
    return _native.Collector(SCALE, below, next_start)


def records_of(registry: KeyRegistry, count: int, seed: int = 7) -> np.ndarray:
    """Records of 4 inference keys and 4 stage keys, with errors, unmeasured and zero CPU, zero and
    negative walls, abandoned and traced flags, and counters."""
    rng = np.random.default_rng(seed)
    inference = [registry.inference_key(f"native.{i}") for i in range(4)]
    stages = [registry.stage_key(k, "step") for k in inference]
    errors = [registry.error_id(ValueError), registry.error_id(KeyError)]
    records = empty_records(count)
    records["key"] = rng.choice(inference + stages, count)
    records["error"] = np.where(rng.random(count) < 0.05, rng.choice(errors, count), 0)
    records["flags"] = np.where(rng.random(count) < 0.02, FLAG_ABANDONED, 0) | np.where(
        rng.random(count) < 0.1, FLAG_TRACED, 0
    )
    records["start_ns"] = np.cumsum(rng.integers(1_000, 100_000, count))
    wall = np.exp(rng.normal(np.log(2e6), 2.0, count)).astype(np.int64)
    wall[rng.random(count) < 0.01] = 0
    wall[rng.random(count) < 0.001] = -5  # a clock step
    records["wall_ns"] = wall
    cpu = (wall * rng.random(count)).astype(np.int64)
    cpu[rng.random(count) < 0.3] = -1
    records["cpu_ns"] = cpu
    records["counters"] = rng.poisson(2.0, (count, COUNTER_SLOTS))
    return records


def buckets(h) -> tuple[int, list[int]]:
    """(index of the first non-empty bucket, the counts from there to the last non-empty one)."""
    counts = np.asarray(h.counts)
    filled = np.flatnonzero(counts)
    if filled.size == 0:
        return 0, []
    return h.offset + int(filled[0]), counts[filled[0] : filled[-1] + 1].tolist()


def series_figures(aggregator: Aggregator) -> tuple[list[tuple], list[float]]:
    """(everything exact, the float sums) of every series."""
    exact, sums = [], []
    for s in aggregator.view().series:
        hists = [s.duration] + ([s.cpu] if s.cpu is not None else [])
        exact.append(
            (
                s.info.key,
                s.error_id,
                s.abandoned,
                s.counters.tolist(),
                s.cpu is None,
                [(h.count, h.zero_count, h.min, h.max, buckets(h)) for h in hists],
            )
        )
        sums += [h.sum for h in hists] + [s.cpu_wall_seconds]
    return exact, sums


def test_the_native_drainer_gives_the_numpy_drainers_aggregates():
    """The same records, in chunks, through the collector (its thread draining some of them, and
    collect() the rest) and through the numpy fold: the same series, bit for bit but for the order in
    which floats are summed."""
    registry = KeyRegistry()
    records = records_of(registry, 60_000)
    ring = _native.Ring(1 << 12)  # each chunk fills it past half: the thread is woken
    collector = make_collector()
    collector.set_ring(ring)
    native, reference = Aggregator(registry), Aggregator(registry, native_fold=False)
    collector.start(100)
    try:
        for chunk in np.array_split(records, 20):
            assert ring.push_records(chunk) == chunk.size
            reference.add(chunk)
            fold, _, _ = collector.collect()
            native.add_fold(batch_fold_of_native(fold))
    finally:
        assert collector.stop()
    exact, sums = series_figures(native)
    exact_ref, sums_ref = series_figures(reference)
    assert exact == exact_ref
    assert sums == pytest.approx(sums_ref, rel=1e-12)
    assert sum(x[5][0][0] for x in exact) == records.size


def test_collect_hands_over_the_traced_records_in_ring_order_once():
    registry = KeyRegistry()
    records = records_of(registry, 5_000)
    ring = _native.Ring(1 << 13)
    collector = make_collector()
    collector.set_ring(ring)
    ring.push_records(records)
    fold, traced, (folded, failed, traced_dropped, missed, _) = collector.collect()
    assert (folded, failed, traced_dropped, missed) == (5_000, 0, 0, 0)
    want_traced = records[(records["flags"] & FLAG_TRACED) != 0]
    assert np.array_equal(np.frombuffer(traced, RECORD_DTYPE), want_traced)
    fold, traced, counts = collector.collect()
    assert (fold, traced, counts[0]) == (None, b"", 5_000)


def test_traced_records_waiting_for_python_are_bounded_and_the_rest_counted():
    ring = _native.Ring(1 << 18)
    collector = make_collector()
    collector.set_ring(ring)
    records = empty_records(20_000)
    records["key"] = 5
    records["flags"] = FLAG_TRACED
    records["wall_ns"] = 1_000
    ring.push_records(records)
    _, traced, (folded, _, traced_dropped, _, _) = collector.collect()
    assert folded == 20_000  # every record is folded, whatever is kept beside
    kept = len(traced) // RECORD_DTYPE.itemsize
    assert kept == 16_384 and kept + traced_dropped == 20_000


def sharer_scenario(sample, add, rng_seed: int, registry: KeyRegistry) -> None:
    """Samples every 100 ms over 3 s of a busy process, and inference records of 3 keys (and stages,
    which get nothing) arriving in batches after the samples they overlap, some of them late."""
    rng = np.random.default_rng(rng_seed)
    keys = [registry.inference_key(f"share.{i}") for i in range(3)]
    stage = registry.stage_key(keys[0], "step")
    ms = 1_000_000
    cpu = 0.0
    pending = []
    for step in range(31):
        now = step * 100 * ms
        cpu += rng.uniform(0.0, 0.2)
        for _ in range(rng.integers(0, 20)):
            start = now - int(rng.integers(0, 900 * ms))
            pending.append((int(rng.choice([*keys, stage])), start, int(rng.integers(0, 400 * ms))))
        ready = [r for r in pending if r[1] + r[2] <= now]
        pending = [r for r in pending if r[1] + r[2] > now]
        if ready:
            batch = empty_records(len(ready))
            batch["key"], batch["start_ns"], batch["wall_ns"] = zip(*ready, strict=True)
            add(batch)
        sample(now, cpu)


def test_the_native_sharer_credits_what_the_python_sharer_credits():
    """The same samples and inference records through share.h and _process_cpu.py."""
    from inferscope._process_cpu import ProcessCpuSharer

    registry = KeyRegistry()
    python = ProcessCpuSharer(registry)
    sharer_scenario(python.sample, python.add_records, 11, registry)
    python.flush()

    ring = _native.Ring(1 << 12)
    collector = make_collector()
    collector.set_ring(ring)
    for info in registry.infos():
        if info.kind == "inference" and info.model is not None:
            collector.mark_inference(info.key)

    def add(batch: np.ndarray) -> None:
        ring.push_records(batch)
        collector.collect()  # drains: the records reach the sharer now, before the next sample

    sharer_scenario(collector.sample, add, 11, KeyRegistry())  # the same keys, in the same order
    want = python.take()
    got = collector.take_credits(True)
    assert set(got) == set(want) and len(want) >= 3
    assert got == pytest.approx(want, rel=1e-9)
    assert collector.take_credits() == {}


def test_the_thread_drains_a_half_full_ring_without_any_read():
    ring = _native.Ring(1024)
    collector = make_collector()
    collector.set_ring(ring)
    collector.start(60_000)  # a minute between passes: only a producer's wake-up drains
    try:
        # One at a time: producers look at every 128th position, so past 640 one of them saw the
        # ring half full, wherever the thread's first pass (at start) left the head.
        records = empty_records(828)
        records["key"] = 3
        records["wall_ns"] = 1_000
        for i in range(828):
            ring.push_records(records[i : i + 1])
        deadline = time.monotonic() + 30
        while len(ring) >= 512 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ring) < 512
        fold, _, (folded, _, _, _, passes) = collector.collect()
        assert folded == 828 and passes >= 1
        assert int(np.frombuffer(fold[1][0], np.int64).sum()) == 828
    finally:
        assert collector.stop()
    assert not collector.running
    assert ring.wake_fd == -1


def test_set_ring_drains_the_old_ring_whole_first():
    old, new = _native.Ring(256), _native.Ring(256)
    collector = make_collector()
    collector.set_ring(old)
    records = empty_records(200)
    records["key"] = 3
    records["wall_ns"] = 1_000
    old.push_records(records)
    collector.set_ring(new)
    assert len(old) == 0 and collector.ring is new
    new.push_records(records[:50])
    assert collector.collect()[2][0] == 250


def test_bad_arguments_name_what_is_accepted():
    below, next_start = _sub_bucket_tables(SCALE)
    with pytest.raises(ValueError, match="scale must be from 1 to 10"):
        _native.Collector(0, below, next_start)
    with pytest.raises(TypeError, match="below must be a 1-D int64 buffer"):
        _native.Collector(SCALE, below[:10], next_start)
    collector = make_collector()
    with pytest.raises(TypeError, match="expected a Ring or None"):
        collector.set_ring("ring")
    with pytest.raises(OverflowError, match="key must be below 32768"):
        collector.mark_inference(1 << 15)
    with pytest.raises(ValueError, match="timeout_millis must be from 0"):
        collector.collect(-1)
    with pytest.raises(TypeError, match="RECORD_DTYPE"):
        _native.Ring(8).push_records(np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="set_own_threads"):
        collector.set_own_threads([0], 0.0)


def test_own_threads_cpu_counts_their_clocks_and_the_ended():
    """The CPU the sharer leaves out: the registered threads' clocks, read when it samples, and
    what the ended ones used. A clock that cannot be read counts its last reading."""
    collector = make_collector()
    collector.set_own_threads((), 5.0)
    assert collector.own_cpu_seconds() == pytest.approx(5.0)
    clock = time.pthread_getcpuclockid(threading.get_ident())
    sum(range(200_000))  # some CPU of this thread's
    collector.set_own_threads((clock,), 1.0)
    used = time.thread_time()
    assert collector.own_cpu_seconds() >= 1.0 + used
    # 40 clocks: the first 32 are kept; ids that are no clock count nothing.
    collector.set_own_threads(tuple(range(100, 140)), 0.0)
    assert collector.own_cpu_seconds() == 0.0


def test_the_c_backend_never_touches_the_switch_interval(monkeypatch):
    """Records leave the ring without the GIL, so nothing needs the short switch interval: a busy
    producer beside the drainer, and reads, and the interval is never set."""
    if inferscope.backend() != "c":
        pytest.skip("the pure-Python drainer lowers it while it aggregates, by design")
    calls = []
    monkeypatch.setattr(sys, "setswitchinterval", lambda value: calls.append(value))
    inferscope.configure(drain_interval_millis=10, ring_capacity=4096, recorder="off")

    @inferscope.track_inference(model="native.switch")
    def predict() -> None:
        with inferscope.stage("step"):
            pass

    for _ in range(50_000):
        predict()
    snap = inferscope.snapshot()
    count = next(r.count for r in snap.rows if r.model == "native.switch" and r.stage is None)
    assert count + snap.dropped.get("ring_full", 0) >= 50_000
    assert calls == []


def test_a_forked_child_drains_with_a_thread_of_its_own():
    """The parent's native thread does not exist in the child: the child starts its own, which
    drains its half-full ring, and its aggregates hold its own calls only."""
    if inferscope.backend() != "c":
        pytest.skip("the native drainer runs on the C backend")
    result = run_python(
        """
import json, os, threading, time
import inferscope
from inferscope import _pipeline
inferscope.configure(drain_interval_millis=60000, ring_capacity=1024, recorder="off")
predict = inferscope.track_inference(model="fork")(lambda: 1)
stop = threading.Event()
def busy():
    while not stop.is_set():
        predict()
threads = [threading.Thread(target=busy) for _ in range(3)]
for t in threads:
    t.start()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    def fold_threads():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return names.count("inferscope-fold")
    for _ in range(828):  # past 640: a producer saw the ring half full, wherever the head was
        predict()
    deadline = time.monotonic() + 30
    while len(_pipeline.RUNTIME.ring) >= 512 and time.monotonic() < deadline:
        time.sleep(0.01)
    left = len(_pipeline.RUNTIME.ring)
    count = next(r.count for r in inferscope.snapshot().rows if r.model == "fork" and r.stage is None)
    from inferscope._process_cpu import OWN_THREADS
    clocks, ended = OWN_THREADS.clocks()
    readable = []
    for clock in clocks:
        try:
            readable.append(time.clock_gettime(clock) >= 0)
        except OSError:
            readable.append(False)
    own = _pipeline.DRAINER._collector.own_cpu_seconds()
    report = {"left": left, "count": count, "fold_threads": fold_threads(), "own_readable": readable,
              "own_ended": ended, "own_within_process": own <= time.process_time()}
    os.write(write, json.dumps(report).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
stop.set()
for t in threads:
    t.join()
child = json.loads(os.read(read, 4096))
print(json.dumps({"status": status, "child": child}))
"""
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["status"] == 0, report
    child = report["child"]
    assert child["left"] < 512, report
    assert child["count"] == 828, report
    assert child["fold_threads"] == 1, report
    # inferscope's own threads, whose CPU the sharer leaves out: the child's alone, from zero.
    assert all(child["own_readable"]) and child["own_ended"] == 0.0, report
    assert child["own_within_process"], report


def test_stop_leaves_no_thread_and_the_drainer_still_reads(monkeypatch):
    if inferscope.backend() != "c":
        pytest.skip("the native drainer runs on the C backend")
    inferscope.configure(recorder="off")
    predict = inferscope.track_inference(model="native.stop")(lambda: 1)
    predict()
    _pipeline.DRAINER.stop()

    def fold_threads() -> int:
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/comm") as comm:
                    names.append(comm.read().strip())
            except OSError:
                continue
        return names.count("inferscope-fold")

    assert fold_threads() == 0
    predict()
    count = next(r.count for r in inferscope.snapshot().rows if r.model == "native.stop" and r.stage is None)
    assert count == 2  # a read drains with no thread running
    _pipeline.DRAINER.start(100)
    assert fold_threads() == 1
    assert threading.active_count() >= 1


def test_an_idle_process_wakes_the_native_drainer_once_a_second_not_every_interval():
    """After 5 s with nothing to drain, the native thread passes once a second."""
    if inferscope.backend() != "c":
        pytest.skip("the native drainer runs on the C backend")
    result = run_python(
        """
import json, os, time
import inferscope
inferscope.configure(drain_interval_millis=10, recorder="off", canary=False)
inferscope.track_inference(model="idle")(lambda: 1)()

def fold_thread_sleeps():
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            if comm.read().strip() == "inferscope-fold":
                with open(f"/proc/self/task/{task}/status") as status:
                    return next(int(l.split()[1]) for l in status if l.startswith("voluntary_ctxt_switches"))

time.sleep(6.0)  # the call's records are drained, and nothing arrived for 5 s
before = fold_thread_sleeps()
time.sleep(3.0)
print(json.dumps({"sleeps": fold_thread_sleeps() - before}))
"""
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    sleeps = json.loads(result.stdout.strip().splitlines()[-1])["sleeps"]
    assert sleeps <= 6, sleeps  # every 10 ms would be ~300


def test_the_native_drainer_runs_below_the_serving_threads():
    """Its nice value is its creator's plus 10 (at most 19): on a busy machine the scheduler runs the
    serving threads first, and the few milliseconds a second it needs still come."""
    if inferscope.backend() != "c":
        pytest.skip("the native drainer runs on the C backend")
    result = run_python(
        """
import json, os, time
import inferscope
inferscope.track_inference(model="nice")(lambda: 1)()
time.sleep(0.3)
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/comm") as comm:
        if comm.read().strip() == "inferscope-fold":
            with open(f"/proc/self/task/{task}/stat") as stat:
                nice = int(stat.read().rsplit(")", 1)[1].split()[16])
print(json.dumps({"fold": nice, "process": os.getpriority(os.PRIO_PROCESS, 0)}))
"""
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fold"] == min(report["process"] + 10, 19), report
