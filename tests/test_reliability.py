"""Faults an operator's service meets: forks while threads record, collectors that are down or never
answer, ports that are taken, producers that never pause, credentials in endpoints.

Each scenario runs in a fresh interpreter (a hang or a crash fails the test instead of pytest), on
the backend under test: the suite runs once per backend (``INFERSCOPE_NO_EXTENSION=1`` for pure
Python), as .ci/run does. Nothing here asserts a duration: a scenario that used to hang must end,
and a bounded one must end before a timeout many times its budget.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

import inferscope
from inferscope import ConfigError, _selflog
from inferscope._selflog import ErrorCounter, RateLimitedLog, redact

from .conftest import run_python

#: The backend under test, for the scenarios that depend on it (each runs in a fresh interpreter).
BACKEND_ENVS = [
    pytest.param({"INFERSCOPE_NO_EXTENSION": ""}, id="c")
    if inferscope.backend() == "c"
    else pytest.param({"INFERSCOPE_NO_EXTENSION": "1"}, id="python")
]

PRELUDE = """
import json, logging, os, signal, socket, sys, threading, time
import inferscope
from inferscope.testing import InMemoryMetricExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

@inferscope.track_inference(model="m")
def predict():
    with inferscope.stage("s"):
        return 1

def result(**values):
    # A line of its own, whatever an exporter printed to stdout meanwhile.
    os.write(1, ("\\nRESULT " + json.dumps(values) + "\\n").encode())
"""


def scenario(code: str, *, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[dict, str]:
    """Run PRELUDE + code; returns the RESULT it printed and its stderr."""
    done = run_python(PRELUDE + textwrap.dedent(code), env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), done.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that another socket holds, listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def silent_collector() -> Iterator[int]:
    """A collector that accepts connections and never answers (a hung backend)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    sock.close()


# --- 1. fork under recording threads ---------------------------------------------------------------

FORKS = """
import os, signal
EXPORTER, TRACING, FORKS, CLOSED = {exporter!r}, {tracing!r}, {forks}, {closed}
settings = dict(export_interval_millis=200, export_timeout_millis=200, drain_interval_millis=5)
if EXPORTER == "memory":
    settings["metric_exporters"] = [InMemoryMetricExporter()]
    if TRACING:
        settings["span_exporters"] = [InMemorySpanExporter()]
elif EXPORTER in ("grpc", "http/protobuf"):
    settings.update(metrics_exporters="otlp", otlp_endpoint=f"http://127.0.0.1:{{CLOSED}}",
                    otlp_protocol=EXPORTER, traces_exporters="otlp" if TRACING else "none")
elif EXPORTER == "console":
    settings.update(metrics_exporters="console", traces_exporters="console" if TRACING else "none")
elif EXPORTER == "prometheus":
    settings.update(metrics_exporters="prometheus", prometheus_port=0)
    if TRACING:
        settings["span_exporters"] = [InMemorySpanExporter()]
if TRACING:
    settings["trace_sampler"] = "always_on"
inferscope.configure(**settings)

stop = threading.Event()
def work():
    while not stop.is_set():
        predict()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
hung = failed = 0
codes = []
for _ in range(FORKS):
    pid = os.fork()
    if pid == 0:
        for _ in range(3):
            predict()
        try:
            count = inferscope.snapshot().row("m").count
        except BaseException as exc:
            os.write(2, f"child: {{exc!r}}\\n".encode())
            os._exit(4)
        os._exit(0 if count == 3 else 3)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            failed += code != 0
            codes += [code] if code else []
            break
        if time.monotonic() > deadline:  # hung: inside fork(), before the child's code ran
            hung += 1
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
stop.set()
for t in threads:
    t.join()
result(hung=hung, failed=failed, codes=codes)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", BACKEND_ENVS)
@pytest.mark.parametrize(
    ("exporter", "tracing", "forks"),
    [
        ("memory", True, 100),
        ("memory", False, 100),
        ("grpc", True, 30),
        ("http/protobuf", True, 30),
        ("console", True, 30),
        ("prometheus", False, 30),
    ],
)
def test_children_forked_under_recording_threads_all_run(backend, exporter, tracing, forks) -> None:
    # Before: 2 to 7 children in 100 hung in the fork handler, on the exemplars' lock that the
    # drainer held when the main thread forked.
    code = FORKS.format(exporter=exporter, tracing=tracing, forks=forks, closed=free_port())
    out, stderr = scenario(code, env=backend, timeout=600)
    # codes: the failed children's exit statuses (3: a wrong count, 4: snapshot() raised, -N: signal N)
    assert out == {"hung": 0, "failed": 0, "codes": []}, stderr[-3000:]


GRPC_FORK = """
from inferscope import _pipeline
from inferscope.export.grpc_fork import GRPC_CALLS
inferscope.configure(
    otlp_endpoint=f"http://127.0.0.1:{port}", otlp_protocol="grpc", trace_sampler="always_on",
    export_interval_millis=3_600_000, export_timeout_millis=120_000, shutdown_timeout_millis=2000,
)

