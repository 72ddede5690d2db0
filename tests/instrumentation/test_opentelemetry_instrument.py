"""Zero-code use: ``opentelemetry-instrument python app.py`` with the stock opentelemetry-distro.

The subprocess tests run the real command on tests/instrumentation/apps/serve_models.py, which does
not import inferscope, and read what arrived at a real OTLP collector (rotel). The in-process tests
drive the hook (``inferscope.otel_distro.attach_to_sdk``) against real SDK MeterProviders.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import distribution, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

import inferscope
from inferscope import _pipeline, otel_distro
from tests.instrumentation import missing, require
from tests.integration.conftest import rotel  # noqa: F401  (the fixture, shared with tests/integration)

if TYPE_CHECKING:
    from tests.integration.conftest import Rotel, RotelPoint

APPS = Path(__file__).parent / "apps"
CALLS = 6
RUN_TIMEOUT_S = 120


# --- helpers ------------------------------------------------------------------------------------


def opentelemetry_instrument() -> str:
    """The opentelemetry-instrument command of this interpreter's environment."""
    require("opentelemetry.distro")  # the stock distro these tests compose with
    candidate = Path(sys.executable).parent / "opentelemetry-instrument"
    found = str(candidate) if candidate.is_file() else shutil.which("opentelemetry-instrument")
    if found is None:
        missing("opentelemetry-instrument", "pip install opentelemetry-instrumentation")
    return found


