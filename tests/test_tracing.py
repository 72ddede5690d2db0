"""Traces: spans built from records after the fact, their context, sampling, cap and exemplars.

Every test runs on the backend in use (CI runs the suite once per backend), through the public
API, with the SDK's real span pipeline and an in-memory span exporter at its end.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import opentelemetry.context as otel_context
import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags, set_span_in_context

import inferscope
from inferscope import _pipeline
from inferscope._records import FLAG_TRACED, empty_records
from inferscope._runtime import RUNTIME
from inferscope.export.traces import EXEMPLARS_PER_KEY, ExemplarStore, TracingRuntimeContext
from inferscope.testing import InMemoryMetricExporter, points


class Traced:
    """inferscope configured with an in-memory span exporter; ``spans()`` flushes and reads them."""

    def __init__(self, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        inferscope.configure(span_exporters=[self.exporter], **settings)

    def spans(self) -> list[ReadableSpan]:
        _pipeline.DRAINER.drain()
        exports = _pipeline._exports
        assert exports is not None and exports.traces is not None
        exports.traces.force_flush()
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name == name]


@pytest.fixture
def traced() -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(**settings: Any) -> Traced:
        made.append(Traced(**settings))
        return made[-1]

    yield make
    _pipeline.configure()  # back to the environment: tracing off


@pytest.fixture
def user_tracer() -> Iterator[tuple[Any, InMemorySpanExporter]]:
    """The application's own SDK tracer, exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("app"), exporter
    provider.shutdown()


def by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    found: dict[str, ReadableSpan] = {}
    for span in spans:
        assert span.name not in found, f"two spans called {span.name!r}"
        found[span.name] = span
    return found


def test_an_inference_is_a_span_with_its_stages_as_children(traced: Callable[..., Traced]) -> None:
    t = traced(trace_ratio=1.0)
    measured: dict[str, float] = {}

    @inferscope.track_inference(model="fraud", version="3")
    def predict() -> int:
        with inferscope.stage("preprocess"):
            begin = time.perf_counter()
            time.sleep(0.02)
            with inferscope.stage("tokenize"):
                time.sleep(0.01)
            measured["preprocess"] = time.perf_counter() - begin
        with inferscope.stage("infer"):
            sum(range(20000))
        return 1

    begin = time.perf_counter()
    predict()
    measured["inference"] = time.perf_counter() - begin

    spans = by_name(t.spans())
    assert set(spans) == {"inference fraud", "stage preprocess", "stage preprocess/tokenize", "stage infer"}
    root = spans["inference fraud"]
    trace_id = root.context.trace_id
    assert root.parent is None and all(s.context.trace_id == trace_id for s in spans.values())
    assert spans["stage preprocess"].parent.span_id == root.context.span_id
    assert spans["stage infer"].parent.span_id == root.context.span_id
    assert spans["stage preprocess/tokenize"].parent.span_id == spans["stage preprocess"].context.span_id
    assert len({s.context.span_id for s in spans.values()}) == 4

    # The real timestamps: children inside their parents, durations as measured around the calls.
    for child, parent in [
        ("stage preprocess", "inference fraud"),
        ("stage infer", "inference fraud"),
        ("stage preprocess/tokenize", "stage preprocess"),
    ]:
        assert spans[parent].start_time <= spans[child].start_time
        assert spans[child].end_time <= spans[parent].end_time
    preprocess = spans["stage preprocess"]
    # Measured inside the stage and around the call: the span lies between the two.
    assert measured["preprocess"] <= (preprocess.end_time - preprocess.start_time) / 1e9
    assert (preprocess.end_time - preprocess.start_time) / 1e9 <= (root.end_time - root.start_time) / 1e9
    assert (root.end_time - root.start_time) / 1e9 <= measured["inference"]
    assert abs(root.start_time - time.time_ns()) < 60e9  # the wall clock, not the monotonic one

    attributes = dict(root.attributes)
    assert attributes["inferscope.model.name"] == "fraud"
    assert attributes["inferscope.model.version"] == "3"
    assert attributes["inferscope.trace.kept"] == "sampled"
    stage = dict(spans["stage preprocess/tokenize"].attributes)
    assert stage["inferscope.stage.name"] == "preprocess/tokenize"
    assert stage["inferscope.model.name"] == "fraud"
    # Sleeping is waiting: off-CPU time, not CPU time (counters=default reads the thread clock).
    assert stage["inferscope.off_cpu.time"] > 0.005 > stage["inferscope.cpu.time"] >= 0
    assert root.status.status_code is StatusCode.UNSET


