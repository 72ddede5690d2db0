"""Aggregates → OTel points, the delegating exporter, and the Prometheus collector."""

from __future__ import annotations

import logging
import math
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogramDataPoint,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferscope._keys import ERROR_TYPE, MODEL_NAME, MODEL_VERSION, STAGE_NAME, KeyRegistry
from inferscope._records import (
    CPU_NOT_MEASURED,
    DROP_RING_FULL,
    DROP_STACK_DEPTH,
    FLAG_ABANDONED,
    SLOT_RSS_DELTA,
    SLOT_RSS_SAMPLES,
    empty_records,
)
from inferscope.aggregator import AggregateView, Aggregator
from inferscope.counters import COUNTER_RSS, COUNTER_RUSAGE, counter_metrics
from inferscope.export.points import (
    EXPORTS_FAILED,
    INFERENCE_ABANDONED,
    INFERENCE_CPU_TIME,
    INFERENCE_DURATION,
    KEYS_OVERFLOWED,
    RECORDS_DROPPED,
    SDK_ERRORS,
    STAGE_CPU_TIME,
    STAGE_DURATION,
    PointBuilder,
)
from inferscope.export.prometheus import PrometheusCollector, start_prometheus_server
from inferscope.export.sdk import (
    AggregatesExporter,
    export_empty_collections,
    unwrap_meter_provider,
    wrap_meter_provider,
)
from inferscope.testing import InMemoryMetricExporter, points

BOUNDARIES = [0.001, 0.01, 0.1, 1.0]
T0 = 1_700_000_000_000_000_000


def feed(
    aggregator: Aggregator,
    key: int,
    seconds: Sequence[float],
    *,
    cpu_seconds: Sequence[float] | None = None,
    error: int = 0,
    flags: int = 0,
) -> None:
    """Add one record per value to ``aggregator``, as the drainer would."""
    batch = empty_records(len(seconds))
    batch["key"] = key
    batch["error"] = error
    batch["flags"] = flags
    batch["wall_ns"] = np.round(np.asarray(seconds) * 1e9).astype(np.int64)
    batch["cpu_ns"] = (
        CPU_NOT_MEASURED if cpu_seconds is None else np.round(np.asarray(cpu_seconds) * 1e9).astype(np.int64)
    )
    aggregator.add(batch)


def otel_index(value: float, scale: int) -> int:
    """The OTel exponential bucket of ``value``: (base**i, base**(i+1)] with base = 2**(2**-scale)."""
    return math.ceil(math.log2(value) * 2.0**scale) - 1


def by_name(metrics: Sequence[Metric]) -> dict[str, Metric]:
    names = [m.name for m in metrics]
    assert len(names) == len(set(names)), f"duplicate metrics: {names}"
    return {m.name: m for m in metrics}


def only_point(metric: Metric, **attributes: Any) -> Any:
    matching = [p for p in metric.data.data_points if dict(p.attributes or {}) == attributes]
    assert len(matching) == 1, (attributes, [p.attributes for p in metric.data.data_points])
    return matching[0]


def occupied(point: ExponentialHistogramDataPoint) -> dict[int, int]:
    """Bucket index → count for the non-empty positive buckets of a point."""
    return {point.positive.offset + i: int(c) for i, c in enumerate(point.positive.bucket_counts) if c}


@pytest.fixture
def registry() -> KeyRegistry:
    return KeyRegistry()


@pytest.fixture
def aggregator(registry: KeyRegistry) -> Aggregator:
    return Aggregator(registry, start_time_unix_nano=T0)


# Values chosen away from every explicit boundary and every scale-6 bucket edge.
OK = [0.0023, 0.0041, 0.0047, 0.027, 0.31]
FAILED = [0.0062, 0.054]
STAGE = [0.0007, 0.0018, 0.0033]
STAGE_CPU = [0.0005, 0.0012, 0.0029]


@pytest.fixture
def populated(registry: KeyRegistry, aggregator: Aggregator) -> dict[str, int]:
    fraud = registry.inference_key("fraud", "3", {"team": "risk"})
    ranker = registry.inference_key("ranker")
    stage = registry.stage_key(fraud, "infer")
    nested = registry.stage_key(stage, "encoder")
    error = registry.error_id(ValueError)
    feed(aggregator, fraud, OK)
    feed(aggregator, fraud, FAILED, error=error)
    feed(aggregator, stage, STAGE, cpu_seconds=STAGE_CPU)
    feed(aggregator, nested, [0.0011])
    feed(aggregator, ranker, [0.02, 0.03], cpu_seconds=[0.01, 0.02])
    feed(aggregator, ranker, [0.5], flags=FLAG_ABANDONED)
    aggregator.set_dropped(DROP_RING_FULL, 7)
    aggregator.set_dropped(DROP_STACK_DEPTH, 0)
    aggregator.set_internal_errors(2)
    return {"fraud": fraud, "ranker": ranker, "stage": stage, "nested": nested}


FRAUD = {MODEL_NAME: "fraud", MODEL_VERSION: "3", "team": "risk"}


# --- PointBuilder ---------------------------------------------------------------------------------