def run_app(
    tmp_path: Path, env: dict[str, str], *app_args: str, pythonpath: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run serve_models.py under opentelemetry-instrument; returns the process and its JSON report.

    The environment is this one without any OTEL_* or INFERSCOPE_* variable (the backend choice,
    INFERSCOPE_NO_EXTENSION, is kept), plus ``env``.
    """
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "INFERSCOPE_")) or name == "INFERSCOPE_NO_EXTENSION"
    }
    clean.update({"OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"})
    clean.update(env)
    if pythonpath is not None:
        clean["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), clean.get("PYTHONPATH")) if p)
    argv = [opentelemetry_instrument(), sys.executable, str(APPS / "serve_models.py"), *app_args]
    result = subprocess.run(
        argv, cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the app printed no report:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(lines[-1])


def is_inferscope(point: RotelPoint) -> bool:
    return point.scope.split(" ")[0] == "inferscope"


def counts(points: list[RotelPoint], metric: str, *attributes: str) -> dict[tuple[str, ...], int]:
    found: dict[tuple[str, ...], int] = {}
    for point in points:
        if point.metric == metric:
            found[tuple(point.attributes.get(name, "") for name in attributes)] = point.count
    return found


# --- through the distro's pipeline ---------------------------------------------------------------


@pytest.mark.integration
def test_metrics_ride_on_the_distro_pipeline_exactly_once(rotel: Rotel, tmp_path: Path) -> None:  # noqa: F811
    require("sklearn")
    require("onnxruntime")
    require("onnx")
    env = {
        "OTEL_SERVICE_NAME": "zero-code-app",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rotel.grpc_endpoint}",
        # One export, at exit: every series shows exactly once unless something exports twice.
        "OTEL_METRIC_EXPORT_INTERVAL": "600000",
    }
    result, report = run_app(tmp_path, env, "--calls", str(CALLS), "--onnx-dir", str(tmp_path), "--report")
    assert report["instrumented"]["sklearn"] == "patched"
    assert report["instrumented"]["onnxruntime"] == "patched"
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr

    rotel.wait_for_points(lambda p: p.metric == "app.batches")
    points = rotel.wait_for_points(lambda p: p.metric == "inferscope.stage.duration")
    points = rotel.points()
    app_points = [p for p in points if p.metric == "app.batches"]
    ours = [p for p in points if is_inferscope(p)]
    assert app_points and ours

    # The same Resource as the application's own metric: the distro's SDK pipeline carried them.
    resource = app_points[0].resource
    assert resource["service.name"] == "zero-code-app"
    assert "telemetry.auto.version" in resource  # set by opentelemetry-instrument's configurator
    assert all(p.resource == resource for p in points)

    # Per model and per stage, with the counts the app made.
    assert counts(
        ours, "inferscope.inference.duration", "inferscope.model.name", "inferscope.model.version"
    ) == {
        ("Pipeline", ""): CALLS,
        ("mlp", "7"): CALLS,
    }
    assert counts(ours, "inferscope.stage.duration", "inferscope.model.name", "inferscope.stage.name") == {
        ("Pipeline", "scaler"): CALLS,
        ("Pipeline", "pca"): CALLS,
        ("Pipeline", "clf"): CALLS,
    }

    # Nothing exported twice: inferscope's aggregates in one export, and no second (inferscope-owned)
    # Resource. The SDK's own instruments (the app's, and the system signals inferscope registered on
    # its meter) go out once more when the SDK shuts down at exit: once per export for those.
    aggregated = ("inferscope.inference.", "inferscope.stage.", "inferscope.sdk.")
    series = [
        (p.metric, tuple(sorted(p.attributes.items()))) for p in ours if p.metric.startswith(aggregated)
    ]
    assert len(series) == len(set(series)), sorted(series)
    per_export = [(p.metric, tuple(sorted(p.attributes.items())), p.fields["Timestamp"]) for p in ours]
    assert len(per_export) == len(set(per_export)), sorted(per_export)
    assert "process.cpu.time" in {p.metric for p in ours}  # the system signals are not lost
    assert "process.pid" not in resource  # inferscope's own Resource would carry it


@pytest.mark.integration
def test_without_an_sdk_exporter_inferscope_uses_its_own(rotel: Rotel, tmp_path: Path) -> None:  # noqa: F811
    require("sklearn")
    env = {
        "OTEL_METRICS_EXPORTER": "none",  # the SDK gets a MeterProvider with no reader
        "INFERSCOPE_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rotel.grpc_endpoint}",
        "OTEL_SERVICE_NAME": "own-exporters",
    }
    run_app(tmp_path, env, "--calls", str(CALLS))
    rotel.wait_for_points(lambda p: p.metric == "inferscope.inference.duration")
    points = rotel.points()
    assert not [p for p in points if p.metric == "app.batches"]  # the SDK exported nothing
    ours = [p for p in points if is_inferscope(p)]
    assert counts(ours, "inferscope.inference.duration", "inferscope.model.name") == {("Pipeline",): CALLS}
    assert all(p.resource.get("process.pid") for p in ours)  # inferscope's own Resource
    assert {p.resource["service.name"] for p in ours} == {"own-exporters"}


def test_an_instrumentor_whose_library_is_missing_is_skipped_silently(tmp_path: Path) -> None:
    require("sklearn")
    # onnxruntime's metadata stays installed (so the distribution-wide check passes) but importing it
    # fails, as when a library's binary does not match the environment.
    blocked = tmp_path / "blocked"
    (blocked / "onnxruntime").mkdir(parents=True)
    (blocked / "onnxruntime" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    result, report = run_app(
        tmp_path, {"OTEL_METRICS_EXPORTER": "none"}, "--calls", "2", "--report", pythonpath=blocked
    )
    # onnxruntime is patched when the application imports it, which this one never does.
    assert report["instrumented"]["sklearn"] == "patched"
    assert report["instrumented"]["onnxruntime"] == "waiting"
    assert "onnxruntime" not in report["imported"]
    assert result.stderr.strip() == ""


#: The modules whose import the other framework instrumentors wait for.
FRAMEWORKS = ("onnxruntime", "xgboost", "lightgbm", "torch", "transformers", "keras", "starlette", "flask")


def test_zero_code_imports_no_framework_the_application_does_not(tmp_path: Path) -> None:
    require("sklearn")
    installed = {name for name in FRAMEWORKS if importlib.util.find_spec(name) is not None}
    assert installed or not os.environ.get("CI"), "CI installs the frameworks group"
    result, report = run_app(tmp_path, {"OTEL_METRICS_EXPORTER": "none"}, "--calls", "2", "--report")
    # A scikit-learn job: no other model framework is loaded. (OpenTelemetry's own FastAPI
    # instrumentor imports Starlette, and the ASGI instrumentor then patches it.)
    imported = set(report["imported"])
    assert imported - {"starlette", "flask"} == {"sklearn"}, report
    assert report["instrumented"]["sklearn"] == "patched"
    for name in FRAMEWORKS:
        expected = "off" if name not in installed else "patched" if name in imported else "waiting"
        assert report["instrumented"][name] == expected, (name, report)
    assert result.stderr.strip() == ""


def test_misconfiguration_is_logged_and_the_app_runs_uninstrumented(tmp_path: Path) -> None:
    require("sklearn")
    _, expected = run_app(tmp_path, {"OTEL_METRICS_EXPORTER": "none"}, "--calls", "2")
    result, report = run_app(
        tmp_path, {"OTEL_METRICS_EXPORTER": "none", "INFERSCOPE_RING_CAPACITY": "3"}, "--calls", "2"
    )
    assert report["predictions"] == expected["predictions"]
    message = "ring_capacity (from INFERSCOPE_RING_CAPACITY): got '3'; accepted: a power of two"
    assert result.stderr.count(message) == 1, result.stderr
    assert "inferscope is disabled" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_zero_code_example_records_both_models(tmp_path: Path) -> None:
    for module in ("sklearn", "onnx", "onnxruntime"):
        require(module)
    example = Path(__file__).parents[2] / "examples" / "sklearn_onnx_zero_code.py"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "INFERSCOPE_")) or name == "INFERSCOPE_NO_EXTENSION"
    }
    env.update(
        {"OTEL_METRICS_EXPORTER": "none", "OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    )
    result = subprocess.run(
        [opentelemetry_instrument(), sys.executable, str(example), "--batches", "20"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    table = {tuple(line.split()[:3]): line.split() for line in result.stderr.splitlines() if line.strip()}
    assert table[("Pipeline", "-", "20")]
    assert table[("Pipeline", "clf", "20")]
    assert table[("churn_mlp", "v3", "-")][3] == "20"


# --- packaging -----------------------------------------------------------------------------------


#: Every instrumentor: entry point name -> (subpackage of inferscope.instrumentation, class name).
INSTRUMENTORS = {
    "inferscope_sklearn": ("sklearn", "SklearnInstrumentor"),
    "inferscope_onnxruntime": ("onnxruntime", "OnnxruntimeInstrumentor"),
    "inferscope_xgboost": ("xgboost", "XGBoostInstrumentor"),
    "inferscope_lightgbm": ("lightgbm", "LightGBMInstrumentor"),
    "inferscope_torch": ("torch", "TorchInstrumentor"),
    "inferscope_transformers": ("transformers", "TransformersInstrumentor"),
    "inferscope_tensorflow": ("tensorflow", "TensorflowInstrumentor"),
    "inferscope_asgi": ("serving", "AsgiInstrumentor"),
    "inferscope_wsgi": ("serving", "WsgiInstrumentor"),
}


def test_every_instrumentation_subpackage_is_registered() -> None:
    import pkgutil

    import inferscope.instrumentation as instrumentation

    subpackages = {m.name for m in pkgutil.iter_modules(instrumentation.__path__) if m.ispkg}
    assert subpackages == {package for package, _ in INSTRUMENTORS.values()}


def test_the_distribution_offers_no_instruments_extra_and_each_instrumentor_checks_its_own() -> None:
    from opentelemetry.instrumentation.dependencies import get_dist_dependency_conflicts

    dist = distribution("inferscope-sdk")
    # Nothing a user could install by mistake: no extra pulls every framework.
    assert not [extra for extra in dist.metadata.get_all("Provides-Extra") or [] if "instruments" in extra]
    assert not [text for text in dist.requires or [] if "instruments" in text]
    # So opentelemetry-instrument's distribution-wide check passes and loads every instrumentor...
    assert get_dist_dependency_conflicts(dist) is None
    # ... each of which declares the frameworks it checks itself.
    for package, class_name in INSTRUMENTORS.values():
        instrumentor = getattr(importlib.import_module(f"inferscope.instrumentation.{package}"), class_name)
        assert instrumentor._instruments or instrumentor._instruments_any, class_name


def test_entry_points_load_the_instrumentors_and_hooks() -> None:
    found = {ep.name: ep.load() for ep in entry_points(group="opentelemetry_instrumentor")}
    for name, (package, class_name) in INSTRUMENTORS.items():
        module = importlib.import_module(f"inferscope.instrumentation.{package}")
        assert found[name] is getattr(module, class_name), name
    for group, hook in (
        ("opentelemetry_pre_instrument", otel_distro.pre_instrument),
        ("opentelemetry_post_instrument", otel_distro.post_instrument),
    ):
        assert {ep.name: ep.load() for ep in entry_points(group=group)}["inferscope"] is hook
    # No distro and no configurator of ours: the stock ones stay in charge.
    assert not [ep for ep in entry_points(group="opentelemetry_distro") if ep.value.startswith("inferscope")]
    assert not [
        ep for ep in entry_points(group="opentelemetry_configurator") if ep.value.startswith("inferscope")
    ]


# --- the hook, in process --------------------------------------------------------------------------


class _Capture(MetricExporter):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.batches.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@pytest.fixture
def sdk_provider(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real SDK MeterProvider with a push reader, made the global one for the hook; afterwards
    inferscope is configured from the environment again."""
    capture = _Capture()
    reader = PeriodicExportingMetricReader(capture, export_interval_millis=3_600_000)
    provider = MeterProvider(resource=Resource({"service.name": "sdk-app"}), metric_readers=[reader])
    monkeypatch.setattr("opentelemetry.metrics.get_meter_provider", lambda: provider)
    provider.capture = capture  # type: ignore[attr-defined]
    yield provider
    monkeypatch.undo()
    inferscope.configure()
    provider.shutdown()


def test_the_hook_attaches_to_the_sdk_provider_once(sdk_provider: Any) -> None:
    assert otel_distro.attach_to_sdk() == "attached"
    settings = inferscope.current_settings()
    assert settings is not None
    assert settings.meter_provider is sdk_provider
    assert settings.metrics_exporters == ()
    assert otel_distro.attach_to_sdk() == "already attached"

    inferscope.track_inference(model="hooked")(lambda: None)()
    sdk_provider.force_flush()
    scopes = [
        (rm.resource.attributes.get("service.name"), sm.scope.name, [m.name for m in sm.metrics])
        for batch in sdk_provider.capture.batches
        for rm in batch.resource_metrics
        for sm in rm.scope_metrics
    ]
    assert any(
        service == "sdk-app" and scope == "inferscope" and "inferscope.inference.duration" in names
        for service, scope, names in scopes
    ), scopes


def test_the_hook_keeps_prometheus_but_not_push_exporters(sdk_provider: Any, monkeypatch) -> None:
    monkeypatch.setenv("INFERSCOPE_PROMETHEUS_PORT", "0")
    inferscope.configure(metrics_exporters=["otlp", "console", "prometheus"])
    assert otel_distro.attach_to_sdk() == "attached"
    settings = inferscope.current_settings()
    assert settings is not None and settings.metrics_exporters == ("prometheus",)
    assert inferscope.prometheus_port()


@pytest.fixture
def sdk_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real SDK TracerProvider (its default sampler samples every root span) exporting to memory
    (``.spans``), made the global one for the hook."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    provider.spans = spans  # type: ignore[attr-defined]
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: provider)
    yield provider
    provider.shutdown()