def test_a_failure_is_an_error_status_with_an_exception_event(traced: Callable[..., Traced]) -> None:
    t = traced(trace_ratio=0.0)  # kept because it failed

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"):
            raise KeyError("no such feature")

    with pytest.raises(KeyError):
        predict()
    spans = by_name(t.spans())
    for name in ("inference m", "stage infer"):
        span = spans[name]
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == "KeyError"
        assert span.attributes["error.type"] == "KeyError"
        [event] = span.events
        assert event.name == "exception" and event.attributes["exception.type"] == "KeyError"
        assert event.timestamp == span.end_time
    assert spans["inference m"].attributes["inferscope.trace.kept"] == "error"


def test_an_inference_inside_an_active_span_is_its_child(traced, user_tracer) -> None:
    t = traced(trace_ratio=0.0)
    tracer, _ = user_tracer

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"):
            pass

    with tracer.start_as_current_span("POST /predict") as server:
        predict()
    spans = by_name(t.spans())
    root = spans["inference m"]
    assert root.parent is not None
    assert root.parent.span_id == server.get_span_context().span_id
    assert root.context.trace_id == server.get_span_context().trace_id
    # The parent was sampled, so the call was kept whatever the ratio: no trace is broken.
    assert root.attributes["inferscope.trace.kept"] == "sampled"
    assert spans["stage infer"].parent.span_id == root.context.span_id


def test_spans_made_inside_a_stage_are_its_children_and_stages_inside_them_theirs(
    traced, user_tracer
) -> None:
    t = traced(trace_ratio=1.0)
    tracer, user_spans = user_tracer

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("preprocess"):
            with tracer.start_as_current_span("feature store lookup"):
                with inferscope.stage("decode"):
                    pass
            with tracer.start_as_current_span("after"):
                pass

    predict()
    ours = by_name(t.spans())
    theirs = by_name(list(user_spans.get_finished_spans()))
    lookup = theirs["feature store lookup"]
    assert lookup.parent.span_id == ours["stage preprocess"].context.span_id
    assert lookup.context.trace_id == ours["inference m"].context.trace_id
    assert lookup.context.trace_flags.sampled  # the call was sampled when it started
    assert ours["stage preprocess/decode"].parent.span_id == lookup.context.span_id
    # Once the application's span ended, the stage is the current span again.
    assert theirs["after"].parent.span_id == ours["stage preprocess"].context.span_id


def test_outside_any_call_the_current_context_is_untouched(traced, user_tracer) -> None:
    traced(trace_ratio=1.0)
    tracer, _ = user_tracer
    assert isinstance(otel_context._RUNTIME_CONTEXT, TracingRuntimeContext)
    with tracer.start_as_current_span("alone") as span:
        assert otel_context.get_current() is otel_context._RUNTIME_CONTEXT.inner.get_current()
        assert span.get_span_context().trace_id != 0
    assert otel_context.get_current() == {}


def test_a_remote_unsampled_parent_is_respected(traced) -> None:
    t = traced(trace_ratio=1.0, trace_slow_ms="off", trace_errors=False)
    parent = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))

    @inferscope.track_inference(model="m")
    def predict() -> None:
        pass

    token = otel_context.attach(set_span_in_context(NonRecordingSpan(parent)))
    try:
        predict()
    finally:
        otel_context.detach(token)
    assert t.spans() == []  # parent-based: the upstream said no

    sampled = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    token = otel_context.attach(set_span_in_context(NonRecordingSpan(sampled)))
    try:
        predict()
    finally:
        otel_context.detach(token)
    [span] = t.spans()
    assert span.context.trace_id == 0xABC and span.parent.span_id == 0xDEF and span.parent.is_remote


def test_slow_calls_and_errors_are_kept_and_the_rest_dropped(traced) -> None:
    t = traced(trace_ratio=0.0, trace_slow_ms=15)

    @inferscope.track_inference(model="m")
    def predict(seconds: float, fail: bool = False) -> None:
        with inferscope.stage("infer"):
            time.sleep(seconds)
            if fail:
                raise ValueError

    for _ in range(20):
        predict(0)
    predict(0.03)
    with pytest.raises(ValueError):
        predict(0, fail=True)
    roots = t.named("inference m")
    assert sorted(span.attributes["inferscope.trace.kept"] for span in roots) == ["error", "slow"]
    assert len(t.named("stage infer")) == 2  # the stages of kept calls, and only those
    assert inferscope.snapshot().row("m").count == 22  # metrics see every call


