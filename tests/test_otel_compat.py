"""The private OpenTelemetry attributes inferscope relies on: all in one module, all still there."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from inferscope import _otel_compat
from inferscope.testing import InMemoryMetricExporter

SRC = Path(_otel_compat.__file__).parent
CONSTRAINTS = SRC.parent.parent / "constraints" / "otel.txt"
PRIVATE = {attribute for _, attribute, _ in _otel_compat.PRIVATE_ATTRIBUTES}


def test_the_installed_sdk_still_has_every_private_attribute() -> None:
    # Fails on an SDK release that moved one: update _otel_compat.py (and constraints/otel.txt).
    assert _otel_compat.missing_attributes() == []


def test_the_accessors_reach_real_sdk_objects() -> None:
    exporter = InMemoryMetricExporter(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    push = PeriodicExportingMetricReader(exporter, export_interval_millis=float("inf"))
    pull = InMemoryMetricReader(preferred_temporality={Histogram: AggregationTemporality.DELTA})
    later = InMemoryMetricReader()
    resource = Resource.create({"service.name": "compat"})
    provider = MeterProvider(metric_readers=[push, pull], resource=resource, shutdown_on_exit=False)
    provider.add_metric_reader(later)
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    try:
        assert _otel_compat.provider_resource(provider) is resource
        assert {id(r) for r in _otel_compat.provider_readers(provider)} == {id(push), id(pull), id(later)}
        assert _otel_compat.reader_exporter(push) is exporter
        assert callable(_otel_compat.reader_collect(pull))
        assert _otel_compat.reader_temporality(pull, Histogram) is AggregationTemporality.DELTA
        assert _otel_compat.reader_temporality(later, Histogram) is AggregationTemporality.CUMULATIVE
        temporality, _ = _otel_compat.exporter_preferences(exporter)
        assert temporality is not None
        assert temporality[Histogram] is AggregationTemporality.DELTA
        processor = _otel_compat.active_span_processor(tracer_provider)
        assert processor is not None
        assert list(_otel_compat.span_processors(processor)) == []
        runtime = _otel_compat.runtime_context()
        assert _otel_compat.runtime_context_var(runtime) is not None
    finally:
        provider.shutdown()
        tracer_provider.shutdown()


def test_a_missing_attribute_is_reported_and_warned_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_otel_compat, "_warned", set())

    class NewTracerProvider:
        """A TracerProvider of an SDK that keeps its processors elsewhere."""

    with caplog.at_level(logging.WARNING, logger="inferscope"):
        assert _otel_compat.active_span_processor(NewTracerProvider()) is None
        assert _otel_compat.active_span_processor(NewTracerProvider()) is None
    messages = [r.getMessage() for r in caplog.records if "_active_span_processor" in r.getMessage()]
    assert len(messages) == 1
    assert "constraints/otel.txt" in messages[0]

    monkeypatch.setattr(_otel_compat, "PRIVATE_ATTRIBUTES", (("MetricReader", "_no_such_attribute", "test"),))
    assert _otel_compat.missing_attributes() == ["MetricReader._no_such_attribute"]


def _private_otel_accesses(path: Path) -> list[str]:
    """``obj._attribute`` reads and writes (and getattr(obj, "_attribute")) of the private attributes
    in ``path``, and imports of private OpenTelemetry names."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
            base = node.value
            if not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE
        ):
            found.append(f"{path.name}:{node.lineno} {node.func.id}({node.args[1].value!r})")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or "._internal" in (node.module or ""):
                found.append(f"{path.name}:{node.lineno} from {node.module} import {private}")
    return found


def test_no_module_but_the_compat_module_touches_private_otel_attributes() -> None:
    offenders = [
        access
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "_otel_compat.py"
        for access in _private_otel_accesses(path)
    ]
    assert offenders == []


def test_the_constraints_pin_the_installed_opentelemetry() -> None:
    import importlib.metadata

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    assert {"opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-grpc"} <= set(pins)
    for name, version in pins.items():
        assert re.fullmatch(r"[0-9][0-9a-z.]*", version), (name, version)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional instrumentation this environment lacks
        assert installed == version, f"{name} {installed} is installed; constraints/otel.txt pins {version}"