@pytest.mark.parametrize("own_exporter", [None, "none"])
def test_inferscope_traces_exporter_none_keeps_inferscope_off_the_sdk_tracer_provider(
    sdk_provider: Any, sdk_tracer_provider: Any, monkeypatch: pytest.MonkeyPatch, own_exporter: str | None
) -> None:
    tracer_provider, spans = sdk_tracer_provider, sdk_tracer_provider.spans
    if own_exporter is None:
        monkeypatch.delenv("INFERSCOPE_TRACES_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("INFERSCOPE_TRACES_EXPORTER", own_exporter)
    monkeypatch.setenv("INFERSCOPE_TRACE_SAMPLER", "always_on")
    inferscope.configure()
    assert otel_distro.attach_to_sdk() == "attached"
    settings = inferscope.current_settings()
    assert settings is not None and settings.meter_provider is sdk_provider
    inferscope.track_inference(model="traced-or-not")(lambda: None)()
    inferscope.shutdown()  # every span recorded so far reaches the exporter
    names = [span.name for span in spans.get_finished_spans()]
    if own_exporter == "none":
        # The SDK's own spans are the application's business; inferscope keeps none.
        assert settings.tracer_provider is None and not settings.tracing
        assert "inference traced-or-not" not in names
    else:
        assert settings.tracer_provider is tracer_provider
        assert "inference traced-or-not" in names, names


@pytest.mark.parametrize(
    ("sampler", "ratio", "kept_all"),
    [(None, "0", False), (None, "1", True), ("parentbased_always_on", "0", True)],
)
def test_under_a_sampled_server_span_zero_code_keeps_slow_and_failed_calls_plus_a_ratio(
    sdk_provider: Any,
    sdk_tracer_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    sampler: str | None,
    ratio: str,
    kept_all: bool,
) -> None:
    tracer_provider, spans = sdk_tracer_provider, sdk_tracer_provider.spans
    tracer = tracer_provider.get_tracer("app")  # every server span is sampled
    for name in ("INFERSCOPE_TRACES_EXPORTER", "INFERSCOPE_TRACE_SAMPLER", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    if sampler is not None:
        monkeypatch.setenv("INFERSCOPE_TRACE_SAMPLER", sampler)
    monkeypatch.setenv("INFERSCOPE_TRACE_RATIO", ratio)
    monkeypatch.setenv("INFERSCOPE_TRACE_SLOW_MS", "200")
    inferscope.configure()
    assert otel_distro.attach_to_sdk() == "attached"
    settings = inferscope.current_settings()
    assert settings is not None and settings.tracer_provider is tracer_provider
    assert settings.trace_sampler == (sampler or otel_distro.ZERO_CODE_TRACE_SAMPLER)

    @inferscope.track_inference(model="zero-code")
    def predict(seconds: float = 0.0, fail: bool = False) -> None:
        with inferscope.stage("infer"):
            with tracer.start_as_current_span("feature lookup"):
                pass
            time.sleep(seconds)
            if fail:
                raise ValueError("bad input")

    fast = 5
    for _ in range(fast):
        with tracer.start_as_current_span("POST /predict"):
            predict()
    with tracer.start_as_current_span("POST /predict"):
        predict(0.25)  # slower than INFERSCOPE_TRACE_SLOW_MS
    with tracer.start_as_current_span("POST /predict"), pytest.raises(ValueError):
        predict(fail=True)
    inferscope.shutdown()  # every span recorded so far reaches the exporter

    finished = spans.get_finished_spans()
    servers = {span.context.span_id for span in finished if span.name == "POST /predict"}
    inferences = [span for span in finished if span.name == "inference zero-code"]
    stages = {span.context.span_id: span for span in finished if span.name == "stage infer"}
    lookups = [span for span in finished if span.name == "feature lookup"]
    assert len(servers) == fast + 2
    kept = sorted(str(span.attributes["inferscope.trace.kept"]) for span in inferences)
    assert kept == (["sampled"] * (fast + 2) if kept_all else ["error", "slow"])
    # A kept inference keeps its stage, and its parent is the request's server span.
    assert {stage.parent.span_id for stage in stages.values()} == {
        span.context.span_id for span in inferences
    }
    assert all(span.parent.span_id in servers for span in inferences)
    # The application's own spans stay in the request's trace whether the inference was kept or not:
    # under the stage of a call kept when it started, else under the server span.
    assert len(lookups) == fast + 2
    for lookup in lookups:
        assert lookup.context.trace_flags.sampled
        assert lookup.parent.span_id in (stages if kept_all else servers), lookup


def test_without_an_sdk_provider_the_hook_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.metrics import NoOpMeterProvider

    before = inferscope.current_settings()
    monkeypatch.setattr("opentelemetry.metrics.get_meter_provider", lambda: NoOpMeterProvider())
    assert otel_distro.attach_to_sdk() == "own exporters"
    bare = MeterProvider()  # an SDK provider without any reader (OTEL_METRICS_EXPORTER=none)
    monkeypatch.setattr("opentelemetry.metrics.get_meter_provider", lambda: bare)
    assert otel_distro.attach_to_sdk() == "own exporters"
    assert inferscope.current_settings() is before
    bare.shutdown()


def test_a_config_error_in_the_hook_is_logged_and_never_raised(
    sdk_provider: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("INFERSCOPE_RING_CAPACITY", "3")
    with caplog.at_level(logging.ERROR, logger="inferscope"):
        assert otel_distro.attach_to_sdk() == "disabled"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "ring_capacity (from INFERSCOPE_RING_CAPACITY): got '3'" in errors[0].getMessage()
    assert inferscope.track_inference(model="off")(lambda: 42)() == 42  # runs, unrecorded


def test_after_a_config_error_at_import_the_hook_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pipeline, "current_settings", lambda: None)
    assert otel_distro.attach_to_sdk() == "disabled"
