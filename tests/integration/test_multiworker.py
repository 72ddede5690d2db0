"""One /metrics for every worker of real pre-fork servers: gunicorn and ``uvicorn --workers``.

A client calls the service from several threads while workers are recycled (gunicorn
``max_requests``, uvicorn ``--limit-max-requests``) and one is killed with SIGKILL. Then the
scraped count equals the calls made, less what was counted as dropped, less what the killed worker
recorded after its last publication; the merged quantiles agree with ``numpy.percentile`` over those
calls within the spacing of the exponential buckets; and the server leaves nothing in /dev/shm.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from tests.integration.conftest import free_port

from inferscope.export.multiworker import MergedSource, Publication, ServerId, user_root
from inferscope.histogram import SCALE

pytestmark = [pytest.mark.integration, pytest.mark.expensive]

READY_TIMEOUT_S = 120.0
PUBLISH_MILLIS = 200
#: The relative width of one exponential bucket: how far a quantile read from the buckets may be.
BUCKET_SPACING = 2 ** (2.0**-SCALE) - 1

APP = r"""
import os, time
from urllib.parse import parse_qs

import inferscope


@inferscope.track_inference(model="mw", version="1")
def predict(ms):
    started = time.perf_counter_ns()
    with inferscope.stage("preprocess"):
        pass
    with inferscope.stage("infer"):
        time.sleep(ms / 1000)
    return time.perf_counter_ns() - started


metrics_wsgi = inferscope.make_wsgi_app()
metrics_asgi = inferscope.make_asgi_app()


def handle(query):
    ms = float(parse_qs(query)["ms"][0])
    started = time.perf_counter_ns()
    inner = predict(ms)
    return f"{os.getpid()} {time.perf_counter_ns() - started} {inner}".encode()


