"""The metric specification: one entry per metric, and everything that exports or documents a metric
agrees with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from inferscope.counters import COUNTER_SETS, COUNTERS, counter_metrics, counters_of
from inferscope.export import points as export_points
from inferscope.export import spec
from inferscope.system.gpu import GPU_METRICS
from inferscope.system.host import register_system_metrics, system_signals

DOC = Path(__file__).parent.parent / "docs" / "metrics.md"
ALL_COUNTERS = 0
for _bit in (*COUNTERS.values(), *COUNTER_SETS.values()):
    ALL_COUNTERS |= _bit


def test_docs_tables_are_generated_from_the_specification() -> None:
    text = DOC.read_text()
    assert spec.replace_generated(text) == text, (
        "docs/metrics.md differs from the specification: run python -m inferscope.export docs/metrics.md"
    )
    for entry in spec.METRICS.values():
        assert f"`{entry.name}`" in text


def test_entries_are_well_formed() -> None:
    prometheus_names = [e.prometheus_name for e in spec.METRICS.values() if e.prometheus]
    assert len(prometheus_names) == len(set(prometheus_names))
    for entry in spec.METRICS.values():
        assert re.fullmatch(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+", entry.name), entry.name
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", entry.prometheus_name), entry.prometheus_name
        assert entry.kind in ("histogram", "counter", "updown", "gauge")
        assert entry.unit and entry.description
        assert entry.prometheus_name.endswith("_total") == (entry.kind == "counter")
        if entry.kind == "histogram":
            assert entry.unit == "s" and entry.prometheus_name.endswith("_seconds")


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        ("process.cpu.time", "s", "counter", "process_cpu_time_seconds_total"),
        ("process.memory.usage", "By", "updown", "process_memory_usage_bytes"),
        ("inferscope.sdk.records.dropped", "{record}", "counter", "inferscope_sdk_records_dropped_total"),
        ("hw.gpu.utilization", "1", "gauge", "hw_gpu_utilization_ratio"),
        ("hw.temperature", "Cel", "gauge", "hw_temperature_celsius"),
        ("x.bytes", "By", "gauge", "x_bytes"),
    ],
)
def test_prometheus_names_follow_the_standard_conversion(
    name: str, unit: str, kind: spec.Kind, expected: str
) -> None:
    assert spec.prometheus_name(name, unit, kind) == expected


def test_every_counter_that_a_mask_exports_is_in_the_specification() -> None:
    from inferscope.counters import _PERF_HARDWARE, _PERF_SOFTWARE

    metrics = [*counter_metrics(ALL_COUNTERS), *_PERF_HARDWARE, *_PERF_SOFTWARE]
    for metric in metrics:
        for scope in ("inference", "stage"):
            if metric in counters_of(metrics, scope):
                entry = spec.get(f"inferscope.{scope}.{metric.suffix}")
                assert entry.unit == metric.unit
                assert entry.monotonic == metric.monotonic
                assert {key for key, _ in metric.attributes} <= set(entry.attributes)


def test_the_exporters_histograms_and_counters_are_the_specifications() -> None:
    assert set(export_points._HISTOGRAMS) == {n for n, e in spec.METRICS.items() if e.kind == "histogram"}
    for name in (
        export_points.INFERENCE_ABANDONED,
        export_points.RECORDS_DROPPED,
        export_points.SPANS_DROPPED,
        export_points.KEYS_OVERFLOWED,
        export_points.SDK_ERRORS,
        export_points.EXPORTS_FAILED,
    ):
        assert spec.get(name).group in ("sdk", "inference")


def test_system_and_gpu_metrics_take_names_kinds_and_units_from_the_specification() -> None:
    assert {m.name for m in GPU_METRICS} == {n for n, e in spec.METRICS.items() if e.source == "gpu"}
    for metric in GPU_METRICS:
        assert metric.spec.source == "gpu"
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        instruments = register_system_metrics(provider.get_meter("inferscope"))
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    assert data is not None
    exported = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    for instrument in instruments:
        entry = spec.get(instrument.name)
        assert entry.source in ("system", "gpu")
        assert instrument.unit == entry.unit
        if instrument.name in exported:
            assert exported[instrument.name].description == entry.description
    signals = system_signals()
    assert [s.spec.name for s in signals] == [i.name for i in instruments]


def test_what_this_machine_can_produce_has_no_reason_and_the_rest_say_why() -> None:
    produced = {signal.spec.name for signal in system_signals()}
    # The limits are registered wherever the controller exists, and have points only under a limit.
    limits = {"inferscope.container.cpu.limit", "inferscope.container.memory.limit"}
    for entry in spec.METRICS.values():
        if entry.source not in ("system", "gpu") or entry.name in limits:
            continue
        reason = entry.unavailable_reason()
        if entry.name in produced:
            assert reason is None, (entry.name, reason)
        else:
            assert reason and entry.name in reason, entry.name


def test_a_need_whose_probe_raises_gives_a_reason_instead() -> None:
    def broken() -> str | None:
        raise OSError("no /proc")

    need = spec.Need("broken", "a broken probe", broken)
    entry = spec.MetricSpec("x.y", "gauge", "1", "A test metric.", needs=(need,))
    assert entry.unavailable_reason() == "x.y needs a broken probe: probing broken failed (OSError: no /proc)"


def test_collections_and_providers_survive_fork_under_busy_threads() -> None:
    """Threads add inferscope's points to a reader's collection, call providers and join a provider
    while the main thread forks: every child does the same and exits; none hangs on a lock of ours.
    (The SDK's own reader locks are not fork-safe, so the collection here is ours alone.)"""
    from tests.conftest import run_python

    result = run_python(
        """
        import os, threading, time
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.resources import Resource
        from inferscope import _otel_compat
        from inferscope._pipeline import collect_view
        from inferscope.export import spec
        from inferscope.export.points import PointBuilder
        from inferscope.export.sdk import _CollectWithAggregates, wrap_meter_provider

        spec.register_provider("inferscope.tax.cpu", lambda: [(0.001, {"inferscope.model.name": "m"})])
        collect = _CollectWithAggregates(
            lambda reader, timeout_millis: None,
            collect_view,  # the process's aggregates, which a fork hands over in a usable state
            resource=Resource.create({}),
            builder=PointBuilder(boundaries=[0.1, 1.0]),
        )
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()])

        def work():
            data = collect(None)
            names = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
            assert "inferscope.tax.cpu" in names, names
            wrap_meter_provider(provider, collect_view, boundaries=[0.1, 1.0])
            _otel_compat.warn_once("a test", "nothing")

        stop = threading.Event()

        def busy():
            while not stop.is_set():
                work()

        threads = [threading.Thread(target=busy) for _ in range(3)]
        for t in threads:
            t.start()
        hung = failed = 0
        for _ in range(40):
            pid = os.fork()
            if pid == 0:
                try:
                    work()
                except BaseException:
                    os._exit(3)
                os._exit(0)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    failed += os.waitstatus_to_exitcode(status) != 0
                    break
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.005)
        stop.set()
        for t in threads:
            t.join()
        print("hung", hung, "failed", failed)
        """,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "hung 0 failed 0"


def test_the_docs_command_rewrites_a_stale_table(tmp_path: Path) -> None:
    import subprocess
    import sys

    stale = tmp_path / "metrics.md"
    text = DOC.read_text()
    stale.write_text(text.replace("`process.cpu.time`", "`process.cpu.old`"))
    argv = [sys.executable, "-m", "inferscope.export", str(stale)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert stale.read_text() == text
    assert "Warning" not in result.stderr
