"""multiprocess: workers publish their aggregates to shared memory and one scrape merges them.

The merge and its bookkeeping (slots, retired workers, the reaper) run here with real forked
processes, in a subprocess each; tests/integration/test_multiworker.py runs real gunicorn and
uvicorn servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import Exemplar
from prometheus_client.parser import text_string_to_metric_families

import inferscope
from inferscope._keys import KeyRegistry
from inferscope._records import empty_records
from inferscope.aggregator import Aggregator
from inferscope.export.multiworker import Publication, ServerId, sweep_stale_servers, user_root
from inferscope.export.traces import ExemplarStore
from inferscope.histogram import Histogram

from .conftest import run_python
from .integration.conftest import free_port


def _view(durations_ns: list[int], *, model: str = "m", error: bool = False) -> Aggregator:
    registry = KeyRegistry()
    key = registry.inference_key(model, "1")
    stage = registry.stage_key(key, "infer")
    records = empty_records(2 * len(durations_ns))
    records["key"][: len(durations_ns)] = key
    records["key"][len(durations_ns) :] = stage
    records["wall_ns"] = durations_ns * 2
    records["cpu_ns"] = [d // 2 for d in durations_ns] * 2
    if error:
        records["error"][0] = registry.error_id(ValueError)
    aggregator = Aggregator(registry)
    aggregator.add(records)
    aggregator.set_dropped("ring_full", 3)
    return aggregator


def test_publication_round_trip_keeps_every_count_and_exemplar() -> None:
    aggregator = _view([1_000_000, 2_000_000, 30_000_000, 4_000_000], error=True)
    view = aggregator.view()
    exemplars = ExemplarStore()
    key = view.series[0].info.key
    exemplars.add(key, Exemplar({}, 0.03, 123, 0xABC, 0xDEF))
    signals = {"process.memory.usage": [(1234.0, {})]}
    published = Publication.of_view(view, exemplars=exemplars, signals=signals, slot=2, generation="g")

    decoded = Publication.decode(published.encode())

    assert (decoded.slot, decoded.generation, decoded.signals) == (2, "g", signals)
    assert decoded.dropped == {"ring_full": 3}
    again = decoded.view(store := ExemplarStore())
    assert len(again.series) == len(view.series) == 3
    by_identity = {(s.info.kind, s.error_type): s for s in again.series}
    for original in view.series:
        copy = by_identity[(original.info.kind, original.error_type)]
        assert copy.duration == original.duration
        assert copy.cpu == original.cpu
        assert copy.info.metric_attributes == original.info.metric_attributes
    success = by_identity[("inference", None)]
    assert [(e.trace_id, e.span_id) for e in store.since(success.info.key, 0)] == [(0xDEF, 0xABC)]


def test_merge_matches_by_what_a_key_stands_for_not_its_number() -> None:
    # Two workers interned their keys in different orders: the same model gets different numbers.
    first = _view([1_000_000, 5_000_000], model="a")
    registry = KeyRegistry()
    registry.inference_key("other")  # shifts every later key number
    second = Aggregator(registry)
    batch = empty_records(3)
    batch["key"] = registry.inference_key("a", "1")
    batch["wall_ns"] = [2_000_000, 3_000_000, 9_000_000]
    second.add(batch)

    total = Publication()
    for aggregator in (first, second):
        total.merge(Publication.decode(Publication.of_view(aggregator.view()).encode()))
    merged = {(s.info.kind, s.info.model): s for s in total.view().series}

    expected = Histogram.of([0.001, 0.005, 0.002, 0.003, 0.009])
    assert merged[("inference", "a")].duration == expected
    assert merged[("inference", "a")].duration.quantile(0.5) == pytest.approx(0.003, rel=2 ** (1 / 128) - 1)
    assert total.dropped == {"ring_full": 3}


def test_stale_directory_of_a_crashed_server_is_swept(tmp_path: Path) -> None:
    root = user_root(str(tmp_path))
    stale = root / ServerId(os.getpid(), 1).name  # this pid, another start time: a server long gone
    stale.mkdir(parents=True)
    (stale / "slot-0.data").write_bytes(b"left behind")
    (stale / "slot-0.lock").write_bytes(b"")
    live = root / ServerId.of(os.getpid()).name  # type: ignore[union-attr]
    live.mkdir()

    assert sweep_stale_servers(root) == 1

    assert not stale.exists()
    assert live.exists()


_FORKED_WORKERS = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

import inferscope
from inferscope._pipeline import collect_view, current_settings
from inferscope.export.multiworker import (
    PUBLISHER, MergedSource, Publication, server_directories, merged_signals,
)
from inferscope.export import spec
from inferscope.recorder import histogram_from_blob, histogram_to_blob

root, out = Path(sys.argv[1]), Path(sys.argv[2])


@inferscope.track_inference(model="m")
def predict(x):
    with inferscope.stage("infer"):
        return x


def record(n, threads=2):
    def run():
        for i in range(n):
            predict(i)
    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(60)


def own_duration():
    [series] = [s for s in collect_view().series if s.info.kind == "inference"]
    return series.duration


def published_count():
    try:
        publication = Publication.decode((PUBLISHER.directory / f"slot-{PUBLISHER.slot}.data").read_bytes())
    except (FileNotFoundError, TypeError):
        return -1
    return sum(d.duration.count for key, d in publication.series.items() if key[0] == "inference")


def worker(n, hang):
    record(n)
    (out / f"{os.getpid()}.bin").write_bytes(histogram_to_blob(own_duration()))
    deadline = time.monotonic() + 30
    while published_count() < 2 * n and time.monotonic() < deadline:
        time.sleep(0.02)
    (out / f"{os.getpid()}.slot").write_text(str(PUBLISHER.slot))
    if hang:
        time.sleep(120)
    sys.exit(0)


def master():
    inferscope.configure(
        multiprocess=True, multiprocess_dir=str(root), multiprocess_publish_millis=50,
        counters="minimal", recorder="off", canary=False,
    )
    stop = threading.Event()

    def background():
        while not stop.is_set():
            predict(-1)
            time.sleep(0.0005)

    recording = threading.Thread(target=background)
    recording.start()
    while PUBLISHER.slot is None:  # the master publishes before it forks, from its own slot
        time.sleep(0.01)
    pids = {}
    for n, hang in ((100, False), (200, True), (300, False)):
        pid = os.fork()
        if pid == 0:
            stop.set()  # the child has no recording thread: only the forking thread survives
            worker(n, hang)
        pids[n] = pid
    os.waitpid(pids[100], 0)
    os.waitpid(pids[300], 0)
    deadline = time.monotonic() + 30
    while not (out / f"{pids[200]}.slot").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pids[200], signal.SIGKILL)  # after its last publication: it counted all it recorded
    os.waitpid(pids[200], 0)
    pid = os.fork()
    if pid == 0:
        worker(50, False)  # takes a dead worker's slot
    os.waitpid(pid, 0)
    stop.set()
    recording.join(10)
    (out / f"{os.getpid()}.bin").write_bytes(histogram_to_blob(own_duration()))
    PUBLISHER.publish()
    source = MergedSource(server_directories(current_settings()))
    view = source.view()
    [merged] = [s.duration for s in view.series if s.info.kind == "inference"]
    expected = None
    for path in out.glob("*.bin"):
        histogram = histogram_from_blob(path.read_bytes())
        if expected is None:
            expected = histogram
        else:
            expected.merge(histogram)
    workers_dir = root / f"inferscope-{os.getuid()}" / server_directories(current_settings())()[1].name
    [memory] = [s for s in source.signals() if s.spec.name == "process.memory.usage"]
    print(json.dumps({
        "merged": merged.count,
        "expected": expected.count,
        "same_buckets": merged.counts[merged.counts.nonzero()[0]].tolist()
            == expected.counts[expected.counts.nonzero()[0]].tolist()
            and merged.min == expected.min and merged.max == expected.max,
        "slots": sorted(p.read_text() for p in out.glob("*.slot")),
        "files": sorted(os.listdir(workers_dir)),
        "memory_workers": [o.attributes["worker"] for o in memory.observe()],
        "master_slot": PUBLISHER.slot,
    }), flush=True)
    inferscope.shutdown()


pid = os.fork()
if pid == 0:
    master()
    os._exit(0)
os.waitpid(pid, 0)
"""