def state(exports=None, queues=None):
    exports = exports or _pipeline._exports
    queues = queues if queues is not None else exports.traces.queues if exports.traces else []
    return dict(
        usable=GRPC_CALLS.usable,
        metrics=[type(w.delegate).__name__ for w in exports.own_wrappers],
        spans=[type(q.exporter).__name__ for q in queues],
        failed_exports=sum(w.failed_exports for w in exports.own_wrappers),
        spans_failed=sum(q.failed for q in queues),
    )

def fork(body):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            report = body()
        except BaseException as exc:
            report = dict(error=repr(exc))
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        report = json.loads(pipe.read() or "{{}}")
    _, status = os.waitpid(pid, 0)
    report["code"] = os.waitstatus_to_exitcode(status)
    return report

def exported_in_child():
    for _ in range(3):
        predict()
    exports = _pipeline._exports
    queues = list(exports.traces.queues)
    # One last export of each signal: both fail at once (a budget ample on a loaded machine).
    inferscope.shutdown(timeout_millis=60_000)
    return state(exports, queues)

# Nothing in flight (no span yet, no export due for an hour): the child's gRPC is usable.
idle = fork(state)
# An export in flight to a collector that never answers (for 120 s, longer than this script):
# the fork cannot wait it out.
threading.Thread(
    target=_pipeline._exports.meter_provider.force_flush, kwargs=dict(timeout_millis=120_000), daemon=True
).start()
deadline = time.monotonic() + 30
while GRPC_CALLS.active == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
in_flight = GRPC_CALLS.active
busy = fork(exported_in_child)
# Its own children inherit a gRPC that cannot be used.
grandchild = fork(lambda: fork(state))
result(idle=idle, in_flight=in_flight, busy=busy, grandchild=grandchild, parent=state())
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("backend", BACKEND_ENVS)
def test_a_child_forked_during_a_grpc_export_never_uses_grpc_and_counts_what_it_drops(
    backend, silent_collector
) -> None:
    out, stderr = scenario(GRPC_FORK.format(port=silent_collector), env=backend, timeout=300)
    said = f"{out}\n{stderr[-3000:]}"  # a string, so that pytest prints it whole
    gated = {"usable": True, "metrics": ["OTLPMetricExporter"], "spans": ["OTLPSpanExporter"]}
    assert out["idle"] == {**gated, "failed_exports": 0, "spans_failed": 0, "code": 0}, said
    assert out["in_flight"] == 1, said
    # The child made no channel: every export failed, and was counted.
    busy = out["busy"]
    assert busy["usable"] is False and busy["code"] == 0, said
    assert busy["metrics"] == ["UnusableMetricExporter"] and busy["spans"] == ["UnusableSpanExporter"], said
    assert busy["failed_exports"] >= 1 and busy["spans_failed"] >= 3, said
    grandchild = out["grandchild"]
    assert grandchild["code"] == 0 and grandchild["usable"] is False, said
    assert grandchild["metrics"] == ["UnusableMetricExporter"], said
    # The parent's gRPC carries on.
    assert {k: out["parent"][k] for k in gated} == gated, said
    # One line in each process that cannot use gRPC says why, and what to do; the others say nothing.
    assert stderr.count("was forked while an OTLP/gRPC export was in flight") == 3, said
    assert "post_fork" in stderr and "http/protobuf" in stderr


# --- 2. one shutdown budget, a dead collector ------------------------------------------------------

