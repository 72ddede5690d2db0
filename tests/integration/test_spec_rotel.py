"""Every metric of the specification that this machine can produce arrives at a real collector (rotel).

A service (spec_workload.py) runs four times: configured with ``inferscope.configure()`` and under
``opentelemetry-instrument``, each over OTLP gRPC and HTTP. Then, per metric of
``inferscope.export.spec``, the test either finds its points in what rotel decoded, under scope
``inferscope``, with the specification's unit and kind, or skips with the specification's own
reason why this machine cannot produce it (no GPU, no PMU, an unlimited cgroup...).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.conftest import (
    READY_TIMEOUT_S,
    Rotel,
    RotelPoint,
    _accepts,
    _Process,
    _rotel_binary,
    free_port,
)

from inferscope.export import spec

pytestmark = pytest.mark.integration

with contextlib.suppress(ImportError):  # the CUDA metrics' need is judged with torch imported,
    import torch  # noqa: F401  # as the workload imports it

WORKLOAD = Path(__file__).parent / "spec_workload.py"
RUN_TIMEOUT_S = 180
COUNTERS = ["thread_cpu", "rusage", "rss", "python_heap", "perf", "cuda_memory"]
DATA_TYPES = {
    "histogram": {"ExponentialHistogram", "Histogram"},
    "counter": {"Sum"},
    "updown": {"Sum"},
    "gauge": {"Gauge"},
}
RUNS = [(mode, protocol) for mode in ("configure", "instrument") for protocol in ("grpc", "http")]


def _counters() -> str:
    """Every counter this machine can read (the others would make configure() refuse)."""
    from inferscope.counters import COUNTERS as BITS
    from inferscope.counters import unavailable_reason

    return ",".join(name for name in COUNTERS if unavailable_reason(BITS[name]) is None)


def _opentelemetry_instrument() -> str:
    candidate = Path(sys.executable).parent / "opentelemetry-instrument"
    found = str(candidate) if candidate.is_file() else shutil.which("opentelemetry-instrument")
    if found is None:
        pytest.skip("opentelemetry-instrument is not installed (pip install opentelemetry-distro)")
    return found


def _start_rotel(workdir: Path) -> tuple[Rotel, _Process]:
    binary = _rotel_binary()
    for _attempt in range(3):
        grpc_port, http_port = free_port(), free_port()
        if grpc_port == http_port:
            continue
        argv = [
            binary,
            "start",
            "--otlp-grpc-endpoint",
            f"127.0.0.1:{grpc_port}",
            "--otlp-http-endpoint",
            f"127.0.0.1:{http_port}",
            "--exporter",
            "blackhole",
            "--debug-log",
            "metrics",
            "--debug-log-verbosity",
            "detailed",
            "--pid-file",
            str(workdir / "rotel.pid"),
            "--log-file",
            str(workdir / "rotel-agent.log"),
        ]
        process = _Process("rotel", argv, workdir / "rotel-output.txt", workdir)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and process.popen.poll() is None:
            if _accepts(grpc_port) and _accepts(http_port):
                return Rotel(grpc_port, http_port, process), process
            time.sleep(0.05)
        process.stop()
    pytest.fail("rotel did not become ready", pytrace=False)


def _run(mode: str, protocol: str, rotel: Rotel, workdir: Path) -> None:
    endpoint = (
        f"http://{rotel.grpc_endpoint}" if protocol == "grpc" else f"http://127.0.0.1:{rotel.http_port}"
    )
    otlp_protocol = "grpc" if protocol == "grpc" else "http/protobuf"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "INFERSCOPE_")) or name == "INFERSCOPE_NO_EXTENSION"
    }
    settings = {
        "service_name": f"spec-{mode}-{protocol}",
        "counters": _counters(),
        "trace_ratio": 0.0,  # kept only for being slow, so that the rate limit applies
        "trace_slow_ms": 0.5,
        "trace_max_spans_per_second": 1,
    }
    if mode == "configure":
        settings.update(
            metrics_exporters=["otlp"],
            traces_exporters=["otlp"],
            otlp_endpoint=endpoint,
            otlp_protocol=otlp_protocol,
        )
        argv = [sys.executable, str(WORKLOAD), "configure", json.dumps(settings)]
    else:
        env.update(
            {
                "OTEL_SERVICE_NAME": str(settings["service_name"]),
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": otlp_protocol,
                "OTEL_LOGS_EXPORTER": "none",
                "OTEL_METRIC_EXPORT_INTERVAL": "600000",  # one export, at exit
                "INFERSCOPE_COUNTERS": str(settings["counters"]),
                "INFERSCOPE_TRACE_RATIO": "0",
                "INFERSCOPE_TRACE_SLOW_MS": "0.5",
                "INFERSCOPE_TRACE_MAX_SPANS_PER_SECOND": "1",
            }
        )
        argv = [_opentelemetry_instrument(), sys.executable, str(WORKLOAD), "instrument"]
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def _reason(entry: spec.MetricSpec) -> str | None:
    if entry.source == "provider":
        return None  # the workload registers providers for the tax meter's metrics
    return entry.unavailable_reason()


#: The metrics this machine can produce: the wait for rotel's output ends once all have arrived.
_EXPECTED = {name for name in spec.METRICS if _reason(spec.get(name)) is None}


@pytest.fixture(scope="module")
def arrived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], list[RotelPoint]]]:
    """Per (mode, protocol): the points of scope ``inferscope`` that rotel decoded from one run."""
    found: dict[tuple[str, str], list[RotelPoint]] = {}
    for mode, protocol in RUNS:
        workdir = tmp_path_factory.mktemp(f"{mode}-{protocol}")
        rotel, process = _start_rotel(workdir)
        try:
            _run(mode, protocol, rotel, workdir)
            service = f"spec-{mode}-{protocol}"
            points = rotel.wait_for_points(
                lambda p, s=service: p.resource.get("service.name") == s,
                timeout_s=30,
                complete=lambda found: {p.metric for p in found} >= _EXPECTED,
            )
            found[(mode, protocol)] = [p for p in points if p.scope.split(" ")[0] == "inferscope"]
        finally:
            process.stop()
    yield found


@pytest.mark.parametrize("name", sorted(spec.METRICS))
def test_every_metric_of_the_specification_arrives(
    name: str, arrived: dict[tuple[str, str], list[RotelPoint]]
) -> None:
    entry = spec.get(name)
    reason = _reason(entry)
    if reason is not None:
        pytest.skip(reason)
    for run, points in arrived.items():
        mine = [p for p in points if p.metric == name]
        assert mine, f"{name} did not arrive at rotel ({run[0]}, over {run[1]})"
        assert {p.unit for p in mine} == {entry.unit}, (run, name)
        assert {p.data_type for p in mine} <= DATA_TYPES[entry.kind], (run, name)
        for point in mine:
            extra = set(point.attributes) - set(entry.attributes)
            if entry.group in ("inference", "stage", "counters"):
                extra -= {"inferscope.device"}  # plus the static attributes a model declares: none here
            assert not extra, f"{name} carries attributes the specification does not name: {extra}"


def test_nothing_arrives_that_the_specification_does_not_name(
    arrived: dict[tuple[str, str], list[RotelPoint]],
) -> None:
    for run, points in arrived.items():
        unknown = {p.metric for p in points} - set(spec.METRICS)
        assert not unknown, (run, unknown)
