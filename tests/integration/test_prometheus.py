"""A real Prometheus 2.42 scrapes the collector and computes quantiles close to the truth."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest
from tests.integration.conftest import wait_until

from inferscope._keys import KeyRegistry
from inferscope._records import DROP_RING_FULL, DROP_STACK_DEPTH, empty_records
from inferscope.aggregator import Aggregator
from inferscope.export.prometheus import PrometheusCollector, start_prometheus_server

if TYPE_CHECKING:
    from conftest import Prometheus

pytestmark = pytest.mark.integration

# Lognormal latencies: median 50 ms, sigma 0.5, so the true p95 is exp(mu + z95 * sigma) ≈ 113.8 ms.
MU = math.log(0.050)
SIGMA = 0.5
Z95 = 1.6448536269514722
TRUE_P95 = math.exp(MU + Z95 * SIGMA)
SAMPLES = 20_000
SEED = 20261128

# Explicit buckets: coarse far away, 2% apart around the true p95, so Prometheus's linear
# interpolation inside one bucket can be off by at most ~2%.
NEAR = [round(0.090 * 1.02**i, 6) for i in range(24)]  # 0.090 .. 0.1419
BOUNDARIES = sorted({0.001, 0.005, 0.01, 0.025, 0.05, 0.075, *NEAR, 0.25, 0.5, 1.0, 2.5, 5.0})


def test_histogram_quantile_matches_true_p95(start_prometheus: Callable[[list[str]], Prometheus]) -> None:
    rng = np.random.default_rng(SEED)
    seconds = rng.lognormal(MU, SIGMA, SAMPLES)
    registry = KeyRegistry()
    key = registry.inference_key("fraud", "3")
    other = registry.inference_key("ranker")  # no version: its label is filled with ""
    batch = empty_records(SAMPLES + 10)
    batch["key"] = [key] * SAMPLES + [other] * 10
    batch["wall_ns"] = np.concatenate([np.round(seconds * 1e9), np.full(10, 2e9)]).astype(np.int64)
    batch["cpu_ns"] = -1
    aggregator = Aggregator(registry)
    aggregator.add(batch)
    aggregator.set_dropped(DROP_RING_FULL, 4)
    aggregator.set_dropped(DROP_STACK_DEPTH, 0)

    server = start_prometheus_server(PrometheusCollector(aggregator.view, BOUNDARIES), port=0)
    try:
        prometheus = start_prometheus([f"127.0.0.1:{server.port}"])
        query = (
            "histogram_quantile(0.95, sum by (le) "
            '(inferscope_inference_duration_seconds_bucket{inferscope_model_name="fraud"}))'
        )
        [sample] = prometheus.wait_for(query)
        estimate = float(sample["value"][1])

        # Within 5% of the distribution's true p95 (sampling error at n=20,000 is ~0.75%) ...
        assert estimate == pytest.approx(TRUE_P95, rel=0.05)
        # ... and inside the explicit bucket holding the sample's own p95, widened by one
        # scale-6 exponential bucket (2**(1/64)) on each side for the split of straddling buckets.
        empirical = float(np.percentile(seconds, 95))
        upper_index = int(np.searchsorted(BOUNDARIES, empirical))
        low, high = BOUNDARIES[upper_index - 1], BOUNDARIES[upper_index]
        assert low / 2 ** (1 / 64) <= estimate <= high * 2 ** (1 / 64), (low, estimate, high, empirical)

        [count] = prometheus.query(
            'inferscope_inference_duration_seconds_count{inferscope_model_name="fraud"}'
        )
        assert int(float(count["value"][1])) == SAMPLES
        assert count["metric"]["inferscope_model_version"] == "3"
        [total] = prometheus.query('inferscope_inference_duration_seconds_sum{inferscope_model_name="fraud"}')
        assert float(total["value"][1]) == pytest.approx(seconds.sum(), rel=1e-6)
        [ranker] = prometheus.query(
            'inferscope_inference_duration_seconds_count{inferscope_model_name="ranker"}'
        )
        assert "inferscope_model_version" not in ranker["metric"]  # Prometheus drops empty labels
        assert int(float(ranker["value"][1])) == 10

        dropped = {
            r["metric"]["reason"]: float(r["value"][1])
            for r in prometheus.query("inferscope_sdk_records_dropped_total")
        }
        assert dropped == {DROP_RING_FULL: 4.0, DROP_STACK_DEPTH: 0.0}
    finally:
        server.shutdown()


def test_exemplars_reach_prometheus_and_name_kept_spans(start_prometheus: Callable[..., Prometheus]) -> None:
    import time

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import inferscope
    from inferscope import _pipeline

    spans = InMemorySpanExporter()
    try:
        inferscope.configure(
            span_exporters=[spans], trace_ratio=1.0, metrics_exporters=["prometheus"], prometheus_port=0
        )
        port = _pipeline.prometheus_port()
        assert port is not None

        @inferscope.track_inference(model="exemplary")
        def predict() -> None:
            time.sleep(0.003)

        for _ in range(3):
            predict()
        _pipeline.DRAINER.drain()
        # Prometheus asks for OpenMetrics, where each bucket carries the newest kept span in it.
        prometheus = start_prometheus([f"127.0.0.1:{port}"], "--enable-feature=exemplar-storage")
        expr = 'inferscope_inference_duration_seconds_bucket{inferscope_model_name="exemplary"}'
        series = wait_until(lambda: prometheus.exemplars(expr), 20, "exemplars in Prometheus", 0.2)
        _pipeline._exports.traces.force_flush()  # type: ignore[union-attr]
        kept = {f"{s.context.span_id:016x}": s for s in spans.get_finished_spans()}
        found = [exemplar for entry in series for exemplar in entry["exemplars"]]
        assert found
        for exemplar in found:
            span = kept[exemplar["labels"]["span_id"]]
            assert exemplar["labels"]["trace_id"] == f"{span.context.trace_id:032x}"
            assert float(exemplar["value"]) == pytest.approx((span.end_time - span.start_time) / 1e9)
    finally:
        _pipeline.configure()


def test_system_signals_and_target_info_reach_prometheus(start_prometheus: Callable[..., Prometheus]) -> None:
    import urllib.error
    import urllib.request

    import inferscope
    from inferscope import _pipeline
    from inferscope.export import spec
    from inferscope.system.host import system_signals

    try:
        inferscope.configure(service_name="scraped-svc", metrics_exporters=["prometheus"], prometheus_port=0)
        port = _pipeline.prometheus_port()
        assert port is not None
        resource = _pipeline._exports.resource  # type: ignore[union-attr]

        # Only /metrics is served.
        for path in ("/", "/favicon.ico", "/metrics/extra"):
            with pytest.raises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
            assert raised.value.code == 404

        prometheus = start_prometheus([f"127.0.0.1:{port}"])
        [info] = prometheus.wait_for('target_info{service_name="scraped-svc"}')
        labels = info["metric"]
        assert labels["inferscope_env_fingerprint"] == resource.attributes["inferscope.env.fingerprint"]
        assert labels["process_pid"] == str(resource.attributes["process.pid"])
        assert float(info["value"][1]) == 1

        cpu = prometheus.wait_for("process_cpu_time_seconds_total")
        assert {sample["metric"]["cpu_mode"] for sample in cpu} == {"user", "system"}
        assert float(prometheus.wait_for("process_memory_usage_bytes")[0]["value"][1]) > 0

        # Every process, host and container signal this machine has, under the specification's name.
        expected = {s.spec.prometheus_name for s in system_signals() if s.observe()}
        assert {"process_cpu_time_seconds_total", "process_thread_count"} <= expected
        for name in sorted(expected):
            assert prometheus.wait_for(name), name
        for entry in spec.METRICS.values():
            if entry.source == "system" and entry.prometheus_name not in expected:
                assert entry.unavailable_reason() or entry.name.endswith(".limit"), entry.name
    finally:
        _pipeline.configure()