def test_exponential_points_names_units_attributes_counts(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    # OK spans ~450 scale-6 buckets: leave room so that no downscaling happens here.
    metrics = by_name(PointBuilder(boundaries=BOUNDARIES, max_buckets=1000).build(aggregator.view(), T0 + 5))
    assert set(metrics) == {
        INFERENCE_DURATION,
        INFERENCE_CPU_TIME,
        STAGE_DURATION,
        STAGE_CPU_TIME,
        INFERENCE_ABANDONED,
        RECORDS_DROPPED,
        KEYS_OVERFLOWED,
        SDK_ERRORS,
    }
    units = {name: m.unit for name, m in metrics.items()}
    assert units == {
        INFERENCE_DURATION: "s",
        INFERENCE_CPU_TIME: "s",
        STAGE_DURATION: "s",
        STAGE_CPU_TIME: "s",
        INFERENCE_ABANDONED: "{inference}",
        RECORDS_DROPPED: "{record}",
        KEYS_OVERFLOWED: "{key}",
        SDK_ERRORS: "{error}",
    }

    duration = metrics[INFERENCE_DURATION]
    assert duration.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    ok = only_point(duration, **FRAUD)
    failed = only_point(duration, **FRAUD, **{ERROR_TYPE: "ValueError"})
    ranker = only_point(duration, **{MODEL_NAME: "ranker"})  # no version attribute when none is set
    assert isinstance(ok, ExponentialHistogramDataPoint)
    assert (ok.count, failed.count, ranker.count) == (len(OK), len(FAILED), 3)
    assert ok.sum == pytest.approx(sum(OK))
    assert (ok.min, ok.max) == pytest.approx((min(OK), max(OK)))
    assert (ok.start_time_unix_nano, ok.time_unix_nano) == (T0, T0 + 5)
    assert ok.scale == 6 and ok.zero_count == 0 and ok.flags == 0
    assert list(ok.negative.bucket_counts) == []
    # Every value sits in the bucket OTel's layout says it should.
    expected: dict[int, int] = {}
    for value in OK:
        expected[otel_index(value, 6)] = expected.get(otel_index(value, 6), 0) + 1
    assert occupied(ok) == expected

    stage = metrics[STAGE_DURATION]
    infer = only_point(stage, **FRAUD, **{STAGE_NAME: "infer"})
    encoder = only_point(stage, **FRAUD, **{STAGE_NAME: "infer/encoder"})
    assert (infer.count, encoder.count) == (len(STAGE), 1)
    stage_cpu = metrics[STAGE_CPU_TIME]
    assert [dict(p.attributes) for p in stage_cpu.data.data_points] == [{**FRAUD, STAGE_NAME: "infer"}]
    assert stage_cpu.data.data_points[0].sum == pytest.approx(sum(STAGE_CPU))
    # CPU was measured for two of ranker's three inferences only.
    [ranker_cpu] = metrics[INFERENCE_CPU_TIME].data.data_points
    assert dict(ranker_cpu.attributes) == {MODEL_NAME: "ranker"} and ranker_cpu.count == 2

    [abandoned] = metrics[INFERENCE_ABANDONED].data.data_points
    assert metrics[INFERENCE_ABANDONED].data.is_monotonic
    assert (dict(abandoned.attributes), abandoned.value) == ({MODEL_NAME: "ranker"}, 1)
    dropped = {p.attributes["reason"]: p.value for p in metrics[RECORDS_DROPPED].data.data_points}
    assert dropped == {DROP_RING_FULL: 7, DROP_STACK_DEPTH: 0}
    assert [p.value for p in metrics[SDK_ERRORS].data.data_points] == [2]
    assert [p.value for p in metrics[KEYS_OVERFLOWED].data.data_points] == [0]


def test_explicit_points(aggregator: Aggregator, populated: dict[str, int]) -> None:
    metrics = by_name(
        PointBuilder(aggregation="explicit", boundaries=BOUNDARIES).build(aggregator.view(), T0 + 1)
    )
    ok = only_point(metrics[INFERENCE_DURATION], **FRAUD)
    assert isinstance(ok, HistogramDataPoint)
    assert list(ok.explicit_bounds) == BOUNDARIES
    expected = np.bincount(np.searchsorted(BOUNDARIES, OK, side="left"), minlength=len(BOUNDARIES) + 1)
    assert list(ok.bucket_counts) == expected.tolist()
    assert (ok.count, ok.sum) == (len(OK), pytest.approx(sum(OK)))
    assert metrics[STAGE_CPU_TIME].data.data_points[0].bucket_counts[0] == 1  # 0.0005 <= 0.001


def test_downscale_when_over_max_buckets(registry: KeyRegistry, aggregator: Aggregator) -> None:
    key = registry.inference_key("wide")
    values = [1.3e-4, 2.9e-3, 0.071, 1.7, 23.0, 370.0]  # ~21 octaves: ~1,300 buckets at scale 6
    feed(aggregator, key, values)
    view = aggregator.view()

    [narrow] = PointBuilder(boundaries=BOUNDARIES, max_buckets=20).build(view, T0)[0].data.data_points
    assert len(narrow.positive.bucket_counts) <= 20
    assert narrow.scale < 6
    # The highest scale that fits: one scale finer would need more than 20 buckets.
    finer = narrow.scale + 1
    assert otel_index(max(values), finer) - otel_index(min(values), finer) + 1 > 20
    expected: dict[int, int] = {}
    for value in values:
        expected[otel_index(value, narrow.scale)] = expected.get(otel_index(value, narrow.scale), 0) + 1
    assert occupied(narrow) == expected
    assert narrow.count == len(values)

    [roomy] = PointBuilder(boundaries=BOUNDARIES, max_buckets=2000).build(view, T0)[0].data.data_points
    assert roomy.scale == 6


def test_max_buckets_below_two_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        PointBuilder(boundaries=BOUNDARIES, max_buckets=1)
    with pytest.raises(ValueError, match="aggregation"):
        PointBuilder(aggregation="summary", boundaries=BOUNDARIES)
    with pytest.raises(ValueError, match="increasing"):
        PointBuilder(boundaries=[0.1, 0.01])


def test_delta_temporality_over_two_exports(registry: KeyRegistry, aggregator: Aggregator) -> None:
    key = registry.inference_key("fraud")
    attrs = {MODEL_NAME: "fraud"}
    builder = PointBuilder(boundaries=BOUNDARIES, temporality=AggregationTemporality.DELTA)
    first_values, second_values = [0.011, 0.013, 0.017], [0.5, 0.7]

    feed(aggregator, key, first_values)
    aggregator.set_dropped(DROP_RING_FULL, 5)
    first = by_name(builder.build(aggregator.view(), T0 + 10))
    feed(aggregator, key, second_values, flags=FLAG_ABANDONED)
    aggregator.set_dropped(DROP_RING_FULL, 8)
    second = by_name(builder.build(aggregator.view(), T0 + 20))

    p1 = only_point(first[INFERENCE_DURATION], **attrs)
    p2 = only_point(second[INFERENCE_DURATION], **attrs)
    assert second[INFERENCE_DURATION].data.aggregation_temporality is AggregationTemporality.DELTA
    assert (p1.start_time_unix_nano, p1.time_unix_nano) == (T0, T0 + 10)
    assert (p2.start_time_unix_nano, p2.time_unix_nano) == (T0 + 10, T0 + 20)
    assert (p1.count, p2.count) == (3, 2)
    assert p2.sum == pytest.approx(sum(second_values))
    assert occupied(p2) == {otel_index(v, 6): 1 for v in second_values}
    assert (p2.min, p2.max) == pytest.approx((0.5, 0.7), rel=0.02)
    assert [p.value for p in first[RECORDS_DROPPED].data.data_points] == [5]
    assert [p.value for p in second[RECORDS_DROPPED].data.data_points] == [3]
    assert INFERENCE_ABANDONED not in first
    assert [p.value for p in second[INFERENCE_ABANDONED].data.data_points] == [2]

    # Nothing new: delta skips the unchanged series; the SDK counters still report 0.
    third = by_name(builder.build(aggregator.view(), T0 + 30))
    assert INFERENCE_DURATION not in third and INFERENCE_ABANDONED not in third
    assert [p.value for p in third[RECORDS_DROPPED].data.data_points] == [0]

    # After a reset (fork) the aggregates start over, and so do the deltas.
    aggregator.reset(start_time_unix_nano=T0 + 35)
    feed(aggregator, key, [0.2])
    fourth = by_name(builder.build(aggregator.view(), T0 + 40))
    p4 = only_point(fourth[INFERENCE_DURATION], **attrs)
    assert (p4.count, p4.start_time_unix_nano) == (1, T0 + 35)


def test_a_cumulative_change_back_at_zero_keeps_its_series(
    registry: KeyRegistry, aggregator: Aggregator
) -> None:
    # RSS grew by a page on one sampled call, then shrank by a page on another: no net change. A
    # cumulative up-down counter back at 0 is a value (its series must not vanish from the
    # backend); a count that never moved, and a delta interval where nothing changed, have none.
    key = registry.stage_key(registry.inference_key("fraud"), "preprocess")

    def sampled_call(rss_change: int) -> None:
        batch = empty_records(1)
        batch["key"] = key
        batch["wall_ns"] = 1_000_000
        batch["cpu_ns"] = CPU_NOT_MEASURED
        batch["counters"][:, SLOT_RSS_DELTA] = rss_change
        batch["counters"][:, SLOT_RSS_SAMPLES] = 1
        aggregator.add(batch)

    rss, faults = "inferscope.stage.memory.rss.change", "inferscope.stage.page_faults"
    metrics = counter_metrics(COUNTER_RSS | COUNTER_RUSAGE)
    cumulative = PointBuilder(boundaries=BOUNDARIES, counters=metrics)
    delta = PointBuilder(boundaries=BOUNDARIES, counters=metrics, temporality=AggregationTemporality.DELTA)
    sampled_call(4096)
    for builder in (cumulative, delta):
        first = by_name(builder.build(aggregator.view(), T0 + 1))
        assert [p.value for p in first[rss].data.data_points] == [4096]
        assert faults not in first  # no fault was ever counted
    sampled_call(-4096)
    back = by_name(cumulative.build(aggregator.view(), T0 + 2))
    assert [p.value for p in back[rss].data.data_points] == [0]
    assert back[rss].data.is_monotonic is False
    assert [p.value for p in by_name(delta.build(aggregator.view(), T0 + 2))[rss].data.data_points] == [-4096]
    assert rss not in by_name(delta.build(aggregator.view(), T0 + 3))  # nothing changed since


def test_cumulative_repeats_unchanged_series(registry: KeyRegistry, aggregator: Aggregator) -> None:
    key = registry.inference_key("fraud")
    builder = PointBuilder(boundaries=BOUNDARIES)
    feed(aggregator, key, [0.011, 0.013])
    builder.build(aggregator.view(), T0 + 10)
    feed(aggregator, key, [0.5])
    second = by_name(builder.build(aggregator.view(), T0 + 20))
    third = by_name(builder.build(aggregator.view(), T0 + 30))
    for metrics in (second, third):
        [point] = metrics[INFERENCE_DURATION].data.data_points
        assert (point.count, point.start_time_unix_nano) == (3, T0)


def test_overflowed_keys_and_extra_counts() -> None:
    registry = KeyRegistry(max_keys=3)
    small = Aggregator(registry, start_time_unix_nano=T0)
    first = registry.inference_key("a")
    folded = [registry.inference_key(name) for name in ("b", "c")]
    assert folded == [1, 1]
    feed(small, first, [0.01])
    feed(small, folded[0], [0.02, 0.03])
    metrics = by_name(PointBuilder(boundaries=BOUNDARIES).build(small.view(), T0, {EXPORTS_FAILED: 4}))
    assert [p.value for p in metrics[KEYS_OVERFLOWED].data.data_points] == [2]
    overflow = only_point(metrics[INFERENCE_DURATION], **{"otel.metric.overflow": True})
    assert overflow.count == 2
    assert metrics[EXPORTS_FAILED].unit == "{export}"
    assert [p.value for p in metrics[EXPORTS_FAILED].data.data_points] == [4]


# --- decode level ---------------------------------------------------------------------------------


def test_encoded_protobuf(aggregator: Aggregator, populated: dict[str, int]) -> None:
    resource = Resource.create({"service.name": "svc"})
    exporter = InMemoryMetricExporter()
    wrapper = AggregatesExporter(exporter, aggregator.view, resource=resource, boundaries=BOUNDARIES)
    assert wrapper.export(MetricsData(resource_metrics=[])) is MetricExportResult.SUCCESS
    [data] = exporter.get_finished_metrics()
    request = encode_metrics(data)
    decoded = type(request).FromString(request.SerializeToString())
    [rm] = decoded.resource_metrics
    assert {kv.key: kv.value.string_value for kv in rm.resource.attributes}["service.name"] == "svc"
    [sm] = rm.scope_metrics
    assert sm.scope.name == "inferscope"
    metrics = {m.name: m for m in sm.metrics}

    duration = metrics[INFERENCE_DURATION]
    assert duration.unit == "s"
    assert (
        duration.exponential_histogram.aggregation_temporality
        == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    )
    decoded_points = {
        tuple(sorted((kv.key, kv.value.string_value) for kv in p.attributes)): p
        for p in duration.exponential_histogram.data_points
    }
    ok = decoded_points[tuple(sorted(FRAUD.items()))]
    # The default max_buckets (320) cannot hold OK's ~450 scale-6 buckets: one downscale.
    assert ok.scale == 5 and ok.count == len(OK)
    assert sum(ok.positive.bucket_counts) + ok.zero_count == ok.count
    assert {ok.positive.offset + i for i, c in enumerate(ok.positive.bucket_counts) if c} == {
        otel_index(v, 5) for v in OK
    }
    failed = decoded_points[tuple(sorted({**FRAUD, ERROR_TYPE: "ValueError"}.items()))]
    assert failed.count == len(FAILED)

    dropped = metrics[RECORDS_DROPPED].sum
    assert dropped.is_monotonic
    assert {p.attributes[0].value.string_value: p.as_int for p in dropped.data_points} == {
        DROP_RING_FULL: 7,
        DROP_STACK_DEPTH: 0,
    }
    assert [p.as_int for p in metrics[EXPORTS_FAILED].sum.data_points] == [0]


def test_encoded_protobuf_explicit(aggregator: Aggregator, populated: dict[str, int]) -> None:
    metrics = PointBuilder(aggregation="explicit", boundaries=BOUNDARIES).build(aggregator.view(), T0 + 1)
    data = MetricsData(
        [
            ResourceMetrics(
                Resource.create({}), [ScopeMetrics(InstrumentationScope("inferscope"), metrics, "")], ""
            )
        ]
    )
    [rm] = encode_metrics(data).resource_metrics
    histogram = {m.name: m for m in rm.scope_metrics[0].metrics}[STAGE_DURATION].histogram
    stage_points = [
        p for p in histogram.data_points if any(kv.value.string_value == "infer" for kv in p.attributes)
    ]
    [infer] = stage_points
    assert list(infer.explicit_bounds) == BOUNDARIES
    assert list(infer.bucket_counts) == [1, 2, 0, 0, 0]  # 0.0007 | 0.0018, 0.0033
    assert infer.count == 3


# --- AggregatesExporter ---------------------------------------------------------------------------


class FlakyExporter(MetricExporter):
    """Raises or fails on demand, records what it receives and how it was flushed/shut down."""

    def __init__(self, outcomes: Sequence[str] = ()) -> None:
        super().__init__()
        self.outcomes = list(outcomes)
        self.received: list[MetricsData] = []
        self.calls: list[tuple[str, Any]] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "raise":
            raise ConnectionError("backend down")
        self.received.append(metrics_data)
        return MetricExportResult.FAILURE if outcome == "fail" else MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        self.calls.append(("force_flush", timeout_millis))
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.calls.append(("shutdown", timeout_millis))


def test_exporter_merges_into_the_providers_resource(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    resource = Resource.create({"service.name": "svc", "service.instance.id": "i-1"})
    memory = InMemoryMetricExporter()
    wrapper = AggregatesExporter(memory, aggregator.view, resource=resource, boundaries=BOUNDARIES)
    reader = PeriodicExportingMetricReader(wrapper, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    provider.get_meter("user.code").create_counter("user.requests").add(3)
    try:
        provider.force_flush()
    finally:
        provider.shutdown()
    [data] = memory.get_finished_metrics()
    [rm] = data.resource_metrics  # one ResourceMetrics: ours joined the user's
    assert rm.resource == resource
    assert [sm.scope.name for sm in rm.scope_metrics] == ["user.code", "inferscope"]
    assert memory.latest_points(INFERENCE_DURATION)
    assert [p.value for p in memory.latest_points("user.requests")] == [3]


def test_exporter_adds_resource_metrics_for_another_resource(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    theirs = ResourceMetrics(Resource.create({"service.name": "other"}), [], "")
    memory = InMemoryMetricExporter()
    ours = Resource.create({"service.name": "ours"})
    wrapper = AggregatesExporter(memory, aggregator.view, resource=ours, boundaries=BOUNDARIES)
    assert wrapper.export(MetricsData([theirs])) is MetricExportResult.SUCCESS
    [data] = memory.get_finished_metrics()
    assert [rm.resource for rm in data.resource_metrics] == [theirs.resource, ours]
    assert [sm.scope.name for sm in data.resource_metrics[1].scope_metrics] == ["inferscope"]


def test_exporter_never_raises_and_counts_failures(
    aggregator: Aggregator, populated: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    delegate = FlakyExporter(["raise", "fail", "ok"])
    wrapper = AggregatesExporter(
        delegate, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES
    )
    caplog.set_level(logging.WARNING, logger="inferscope")
    assert wrapper.export(MetricsData([])) is MetricExportResult.FAILURE
    assert wrapper.export(MetricsData([])) is MetricExportResult.FAILURE
    assert wrapper.failed_exports == 2
    assert wrapper.export(MetricsData([])) is MetricExportResult.SUCCESS
    # The failures are exported with the next batch that gets through.
    assert [p.value for p in points(delegate.received[-1:], EXPORTS_FAILED)] == [2]
    # Logged once: at most once a minute.
    assert len([r for r in caplog.records if r.name == "inferscope"]) == 1


def test_exporter_survives_a_failing_source(aggregator: Aggregator) -> None:
    def broken() -> AggregateView:
        raise RuntimeError("ring exploded")

    delegate = FlakyExporter()
    wrapper = AggregatesExporter(delegate, broken, resource=Resource.create({}), boundaries=BOUNDARIES)
    sdk_data = MetricsData([ResourceMetrics(Resource.create({"service.name": "user"}), [], "")])
    assert wrapper.export(sdk_data) is MetricExportResult.FAILURE
    assert wrapper.failed_exports == 1
    assert delegate.received == [sdk_data]  # the user's own metrics still went out
    # With no data of the SDK's either, nothing is sent, and the failure is still counted.
    assert wrapper.export(MetricsData([])) is MetricExportResult.FAILURE
    assert wrapper.failed_exports == 2
    assert delegate.received == [sdk_data]


def test_inactive_exporter_adds_nothing(aggregator: Aggregator, populated: dict[str, int]) -> None:
    calls: list[int] = []

    def source() -> AggregateView:
        calls.append(1)
        return aggregator.view()

    delegate = FlakyExporter()
    wrapper = AggregatesExporter(delegate, source, resource=Resource.create({}), boundaries=BOUNDARIES)
    wrapper.active = False
    sdk_data = MetricsData([ResourceMetrics(Resource.create({"service.name": "user"}), [], "")])
    assert wrapper.export(sdk_data) is MetricExportResult.SUCCESS
    assert wrapper.export(MetricsData([])) is MetricExportResult.SUCCESS
    assert delegate.received == [sdk_data] and delegate.received[0] is sdk_data
    assert calls == []
    wrapper.active = True
    wrapper.export(MetricsData([]))
    assert calls == [1] and points(delegate.received[-1:], INFERENCE_DURATION)


def test_exporter_follows_the_delegates_temporality(aggregator: Aggregator, registry: KeyRegistry) -> None:
    preferred = {HistogramInstrument: AggregationTemporality.DELTA}
    memory = InMemoryMetricExporter(preferred_temporality=preferred)
    wrapper = AggregatesExporter(memory, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES)
    assert wrapper._preferred_temporality == preferred
    key = registry.inference_key("fraud")
    feed(aggregator, key, [0.01, 0.02])
    wrapper.export(MetricsData([]))
    feed(aggregator, key, [0.03])
    wrapper.export(MetricsData([]))
    first, second = memory.points(INFERENCE_DURATION)
    assert (first.count, second.count) == (2, 1)
    [metric] = [m for m in metrics_in(memory.get_finished_metrics()[-1]) if m.name == INFERENCE_DURATION]
    assert metric.data.aggregation_temporality is AggregationTemporality.DELTA

    cumulative = AggregatesExporter(
        FlakyExporter(), aggregator.view, resource=Resource.create({}), boundaries=[1.0]
    )
    assert cumulative.temporality is AggregationTemporality.CUMULATIVE


def metrics_in(data: MetricsData) -> list[Metric]:
    return [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def test_flush_and_shutdown_delegate_timeouts(aggregator: Aggregator) -> None:
    delegate = FlakyExporter()
    wrapper = AggregatesExporter(
        delegate, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES
    )
    assert wrapper.force_flush(timeout_millis=1234) is True
    wrapper.shutdown(timeout_millis=4321)
    assert delegate.calls == [("force_flush", 1234), ("shutdown", 4321)]


# --- wrap_meter_provider --------------------------------------------------------------------------


def test_wrap_and_unwrap_meter_provider(aggregator: Aggregator, populated: dict[str, int]) -> None:
    first, second = InMemoryMetricExporter(), InMemoryMetricExporter()
    reader_a = PeriodicExportingMetricReader(first, export_interval_millis=math.inf)
    reader_b = PeriodicExportingMetricReader(second, export_interval_millis=math.inf)
    pull = InMemoryMetricReader()  # not periodic: joined through its collect callback
    resource = Resource.create({"service.name": "users-own"})
    provider = MeterProvider(metric_readers=[reader_a, pull], resource=resource)
    provider.add_metric_reader(reader_b)
    collect_a = reader_a._collect
    try:
        wrappers = wrap_meter_provider(provider, aggregator.view, boundaries=BOUNDARIES)
        assert [w.delegate for w in wrappers] == [first, second]
        assert points([pull.get_metrics_data()], INFERENCE_DURATION)
        assert reader_a._exporter is wrappers[0] and reader_b._exporter is wrappers[1]
        # Idempotent: the same wrappers, no wrapper around a wrapper.
        again = wrap_meter_provider(provider, aggregator.view, boundaries=BOUNDARIES)
        assert [id(w) for w in again] == [id(w) for w in wrappers]
        assert reader_a._exporter.delegate is first

        # The provider has no instruments, yet our points ride out, under the provider's resource.
        provider.force_flush()
        reader_b.force_flush()  # MeterProvider.force_flush only flushes the constructor's readers
        for memory in (first, second):
            [data] = memory.get_finished_metrics()
            assert data.resource_metrics[0].resource == resource
            assert points([data], INFERENCE_DURATION)

        unwrap_meter_provider(provider)
        assert reader_a._exporter is first and reader_b._exporter is second
        assert reader_a._collect is collect_a
        pull.get_metrics_data()  # what provider.force_flush() collected while wrapped
        assert pull.get_metrics_data() is None  # the SDK's own behaviour: nothing collected
        first.clear()
        provider.force_flush()
        assert first.get_finished_metrics() == []  # back to the SDK's own behaviour: nothing to export
    finally:
        provider.shutdown()


def test_export_empty_collections_is_idempotent(aggregator: Aggregator, populated: dict[str, int]) -> None:
    memory = InMemoryMetricExporter()
    wrapper = AggregatesExporter(memory, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES)
    reader = PeriodicExportingMetricReader(wrapper, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader])
    try:
        provider.force_flush()
        assert memory.get_finished_metrics() == []  # the SDK skips an empty collection
        export_empty_collections(reader)
        patched = reader._collect
        export_empty_collections(reader)
        assert reader._collect is patched
        provider.force_flush()
        assert len(memory.get_finished_metrics()) == 1
    finally:
        provider.shutdown()


# --- Prometheus -----------------------------------------------------------------------------------


def scrape(collector: PrometheusCollector) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_prometheus_collector(aggregator: Aggregator, populated: dict[str, int]) -> None:
    collector = PrometheusCollector(
        aggregator.view, BOUNDARIES, extra_counts=lambda: {EXPORTS_FAILED: 1}, signals=()
    )
    families = scrape(collector)
    # Counter family names come back without "_total" from the parser.
    assert {
        "inferscope_inference_duration_seconds",
        "inferscope_stage_duration_seconds",
        "inferscope_inference_cpu_time_seconds",
        "inferscope_stage_cpu_time_seconds",
        "inferscope_inference_abandoned",
        "inferscope_sdk_records_dropped",
        "inferscope_sdk_keys_overflowed",
        "inferscope_sdk_errors",
        "inferscope_sdk_exports_failed",
    } == set(families)

    duration = families["inferscope_inference_duration_seconds"]
    assert duration.type == "histogram"
    label_sets = {frozenset(s.labels) - {"le"} for s in duration.samples}
    assert label_sets == {
        frozenset({"inferscope_model_name", "inferscope_model_version", "team", "error_type"})
    }
    ok = {"inferscope_model_name": "fraud", "inferscope_model_version": "3", "team": "risk", "error_type": ""}
    buckets = {
        s.labels["le"]: s.value
        for s in duration.samples
        if s.name.endswith("_bucket") and {k: v for k, v in s.labels.items() if k != "le"} == ok
    }
    cumulative = np.cumsum(np.bincount(np.searchsorted(BOUNDARIES, OK), minlength=len(BOUNDARIES) + 1))
    assert buckets == {
        **{str(b): float(c) for b, c in zip(BOUNDARIES, cumulative[:-1], strict=True)},
        "+Inf": float(len(OK)),
    }
    sums = {
        s.labels["error_type"]: s.value
        for s in duration.samples
        if s.name.endswith("_sum") and s.labels["inferscope_model_name"] == "fraud"
    }
    assert sums == {"": pytest.approx(sum(OK)), "ValueError": pytest.approx(sum(FAILED))}
    ranker = [
        s
        for s in duration.samples
        if s.name.endswith("_count") and s.labels["inferscope_model_name"] == "ranker"
    ]
    assert [(s.labels["inferscope_model_version"], s.value) for s in ranker] == [("", 3.0)]

    stage = families["inferscope_stage_duration_seconds"]
    assert {s.labels["inferscope_stage_name"] for s in stage.samples} == {"infer", "infer/encoder"}
    dropped = {s.labels["reason"]: s.value for s in families["inferscope_sdk_records_dropped"].samples}
    assert dropped == {DROP_RING_FULL: 7.0, DROP_STACK_DEPTH: 0.0}
    assert [s.value for s in families["inferscope_sdk_errors"].samples if s.name.endswith("_total")] == [2.0]
    abandoned = [s for s in families["inferscope_inference_abandoned"].samples if s.name.endswith("_total")]
    assert [(s.labels["inferscope_model_name"], s.value) for s in abandoned] == [("ranker", 1.0)]


def test_prometheus_label_names_are_sanitized(registry: KeyRegistry, aggregator: Aggregator) -> None:
    key = registry.inference_key("m", attributes={"deploy.region": "eu-1", "k8s-pod": "p"})
    feed(aggregator, key, [0.01])
    families = scrape(PrometheusCollector(aggregator.view, BOUNDARIES, signals=()))
    [count] = [
        s for s in families["inferscope_inference_duration_seconds"].samples if s.name.endswith("_count")
    ]
    assert count.labels == {"inferscope_model_name": "m", "deploy_region": "eu-1", "k8s_pod": "p"}


def test_prometheus_collector_survives_a_failing_source() -> None:
    def broken() -> AggregateView:
        raise RuntimeError("ring exploded")

    assert scrape(PrometheusCollector(broken, BOUNDARIES, signals=())) == {}


def test_prometheus_server_uses_a_private_registry(aggregator: Aggregator, populated: dict[str, int]) -> None:
    server = start_prometheus_server(PrometheusCollector(aggregator.view, BOUNDARIES), port=0)
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        assert server.port != 0
        with urllib.request.urlopen(url, timeout=5) as response:
            body = response.read().decode()
        assert (
            'inferscope_inference_duration_seconds_count{error_type="",inferscope_model_name="fraud"' in body
        )
        assert b"inferscope_" not in generate_latest(REGISTRY)
    finally:
        server.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


# --- testing.InMemoryMetricExporter ---------------------------------------------------------------


def test_in_memory_exporter_is_thread_safe() -> None:
    exporter = InMemoryMetricExporter()

    def point(value: int) -> MetricsData:
        number = NumberDataPoint({}, 0, 1, value)
        metric = Metric("n", None, "1", Sum([number], AggregationTemporality.CUMULATIVE, True))
        return MetricsData(
            [
                ResourceMetrics(
                    Resource.create({}), [ScopeMetrics(InstrumentationScope("t"), [metric], "")], ""
                )
            ]
        )

    def worker(base: int) -> None:
        for i in range(200):
            exporter.export(point(base + i))

    threads = [threading.Thread(target=worker, args=(t * 1000,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = sorted(p.value for p in exporter.points("n"))
    assert values == sorted(t * 1000 + i for t in range(8) for i in range(200))
    assert exporter.latest_points("missing") == []
    exporter.clear()
    assert exporter.get_finished_metrics() == []
    exporter.shutdown()
    assert exporter.export(point(1)) is MetricExportResult.FAILURE


# --- one ScopeMetrics per scope (the OTLP encoder keeps one per scope) ------------------------------


def encoded_metric_names(data: MetricsData) -> list[str]:
    """The metric names that survive the OTLP encoder, as a collector would decode them."""
    request = encode_metrics(data)
    return [
        metric.name
        for resource_metrics in request.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    ]


def test_system_signals_and_aggregates_survive_the_otlp_encoder(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    from inferscope.export.points import _scope_version
    from inferscope.system.host import register_system_metrics

    resource = Resource.create({"service.name": "svc"})
    memory = InMemoryMetricExporter()
    wrapper = AggregatesExporter(memory, aggregator.view, resource=resource, boundaries=BOUNDARIES)
    reader = PeriodicExportingMetricReader(wrapper, export_interval_millis=math.inf)
    provider = MeterProvider(metric_readers=[reader], resource=resource)
    # As the pipeline does: the system signals live on the SDK meter of the same scope as our points.
    instruments = register_system_metrics(
        provider.get_meter("inferscope", _scope_version()), gpu=False, oversubscription=False
    )
    try:
        provider.force_flush()
    finally:
        provider.shutdown()
    [data] = memory.get_finished_metrics()
    [rm] = data.resource_metrics
    assert [sm.scope.name for sm in rm.scope_metrics] == ["inferscope"]  # merged, not two of one scope
    names = encoded_metric_names(data)
    assert len(names) == len(set(names))
    assert {"process.cpu.time", INFERENCE_DURATION, STAGE_DURATION, RECORDS_DROPPED} <= set(names)
    assert {i.name for i in instruments} <= set(names) | {
        "inferscope.container.cpu.limit",  # no points while the cgroup is unlimited
        "inferscope.container.memory.limit",
    }


def test_a_scope_of_another_version_is_kept_apart(aggregator: Aggregator, populated: dict[str, int]) -> None:
    number = NumberDataPoint({}, 0, 1, 4)
    theirs = ScopeMetrics(
        InstrumentationScope("inferscope", "0.0.1"),
        [Metric("old.metric", None, "1", Sum([number], AggregationTemporality.CUMULATIVE, True))],
        "",
    )
    resource = Resource.create({"service.name": "svc"})
    memory = InMemoryMetricExporter()
    wrapper = AggregatesExporter(memory, aggregator.view, resource=resource, boundaries=BOUNDARIES)
    wrapper.export(MetricsData([ResourceMetrics(resource, [theirs], "")]))
    [data] = memory.get_finished_metrics()
    names = encoded_metric_names(data)
    assert "old.metric" in names and INFERENCE_DURATION in names


# --- every reader kind of an application's MeterProvider ---------------------------------------------


class PullReader(MetricReader):
    """A reader that collects only when asked, as a scrape endpoint does (OTel's Prometheus reader)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.received: list[MetricsData] = []

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        self.received.append(metrics_data)

    def scrape(self) -> MetricsData:
        self.collect()
        return self.received[-1]

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def test_in_memory_and_pull_readers_get_the_histograms(
    registry: KeyRegistry, aggregator: Aggregator, populated: dict[str, int]
) -> None:
    memory_reader = InMemoryMetricReader()
    pull = PullReader(preferred_temporality={HistogramInstrument: AggregationTemporality.DELTA})
    resource = Resource.create({"service.name": "app"})
    provider = MeterProvider(metric_readers=[memory_reader, pull], resource=resource)
    provider.get_meter("user.code").create_counter("user.requests").add(2)
    try:
        assert wrap_meter_provider(provider, aggregator.view, boundaries=BOUNDARIES) == []
        data = memory_reader.get_metrics_data()
        assert data is not None
        [rm] = data.resource_metrics
        assert rm.resource == resource
        assert {sm.scope.name for sm in rm.scope_metrics} == {"user.code", "inferscope"}
        [ok] = [p for p in points([data], INFERENCE_DURATION) if dict(p.attributes) == FRAUD]
        assert ok.count == len(OK)
        assert [p.value for p in points([data], "user.requests")] == [2]

        # The pull reader asked for delta: a second scrape carries only what happened in between.
        first = pull.scrape()
        assert {p.count for p in points([first], INFERENCE_DURATION) if dict(p.attributes) == FRAUD} == {
            len(OK)
        }
        feed(aggregator, populated["fraud"], [0.0023])
        second = pull.scrape()
        [delta] = [p for p in points([second], INFERENCE_DURATION) if dict(p.attributes) == FRAUD]
        assert delta.count == 1
        metric = next(
            m for m in second.resource_metrics[0].scope_metrics[-1].metrics if m.name == INFERENCE_DURATION
        )
        assert metric.data.aggregation_temporality is AggregationTemporality.DELTA

        # Idempotent: wrapping again adds no second copy.
        wrap_meter_provider(provider, aggregator.view, boundaries=BOUNDARIES)
        again = memory_reader.get_metrics_data()
        assert again is not None
        names = [m.name for sm in again.resource_metrics[0].scope_metrics for m in sm.metrics]
        assert names.count(INFERENCE_DURATION) == 1
    finally:
        unwrap_meter_provider(provider)
        provider.shutdown()


def test_a_reader_the_sdk_keeps_out_of_reach_is_refused_with_config_error(
    aggregator: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    from inferscope import ConfigError

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        del reader._collect  # what a future SDK that keeps the callback elsewhere looks like
        with caplog.at_level(logging.WARNING, logger="inferscope"), pytest.raises(ConfigError) as raised:
            wrap_meter_provider(provider, aggregator.view, boundaries=BOUNDARIES)
        assert "meter_provider" in str(raised.value)
        assert "constraints/otel.txt" in str(raised.value)
    finally:
        reader._collect = None  # type: ignore[assignment]
        provider.shutdown()


def test_a_failing_collection_keeps_the_applications_points(
    aggregator: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> AggregateView:
        raise RuntimeError("ring exploded")

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("user.code").create_counter("user.requests").add(1)
    try:
        wrap_meter_provider(provider, broken, boundaries=BOUNDARIES)
        with caplog.at_level(logging.WARNING, logger="inferscope"):
            data = reader.get_metrics_data()
        assert [p.value for p in points([data], "user.requests")] == [1]
        assert "adding inferscope's points" in caplog.text
    finally:
        unwrap_meter_provider(provider)
        provider.shutdown()


# --- provider metrics (the tax meter's) --------------------------------------------------------------


def test_provider_metrics_ride_along_on_otlp_and_prometheus(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    from inferscope.export import spec

    tax = [(0.004, {MODEL_NAME: "fraud", STAGE_NAME: "infer"})]
    memory = InMemoryMetricExporter()
    spec.register_provider("inferscope.tax.latency", lambda: tax)
    try:
        wrapper = AggregatesExporter(
            memory, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES
        )
        wrapper.export(MetricsData([]))
        [point] = memory.points("inferscope.tax.latency")
        assert (point.value, dict(point.attributes)) == (0.004, tax[0][1])
        assert memory.points("inferscope.tax.cpu") == []  # no provider: no points
        families = scrape(PrometheusCollector(aggregator.view, BOUNDARIES))
        [sample] = families["inferscope_tax_latency_seconds"].samples
        assert sample.value == 0.004 and sample.labels["inferscope_stage_name"] == "infer"
        assert spec.get("inferscope.tax.latency").unavailable_reason() is None
    finally:
        spec.unregister_provider("inferscope.tax.latency")
    assert "no provider" in (spec.get("inferscope.tax.latency").unavailable_reason() or "")
    with pytest.raises(ValueError, match="not a provider metric"):
        spec.register_provider("process.cpu.time", lambda: [])


def test_a_failing_provider_costs_only_its_own_points(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    from inferscope.export import spec
    from inferscope.system.host import GUARD

    def broken() -> list[tuple[float, dict[str, str]]]:
        raise RuntimeError("detector busy")

    before = GUARD.total()
    spec.register_provider("inferscope.regression.active", broken)
    try:
        memory = InMemoryMetricExporter()
        wrapper = AggregatesExporter(
            memory, aggregator.view, resource=Resource.create({}), boundaries=BOUNDARIES
        )
        assert wrapper.export(MetricsData([])) is MetricExportResult.SUCCESS
        assert memory.points(INFERENCE_DURATION)
        assert memory.points("inferscope.regression.active") == []
        assert GUARD.total() == before + 1
    finally:
        spec.unregister_provider("inferscope.regression.active")


# --- the Prometheus endpoint: signals, target_info, /metrics only -------------------------------------


def test_prometheus_serves_system_signals_and_target_info(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    resource = Resource.create(
        {"service.name": "fraud-svc", "inferscope.env.fingerprint": "ab12", "process.pid": 7}
    )
    families = scrape(PrometheusCollector(aggregator.view, BOUNDARIES, resource=resource))
    cpu = families["process_cpu_time_seconds"]
    assert cpu.type == "counter"
    assert {s.labels["cpu_mode"] for s in cpu.samples if s.name.endswith("_total")} == {"user", "system"}
    assert families["process_memory_usage_bytes"].type == "gauge"
    assert families["process_memory_usage_bytes"].samples[0].value > 0
    assert "process_thread_count" in families
    [info] = families["target_info"].samples
    assert info.name == "target_info" and info.value == 1
    assert info.labels["service_name"] == "fraud-svc"
    assert info.labels["inferscope_env_fingerprint"] == "ab12"
    assert info.labels["process_pid"] == "7"
    # Every served family's name is the one the specification gives.
    from inferscope.export import spec

    served = {s.name for family in families.values() for s in family.samples}
    for entry in spec.METRICS.values():
        if entry.source == "system" and entry.prometheus_name.removesuffix("_total") in families:
            assert entry.prometheus_name in served or entry.prometheus_name + "_total" in served


def test_prometheus_endpoint_serves_metrics_and_404_elsewhere(
    aggregator: Aggregator, populated: dict[str, int]
) -> None:
    server = start_prometheus_server(
        PrometheusCollector(aggregator.view, BOUNDARIES, resource=Resource.create({"service.name": "s"})),
        port=0,
    )
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
        assert "process_cpu_time_seconds_total" in body and "target_info{" in body
        for path in ("/", "/favicon.ico", "/metricsx", "/other/metrics"):
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(base + path, timeout=5)
            assert raised.value.code == 404, path
    finally:
        server.shutdown()


def test_configure_with_an_in_memory_reader_gets_the_histograms() -> None:
    import inferscope
    from inferscope import _pipeline

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "tests-own"}))

    @inferscope.track_inference(model="in-memory")
    def predict() -> None:
        with inferscope.stage("infer"):
            pass

    try:
        inferscope.configure(meter_provider=provider, metrics_exporters=[])
        for _ in range(3):
            predict()
        data = reader.get_metrics_data()
        assert data is not None
        [point] = [
            p for p in points([data], INFERENCE_DURATION) if dict(p.attributes)[MODEL_NAME] == "in-memory"
        ]
        assert point.count == 3
        assert points([data], "process.cpu.time")  # the system signals ride on the same reader
        assert data.resource_metrics[0].resource.attributes["service.name"] == "tests-own"
    finally:
        _pipeline.configure()
        provider.shutdown()


def test_configure_refuses_a_provider_whose_readers_cannot_be_joined() -> None:
    import inferscope
    from inferscope import ConfigError, _pipeline

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        del reader._collect
        with pytest.raises(ConfigError, match="meter_provider"):
            inferscope.configure(meter_provider=provider, metrics_exporters=[])
    finally:
        reader._collect = None  # type: ignore[assignment]
        _pipeline.configure()
        provider.shutdown()
