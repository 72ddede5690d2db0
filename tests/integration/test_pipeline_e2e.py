"""The whole pipeline, from tracked calls in a service process to a real backend.

The service runs in a subprocess configured the way a user would configure it (environment
variables or configure()), so what arrives was produced by the real hot path, drainer, aggregator,
exporters and exit flush, on whichever backend this test run selected.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Rotel

pytestmark = pytest.mark.integration

SERVICE = """
import time, inferscope

@inferscope.track_inference(model=MODEL, version="5")
def predict(x):
    with inferscope.stage("preprocess"):
        if x % 10 == 0:
            raise ValueError("bad input")
    with inferscope.stage("infer"):
        time.sleep(0.001)
    return x

for i in range(1, 41):
    try:
        predict(i)
    except ValueError:
        pass
"""


def run_service(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _assert_service_points(rotel: Rotel, model: str, service_name: str) -> None:
    def ours(point):
        return point.attributes.get("inferscope.model.name") == model

    points = rotel.wait_for_points(
        lambda p: (
            ours(p)
            and p.metric == "inferscope.stage.duration"
            and p.attributes.get("inferscope.stage.name") == "infer"
        )
    )
    everything = [p for p in rotel.points() if ours(p)]
    by_name: dict[tuple[str, str | None, str | None], int] = {}
    for p in everything:
        key = (p.metric, p.attributes.get("inferscope.stage.name"), p.attributes.get("error.type"))
        by_name[key] = max(by_name.get(key, 0), p.count)
    assert by_name[("inferscope.inference.duration", None, None)] == 36
    assert by_name[("inferscope.inference.duration", None, "ValueError")] == 4
    assert by_name[("inferscope.stage.duration", "preprocess", None)] == 36
    assert by_name[("inferscope.stage.duration", "preprocess", "ValueError")] == 4
    assert by_name[("inferscope.stage.duration", "infer", None)] == 36
    assert ("inferscope.stage.cpu.time", "infer", None) in by_name  # default counters read CPU time
    point = points[-1]
    assert point.unit == "s"
    assert point.attributes.get("inferscope.model.version") == "5"
    assert point.resource.get("service.name") == service_name
    assert point.resource.get("process.pid") not in (None, str(os.getpid()))
    assert point.sum >= 36 * 0.001


def test_otlp_grpc_configured_from_environment_flushes_at_exit(rotel: Rotel):
    model = f"grpc-{uuid.uuid4().hex[:8]}"
    run_service(
        f"MODEL = {model!r}\n" + SERVICE,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rotel.grpc_endpoint}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "e2e-grpc",
            "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        },
    )
    _assert_service_points(rotel, model, "e2e-grpc")


def test_otlp_http_configured_in_code(rotel: Rotel):
    model = f"http-{uuid.uuid4().hex[:8]}"
    endpoint = rotel.http_metrics_endpoint.removesuffix("/v1/metrics")
    run_service(
        f"MODEL = {model!r}\n"
        "import inferscope\n"
        "inferscope.configure(service_name='e2e-http', metrics_exporters='otlp', "
        f"otlp_protocol='http/protobuf', otlp_endpoint={endpoint!r}, "
        "histogram_aggregation='explicit', histogram_boundaries=[0.0005, 0.002, 0.01])\n"
        + SERVICE
        + "\ninferscope.shutdown()\n",
        {},
    )
    _assert_service_points(rotel, model, "e2e-http")
    explicit = [
        p
        for p in rotel.points()
        if p.attributes.get("inferscope.model.name") == model and p.metric == "inferscope.stage.duration"
    ]
    assert all(p.explicit_bounds == [0.0005, 0.002, 0.01] for p in explicit)


FORKED_WORKERS = """
import os, threading, time, inferscope
from inferscope.export.grpc_fork import GRPC_CALLS

# Under test: the workers' own channels. How long a fork waits for an export in flight (0.5 s) is
# not, and a loaded machine could stretch an export past it: each fork waits for the export out.
GRPC_CALLS.fork_wait_s = 60.0

