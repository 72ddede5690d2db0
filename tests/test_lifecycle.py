"""configure(), shutdown(), exit, fork and exact counts, each in a fresh interpreter.

Subprocesses keep a crash, a fork or an exit hook from touching the pytest process, and they
inherit INFERSCOPE_NO_EXTENSION, so CI proves each of these on both backends.
"""

from __future__ import annotations

import json
import multiprocessing
import sys

import pytest

import inferscope
from inferscope import ConfigError

from .conftest import run_python

PRELUDE = """
import json, os, sys, threading, time
import inferscope
from inferscope.testing import InMemoryMetricExporter

def exported_count(exporter, name="inferscope.inference.duration", **attrs):
    total = 0
    for point in exporter.latest_points(name):
        if all(point.attributes.get(k) == v for k, v in attrs.items()):
            total += point.count
    return total
"""


def run(code: str, **env: str) -> dict:
    result = run_python(PRELUDE + code, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


EXACT_COUNTS = """
exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter], export_interval_millis=60000)

@inferscope.track_inference(model="m")
def predict(x):
    with inferscope.stage("infer"):
        return x

def worker():
    for i in range(CALLS):
        predict(i)
        if PAUSE_EVERY and i % PAUSE_EVERY == 0:
            time.sleep(0.001)

threads = [threading.Thread(target=worker) for _ in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
inferscope.shutdown()
dropped = [p.value for p in exporter.latest_points("inferscope.sdk.records.dropped")
           if p.attributes.get("reason") == "ring_full"]
print(json.dumps({
    "inference": exported_count(exporter, **{"inferscope.model.name": "m"}),
    "stage": exported_count(exporter, "inferscope.stage.duration", **{"inferscope.stage.name": "infer"}),
    "dropped": dropped[0],
}))
"""


def test_exact_counts_at_a_moderate_rate_lose_nothing():
    # 4 threads, each pausing 1 ms every 20 calls: tens of thousands of calls per second.
    out = run("THREADS, CALLS, PAUSE_EVERY = 4, 5000, 20\n" + EXACT_COUNTS)
    assert out == {"inference": 20_000, "stage": 20_000, "dropped": 0}


def test_exact_counts_under_saturation_account_for_every_record():
    # Threads calling as fast as they can: whatever the ring cannot hold is dropped and counted,
    # and exported + dropped is exactly what was recorded.
    out = run("THREADS, CALLS, PAUSE_EVERY = 4, 25000, 0\n" + EXACT_COUNTS)
    assert out["inference"] + out["stage"] + out["dropped"] == 2 * 100_000
    assert out["inference"] > 0


def test_exit_flushes_everything_recorded_before_it():
    out = run_python(
        PRELUDE
        + """
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
inferscope.configure(metrics_exporters="console", export_interval_millis=60000)

@inferscope.track_inference(model="at-exit")
def predict():
    return 1

for _ in range(1234):
    predict()
"""
    )
    assert out.returncode == 0, out.stderr
    # The console exporter prints JSON per export; only the exit-time export can contain our points.
    assert '"inferscope.inference.duration"' in out.stdout
    assert '"count": 1234' in out.stdout


def test_small_ring_drops_are_counted_and_exported():
    out = run(
        """
exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter], ring_capacity=1024, drain_interval_millis=60000)
inferscope._pipeline.DRAINER.stop()  # nobody drains: the ring must fill, drop and count

@inferscope.track_inference(model="m")
def predict():
    return 1

for _ in range(5000):
    predict()
inferscope.shutdown()
dropped = [p.value for p in exporter.latest_points("inferscope.sdk.records.dropped")
           if p.attributes.get("reason") == "ring_full"]
print(json.dumps({"count": exported_count(exporter), "dropped": dropped}))
"""
    )
    assert out["dropped"] and out["dropped"][0] > 0
    assert out["count"] + out["dropped"][0] == 5000


def test_invalid_environment_at_import_logs_and_runs_uninstrumented():
    result = run_python(
        """
import inferscope, json
@inferscope.track_inference(model="m")
def predict(x):
    return x + 1
print(json.dumps({"result": predict(1), "rows": len(inferscope.snapshot().rows)}))
""",
        env={"INFERSCOPE_RING_CAPACITY": "1000"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"result": 2, "rows": 0}
    assert "inferscope is disabled" in result.stderr
    assert "ring_capacity (from INFERSCOPE_RING_CAPACITY): got '1000'" in result.stderr


def test_configure_rejects_bad_settings_and_keeps_the_current_ones():
    before = inferscope.current_settings()
    with pytest.raises(ConfigError, match=r"ring_capacity \(configure argument\): got 3"):
        inferscope.configure(ring_capacity=3)
    with pytest.raises(ConfigError, match="did you mean 'counters'"):
        inferscope.configure(counter="minimal")
    assert inferscope.current_settings() == before


def test_configure_is_idempotent_and_keeps_aggregates():
    out = run(
        """
@inferscope.track_inference(model="m")
def predict():
    return 1

for _ in range(10):
    predict()
for _ in range(3):
    inferscope.configure(counters="minimal", ring_capacity=2048)
for _ in range(5):
    predict()
inferscope.configure(ring_capacity=4096)  # a new ring: the old one is drained first
predict()
threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("inferscope"))
print(json.dumps({"count": inferscope.snapshot().row("m").count, "threads": threads}))
"""
    )
    assert out["count"] == 16
    assert out["threads"] == ["inferscope-drainer"]


def test_os_fork_child_exports_only_its_own_counts():
    if not hasattr(__import__("os"), "fork"):
        pytest.skip("no fork")
    out = run(
        """
exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter], export_interval_millis=60000)

@inferscope.track_inference(model="m")
def predict():
    with inferscope.stage("s"):
        return 1

for _ in range(100):
    predict()
read_fd, write_fd = os.pipe()
pid = os.fork()
if pid == 0:
    for _ in range(7):
        predict()
    snap = inferscope.snapshot()
    time.sleep(0.2)  # the child's exporters are rebuilt off the fork handler
    inferscope.shutdown()
    exported = exported_count(exporter, **{"inferscope.model.name": "m"})
    pids = {p.attributes.get("x") for p in []}
    resource_pids = sorted({
        rm.resource.attributes.get("process.pid")
        for data in exporter.get_finished_metrics() for rm in data.resource_metrics
        for sm in rm.scope_metrics for m in sm.metrics if m.name == "inferscope.inference.duration"
    })
    os.write(write_fd, json.dumps({
        "snapshot": snap.row("m").count, "stage": snap.row("m", "s").count,
        "exported": exported, "pids": resource_pids, "pid": os.getpid(),
    }).encode())
    os._exit(0)
os.close(write_fd)
os.waitpid(pid, 0)
child = json.loads(os.read(read_fd, 65536))
for _ in range(3):
    predict()
parent = inferscope.snapshot().row("m").count
inferscope.shutdown()
print(json.dumps({"child": child, "parent": parent, "parent_exported": exported_count(exporter)}))
"""
    )
    child = out["child"]
    assert (child["snapshot"], child["stage"], child["exported"]) == (7, 7, 7)
    assert child["pids"] == [child["pid"]]  # the child exports under its own process identity
    assert out["parent"] == 103
    assert out["parent_exported"] == 103


def _mp_worker(queue):
    import inferscope as isc

    @isc.track_inference(model="mp")
    def predict(x):
        return x

    for i in range(11):
        predict(i)
    queue.put((isc.snapshot().row("mp").count, isc.backend()))


# Python 3.12+ warns that fork() with threads running may deadlock; inferscope's own drainer thread
# is one of them, and handling exactly that is what this test proves.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_children_count_only_their_own(method):
    @inferscope.track_inference(model="mp")
    def predict(x):
        return x

    for i in range(5):
        predict(i)
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_mp_worker, args=(queue,))
    proc.start()
    count, backend = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert count == 11
    assert backend == inferscope.backend()
    assert inferscope.snapshot().row("mp").count == 5


def test_tracked_functions_pickle_by_name_for_spawn():
    import pickle

    from . import _picklable

    restored = pickle.loads(pickle.dumps(_picklable.predict))
    assert restored is _picklable.predict
    assert restored(2) == 4


def test_snapshot_reports_the_backend():
    assert inferscope.snapshot().backend == inferscope.backend()
    assert inferscope.backend() in ("c", "python")
    assert isinstance(inferscope.BACKEND_REASON, str) and inferscope.BACKEND_REASON


def test_no_extension_variable_selects_pure_python():
    result = run_python(
        "import inferscope; print(inferscope.backend())", env={"INFERSCOPE_NO_EXTENSION": "1"}
    )
    assert result.stdout.strip() == "python"
    assert sys.executable


def test_an_exporter_handed_over_survives_reconfiguration():
    out = run(
        """
exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter])

@inferscope.track_inference(model="m")
def predict():
    return 1

predict()
inferscope.configure(metric_exporters=[exporter], counters="minimal")  # flushes, does not shut it down
predict()
inferscope.shutdown()
print(json.dumps({"counts": [p.count for p in exporter.points("inferscope.inference.duration")]}))
"""
    )
    assert out["counts"] == [1, 2]


def test_draining_restores_the_switch_interval():
    before = sys.getswitchinterval()

    @inferscope.track_inference(model="si")
    def predict():
        return 1

    for _ in range(20_000):
        predict()
    inferscope.snapshot()  # drains, lowering the interval only while it aggregates
    assert sys.getswitchinterval() == before
    sys.setswitchinterval(0.0001)  # an application that runs with a shorter one keeps it
    try:
        predict()
        inferscope.snapshot()
        assert abs(sys.getswitchinterval() - 0.0001) < 1e-9
    finally:
        sys.setswitchinterval(before)


def test_a_batch_the_aggregator_rejects_is_counted_not_lost():
    from inferscope._runtime import RUNTIME

    before = inferscope.snapshot().dropped.get("aggregation_failed", 0)
    RUNTIME.record(2_000_000, None, 0, 0, 1000, -1)  # a key nobody interned: internal misuse
    snap = inferscope.snapshot()
    assert snap.dropped["aggregation_failed"] == before + 1


#: A minute between drains, and a small ring: only a producer's wake-up can have the ring drained
#: within the tests' waits. ``call(model)`` records one inference of ``model``; ``aggregated(model)``
#: is what the drainer has folded of it.
_WAKE_PRELUDE = """
from inferscope import _pipeline
inferscope.configure(drain_interval_millis=60000, ring_capacity=1024, recorder="off")
_models = {}

def call(model):
    if model not in _models:
        _models[model] = inferscope.track_inference(model=model)(lambda: 1)
    return _models[model]()

def aggregated(model):
    return sum(s.duration.count for s in _pipeline.AGGREGATOR.view().series if s.info.model == model)

def drained(pushed, at_least):
    # How many of the `pushed` records the drainer took out of the ring without any read.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and pushed - len(_pipeline.RUNTIME.ring) < at_least:
        time.sleep(0.01)
    return pushed - len(_pipeline.RUNTIME.ring)
"""


def test_a_ring_half_full_is_drained_long_before_the_interval_ends():
    report = run(
        _WAKE_PRELUDE
        + """
# More than half of the ring, well short of full. Producers look at every 128th position, so past
# 640 one of them saw it half full, wherever a drain at the drainer's start left the head.
for _ in range(828):
    call("wake")
# Nothing reads: only the drainer, woken by a producer, can take the records out of the ring.
left = 828 - drained(828, 512)

# Records in the ring, below half: the drainers sleep until the interval ends; they never poll.
# On the C backend that is the native drainer's thread too (named inferscope-fold).
drainer = next(t for t in threading.enumerate() if t.name == "inferscope-drainer")

def sleeps():
    total = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            if int(task) != drainer.native_id and comm.read().strip() != "inferscope-fold":
                continue
        with open(f"/proc/self/task/{task}/status") as status:
            total += next(int(l.split()[1]) for l in status if l.startswith("voluntary_ctxt_switches"))
    return total

for _ in range(10):
    call("wake")
before = sleeps()
time.sleep(1.0)
slept = sleeps() - before
snap = inferscope.snapshot()
print(json.dumps({
    "left": left,
    "dropped": snap.dropped.get("ring_full", 0),
    "sleeps": slept,
    "total": aggregated("wake"),
}))
"""
    )
    assert report["left"] < 512, report
    assert report["total"] == 838, report
    assert report["dropped"] == 0, report
    assert report["sleeps"] <= 2, report  # a poll every 10 ms would be ~100


def test_a_forked_child_wakes_its_own_drainer_not_its_parents():
    report = run(
        _WAKE_PRELUDE
        + """
call("parent")
parent_wake = _pipeline.RUNTIME.ring.wake_fd
parent_pipe = os.fstat(parent_wake).st_ino
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    for _ in range(828):
        call("child")
    done = drained(828, 512)
    own_pipe = os.fstat(_pipeline.RUNTIME.ring.wake_fd).st_ino
    os.write(write, json.dumps({"own_pipe": own_pipe, "aggregated": done}).encode())
    os._exit(0)
os.close(write)
_, status = os.waitpid(pid, 0)
child = json.loads(os.read(read, 4096))
print(json.dumps({"status": status, "parent_pipe": parent_pipe, "child": child,
                  "parent_wake": _pipeline.RUNTIME.ring.wake_fd}))
"""
    )
    assert report["status"] == 0, report
    assert report["parent_wake"] >= 0, report
    child = report["child"]
    assert child["own_pipe"] != report["parent_pipe"], report  # a pipe of its own
    assert child["aggregated"] >= 512, report  # woken through it: out of the ring, nothing read