DEAD_COLLECTOR = """
PROTOCOL, PORT, EXPLICIT = {protocol!r}, {port}, {explicit!r}
inferscope.configure(
    otlp_endpoint=f"http://127.0.0.1:{{PORT}}", otlp_protocol=PROTOCOL, trace_sampler="always_on",
    export_interval_millis=200, export_timeout_millis=120_000, shutdown_timeout_millis=1000,
)
for _ in range(2000):
    predict()
time.sleep(1.0)  # a few failed pushes and span batches
if EXPLICIT == "configure":  # away from the dead collector: the old pipeline gets the budget
    inferscope.configure(metrics_exporters="none", traces_exporters="none", shutdown_timeout_millis=1000)
    alive = sorted(t.name for t in threading.enumerate() if t.name == "inferscope-spans")
    result(after_shutdown=alive)
elif EXPLICIT:
    inferscope.shutdown()
    alive = sorted(t.name for t in threading.enumerate() if t.name == "inferscope-spans")
    result(after_shutdown=alive)
else:
    result(exiting=True)  # exit shuts down within shutdown_timeout_millis
"""


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("collector", ["closed", "silent"])
@pytest.mark.parametrize("explicit", [True, False, "configure"], ids=["shutdown", "exit", "configure"])
def test_shutdown_with_a_dead_collector_keeps_its_budget(
    protocol, collector, explicit, silent_collector
) -> None:
    # Before: 35 s and more for a 5 s budget (the span processor's flush and join had no timeout);
    # here 1 s against exporters allowed 120 s per push: without the budget this cannot finish
    # within the subprocess timeout.
    port = free_port() if collector == "closed" else silent_collector
    code = DEAD_COLLECTOR.format(protocol=protocol, port=port, explicit=explicit)
    out, stderr = scenario(code, timeout=60)
    if explicit and not (collector == "silent" and protocol == "http/protobuf"):
        # The exporter's shutdown cancels its call in flight; only an HTTP request to a backend
        # that never answers runs on to its own timeout, in a daemon thread.
        assert out["after_shutdown"] == []
    # A dead collector: one line per exporter (metrics, spans) per minute, not one per retry.
    mentions = [line for line in stderr.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(mentions) <= 2, stderr[-3000:]


def test_ctrl_c_during_the_exit_shutdown_ends_it_at_once(silent_collector) -> None:
    code = PRELUDE + textwrap.dedent(
        f"""
        inferscope.configure(
            otlp_endpoint="http://127.0.0.1:{silent_collector}", trace_sampler="always_on",
            export_timeout_millis=120_000, shutdown_timeout_millis=120_000,
        )
        for _ in range(100):
            predict()
        print("exiting", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "exiting"
        time.sleep(1.0)  # inside the exit-time shutdown, waiting on the silent collector
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)  # the budget is 120 s: only Ctrl-C ends it
    finally:
        proc.kill()
    assert "shutdown interrupted" in stderr, stderr[-3000:]


# --- 3. configure() is atomic -----------------------------------------------------------------------

ATOMIC = """
exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter], export_interval_millis=60_000)
for _ in range(100):
    predict()
errors = []
for bad in ({BAD}):
    try:
        inferscope.configure(metrics_exporters="prometheus", **bad)
    except inferscope.ConfigError as exc:
        errors.append([exc.setting, str(exc)])
    except Exception as exc:
        errors.append(["raw", repr(exc)])
for _ in range(20_000):
    predict()
drainer = [t.name for t in threading.enumerate() if t.name == "inferscope-drainer"]
count = inferscope.snapshot().row("m").count
inferscope.shutdown()
exported = sum(p.count for p in exporter.latest_points("inferscope.inference.duration"))
result(errors=errors, drainer=drainer, count=count, exported=exported,
       settings=inferscope.current_settings().metrics_exporters)
"""


@pytest.mark.parametrize("backend", BACKEND_ENVS)
def test_a_configure_that_cannot_be_served_keeps_the_running_pipeline(backend, busy_port) -> None:
    # Before: a raw OSError/gaierror, the running exporter shut down and the drainer gone, and
    # most of the following records dropped.
    bad = f'{{"prometheus_port": {busy_port}}}, {{"prometheus_host": "no-such-host.invalid"}}'
    out, _ = scenario(ATOMIC.replace("{BAD}", bad), env=backend)
    assert [setting for setting, _ in out["errors"]] == ["prometheus_port", "prometheus_host"]
    assert str(busy_port) in out["errors"][0][1]
    assert "no-such-host.invalid" in out["errors"][1][1]
    assert out["drainer"] == ["inferscope-drainer"]
    assert out["count"] == out["exported"] == 20_100
    assert out["settings"] == []  # the settings in force are the previous ones


def test_configure_on_the_same_prometheus_port_keeps_serving_it() -> None:
    port = free_port()
    out, _ = scenario(
        f"""
        import urllib.request
        inferscope.configure(metrics_exporters="prometheus", prometheus_port={port})
        predict()
        inferscope.configure(metrics_exporters="prometheus", prometheus_port={port}, counters="minimal")
        predict()
        body = urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode()
        line = [l for l in body.splitlines() if l.startswith("inferscope_inference_duration_seconds_count")]
        result(port=inferscope.prometheus_port(), line=line)
        """
    )
    assert out["port"] == port
    assert len(out["line"]) == 1 and out["line"][0].endswith(" 2.0")


# --- 4. a Prometheus port that is taken costs that exporter only -----------------------------------

BUSY_PORT_WORKER = """
for _ in range(CALLS):
    predict()
