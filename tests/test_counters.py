"""Per-stage counters move the right way on real work, on both backends, and cost no descriptors.

Each test runs in a fresh interpreter so that the counter set it configures stays its own.
"""

from __future__ import annotations

import json

import pytest

import inferscope

from .conftest import run_python

PRELUDE = """
import json, mmap, os, threading, time
import inferscope
inferscope.configure(counters=COUNTERS)

@inferscope.track_inference(model="work")
def work():
    with inferscope.stage("spin"):
        end = time.thread_time() + 0.005  # 5 ms of CPU, however long a busy machine makes it take
        while time.thread_time() < end:
            pass
    with inferscope.stage("sleep"):
        time.sleep(0.005)
    # A fresh anonymous mapping each call (malloc would recycle freed memory): 16 MiB of new pages,
    # all written inside the stage, unmapped after it.
    block = mmap.mmap(-1, 16 * 1024 * 1024)
    with inferscope.stage("touch"):
        for i in range(0, len(block), 4096):
            block[i] = 1
    block.close()

for _ in range(RUNS):
    work()
snap = inferscope.snapshot()
print(json.dumps({stage: snap.row("work", stage).to_dict() for stage in ("spin", "sleep", "touch")}))
"""


def run_work(counters: str, runs: int = 2) -> dict:
    result = run_python(PRELUDE.replace("COUNTERS", repr(counters)).replace("RUNS", str(runs)))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def switches(row: dict) -> int:
    counters = row["counters"]
    return counters["context_switches.voluntary"] + counters["context_switches.involuntary"]


def test_full_counters_move_the_right_way():
    # The RSS is sampled on 1 entry in 16 at random: 128 runs leave a chance of (15/16)**128, about
    # 3e-4, that the touch stage is never sampled.
    runs = 128
    rows = run_work("full", runs=runs)
    spin, sleep, touch = rows["spin"], rows["sleep"], rows["touch"]
    # A busy loop is CPU time; a sleep is off-CPU time and a switch per call: voluntary, or
    # involuntary when the thread is preempted on its way to sleep (a busy machine does that).
    assert spin["cpu_seconds"] > 0.9 * runs * 0.005
    assert sleep["cpu_seconds"] < 0.2 * runs * 0.005
    assert switches(sleep) >= runs
    # Touching 16 MiB of new memory faults in ~4k pages per call and grows the RSS while it lasts.
    assert touch["counters"]["page_faults.minor"] >= runs * 3_000
    assert spin["counters"]["page_faults.minor"] < touch["counters"]["page_faults.minor"] / 10
    assert touch["counters"]["memory.rss.change"] > runs * 8 * 1024 * 1024
    assert abs(spin["counters"]["memory.rss.change"]) < runs * 2 * 1024 * 1024
    if inferscope.backend() == "c" and "cpu_migrations" in rows["spin"]["counters"]:
        # perf's task-clock supplies the CPU time when the full set reads perf events.
        assert spin["cpu_seconds"] <= spin["mean_seconds"] * runs * 1.05


def test_rusage_alone_by_name():
    rows = run_work("thread_cpu,rusage")
    assert switches(rows["sleep"]) >= 2
    assert "memory.rss.change" not in rows["touch"]["counters"]
    assert rows["touch"]["counters"]["page_faults.minor"] >= 2 * 3_000


def test_python_heap_only_when_asked_for():
    code = """
import json, inferscope, tracemalloc
inferscope.configure(counters="python_heap")
keep = []

@inferscope.track_inference(model="heap")
def grow():
    keep.append([object() for _ in range(100_000)])

grow()
print(json.dumps({"tracing": tracemalloc.is_tracing(),
                  "row": inferscope.snapshot().row("heap").to_dict()}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["tracing"] is True
    assert out["row"]["counters"]["memory.python_heap.change"] > 100_000 * 16


def test_default_set_has_no_extra_counters():
    rows = run_work("default", runs=1)
    assert rows["spin"]["counters"] == {}
    assert rows["spin"]["cpu_seconds"] > 0


@pytest.mark.c_only
def test_perf_events_by_name_on_the_c_backend():
    if inferscope.backend() != "c":
        with pytest.raises(inferscope.ConfigError, match="perf is not available here"):
            inferscope.configure(counters="perf")
        return
    mode, reason = inferscope.counters_status()["perf"]
    if mode == "none":
        pytest.skip(f"no perf events on this machine: {reason}")
    rows = run_work("perf", runs=2)
    spin = rows["spin"]
    assert spin["cpu_seconds"] > 0.5 * 2 * 0.005  # the task-clock
    if mode == "hardware":
        assert spin["counters"]["instructions"] > 1_000_000
    else:
        assert rows["touch"]["counters"]["perf.page_faults"] >= 2 * 3_000


def test_threads_release_their_counter_descriptors():
    code = """
import json, os, threading, time, inferscope
inferscope.configure(counters="full", recorder="off")  # its SQLite files are not per thread

@inferscope.track_inference(model="t")
def work():
    with inferscope.stage("s"):
        return 1

def run():
    work()

def open_fds():
    return len(os.listdir("/proc/self/fd"))

work()
before = open_fds()
for batch in range(100):
    threads = [threading.Thread(target=run) for _ in range(100)]
    for t in threads: t.start()
    for t in threads: t.join()
# Thread.join() returns before the OS thread has run its exit handlers; give them a moment.
for _ in range(100):
    after = open_fds()
    if after - before <= 2:
        break
    time.sleep(0.02)
print(json.dumps({"before": before, "after": after,
                  "count": inferscope.snapshot().row("t").count}))
"""
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["count"] == 10_001
    assert out["after"] - out["before"] <= 2  # 10,000 threads came and went; their perf fds too


def test_counters_reset_after_fork():
    code = """
import json, os, inferscope
inferscope.configure(counters="full")

@inferscope.track_inference(model="f")
def work():
    block = bytearray(8 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1

work()
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    work()
    row = inferscope.snapshot().row("f").to_dict()
    os.write(w, json.dumps(row).encode())
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(r, 1 << 20))
print(json.dumps({"child": child, "parent": inferscope.snapshot().row("f").to_dict()}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["child"]["count"] == 1 and out["parent"]["count"] == 1
    # The child counts its own faults from its own descriptors, not the parent's thread.
    assert out["child"]["counters"]["page_faults.minor"] >= 1500
    assert out["child"]["cpu_seconds"] > 0


def test_counters_are_exported_under_their_metric_names():
    code = """
import json, time, inferscope
from inferscope.testing import InMemoryMetricExporter
exporter = InMemoryMetricExporter()
inferscope.configure(counters="full", metric_exporters=[exporter])

@inferscope.track_inference(model="x")
def work():
    with inferscope.stage("sleep"):
        time.sleep(0.005)
    with inferscope.stage("touch"):
        block = bytearray(4 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1

for _ in range(5):
    work()
inferscope.shutdown()
found = {}
for name in ("inferscope.stage.context_switches", "inferscope.stage.page_faults",
             "inferscope.inference.context_switches"):
    for point in exporter.latest_points(name):
        stage = point.attributes.get("inferscope.stage.name")
        found[f"{name}/{point.attributes['type']}/{stage}"] = point.value
print(json.dumps(found))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["inferscope.stage.context_switches/voluntary/sleep"] >= 5
    assert found["inferscope.stage.page_faults/minor/touch"] >= 1000  # at least the first 4 MiB touched
    # A counter that never moved is not exported, as the OTel SDK creates no point without a measurement.
    assert "inferscope.stage.page_faults/major/sleep" not in found
    assert found["inferscope.inference.context_switches/voluntary/None"] >= 5