def test_errors_are_not_kept_when_asked_not_to(traced) -> None:
    t = traced(trace_ratio=0.0, trace_slow_ms="off", trace_errors=False)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        raise ValueError

    with pytest.raises(ValueError):
        predict()
    assert t.spans() == []


def test_relative_threshold_keeps_calls_above_the_running_p99(traced) -> None:
    t = traced(trace_ratio=0.0, trace_slow_ms="p99")

    @inferscope.track_inference(model="m")
    def predict(seconds: float) -> None:
        time.sleep(seconds)

    for _ in range(150):
        predict(0)
    # Once a key has 100 calls its p99 applies, and about 1 call in 100 is above it by definition.
    warm = len(t.spans())
    assert warm <= 6
    predict(0.02)
    spans = t.spans()
    assert len(spans) == warm + 1
    assert spans[-1].attributes["inferscope.trace.kept"] == "slow"
    assert spans[-1].end_time - spans[-1].start_time >= 20_000_000


def test_the_ratio_keeps_its_share_of_calls(traced) -> None:
    ratio, calls = 0.2, 3000
    t = traced(trace_ratio=ratio, trace_slow_ms="off")

    @inferscope.track_inference(model="m")
    def predict() -> None:
        pass

    for _ in range(calls):
        predict()
    kept = len(t.spans())
    sigma = math.sqrt(calls * ratio * (1 - ratio))
    assert abs(kept - calls * ratio) < 5 * sigma, (kept, calls * ratio)


def test_the_cap_limits_spans_from_slow_calls_and_counts_the_rest(traced) -> None:
    t = traced(trace_ratio=0.0, trace_slow_ms=0.000001, trace_max_spans_per_second=10)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"):
            pass

    for _ in range(200):
        predict()
    spans = t.spans()
    roots = [s for s in spans if s.name == "inference m"]
    assert 1 <= len(roots) <= 10  # a budget of 10 spans a second, two per call; a little refill
    view = _pipeline.AGGREGATOR.view()  # what inferscope.sdk.spans.dropped exports
    assert view.spans_dropped["rate_limit"] == 2 * (200 - len(roots))
    assert len(spans) == 2 * len(roots)


def test_a_generator_is_one_span_and_its_stages_its_children(traced) -> None:
    t = traced(trace_ratio=1.0)

    @inferscope.track_inference(model="gen")
    def tokens():
        for i in range(3):
            with inferscope.stage("decode"):
                yield i

    for _ in tokens():
        with inferscope.stage("consume"):
            pass
    spans = t.spans()
    [root] = [s for s in spans if s.name == "inference gen"]
    decodes = [s for s in spans if s.name == "stage decode"]
    assert len(decodes) == 3
    assert all(s.parent.span_id == root.context.span_id for s in decodes)
    consumes = [s for s in spans if s.name == "stage consume"]
    assert consumes and all(s.context.trace_id != root.context.trace_id for s in consumes)


def test_bind_carries_the_span_into_a_worker_thread(traced) -> None:
    t = traced(trace_ratio=1.0)

    def shard() -> None:
        with inferscope.stage("shard"):
            pass

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"), ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda f: f(), [inferscope.bind(shard)] * 2))

    predict()
    spans = t.spans()
    [infer] = [s for s in spans if s.name == "stage infer"]
    shards = [s for s in spans if s.name == "stage infer/shard"]
    assert len(shards) == 2 and all(s.parent.span_id == infer.context.span_id for s in shards)


def test_asyncio_tasks_nest_under_the_inference(traced) -> None:
    t = traced(trace_ratio=1.0)

    async def part(i: int) -> None:
        with inferscope.stage("part"):
            await asyncio.sleep(0)

    @inferscope.track_inference(model="m")
    async def predict() -> None:
        await asyncio.gather(part(0), part(1))

    asyncio.run(predict())
    spans = t.spans()
    [root] = [s for s in spans if s.name == "inference m"]
    parts = [s for s in spans if s.name == "stage part"]
    assert len(parts) == 2 and all(s.parent.span_id == root.context.span_id for s in parts)