@inferscope.track_inference(model=MODEL + "-parent")
def parent_call():
    time.sleep(0.0005)

stop = threading.Event()
def serve():
    while not stop.is_set():
        parent_call()
# The parent exports over gRPC every 100 ms while it forks, so its calls are often in flight.
thread = threading.Thread(target=serve)
thread.start()
time.sleep(0.5)
codes = []
for worker in range(3):
    pid = os.fork()
    if pid == 0:
        MODEL = f"{MODEL}-worker{worker}"
        exec(SERVICE)
        inferscope.shutdown()  # the worker's own channel flushes its points
        os._exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop.set()
thread.join()
print(codes)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_workers_export_over_grpc_on_channels_of_their_own(rotel: Rotel):
    # A pre-fork server whose master exports over gRPC: each worker makes its own channel after
    # fork(); gRPC's fork handlers ran, since fork() waited for the master's exports in flight.
    model = f"forked-{uuid.uuid4().hex[:8]}"
    result = run_service(
        f"MODEL = {model!r}\nSERVICE = {SERVICE!r}\n" + FORKED_WORKERS,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rotel.grpc_endpoint}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "e2e-forked",
            "OTEL_METRIC_EXPORT_INTERVAL": "100",
        },
    )
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 0]", result.stderr
    assert "was forked while an OTLP/gRPC export was in flight" not in result.stderr
    pids = set()
    for worker in range(3):
        _assert_service_points(rotel, f"{model}-worker{worker}", "e2e-forked")
        pids |= {
            p.resource.get("process.pid")
            for p in rotel.points()
            if p.attributes.get("inferscope.model.name") == f"{model}-worker{worker}"
        }
    assert len(pids) == 3  # one process each


def test_down_backend_never_blocks_the_service_for_long_or_raises():
    started = time.monotonic()
    result = run_service(
        "MODEL = 'down'\n"
        + SERVICE
        + "\nimport inferscope\nprint(inferscope.snapshot().row('down').count)\n",
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # discard port: nothing listens
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_METRIC_EXPORT_TIMEOUT": "1000",
        },
    )
    assert result.stdout.strip().splitlines()[-1] == "40"
    assert time.monotonic() - started < 30  # the exit flush gives up; the service is not held hostage


def test_prometheus_scrapes_the_pipeline_and_quantiles_agree(start_prometheus):
    boundaries = [round(0.001 * 1.04**i, 6) for i in range(110)]  # 1 ms to ~75 ms, 4% apart
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import random, sys, time, inferscope
                inferscope.configure(metrics_exporters="prometheus", prometheus_port=0,
                                     histogram_boundaries={boundaries!r})

                @inferscope.track_inference(model="scraped")
                def predict(ms):
                    time.sleep(ms / 1000)

                rng = random.Random(3)
                for _ in range(150):
                    predict(rng.uniform(1, 30))
                snap = inferscope.snapshot()
                print(inferscope.prometheus_port(), snap.row("scraped").p95, flush=True)
                sys.stdin.read()  # serve until the test closes stdin
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        line = service.stdout.readline()
        assert line, service.stderr.read() if service.stderr else ""
        port_text, p95_text = line.split()
        prometheus = start_prometheus([f"127.0.0.1:{port_text}"])
        series = prometheus.wait_for(
            'inferscope_inference_duration_seconds_count{inferscope_model_name="scraped"}'
        )
        assert float(series[0]["value"][1]) == 150
        buckets = 'inferscope_inference_duration_seconds_bucket{inferscope_model_name="scraped"}'
        result = prometheus.wait_for(f"histogram_quantile(0.95, sum by (le) ({buckets}))")
        scraped_p95 = float(result[0]["value"][1])
        # Buckets 4% apart bound the interpolation error; the snapshot's own error is under 1%.
        assert math.isclose(scraped_p95, float(p95_text), rel_tol=0.06)
    finally:
        if service.stdin:
            service.stdin.close()
        service.wait(timeout=30)