result(count=inferscope.snapshot().row("m").count, port=inferscope.prometheus_port())
"""


@pytest.mark.parametrize("backend", BACKEND_ENVS)
def test_a_taken_prometheus_port_costs_that_exporter_only(backend, busy_port) -> None:
    env = {
        **backend,
        "INFERSCOPE_METRICS_EXPORTER": "prometheus,console",
        "INFERSCOPE_PROMETHEUS_PORT": str(busy_port),
        "INFERSCOPE_EXPORT_INTERVAL_MILLIS": "600000",
    }
    done = run_python(PRELUDE + "CALLS = 500\n" + BUSY_PORT_WORKER, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.split("RESULT ")[1].splitlines()[0]) == {"count": 500, "port": None}
    assert '"count": 500' in done.stdout  # the console exporter's export at exit
    errors = [line for line in done.stderr.splitlines() if "prometheus" in line.lower()]
    assert len(errors) == 1, done.stderr
    assert "prometheus_port" in errors[0] and str(busy_port) in errors[0]
    assert "Traceback" not in done.stderr


def test_pre_fork_workers_sharing_one_prometheus_port_all_record_and_export() -> None:
    # Several worker processes configured alike from the environment, as a pre-fork server
    # starts them: one serves the port, every one records and pushes its own counts.
    env = {
        **os.environ,
        "INFERSCOPE_METRICS_EXPORTER": "prometheus,console",
        "INFERSCOPE_PROMETHEUS_PORT": str(free_port()),
        "INFERSCOPE_EXPORT_INTERVAL_MILLIS": "600000",
    }
    code = PRELUDE + "time.sleep(0.5)\nCALLS = 300\n" + BUSY_PORT_WORKER + "time.sleep(1.0)\n"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    results = []
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr
        results.append(json.loads(stdout.split("RESULT ")[1].splitlines()[0]))
        assert '"count": 300' in stdout, stdout[-2000:]
    assert [r["count"] for r in results] == [300, 300, 300]
    assert sum(r["port"] is not None for r in results) == 1


# --- 5. reads return under producers that never pause -----------------------------------------------

FREE_RUNNING = """
def produce():
    while True:
        predict()
for _ in range(8):  # more than the drainer keeps up with: the ring refills while it drains
    threading.Thread(target=produce, daemon=True).start()
time.sleep(0.5)
reads = 0
for _ in range(10):
    inferscope.snapshot()
    reads += 1