def test_threads_trace_independently(traced) -> None:
    t = traced(trace_ratio=1.0)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"):
            pass

    workers = [threading.Thread(target=lambda: [predict() for _ in range(50)]) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    spans = t.spans()
    roots = {s.context.span_id: s for s in spans if s.name == "inference m"}
    stages = [s for s in spans if s.name == "stage infer"]
    assert len(roots) == 200 and len(stages) == 200
    assert all(s.parent.span_id in roots for s in stages)
    assert len({s.context.trace_id for s in roots.values()}) == 200


def kept_with_exemplars(traced) -> tuple[Traced, InMemoryMetricExporter, Callable[[], None]]:
    """Every call kept, metrics exported to memory at shutdown only, and a call with one stage."""
    metrics = InMemoryMetricExporter()
    t = traced(trace_ratio=1.0, metric_exporters=[metrics], export_interval_millis=3_600_000)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        with inferscope.stage("infer"):
            pass

    return t, metrics, predict


def test_kept_spans_become_exemplars_of_the_duration_histograms(traced) -> None:
    t, metrics, predict = kept_with_exemplars(traced)
    predict()
    spans = by_name(t.spans())
    inferscope.shutdown()  # the final export
    [point] = points(metrics.get_finished_metrics(), "inferscope.inference.duration")
    [exemplar] = point.exemplars
    root = spans["inference m"]
    assert (exemplar.trace_id, exemplar.span_id) == (root.context.trace_id, root.context.span_id)
    assert exemplar.time_unix_nano == root.end_time
    assert exemplar.value == pytest.approx((root.end_time - root.start_time) / 1e9)
    [stage_point] = points(metrics.get_finished_metrics(), "inferscope.stage.duration")
    assert stage_point.exemplars[0].span_id == spans["stage infer"].context.span_id

    # And as the OTLP exporter encodes them: the ids as bytes, the time, the value.
    [data] = metrics.get_finished_metrics()
    encoded = encode_metrics(data)
    found = [
        exemplar
        for resource in encoded.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "inferscope.inference.duration"
        for point in metric.exponential_histogram.data_points
        for exemplar in point.exemplars
    ]
    [proto] = found
    assert proto.trace_id == root.context.trace_id.to_bytes(16, "big")
    assert proto.span_id == root.context.span_id.to_bytes(8, "big")
    assert proto.time_unix_nano == root.end_time


def test_each_series_keeps_the_exemplars_of_its_newest_kept_spans(traced) -> None:
    t, metrics, predict = kept_with_exemplars(traced)
    calls = 3 * EXEMPLARS_PER_KEY  # drained in one batch or several, only the newest are kept
    for _ in range(calls):
        predict()
    spans = t.spans()
    inferscope.shutdown()  # the final export
    for metric, name in (
        ("inferscope.inference.duration", "inference m"),
        ("inferscope.stage.duration", "stage infer"),
    ):
        kept = [s for s in spans if s.name == name]  # in the order they were built
        assert len(kept) == calls
        [point] = points(metrics.get_finished_metrics(), metric)
        newest = [(s.context.trace_id, s.context.span_id) for s in kept[-EXEMPLARS_PER_KEY:]]
        assert [(e.trace_id, e.span_id) for e in point.exemplars] == newest


def test_the_newest_per_key_are_the_last_of_each_key() -> None:
    store = ExemplarStore(per_key=2)
    assert store.newest_per_key([1, 2, 1, 1, 2, 3]) == [False, True, True, True, True, True]
    assert store.newest_per_key([]) == []


def test_a_user_tracer_provider_gets_the_spans(user_tracer) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        inferscope.configure(tracer_provider=provider, trace_ratio=1.0)

        @inferscope.track_inference(model="m")
        def predict() -> None:
            pass

        predict()
        inferscope.shutdown()
        [span] = exporter.get_finished_spans()
        assert span.name == "inference m" and span.resource is provider.resource
    finally:
        _pipeline.configure()
        provider.shutdown()


def test_tracing_off_costs_the_hot_path_nothing() -> None:
    _pipeline.configure()
    assert not RUNTIME.tracing
    assert not isinstance(otel_context._RUNTIME_CONTEXT, TracingRuntimeContext)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        pass

    predict()
    buffer = empty_records(16)
    n = RUNTIME.ring.drain(buffer)
    records = buffer[:n]
    assert n == 1 and not (records["flags"] & FLAG_TRACED).any() and records["span_id"][0] == 0


def test_turning_tracing_off_restores_the_otel_context(traced) -> None:
    traced(trace_ratio=1.0)
    assert RUNTIME.tracing
    _pipeline.configure()
    assert not RUNTIME.tracing
    assert not isinstance(otel_context._RUNTIME_CONTEXT, TracingRuntimeContext)


def test_shutdown_flushes_every_span_recorded_before_it(traced) -> None:
    t = traced(trace_ratio=1.0)

    @inferscope.track_inference(model="m")
    def predict() -> None:
        pass

    for _ in range(500):
        predict()
    inferscope.shutdown()
    assert len(t.exporter.get_finished_spans()) == 500


def test_a_forked_child_never_repeats_its_parents_ids() -> None:
    from tests.conftest import run_python

    result = run_python(
        """
        import os
        import inferscope
        from inferscope import _pipeline
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        inferscope.configure(span_exporters=[exporter], trace_ratio=1.0)

        @inferscope.track_inference(model="m")
        def predict():
            with inferscope.stage("infer"):
                pass

        predict()  # the ids of this thread are seeded now
        _pipeline.DRAINER.drain()
        _pipeline._exports.traces.force_flush()  # its two spans are in both processes' exporter
        read, write = os.pipe()
        pid = os.fork()
        predict()
        _pipeline.DRAINER.drain()
        _pipeline._exports.traces.force_flush()
        ids = sorted(f"{s.context.trace_id:x}/{s.context.span_id:x}" for s in exporter.get_finished_spans())
        if pid == 0:
            os.write(write, " ".join(ids).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read, 65536).decode().split()
        print(len(ids), len(child), len(set(ids) & set(child)))
        """
    )
    assert result.returncode == 0, result.stderr
    parent, child, shared = map(int, result.stdout.split())
    # Both hold the two spans made before fork, and two of their own: no id of those is shared.
    assert (parent, child, shared) == (4, 4, 2)


def test_an_unknown_runtime_context_leaves_tracing_off_and_says_why(monkeypatch, caplog) -> None:
    class Elsewhere(otel_context._RuntimeContext):  # e.g. a custom OTEL_PYTHON_CONTEXT
        def attach(self, context):  # type: ignore[no-untyped-def]
            return None

        def detach(self, token):  # type: ignore[no-untyped-def]
            pass

        def get_current(self):  # type: ignore[no-untyped-def]
            return otel_context.Context()

    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", Elsewhere())
    try:
        with caplog.at_level("WARNING", logger="inferscope"):
            inferscope.configure(span_exporters=[InMemorySpanExporter()], trace_ratio=1.0)
        assert not RUNTIME.tracing
        assert _pipeline._exports is not None and _pipeline._exports.traces is None
        assert "tracing is off: the OTel runtime context is Elsewhere" in caplog.text
        assert isinstance(otel_context._RUNTIME_CONTEXT, Elsewhere)
    finally:
        _pipeline.configure()


def test_the_prometheus_endpoint_carries_exemplars_to_openmetrics_scrapers(traced) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics import exposition as openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from inferscope.export.prometheus import PrometheusCollector

    t = traced(trace_ratio=1.0)

    @inferscope.track_inference(model="m")
    def predict(seconds: float) -> None:
        time.sleep(seconds)

    predict(0.002)
    predict(0.03)
    spans = t.named("inference m")
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(_pipeline.collect_view, [0.001, 0.01, 0.1]))
    families = {
        f.name: f for f in text_string_to_metric_families(openmetrics.generate_latest(registry).decode())
    }
    buckets = [
        s for s in families["inferscope_inference_duration_seconds"].samples if s.name.endswith("_bucket")
    ]
    found = {s.labels["le"]: s.exemplar for s in buckets if s.exemplar is not None}
    by_span = {f"{s.context.span_id:016x}": s for s in spans}
    assert set(found) == {"0.01", "0.1"}  # each call's exemplar in the bucket its duration falls in
    for le, exemplar in found.items():
        span = by_span[exemplar.labels["span_id"]]
        assert exemplar.labels["trace_id"] == f"{span.context.trace_id:032x}"
        assert exemplar.value == pytest.approx((span.end_time - span.start_time) / 1e9)
        assert exemplar.value <= float(le)
        stamp = exemplar.timestamp
        assert stamp.sec * 1_000_000_000 + stamp.nsec == pytest.approx(span.end_time, abs=1_000)
    assert b" # {" not in generate_latest(registry)  # the classic text format has no exemplars