def wsgi(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        return metrics_wsgi(environ, start_response)
    body = handle(environ["QUERY_STRING"])
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["path"] == "/metrics":
        return await metrics_asgi(scope, receive, send)
    body = handle(scope["query_string"].decode())
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
"""


@dataclass
class Calls:
    """What the client saw: per answered call, in the order the calls were answered, the worker's
    pid and the call's seconds timed by the service around the tracked function (outer) and inside
    it (inner). What inferscope times lies between the two: on a busy machine, a thread may wait
    for the GIL at a function call for milliseconds, on either side of inferscope's clock."""

    pids: list[int] = field(default_factory=list)
    outer: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    metrics_url: str
    log: Path

    @property
    def directory(self) -> Path:
        server = ServerId.of(self.process.pid)
        assert server is not None
        return user_root("/dev/shm") / server.name

    def workers(self) -> list[int]:
        """The server's worker processes now (the master's children; uvicorn also has a
        multiprocessing helper, which never serves a request and is never picked)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split()]


def _start(kind: str, workers: int, tmp_path: Path, max_requests: int) -> Server:
    (tmp_path / "mw_app.py").write_text(APP)
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "INFERSCOPE_MULTIPROCESS": "true",
        "INFERSCOPE_MULTIPROCESS_PUBLISH_MILLIS": str(PUBLISH_MILLIS),
        "INFERSCOPE_METRICS_EXPORTER": "prometheus",
        "INFERSCOPE_PROMETHEUS_PORT": str(metrics_port),
        "INFERSCOPE_RECORDER": "off",
        "INFERSCOPE_CANARY": "false",
        "PYTHONPATH": str(tmp_path),
    }
    if kind == "gunicorn":
        command = [
            sys.executable, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
            "--max-requests", str(max_requests), "--max-requests-jitter", str(max_requests // 2),
            "--graceful-timeout", "10", "mw_app:wsgi",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # the endpoint a worker serves
    else:
        command = [
            sys.executable, "-m", "uvicorn", "--workers", str(workers), "--host", "127.0.0.1",
            "--port", str(port), "--limit-max-requests", str(max_requests), "--lifespan", "off",
            "--timeout-graceful-shutdown", "10", "mw_app:asgi",
        ]  # fmt: skip
        metrics_url = f"http://127.0.0.1:{port}/metrics"  # the app mounted in the service
    log = tmp_path / f"{kind}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(process, port, metrics_url, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        # Ready when the service answers (its mounted /metrics: no call is made) and so does the
        # endpoint that the test scrapes.
        if _scrape(f"http://127.0.0.1:{port}/metrics") is not None and _scrape(metrics_url) is not None:
            return server
        time.sleep(0.2)
    raise AssertionError(f"{kind} did not start:\n{log.read_text()}")


def _call(port: int, ms: float) -> tuple[int, float, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/predict?ms={ms}", timeout=30) as response:
            pid, outer_ns, inner_ns = response.read().split()
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return int(pid), int(outer_ns) / 1e9, int(inner_ns) / 1e9


@dataclass
class Scrape:
    count: float
    total_seconds: float
    dropped: float
    worker_labels: set[str]


def _families(url: str) -> dict[str, Metric]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return {family.name: family for family in text_string_to_metric_families(response.read().decode())}


def _scrape(url: str) -> Scrape | None:
    try:
        families = _families(url)
    except OSError:
        return None  # between two workers serving the endpoint
    count = total = dropped = 0.0
    workers: set[str] = set()
    for family in families.values():
        for sample in family.samples:
            if family.name == "inferscope_inference_duration_seconds":
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
            elif family.name == "inferscope_sdk_records_dropped":
                dropped += sample.value
            elif family.name == "process_memory_usage_bytes":
                workers.add(sample.labels["worker"])
    return Scrape(count, total, dropped, workers)


def _settled_scrape(url: str, timeout_s: float = 30.0) -> Scrape:
    """A scrape once the counts stopped changing: every worker published its last calls."""
    deadline = time.monotonic() + timeout_s
    previous = None
    while time.monotonic() < deadline:
        time.sleep(3 * PUBLISH_MILLIS / 1e3)
        scrape = _scrape(url)
        if scrape is not None and previous is not None and scrape.count == previous.count:
            return scrape
        previous = scrape
    raise AssertionError(f"the scraped counts did not settle within {timeout_s} s")


def _published(directory: Path, pid: int) -> int:
    """How many calls worker ``pid`` had published (0 when none yet)."""
    for path in directory.glob("slot-*.data"):
        try:
            publication = Publication.decode(path.read_bytes())
        except (OSError, ValueError):
            continue
        if publication.pid == pid:
            return sum(d.duration.count for key, d in publication.series.items() if key[0] == "inference")
    return 0


@pytest.fixture
def stop_servers() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


@pytest.mark.parametrize(("kind", "workers"), [("gunicorn", 4), ("gunicorn", 8), ("uvicorn", 4)])
def test_one_scrape_counts_every_call_of_every_worker(
    kind: str, workers: int, tmp_path: Path, stop_servers: list[Server], seeded_random: random.Random
) -> None:
    pytest.importorskip(kind)
    calls_total = 60 * workers
    # Each worker is recycled about once during the run (gunicorn spreads it with a jitter).
    server = _start(kind, workers, tmp_path, max_requests=2 * calls_total // (3 * workers))
    stop_servers.append(server)
    directory = server.directory
    durations_ms = [seeded_random.uniform(2.0, 25.0) for _ in range(calls_total)]
    calls = Calls()
    scraped_during: list[float] = []
    scrape_lock = threading.Lock()
    killed: dict[str, int] = {}

    def one(index: int) -> None:
        answer = _call(server.port, durations_ms[index])
        with calls.lock:
            if answer is None:
                calls.failed += 1
                return
            calls.pids.append(answer[0])
            calls.outer.append(answer[1])
            calls.inner.append(answer[2])
            done = len(calls.pids)
        if done % (calls_total // 6) == 0:
            # One scrape at a time, kept in the order taken: two threads that scrape at once could
            # otherwise keep the later count first.
            with scrape_lock:
                scrape = _scrape(server.metrics_url)
                if scrape is not None:
                    scraped_during.append(scrape.count)
        if done == calls_total // 2 and not killed:
            # A worker that is serving calls right now: what it published so far stays counted.
            victim = next(pid for pid in reversed(calls.pids) if pid in server.workers())
            killed["published"] = _published(directory, victim)
            killed["pid"] = victim
            os.kill(victim, signal.SIGKILL)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(calls_total)))
    assert killed, "no worker was killed"
    made = len(calls.pids)
    victim_calls = [i for i, pid in enumerate(calls.pids) if pid == killed["pid"]]
    # The killed worker loses at most what it recorded after the publication read before the kill.
    bound = len(victim_calls) - killed["published"]

    final = _settled_scrape(server.metrics_url)
    lost = made - final.dropped - final.count
    # A call the killed worker finished but could not answer is counted, not made: at most one.
    assert -min(calls.failed, 1) <= lost <= bound, (made, final, bound, calls.failed)
    # Counters only grow, across recycled and killed workers.
    assert scraped_during == sorted(scraped_during)
    assert all(count <= final.count for count in scraped_during)
    # Process gauges by slot: a recycled worker reuses its slot, so the series do not grow.
    assert final.worker_labels and all(int(label) < 2 * workers for label in final.worker_labels)

    # The merged histogram (what the scrape renders) against every call that it counts: all but
    # the killed worker's last `lost` calls, which it never published.
    unpublished = set(victim_calls[len(victim_calls) - int(lost) :]) if lost > 0 else set()
    inner = np.array([s for i, s in enumerate(calls.inner) if i not in unpublished])
    outer = np.array([s for i, s in enumerate(calls.outer) if i not in unpublished])
    merged = MergedSource(lambda: [directory]).view()
    [duration] = [s.duration for s in merged.series if s.info.kind == "inference" and s.error_type is None]
    assert duration.count == final.count
    assert inner.sum() * (1 - 1e-9) <= final.total_seconds <= outer.sum() * (1 + 1e-9)
    for q in (0.5, 0.9, 0.99):
        # A quantile only grows when any value grows: inferscope's lies between the inner and the
        # outer one, each read from the buckets within their spacing.
        low, high = np.percentile(inner, q * 100), np.percentile(outer, q * 100)
        assert low * (1 - BUCKET_SPACING) <= duration.quantile(q) <= high * (1 + BUCKET_SPACING), (
            q,
            low,
            high,
        )

    # Workers were recycled during the run: some that answered calls are gone, though not killed.
    assert {pid for pid in calls.pids if pid != killed["pid"] and not Path(f"/proc/{pid}").exists()}

    if kind == "gunicorn":
        # The app mounted in the service serves the same merged view as the endpoint.
        mounted = _scrape(f"http://127.0.0.1:{server.port}/metrics")
        assert mounted is not None and mounted.count == final.count

    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    log = server.log.read_text()
    assert "not serving Prometheus" not in log and "publishing this worker" not in log, log
    assert "Traceback" not in log, log
    # The reaper removes the server's directory once the master is gone.
    deadline = time.monotonic() + 30
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not directory.exists(), sorted(p.name for p in directory.iterdir())


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _serve(
    command: list[str], cwd: Path, env: dict[str, str], log: Path, ready_url: str
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while _scrape(ready_url) is None:
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return process


def _stop_and_check_cleaned(process: subprocess.Popen[bytes], directory: Path, log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)
    text = log.read_text()
    assert "Traceback" not in text and "not serving Prometheus" not in text, text
    deadline = time.monotonic() + 30
    while directory.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not directory.exists()


def test_fastapi_prometheus_example_under_uvicorn_workers(tmp_path: Path, stop_servers: list[Server]) -> None:
    pytest.importorskip("fastapi")
    port = free_port()
    log = tmp_path / "uvicorn.log"
    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_prometheus:app",
        "--workers", "4", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    process = _serve(command, tmp_path, {"INFERSCOPE_RECORDER": "off"}, log, metrics_url)
    stop_servers.append(Server(process, port, metrics_url, log))
    directory = stop_servers[0].directory

    def post(i: int) -> bool:
        body = json.dumps({"features": [0.1 * i, 1.0, -0.2, 0.5]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return "fraud_probability" in json.loads(response.read())

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(post, range(40)))
    final = _settled_scrape(metrics_url)
    assert final.count == 40
    assert len(final.worker_labels) == 4  # every live worker's gauges, by slot
    families = _families(metrics_url)
    stages = {
        s.labels["inferscope_stage_name"]: s.value
        for s in families["inferscope_stage_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert stages == {"preprocess": 40, "infer": 40, "postprocess": 40}
    _stop_and_check_cleaned(process, directory, log)


def test_gunicorn_conf_example_master_serves_every_worker(tmp_path: Path, stop_servers: list[Server]) -> None:
    pytest.importorskip("gunicorn")
    (tmp_path / "service.py").write_text(APP)
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "gunicorn.log"
    command = [
        sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn.conf.py"), "--chdir", str(tmp_path),
        "service:wsgi",
    ]  # fmt: skip
    env = {
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "2",
        "MAX_REQUESTS": "20",  # every worker is recycled during the run
        "INFERSCOPE_PROMETHEUS_PORT": str(metrics_port),
        "INFERSCOPE_RECORDER": "off",
    }
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    process = _serve(command, tmp_path, env, log, metrics_url)
    stop_servers.append(Server(process, port, metrics_url, log))
    directory = stop_servers[0].directory
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _call(port, 1.0), range(80)))
    assert all(answer is not None for answer in answers)
    assert len({answer[0] for answer in answers if answer is not None}) > 2  # workers were recycled
    final = _settled_scrape(metrics_url)
    assert final.count == 80  # the master's endpoint: all workers, the recycled ones included
    assert final.worker_labels and all(int(label) < 4 for label in final.worker_labels)
    _stop_and_check_cleaned(process, directory, log)