inferscope.configure(counters="minimal")  # drains the old pipeline's ring, then rebuilds
inferscope.snapshot()
result(reads=reads, configured=inferscope.current_settings().counters)
os._exit(0)  # the producers never stop
"""


@pytest.mark.parametrize("backend", BACKEND_ENVS)
def test_reads_return_while_producers_never_pause(backend) -> None:
    # Before: snapshot() held the drainer for as long as the producers ran, and configure() never
    # returned on the pure-Python backend.
    out, _ = scenario(FREE_RUNNING, env=backend, timeout=300)
    assert out == {"reads": 10, "configured": "minimal"}


# --- smaller defects --------------------------------------------------------------------------------


def test_importing_starts_no_thread_until_the_first_tracked_function() -> None:
    done = run_python(
        """
        import threading
        import inferscope
        before = threading.active_count()
        @inferscope.track_inference(model="m")
        def predict():
            return 1
        names = sorted(t.name for t in threading.enumerate())
        print(before, "inferscope-drainer" in names)
        """,
        env={"INFERSCOPE_METRICS_EXPORTER": "console", "INFERSCOPE_EXPORT_INTERVAL_MILLIS": "600000"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["1", "True"]


def test_a_pipeline_shut_down_before_it_started_stays_stopped() -> None:
    done = run_python(
        """
        import threading
        import inferscope
        inferscope.shutdown()
        @inferscope.track_inference(model="m")
        def predict():
            return 1
        predict()
        print(sorted(t.name for t in threading.enumerate()), len(inferscope.snapshot().rows))
        """,
        env={"INFERSCOPE_METRICS_EXPORTER": "console"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['MainThread'] 0"


def test_credentials_never_reach_an_error_message_or_a_log_line() -> None:
    with pytest.raises(ConfigError) as caught:
        from inferscope.config import load_settings

        load_settings({"otlp_endpoint": "http://user:hunter2@a b:4317"}, environ={})
    assert "hunter2" not in str(caught.value)
    assert "user:***@" in str(caught.value)
    port = free_port()
    _, stderr = scenario(
        f"""
        inferscope.configure(otlp_endpoint="http://svc:hunter2@127.0.0.1:{port}", export_interval_millis=200)
        for _ in range(10):
            predict()
        time.sleep(1.0)
        result(done=True)
        """
    )
    assert "127.0.0.1" in stderr  # the failure is logged ...
    assert "hunter2" not in stderr  # ... without the password


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("https://svc:hunter2@otel:4318/v1/traces", "https://svc:***@otel:4318/v1/traces"),
        ("grpc://t0ken@otel:4317", "grpc://***@otel:4317"),
        ("http://u:p@ss@otel:4317", "http://u:***@otel:4317"),
        ("https://otel/v1?api_key=abc&x=1", "https://otel/v1?api_key=***&x=1"),
        ("Authorization=Bearer abc123,x=1", "Authorization=***,x=1"),
        ("ops@example.com reached http://otel:4317", "ops@example.com reached http://otel:4317"),
        ("errors resolving svc:hunter2@127.0.0.1:4317", "errors resolving svc:***@127.0.0.1:4317"),
    ],
)
def test_redact(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_the_error_counter_is_exact_from_many_threads() -> None:
    counter = ErrorCounter()

    def hammer() -> None:
        for _ in range(20_000):
            counter.add()

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value == 160_000


def test_the_log_limiter_logs_each_kind_once_per_interval(caplog) -> None:
    now = [100.0]
    log = RateLimitedLog(interval_seconds=60.0, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="inferscope"):
        assert log.warning("inferscope: collector down") is True
        assert log.warning("inferscope: collector down") is False
        assert log.warning("inferscope: another failure") is True
        now[0] += 60.0
        assert log.warning("inferscope: collector down") is True
    assert [r.getMessage() for r in caplog.records] == [
        "inferscope: collector down",
        "inferscope: another failure",
        "inferscope: collector down",
    ]


def test_report_error_counts_every_failure_and_logs_once(caplog) -> None:
    before = _selflog.ERRORS.value
    with caplog.at_level("ERROR", logger="inferscope"):
        for _ in range(5):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                _selflog.report_error("inferscope: a test failure, reported five times")
    assert _selflog.ERRORS.value == before + 5
    assert len([r for r in caplog.records if "reported five times" in r.getMessage()]) <= 1


# --- the span queue ---------------------------------------------------------------------------------


class _BlockingSpanExporter:
    """A span exporter whose export waits until it is shut down, as one waiting on a silent collector."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.exported: list[object] = []

    def export(self, spans):  # type: ignore[no-untyped-def]
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.stopped.wait(600)
        self.exported.extend(spans)
        return SpanExportResult.FAILURE if self.stopped.is_set() else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.stopped.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _span(name: str):  # type: ignore[no-untyped-def]
    from opentelemetry.sdk.trace import ReadableSpan

    return ReadableSpan(name=name)


def test_the_span_queue_is_bounded_and_counts_what_it_drops() -> None:
    from inferscope.export.traces import BoundedBatchSpanProcessor

    exporter = _BlockingSpanExporter()
    queue = BoundedBatchSpanProcessor(exporter, max_queue_size=8, max_export_batch_size=4)
    for i in range(30):
        queue.on_end(_span(f"s{i}"))
    assert queue.force_flush(timeout_millis=50) is False  # the exporter is stuck: flush gives up
    queue.shutdown(timeout_millis=200)  # returns although the export never would on its own
    assert exporter.stopped.is_set()
    # Every span is accounted for: exported (here: handed over, then failed) or dropped.
    assert queue.dropped + queue.failed == 30
    assert queue.dropped >= 30 - 8 - 4
    queue.on_end(_span("after"))  # after shutdown: dropped, never queued
    assert queue.dropped + queue.failed == 31


def test_the_span_queue_exports_everything_on_flush_and_reads_the_bsp_variables() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inferscope.export.traces import BoundedBatchSpanProcessor

    exporter = InMemorySpanExporter()
    queue = BoundedBatchSpanProcessor.from_environment(
        exporter, {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3", "OTEL_BSP_SCHEDULE_DELAY": "x"}
    )
    assert queue._thread is None  # no thread until the first span
    for i in range(10):
        queue.on_end(_span(f"s{i}"))
    assert queue.force_flush(timeout_millis=60_000) is True
    assert [s.name for s in exporter.get_finished_spans()] == [f"s{i}" for i in range(10)]
    queue.shutdown(timeout_millis=60_000)
    assert (queue.dropped, queue.failed) == (0, 0)