def _assert_quiet(stderr: str) -> None:
    """Nothing about publishing or serving went wrong (no warning, no error, no traceback)."""
    for line in stderr.splitlines():
        assert "Traceback" not in line, stderr
        assert "Prometheus" not in line and "publish" not in line and "slot" not in line, stderr


def _wait_until_removed(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists(), sorted(str(p) for p in path.rglob("*"))


def test_forked_workers_are_merged_with_recycled_and_killed_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "script.py"
    script.write_text(_FORKED_WORKERS)
    result = run_python(
        f"import runpy, sys; sys.argv = ['s', {str(tmp_path)!r}, {str(out)!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')",
        env={"INFERSCOPE_RECORDER": "off"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])

    # Every call of every worker, the killed one included, and of the master that forked them.
    assert report["merged"] == report["expected"] > 600
    assert report["same_buckets"]
    # The worker forked last took a dead worker's slot: three slots served four workers.
    assert set(report["slots"]) <= {"0", "1", "2"}
    assert len(report["slots"]) == 4
    assert "retired.data" in report["files"]
    assert "reaper.lock" in report["files"]  # held by the reaper while it watches the server
    # Gauges come from live workers only: here the master alone, in its own server's directory.
    assert report["memory_workers"] == [str(report["master_slot"])]
    _assert_quiet(result.stderr)
    # Once the processes that own them are gone, their reapers delete both directories.
    _wait_until_removed(user_root(str(tmp_path)))


_ENDPOINT_WORKERS = r"""
import os, signal, sys, time, urllib.request
from pathlib import Path

import inferscope

root, port = sys.argv[1], int(sys.argv[2])
out = Path(sys.argv[3])


@inferscope.track_inference(model="served")
def predict(x):
    return x


def worker(n):
    inferscope.configure(
        multiprocess=True, multiprocess_dir=root, multiprocess_publish_millis=50,
        metrics_exporters=["prometheus"], prometheus_port=port, recorder="off", canary=False,
    )
    for i in range(n):
        predict(i)
    (out / f"{os.getpid()}").write_text("serving" if inferscope.prometheus_port() else "standby")
    time.sleep(120)


pids = []
for n in (40, 60):
    pid = os.fork()
    if pid == 0:
        worker(n)
        os._exit(0)
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
sys.stdin.read()  # until the test is done
for pid in pids:
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
"""


def _scraped_count(port: int, accept: str = "text/plain") -> float | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "inferscope_inference_duration_seconds":
            return sum(s.value for s in family.samples if s.name.endswith("_count"))
    return None


# Processes racing for a port on a loaded machine: run once in CI, with the expensive checks.
@pytest.mark.expensive
def test_one_worker_serves_everyone_and_a_sibling_takes_over_when_it_dies(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    script = tmp_path / "script.py"
    script.write_text(_ENDPOINT_WORKERS)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(port), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INFERSCOPE_RECORDER": "off"},
    )
    try:
        pids = [int(p) for p in process.stdout.readline().split()]  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while not all((tmp_path / str(pid)).exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        roles = {pid: (tmp_path / str(pid)).read_text() for pid in pids}
        assert sorted(roles.values()) == ["serving", "standby"]
        deadline = time.monotonic() + 30
        while _scraped_count(port) != 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _scraped_count(port) == 100

        [serving] = [pid for pid, role in roles.items() if role == "serving"]
        os.kill(serving, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _scraped_count(port) != 100 and time.monotonic() < deadline:
            time.sleep(0.1)
        # The sibling took the port over, and what the killed worker published is still counted.
        assert _scraped_count(port) == 100
    finally:
        _, stderr = process.communicate("", timeout=60)
    # The worker that stood by was never in error.
    _assert_quiet(stderr)


_MASTER = r"""
import os, sys, time
from pathlib import Path

import inferscope

root, port, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
inferscope.configure(
    multiprocess=True, multiprocess_dir=root, multiprocess_publish_millis=50,
    metrics_exporters=["prometheus"], prometheus_port=port, recorder="off", canary=False,
)
assert inferscope.prometheus_port() == port  # the master serves its workers


@inferscope.track_inference(model="forked")
def predict(x):
    return x


for n in (30, 50):
    if os.fork() == 0:  # a worker: stands by for the endpoint that its parent serves
        for i in range(n):
            predict(i)
        (out / str(os.getpid())).write_text(str(n))
        time.sleep(120)
        os._exit(0)
time.sleep(120)
"""


# Processes racing for a port on a loaded machine: run once in CI, with the expensive checks.
@pytest.mark.expensive
def test_a_master_serves_its_forked_workers_and_a_worker_takes_over_when_it_dies(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    port = free_port()
    script = tmp_path / "master.py"
    script.write_text(_MASTER)
    out = tmp_path / "out"
    out.mkdir()
    master = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(port), str(out)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "INFERSCOPE_RECORDER": "off"},
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(list(out.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.name) for p in out.iterdir()]
        deadline = time.monotonic() + 30
        while _scraped_count(port) != 80 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _scraped_count(port) == 80

        master.kill()  # the workers closed their copies of its socket: one of them takes the port
        master.wait(30)
        deadline = time.monotonic() + 30
        while _scraped_count(port) != 80 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _scraped_count(port) == 80
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if master.poll() is None:
            master.kill()
        _, stderr = master.communicate(timeout=30)
    _assert_quiet(stderr)
    _wait_until_removed(user_root(str(tmp_path)))


def test_mounted_apps_serve_this_process_with_openmetrics_negotiation() -> None:
    from wsgiref.util import setup_testing_defaults

    @inferscope.track_inference(model="mounted")
    def predict(x: int) -> int:
        return x

    for i in range(7):
        predict(i)

    def wsgi_get(accept: str) -> tuple[str, str]:
        environ: dict[str, object] = {"HTTP_ACCEPT": accept}
        setup_testing_defaults(environ)
        found: list[str] = []

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            found.append(dict(headers)["Content-Type"])

        body = b"".join(inferscope.make_wsgi_app()(environ, start_response))  # type: ignore[arg-type]
        return found[0], body.decode()

    content_type, text = wsgi_get("text/plain")
    assert content_type.startswith("text/plain")
    assert 'inferscope_inference_duration_seconds_count{inferscope_model_name="mounted"} 7.0' in text
    content_type, text = wsgi_get("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")

    async def asgi_get() -> tuple[int, bytes]:
        messages: list[dict[str, object]] = []
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "query_string": b"",
            "headers": [(b"accept", b"application/openmetrics-text")],
        }

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            messages.append(message)

        await inferscope.make_asgi_app()(scope, receive, send)
        status = int(messages[0]["status"])  # type: ignore[call-overload]
        return status, b"".join(m.get("body", b"") for m in messages[1:])  # type: ignore[misc]

    status, body = asyncio.run(asgi_get())
    assert status == 200
    assert b'inferscope_inference_duration_seconds_count{inferscope_model_name="mounted"} 7' in body
    assert body.rstrip().endswith(b"# EOF")


def test_gauges_carry_the_worker_slot_and_regression_active_is_the_highest() -> None:
    from inferscope.export import spec
    from inferscope.export.multiworker import WorkersState, merged_signals

    def worker(slot: int, active: float, rss: float) -> Publication:
        return Publication(
            slot=slot,
            signals={
                "inferscope.regression.active": [(active, {"inferscope.model.name": "m"})],
                "process.memory.usage": [(rss, {})],
            },
        )

    state = WorkersState(Publication(), {0: worker(0, 0.0, 100.0), 3: worker(3, 1.0, 300.0)})
    entries = [spec.get("inferscope.regression.active"), spec.get("process.memory.usage")]
    active, memory = merged_signals(lambda: state, entries)

    assert [(o.value, o.attributes) for o in active.observe()] == [(1.0, {"inferscope.model.name": "m"})]
    assert sorted((o.attributes["worker"], o.value) for o in memory.observe()) == [("0", 100.0), ("3", 300.0)]


def test_the_merged_scrape_carries_the_workers_exemplars_in_openmetrics(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

    from inferscope.config import Settings
    from inferscope.export.multiworker import merged_collector

    for slot, (trace_id, seconds) in enumerate([(0xAAA1, 0.004), (0xBBB2, 0.3)]):
        aggregator = _view([int(seconds * 1e9)], model="ex")
        exemplars = ExemplarStore()
        exemplars.add(aggregator.view().series[0].info.key, Exemplar({}, seconds, 10 + slot, 0x51, trace_id))
        publication = Publication.of_view(
            aggregator.view(), exemplars=exemplars, slot=slot, generation=str(slot)
        )
        (tmp_path / f"slot-{slot}.data").write_bytes(publication.encode())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(merged_collector(Settings(recorder="off"), directories=lambda: [tmp_path]))

    openmetrics = generate_openmetrics(registry).decode()
    assert f'trace_id="{0xAAA1:032x}"' in openmetrics and f'trace_id="{0xBBB2:032x}"' in openmetrics
    text = generate_latest(registry).decode()
    labels = 'inferscope_model_name="ex",inferscope_model_version="1"'
    assert f"inferscope_inference_duration_seconds_count{{{labels}}} 2.0" in text
    assert "trace_id" not in text  # the Prometheus text format has no exemplars


def test_a_worker_whose_server_is_gone_stops_publishing_and_starts_no_reaper(tmp_path: Path) -> None:
    """A worker that outlives its server (a master killed with SIGKILL) and finds the shared
    directory gone does not make it again: before, it started one reaper per publication, each of
    which exited at once and stayed a zombie."""
    result = run_python(
        f"""
import json, subprocess, sys, time
import inferscope
from inferscope.export import multiworker

server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
gone = multiworker.ServerId.of(server.pid)
server.wait()
inferscope.configure(
    multiprocess=True, multiprocess_dir={str(tmp_path)!r}, multiprocess_publish_millis=60000,
    recorder="off", canary=False,
)
multiworker.PUBLISHER.server = gone  # this worker's server: gone
predict = inferscope.track_inference(model="orphan")(lambda: 1)
predict()
published = [multiworker.PUBLISHER.publish() for _ in range(5)]
print(json.dumps({{
    "published": published,
    "reapers": len(multiworker._reapers),
    "directory": multiworker.PUBLISHER.directory.exists(),
}}))
"""
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"published": [False] * 5, "reapers": 0, "directory": False}, report
    assert result.stderr.count("is gone; this worker stops publishing") == 1
