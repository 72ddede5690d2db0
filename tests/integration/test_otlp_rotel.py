"""inferscope's points reach a real OTLP collector (rotel) over gRPC and HTTP, decoded intact."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from inferscope._keys import KeyRegistry
from inferscope._records import CPU_NOT_MEASURED, DROP_RING_FULL, empty_records
from inferscope.aggregator import Aggregator
from inferscope.export.sdk import AggregatesExporter, export_empty_collections

if TYPE_CHECKING:
    from conftest import Rotel, RotelPoint

pytestmark = pytest.mark.integration

BOUNDARIES = [0.001, 0.005, 0.01, 0.05, 0.1]


def _aggregate(model: str) -> tuple[Aggregator, dict[str, list[float]]]:
    """An aggregator fed with real records: inferences (some failing) and one stage with CPU time."""
    registry = KeyRegistry()
    inference = registry.inference_key(model, "7", {"deployment.region": "eu"})
    stage = registry.stage_key(inference, "infer")
    error = registry.error_id(ValueError)
    ok = [0.0021, 0.0033, 0.0047, 0.012]
    failed = [0.0071]
    staged = [0.0013, 0.0029]
    staged_cpu = [0.0009, 0.0011]
    batch = empty_records(len(ok) + len(failed) + len(staged))
    batch["key"] = [inference] * (len(ok) + len(failed)) + [stage] * len(staged)
    batch["error"] = [0] * len(ok) + [error] * len(failed) + [0] * len(staged)
    batch["wall_ns"] = np.round(np.array(ok + failed + staged) * 1e9).astype(np.int64)
    batch["cpu_ns"] = [CPU_NOT_MEASURED] * (len(ok) + len(failed)) + [round(c * 1e9) for c in staged_cpu]
    aggregator = Aggregator(registry)
    aggregator.add(batch)
    aggregator.set_dropped(DROP_RING_FULL, 3)
    return aggregator, {"ok": ok, "failed": failed, "staged": staged, "staged_cpu": staged_cpu}


def _bucket_of(point: RotelPoint, value: float) -> int:
    """The count rotel printed for the exponential bucket holding ``value``."""
    holding = [count for low, high, count in point.exponential_buckets if low < value <= high]
    assert len(holding) == 1, f"{value} is in {len(holding)} printed buckets"
    return holding[0]


EXPORTERS: dict[str, Callable[[Rotel], MetricExporter]] = {
    "grpc": lambda rotel: GrpcMetricExporter(endpoint=rotel.grpc_endpoint, insecure=True, timeout=5),
    "http": lambda rotel: HttpMetricExporter(endpoint=rotel.http_metrics_endpoint, timeout=5),
}


@pytest.mark.parametrize("protocol", sorted(EXPORTERS))
def test_exponential_points_arrive_decoded(rotel: Rotel, protocol: str) -> None:
    model = f"fraud-{protocol}-{uuid.uuid4().hex[:8]}"
    aggregator, values = _aggregate(model)
    resource = Resource.create({"service.name": "rotel-test", "service.instance.id": model})
    exporter = AggregatesExporter(
        EXPORTERS[protocol](rotel), aggregator.view, resource=resource, boundaries=BOUNDARIES
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    # The user's own instrument rides in the same batch as inferscope's points.
    provider.get_meter("user.code").create_counter("user.requests", unit="{request}").add(5)
    try:
        provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown(timeout_millis=10_000)

    ours = rotel.wait_for_points(lambda p: p.resource.get("service.instance.id") == model)
    by_metric: dict[str, list[RotelPoint]] = {}
    for point in ours:
        by_metric.setdefault(point.metric, []).append(point)

    [user] = by_metric["user.requests"]
    assert user.value == 5
    assert user.scope.split()[0] == "user.code"

    durations = by_metric["inferscope.inference.duration"]
    assert {p.unit for p in durations} == {"s"}
    assert {p.data_type for p in durations} == {"ExponentialHistogram"}
    assert {p.scope.split()[0] for p in durations} == {"inferscope"}
    success = [p for p in durations if "error.type" not in p.attributes]
    failure = [p for p in durations if "error.type" in p.attributes]
    assert len(success) == len(failure) == 1
    assert success[0].attributes == {
        "inferscope.model.name": model,
        "inferscope.model.version": "7",
        "deployment.region": "eu",
    }
    assert failure[0].attributes["error.type"] == "ValueError"
    assert success[0].count == len(values["ok"])
    assert success[0].sum == pytest.approx(sum(values["ok"]))
    assert failure[0].count == len(values["failed"])
    assert sum(c for _, _, c in success[0].exponential_buckets) == len(values["ok"])
    for value in values["ok"]:
        assert _bucket_of(success[0], value) == 1

    [stage] = by_metric["inferscope.stage.duration"]
    assert stage.attributes["inferscope.stage.name"] == "infer"
    assert stage.count == len(values["staged"])
    [stage_cpu] = by_metric["inferscope.stage.cpu.time"]
    assert stage_cpu.unit == "s"
    assert stage_cpu.count == len(values["staged_cpu"])
    for value in values["staged_cpu"]:
        assert _bucket_of(stage_cpu, value) == 1
    assert "inferscope.inference.cpu.time" not in by_metric  # no inference measured CPU

    [dropped] = by_metric["inferscope.sdk.records.dropped"]
    assert (dropped.unit, dropped.data_type, dropped.is_monotonic) == ("{record}", "Sum", "true")
    assert dropped.attributes == {"reason": DROP_RING_FULL}
    assert dropped.value == 3
    [failed_exports] = by_metric["inferscope.sdk.exports.failed"]
    assert failed_exports.value == 0
    assert exporter.failed_exports == 0


@pytest.mark.parametrize("protocol", sorted(EXPORTERS))
def test_explicit_points_arrive_without_sdk_instruments(rotel: Rotel, protocol: str) -> None:
    model = f"ranker-{protocol}-{uuid.uuid4().hex[:8]}"
    aggregator, values = _aggregate(model)
    resource = Resource.create({"service.name": "rotel-test", "service.instance.id": model})
    exporter = AggregatesExporter(
        EXPORTERS[protocol](rotel),
        aggregator.view,
        resource=resource,
        aggregation="explicit",
        boundaries=BOUNDARIES,
    )
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    export_empty_collections(reader)  # the provider has no instruments of its own
    try:
        provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown(timeout_millis=10_000)

    ours = rotel.wait_for_points(
        lambda p: (
            p.resource.get("service.instance.id") == model and p.metric == "inferscope.inference.duration"
        )
    )
    [success] = [p for p in ours if "error.type" not in p.attributes]
    assert success.data_type == "Histogram"
    assert success.explicit_bounds == BOUNDARIES
    # Expected counts straight from the raw values (none lies near a boundary).
    expected = np.bincount(
        np.searchsorted(BOUNDARIES, values["ok"], side="left"), minlength=len(BOUNDARIES) + 1
    )
    printed = [success.explicit_counts.get(i, 0) for i in range(len(BOUNDARIES) + 1)]
    assert printed == expected.tolist()
    assert success.count == len(values["ok"])


@pytest.mark.parametrize("protocol", sorted(EXPORTERS))
def test_down_backend_counts_failure_and_never_raises(protocol: str, unused_port: int) -> None:
    port = unused_port  # nothing listens here
    delegate: MetricExporter
    if protocol == "grpc":
        delegate = GrpcMetricExporter(endpoint=f"127.0.0.1:{port}", insecure=True, timeout=1)
    else:
        delegate = HttpMetricExporter(endpoint=f"http://127.0.0.1:{port}/v1/metrics", timeout=1)
    aggregator, _ = _aggregate("down")
    exporter = AggregatesExporter(
        delegate, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES
    )
    started = time.monotonic()
    result = exporter.export(MetricsData(resource_metrics=[]), timeout_millis=2_000)
    elapsed = time.monotonic() - started
    assert result is MetricExportResult.FAILURE
    assert exporter.failed_exports == 1
    assert elapsed < 15, f"export against a down backend took {elapsed:.1f} s"

    # Through the SDK as well: nothing propagates to the caller, and the failure is counted.
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])
    export_empty_collections(reader)
    provider.force_flush(timeout_millis=5_000)
    provider.shutdown(timeout_millis=5_000)
    assert exporter.failed_exports == 2


@pytest.mark.parametrize("protocol", sorted(EXPORTERS))
def test_system_signals_arrive_with_inferscopes_points(rotel: Rotel, protocol: str) -> None:
    """The process, host and container signals share the scope ``inferscope`` with the aggregates;
    the OTLP encoder keeps one ScopeMetrics per scope, so they must travel in one."""
    import inferscope
    from inferscope import _pipeline
    from inferscope.system.host import system_signals

    service = f"signals-{protocol}-{uuid.uuid4().hex[:8]}"
    endpoint = (
        f"http://{rotel.grpc_endpoint}" if protocol == "grpc" else f"http://127.0.0.1:{rotel.http_port}"
    )

    @inferscope.track_inference(model=service)
    def predict() -> None:
        with inferscope.stage("infer"):
            time.sleep(0.001)

    try:
        inferscope.configure(
            service_name=service,
            metrics_exporters=["otlp"],
            otlp_endpoint=endpoint,
            otlp_protocol="grpc" if protocol == "grpc" else "http/protobuf",
        )
        for _ in range(5):
            predict()
        inferscope.shutdown()  # the final export
        expected = {s.spec.name for s in system_signals(gpu=False) if s.observe()}
        assert {
            "process.cpu.time",
            "process.memory.usage",
            "process.memory.virtual",
            "process.thread.count",
        } <= expected
        ours = rotel.wait_for_points(lambda p: p.resource.get("service.name") == service)
        arrived = {p.metric for p in ours if p.scope.split()[0] == "inferscope"}
        assert expected | {"inferscope.inference.duration", "inferscope.stage.duration"} <= arrived
        assert {p.attributes["cpu.mode"] for p in ours if p.metric == "process.cpu.time"} == {
            "user",
            "system",
        }
    finally:
        _pipeline.configure()
