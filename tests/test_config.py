"""Settings from configure() arguments and environment variables: parsing, precedence, errors, docs."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

from inferscope._records import COUNTER_THREAD_CPU
from inferscope.config import (
    SETTINGS,
    ConfigError,
    Settings,
    SettingSpec,
    _markdown_table,
    default_recorder_path,
    load_settings,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
SPECS = {spec.name: spec for spec in SETTINGS}
SETTING_FIELDS = [f.name for f in dataclasses.fields(Settings) if f.init]
HISTOGRAM_AGGREGATION_VARIABLE = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"


def test_defaults() -> None:
    settings = load_settings(environ={})

    assert settings.enabled is True
    assert settings.service_name is None
    assert settings.counters == "default"
    assert settings.counter_mask == COUNTER_THREAD_CPU
    assert settings.ring_capacity == 65536
    assert settings.drain_interval_millis == 100
    assert settings.max_keys == 2000
    assert settings.metrics_exporters == ()
    assert settings.otlp_protocol == "grpc"
    assert settings.otlp_endpoint is None
    assert settings.export_interval_millis == 60000
    assert settings.export_timeout_millis == 30000
    assert settings.histogram_aggregation == "exponential"
    assert settings.histogram_boundaries == (
        0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
        0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    )  # fmt: skip
    assert settings.histogram_max_buckets == 320
    assert settings.prometheus_host == "127.0.0.1"
    assert settings.prometheus_port == 9464
    assert settings.meter_provider is None
    assert settings.metric_exporters == ()
    assert settings.window_seconds == 60.0
    assert settings.baseline_seconds == 3600.0
    assert settings.regression_threshold == 0.2
    assert settings.regression_sustain_seconds == 3600.0
    assert settings.regression_quantile == 0.95
    assert settings.recorder == default_recorder_path()
    assert settings.recorder_max_bytes == 256 * 2**20
    assert (settings.recorder_window_retention_days, settings.recorder_rollup_retention_days) == (7, 90)
    assert settings.canary is True
    assert settings == Settings()


def test_recorder_default_path_follows_xdg_state_home(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    expected = str(tmp_path / "inferscope" / "recorder.sqlite")
    assert default_recorder_path() == expected
    assert load_settings(environ={"INFERSCOPE_RECORDER": "default"}).recorder == expected
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert default_recorder_path() == os.path.expanduser("~/.local/state/inferscope/recorder.sqlite")
    assert load_settings({"recorder": "OFF"}, environ={}).recorder == "off"
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={"INFERSCOPE_RECORDER": "r.sqlite"}).recorder == str(tmp_path / "r.sqlite")


@pytest.mark.parametrize(
    ("environ", "name", "expected"),
    [
        ({"INFERSCOPE_ENABLED": "false"}, "enabled", False),
        ({"INFERSCOPE_ENABLED": "0"}, "enabled", False),
        ({"INFERSCOPE_ENABLED": "No"}, "enabled", False),
        ({"INFERSCOPE_ENABLED": "OFF"}, "enabled", False),
        ({"INFERSCOPE_ENABLED": "TRUE"}, "enabled", True),
        ({"INFERSCOPE_ENABLED": "1"}, "enabled", True),
        ({"INFERSCOPE_ENABLED": "yes"}, "enabled", True),
        ({"INFERSCOPE_ENABLED": "on"}, "enabled", True),
        ({"INFERSCOPE_SERVICE_NAME": "fraud"}, "service_name", "fraud"),
        ({"OTEL_SERVICE_NAME": " checkout "}, "service_name", "checkout"),
        ({"INFERSCOPE_COUNTERS": "minimal"}, "counters", "minimal"),
        ({"INFERSCOPE_COUNTERS": " Thread_CPU "}, "counters", "thread_cpu"),
        ({"INFERSCOPE_RING_CAPACITY": "1024"}, "ring_capacity", 1024),
        ({"INFERSCOPE_RING_CAPACITY": " 16777216 "}, "ring_capacity", 16777216),
        ({"INFERSCOPE_DRAIN_INTERVAL_MILLIS": "5"}, "drain_interval_millis", 5),
        ({"INFERSCOPE_MAX_KEYS": "10"}, "max_keys", 10),
        ({"INFERSCOPE_MAX_KEYS": "20000"}, "max_keys", 20_000),
        ({"INFERSCOPE_METRICS_EXPORTER": "prometheus"}, "metrics_exporters", ("prometheus",)),
        ({"INFERSCOPE_METRICS_EXPORTER": "OTLP, console"}, "metrics_exporters", ("otlp", "console")),
        ({"INFERSCOPE_METRICS_EXPORTER": "console,otlp,console"}, "metrics_exporters", ("console", "otlp")),
        ({"OTEL_METRICS_EXPORTER": "console"}, "metrics_exporters", ("console",)),
        ({"INFERSCOPE_METRICS_EXPORTER": "none"}, "metrics_exporters", ()),
        ({"INFERSCOPE_OTLP_PROTOCOL": "http/protobuf"}, "otlp_protocol", "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "HTTP/Protobuf"}, "otlp_protocol", "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "otlp_protocol", "http/protobuf"),
        ({"INFERSCOPE_OTLP_ENDPOINT": "http://collector:4317"}, "otlp_endpoint", "http://collector:4317"),
        (
            {"INFERSCOPE_OTLP_ENDPOINT": " https://c.example/v1/metrics "},
            "otlp_endpoint",
            "https://c.example/v1/metrics",
        ),
        ({"INFERSCOPE_EXPORT_INTERVAL_MILLIS": "100"}, "export_interval_millis", 100),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "15000"}, "export_interval_millis", 15000),
        ({"INFERSCOPE_EXPORT_TIMEOUT_MILLIS": "1"}, "export_timeout_millis", 1),
        ({"OTEL_METRIC_EXPORT_TIMEOUT": "5000"}, "export_timeout_millis", 5000),
        ({"INFERSCOPE_HISTOGRAM_AGGREGATION": "explicit"}, "histogram_aggregation", "explicit"),
        (
            {"INFERSCOPE_HISTOGRAM_AGGREGATION": "explicit_bucket_histogram"},
            "histogram_aggregation",
            "explicit",
        ),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "explicit_bucket_histogram"},
            "histogram_aggregation",
            "explicit",
        ),
        (
            {HISTOGRAM_AGGREGATION_VARIABLE: "Base2_Exponential_Bucket_Histogram"},
            "histogram_aggregation",
            "exponential",
        ),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "Explicit"},
            "histogram_aggregation",
            "explicit",
        ),
        (
            {"INFERSCOPE_HISTOGRAM_BOUNDARIES": "0.001, 0.01,0.1 ,1"},
            "histogram_boundaries",
            (0.001, 0.01, 0.1, 1.0),
        ),
        ({"INFERSCOPE_HISTOGRAM_BOUNDARIES": "2.5e-1"}, "histogram_boundaries", (0.25,)),
        ({"INFERSCOPE_HISTOGRAM_MAX_BUCKETS": "2"}, "histogram_max_buckets", 2),
        ({"INFERSCOPE_HISTOGRAM_MAX_BUCKETS": "16384"}, "histogram_max_buckets", 16384),
        ({"INFERSCOPE_PROMETHEUS_HOST": "0.0.0.0"}, "prometheus_host", "0.0.0.0"),
        ({"OTEL_EXPORTER_PROMETHEUS_HOST": "::1"}, "prometheus_host", "::1"),
        ({"INFERSCOPE_PROMETHEUS_PORT": "0"}, "prometheus_port", 0),
        ({"OTEL_EXPORTER_PROMETHEUS_PORT": "65535"}, "prometheus_port", 65535),
    ],
)
def test_environment_variable_is_parsed(environ: dict[str, str], name: str, expected: object) -> None:
    assert getattr(load_settings(environ=environ), name) == expected


def test_counters_set_the_counter_mask() -> None:
    assert load_settings({"counters": "minimal"}, environ={}).counter_mask == 0
    assert load_settings({"counters": "thread_cpu"}, environ={}).counter_mask == COUNTER_THREAD_CPU
    assert load_settings(environ={"INFERSCOPE_COUNTERS": "default"}).counter_mask == COUNTER_THREAD_CPU


# setting: (argument, its result), (INFERSCOPE_* variable, text, result), (OTEL_* variable, text, result),
# default. Each level gives a result different from the level below it.
PRECEDENCE = {
    "enabled": (
        (False, False),
        ("INFERSCOPE_ENABLED", "yes", True),
        ("OTEL_SDK_DISABLED", "true", False),
        True,
    ),
    "service_name": (
        ("arg", "arg"),
        ("INFERSCOPE_SERVICE_NAME", "ours", "ours"),
        ("OTEL_SERVICE_NAME", "otel", "otel"),
        None,
    ),
    "metrics_exporters": (
        (["console"], ("console",)),
        ("INFERSCOPE_METRICS_EXPORTER", "prometheus", ("prometheus",)),
        ("OTEL_METRICS_EXPORTER", "otlp", ("otlp",)),
        (),
    ),
    "otlp_protocol": (
        ("grpc", "grpc"),
        ("INFERSCOPE_OTLP_PROTOCOL", "http/protobuf", "http/protobuf"),
        ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc", "grpc"),
        "grpc",
    ),
    "export_interval_millis": (
        (1000, 1000),
        ("INFERSCOPE_EXPORT_INTERVAL_MILLIS", "2000", 2000),
        ("OTEL_METRIC_EXPORT_INTERVAL", "3000", 3000),
        60000,
    ),
    "export_timeout_millis": (
        (10, 10),
        ("INFERSCOPE_EXPORT_TIMEOUT_MILLIS", "20", 20),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "30", 30),
        30000,
    ),
    "histogram_aggregation": (
        ("exponential", "exponential"),
        ("INFERSCOPE_HISTOGRAM_AGGREGATION", "explicit", "explicit"),
        (HISTOGRAM_AGGREGATION_VARIABLE, "base2_exponential_bucket_histogram", "exponential"),
        "exponential",
    ),
    "prometheus_host": (
        ("10.0.0.1", "10.0.0.1"),
        ("INFERSCOPE_PROMETHEUS_HOST", "10.0.0.2", "10.0.0.2"),
        ("OTEL_EXPORTER_PROMETHEUS_HOST", "10.0.0.3", "10.0.0.3"),
        "127.0.0.1",
    ),
    "prometheus_port": (
        (1, 1),
        ("INFERSCOPE_PROMETHEUS_PORT", "2", 2),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "3", 3),
        9464,
    ),
    "traces_exporters": (
        (["console"], ("console",)),
        ("INFERSCOPE_TRACES_EXPORTER", "otlp,console", ("otlp", "console")),
        ("OTEL_TRACES_EXPORTER", "console", ("console",)),
        (),
    ),
    "trace_sampler": (
        ("always_on", "always_on"),
        ("INFERSCOPE_TRACE_SAMPLER", "TraceIdRatio", "traceidratio"),
        ("OTEL_TRACES_SAMPLER", "parentbased_always_off", "parentbased_always_off"),
        "parentbased_traceidratio",
    ),
}


def test_precedence_table_covers_every_setting_with_an_otel_variable() -> None:
    with_otel = {spec.name for spec in SETTINGS if any(v.startswith("OTEL_") for v in spec.env)}
    assert set(PRECEDENCE) == with_otel


@pytest.mark.parametrize("name", PRECEDENCE)
def test_precedence(name: str) -> None:
    (argument, from_argument), (ours, ours_text, from_ours), (otel, otel_text, from_otel), default = (
        PRECEDENCE[name]
    )
    both = {ours: ours_text, otel: otel_text}
    assert getattr(load_settings({name: argument}, environ=both), name) == from_argument
    assert getattr(load_settings(environ=both), name) == from_ours
    assert getattr(load_settings(environ={otel: otel_text}), name) == from_otel
    assert getattr(load_settings(environ={}), name) == default


@pytest.mark.parametrize(
    ("name", "argument", "variable", "text", "from_variable"),
    [
        ("counters", "minimal", "INFERSCOPE_COUNTERS", "thread_cpu", "thread_cpu"),
        ("ring_capacity", 1024, "INFERSCOPE_RING_CAPACITY", "2048", 2048),
        ("drain_interval_millis", 7, "INFERSCOPE_DRAIN_INTERVAL_MILLIS", "8", 8),
        ("max_keys", 11, "INFERSCOPE_MAX_KEYS", "12", 12),
        ("shutdown_timeout_millis", 0, "INFERSCOPE_SHUTDOWN_TIMEOUT_MILLIS", "2500", 2500),
        ("otlp_endpoint", "http://a:4317", "INFERSCOPE_OTLP_ENDPOINT", "http://b:4317", "http://b:4317"),
        ("histogram_boundaries", [1], "INFERSCOPE_HISTOGRAM_BOUNDARIES", "2", (2.0,)),
        ("histogram_max_buckets", 3, "INFERSCOPE_HISTOGRAM_MAX_BUCKETS", "4", 4),
    ],
)
def test_argument_wins_over_the_inferscope_variable(
    name: str, argument: object, variable: str, text: str, from_variable: object
) -> None:
    expected_argument = tuple(argument) if isinstance(argument, list) else argument
    assert getattr(load_settings({name: argument}, environ={variable: text}), name) == expected_argument
    assert getattr(load_settings(environ={variable: text}), name) == from_variable
    assert getattr(load_settings(environ={}), name) == getattr(Settings(), name) != from_variable


def test_otlp_protocol_prefers_the_metrics_variable_over_the_general_one() -> None:
    environ = {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert load_settings(environ=environ).otlp_protocol == "http/protobuf"


def test_argument_of_none_counts_as_not_given() -> None:
    environ = {"INFERSCOPE_RING_CAPACITY": "2048", "INFERSCOPE_SERVICE_NAME": "fraud"}
    settings = load_settings({"ring_capacity": None, "service_name": None}, environ=environ)
    assert settings.ring_capacity == 2048
    assert settings.service_name == "fraud"


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_blank_environment_variable_counts_as_unset(blank: str) -> None:
    environ = {
        "INFERSCOPE_RING_CAPACITY": blank,
        "INFERSCOPE_SERVICE_NAME": blank,
        "OTEL_SERVICE_NAME": "from-otel",
        "INFERSCOPE_ENABLED": blank,
        "INFERSCOPE_METRICS_EXPORTER": blank,
        "OTEL_EXPORTER_OTLP_ENDPOINT": blank,
    }
    settings = load_settings(environ=environ)
    assert settings.ring_capacity == 65536
    assert settings.service_name == "from-otel"
    assert settings.enabled is True
    assert settings.metrics_exporters == ()


def test_argument_overrides_an_invalid_environment_variable() -> None:
    # The variable is never read when the argument is given, so it cannot fail the call.
    settings = load_settings({"ring_capacity": 4096}, environ={"INFERSCOPE_RING_CAPACITY": "lots"})
    assert settings.ring_capacity == 4096


def test_load_settings_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERSCOPE_MAX_KEYS", "123")
    assert load_settings().max_keys == 123


# --- OTEL_SDK_DISABLED --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_otel_sdk_disabled_true_disables(value: str) -> None:
    assert load_settings(environ={"OTEL_SDK_DISABLED": value}).enabled is False


@pytest.mark.parametrize("value", ["false", "1", "yes", "on", "disabled", "nonsense"])
def test_otel_sdk_disabled_other_values_are_ignored(value: str) -> None:
    assert load_settings(environ={"OTEL_SDK_DISABLED": value}).enabled is True


def test_inferscope_enabled_wins_over_otel_sdk_disabled() -> None:
    environ = {"OTEL_SDK_DISABLED": "true", "INFERSCOPE_ENABLED": "yes"}
    assert load_settings(environ=environ).enabled is True
    environ = {"OTEL_SDK_DISABLED": "false", "INFERSCOPE_ENABLED": "off"}
    assert load_settings(environ=environ).enabled is False


# --- metrics_exporters default ------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"},
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics"},
        {"INFERSCOPE_OTLP_ENDPOINT": "http://collector:4317"},
    ],
)
def test_an_otlp_endpoint_alone_makes_otlp_the_exporter(environ: dict[str, str]) -> None:
    assert load_settings(environ=environ).metrics_exporters == ("otlp",)


def test_an_otlp_endpoint_argument_alone_makes_otlp_the_exporter() -> None:
    assert load_settings({"otlp_endpoint": "http://c:4317"}, environ={}).metrics_exporters == ("otlp",)


def test_the_otel_endpoint_is_left_to_the_exporter() -> None:
    settings = load_settings(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert settings.otlp_endpoint is None


@pytest.mark.parametrize(
    ("overrides", "environ", "expected"),
    [
        ({}, {"OTEL_METRICS_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ()),
        ({}, {"INFERSCOPE_METRICS_EXPORTER": "NONE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ()),
        (
            {},
            {"OTEL_METRICS_EXPORTER": "console", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
            ("console",),
        ),
        ({"metrics_exporters": []}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ()),
        ({"metrics_exporters": "none"}, {"INFERSCOPE_METRICS_EXPORTER": "otlp"}, ()),
        ({"metrics_exporters": ["none"]}, {}, ()),
    ],
)
def test_named_exporters_win_over_the_endpoint_default(
    overrides: dict[str, object], environ: dict[str, str], expected: tuple[str, ...]
) -> None:
    assert load_settings(overrides, environ=environ).metrics_exporters == expected


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("otlp", ("otlp",)),
        ("prometheus, OTLP", ("prometheus", "otlp")),
        (["console", "otlp", "console"], ("console", "otlp")),
        (("prometheus",), ("prometheus",)),
    ],
)
def test_metrics_exporters_argument(argument: object, expected: tuple[str, ...]) -> None:
    assert load_settings({"metrics_exporters": argument}, environ={}).metrics_exporters == expected


# --- configure() arguments ----------------------------------------------------------------------


def test_arguments_are_normalized() -> None:
    settings = load_settings(
        {
            "counters": " MINIMAL ",
            "ring_capacity": np.int64(2048),
            "otlp_protocol": "HTTP/PROTOBUF",
            "otlp_endpoint": " http://c:4318/v1/metrics ",
            "histogram_aggregation": "explicit_bucket_histogram",
            "histogram_boundaries": [1, 2.5, np.float32(5)],
            "service_name": " fraud ",
        },
        environ={},
    )
    assert settings.counters == "minimal"
    assert settings.ring_capacity == 2048
    assert type(settings.ring_capacity) is int
    assert settings.otlp_protocol == "http/protobuf"
    assert settings.otlp_endpoint == "http://c:4318/v1/metrics"
    assert settings.histogram_aggregation == "explicit"
    assert settings.histogram_boundaries == (1.0, 2.5, 5.0)
    assert all(type(b) is float for b in settings.histogram_boundaries)
    assert settings.service_name == "fraud"


@pytest.mark.parametrize(
    "boundaries",
    [(0.1, 0.2), [0.1, 0.2], np.array([0.1, 0.2]), (b for b in (0.1, 0.2))],
    ids=["tuple", "list", "ndarray", "generator"],
)
def test_histogram_boundaries_accept_any_sequence_of_numbers(boundaries: object) -> None:
    assert load_settings({"histogram_boundaries": boundaries}, environ={}).histogram_boundaries == (0.1, 0.2)


def test_objects_from_configure() -> None:
    provider = MeterProvider()
    exporter = ConsoleMetricExporter()
    try:
        settings = load_settings({"meter_provider": provider, "metric_exporters": [exporter]}, environ={})
        assert settings.meter_provider is provider
        assert settings.metric_exporters == (exporter,)
    finally:
        provider.shutdown()


def test_settings_are_frozen_and_hashable() -> None:
    settings = load_settings({"metrics_exporters": ["otlp"]}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.ring_capacity = 1024  # type: ignore[misc]
    assert hash(settings) == hash(load_settings({"metrics_exporters": ("otlp",)}, environ={}))


def test_settings_built_directly_are_validated_and_normalized() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(ring_capacity=1000)
    assert info.value.source == "Settings field"
    assert "ring_capacity (Settings field): got 1000" in str(info.value)
    settings = Settings(metrics_exporters=["Console"], counters="minimal")  # type: ignore[arg-type]
    assert settings.metrics_exporters == ("console",)
    assert dataclasses.replace(settings, counters="thread_cpu").counter_mask == COUNTER_THREAD_CPU


# --- invalid values -----------------------------------------------------------------------------

# (setting, environment variable, bad text): every setting that has a variable appears here.
BAD_ENVIRONMENT = [
    ("enabled", "INFERSCOPE_ENABLED", "maybe"),
    ("enabled", "INFERSCOPE_ENABLED", "2"),
    ("counters", "INFERSCOPE_COUNTERS", "fast"),
    ("counters", "INFERSCOPE_COUNTERS", "thread_cpu,gpu"),
    ("counters", "INFERSCOPE_COUNTERS", "thread_cpu,"),
    ("ring_capacity", "INFERSCOPE_RING_CAPACITY", "1000"),
    ("ring_capacity", "INFERSCOPE_RING_CAPACITY", "512"),
    ("ring_capacity", "INFERSCOPE_RING_CAPACITY", "33554432"),
    ("ring_capacity", "INFERSCOPE_RING_CAPACITY", "big"),
    ("ring_capacity", "INFERSCOPE_RING_CAPACITY", "65536.0"),
    ("drain_interval_millis", "INFERSCOPE_DRAIN_INTERVAL_MILLIS", "0"),
    ("drain_interval_millis", "INFERSCOPE_DRAIN_INTERVAL_MILLIS", "60001"),
    ("max_keys", "INFERSCOPE_MAX_KEYS", "9"),
    ("max_keys", "INFERSCOPE_MAX_KEYS", "20001"),
    ("metrics_exporters", "INFERSCOPE_METRICS_EXPORTER", "zipkin"),
    ("metrics_exporters", "INFERSCOPE_METRICS_EXPORTER", "otlp,none"),
    ("metrics_exporters", "INFERSCOPE_METRICS_EXPORTER", "otlp,,console"),
    ("metrics_exporters", "OTEL_METRICS_EXPORTER", "logging"),
    ("otlp_protocol", "INFERSCOPE_OTLP_PROTOCOL", "udp"),
    ("otlp_protocol", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ("otlp_protocol", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "localhost:4317"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "ftp://collector"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "http://"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "http://collector:port"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "http://a b:4317"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "http://coll$ctor:4317"),
    ("otlp_endpoint", "INFERSCOPE_OTLP_ENDPOINT", "http://-collector:4317"),
    ("export_interval_millis", "INFERSCOPE_EXPORT_INTERVAL_MILLIS", "99"),
    ("export_interval_millis", "OTEL_METRIC_EXPORT_INTERVAL", "1.5"),
    ("export_timeout_millis", "INFERSCOPE_EXPORT_TIMEOUT_MILLIS", "0"),
    ("export_timeout_millis", "OTEL_METRIC_EXPORT_TIMEOUT", "-5"),
    ("shutdown_timeout_millis", "INFERSCOPE_SHUTDOWN_TIMEOUT_MILLIS", "-1"),
    ("shutdown_timeout_millis", "INFERSCOPE_SHUTDOWN_TIMEOUT_MILLIS", "600001"),
    ("histogram_aggregation", "INFERSCOPE_HISTOGRAM_AGGREGATION", "linear"),
    ("histogram_aggregation", "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION", "sum"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,0.05"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,0.1"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0,1"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "-1"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,nan"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,inf"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,x"),
    ("histogram_boundaries", "INFERSCOPE_HISTOGRAM_BOUNDARIES", "0.1,,0.2"),
    ("histogram_max_buckets", "INFERSCOPE_HISTOGRAM_MAX_BUCKETS", "1"),
    ("histogram_max_buckets", "INFERSCOPE_HISTOGRAM_MAX_BUCKETS", "16385"),
    ("prometheus_host", "INFERSCOPE_PROMETHEUS_HOST", "my host"),
    ("prometheus_host", "OTEL_EXPORTER_PROMETHEUS_HOST", "a b"),
    ("prometheus_host", "INFERSCOPE_PROMETHEUS_HOST", "host:9464"),
    ("prometheus_host", "INFERSCOPE_PROMETHEUS_HOST", "http://host"),
    ("prometheus_port", "INFERSCOPE_PROMETHEUS_PORT", "65536"),
    ("prometheus_port", "INFERSCOPE_PROMETHEUS_PORT", "-1"),
    ("prometheus_port", "OTEL_EXPORTER_PROMETHEUS_PORT", "http"),
    ("traces_exporters", "INFERSCOPE_TRACES_EXPORTER", "jaeger"),
    ("traces_exporters", "OTEL_TRACES_EXPORTER", "otlp,zipkin"),
    ("trace_sampler", "INFERSCOPE_TRACE_SAMPLER", "ratio"),
    ("trace_ratio", "INFERSCOPE_TRACE_RATIO", "1.5"),
    ("trace_ratio", "INFERSCOPE_TRACE_RATIO", "half"),
    ("trace_slow_ms", "INFERSCOPE_TRACE_SLOW_MS", "p50"),
    ("trace_errors", "INFERSCOPE_TRACE_ERRORS", "sometimes"),
    ("trace_max_spans_per_second", "INFERSCOPE_TRACE_MAX_SPANS_PER_SECOND", "0"),
    ("window_seconds", "INFERSCOPE_WINDOW_SECONDS", "0.05"),
    ("window_seconds", "INFERSCOPE_WINDOW_SECONDS", "1m"),
    ("baseline_seconds", "INFERSCOPE_BASELINE_SECONDS", "0"),
    ("regression_threshold", "INFERSCOPE_REGRESSION_THRESHOLD", "20%"),
    ("regression_threshold", "INFERSCOPE_REGRESSION_THRESHOLD", "-0.1"),
    ("regression_sustain_seconds", "INFERSCOPE_REGRESSION_SUSTAIN_SECONDS", "-1"),
    ("regression_quantile", "INFERSCOPE_REGRESSION_QUANTILE", "1"),
    ("regression_quantile", "INFERSCOPE_REGRESSION_QUANTILE", "p95"),
    ("recorder", "INFERSCOPE_RECORDER", "/"),
    ("recorder_max_bytes", "INFERSCOPE_RECORDER_MAX_BYTES", "1000"),
    ("recorder_window_retention_days", "INFERSCOPE_RECORDER_WINDOW_RETENTION_DAYS", "0"),
    ("recorder_rollup_retention_days", "INFERSCOPE_RECORDER_ROLLUP_RETENTION_DAYS", "nan"),
    ("canary", "INFERSCOPE_CANARY", "sometimes"),
    ("multiprocess", "INFERSCOPE_MULTIPROCESS", "workers"),
    ("multiprocess_publish_millis", "INFERSCOPE_MULTIPROCESS_PUBLISH_MILLIS", "5"),
    ("multiprocess_dir", "INFERSCOPE_MULTIPROCESS_DIR", "/no/such/directory"),
    ("profile_on_regression", "INFERSCOPE_PROFILE_ON_REGRESSION", "sometimes"),
]

# service_name is the one setting whose variables accept any non-blank text.
_NO_BAD_TEXT = {"service_name"}

# (setting, bad configure() value): every setting appears here.
BAD_ARGUMENTS = [
    ("enabled", "yes"),
    ("enabled", 1),
    ("service_name", ""),
    ("service_name", "   "),
    ("service_name", 42),
    ("counters", "fast"),
    ("counters", 1),
    ("counters", ["minimal"]),
    ("ring_capacity", 1000),
    ("ring_capacity", True),
    ("ring_capacity", "65536"),
    ("ring_capacity", 65536.0),
    ("ring_capacity", "big"),
    ("drain_interval_millis", 0),
    ("drain_interval_millis", False),
    ("max_keys", 5),
    ("max_keys", 2000.5),
    ("metrics_exporters", ["jaeger"]),
    ("metrics_exporters", ["otlp", "none"]),
    ("metrics_exporters", [1]),
    ("metrics_exporters", 5),
    ("metrics_exporters", {"otlp"}),
    ("otlp_protocol", "http/json"),
    ("otlp_protocol", "http"),
    ("otlp_protocol", 1),
    ("otlp_endpoint", "collector:4317"),
    ("otlp_endpoint", 4317),
    ("export_interval_millis", 50),
    ("export_interval_millis", "60000"),
    ("export_timeout_millis", -1),
    ("export_timeout_millis", True),
    ("shutdown_timeout_millis", 1.5),
    ("shutdown_timeout_millis", "5000"),
    ("histogram_aggregation", "sum"),
    ("histogram_aggregation", 3),
    ("histogram_boundaries", []),
    ("histogram_boundaries", [0.2, 0.1]),
    ("histogram_boundaries", "0.1,0.2"),
    ("histogram_boundaries", [True]),
    ("histogram_boundaries", [float("inf")]),
    ("histogram_boundaries", [0.1, "0.2"]),
    ("histogram_boundaries", 0.5),
    ("histogram_max_buckets", 1),
    ("histogram_max_buckets", 16385),
    ("prometheus_host", ""),
    ("prometheus_host", 127),
    ("prometheus_port", 70000),
    ("prometheus_port", -1),
    ("prometheus_port", "9464"),
    ("meter_provider", object()),
    ("meter_provider", NoOpMeterProvider()),
    ("metric_exporters", [object()]),
    ("metric_exporters", "console"),
    ("metric_exporters", ConsoleMetricExporter()),
    ("traces_exporters", ["prometheus"]),
    ("traces_exporters", 3),
    ("trace_sampler", "jaeger_remote"),
    ("trace_ratio", -0.1),
    ("trace_ratio", True),
    ("trace_ratio", "0.5"),
    ("trace_slow_ms", 0),
    ("trace_slow_ms", "50"),
    ("trace_errors", "yes"),
    ("trace_max_spans_per_second", 0),
    ("trace_max_spans_per_second", 10.5),
    ("tracer_provider", object()),
    ("span_exporters", [object()]),
    ("span_exporters", ConsoleMetricExporter()),
    ("window_seconds", 0),
    ("window_seconds", "60"),
    ("baseline_seconds", -5),
    ("regression_threshold", 0),
    ("regression_threshold", True),
    ("regression_sustain_seconds", float("inf")),
    ("regression_quantile", 0.0),
    ("recorder", ""),
    ("recorder", 5),
    ("recorder_max_bytes", 2**19),
    ("recorder_max_bytes", 1.5e9),
    ("recorder_window_retention_days", -1),
    ("recorder_rollup_retention_days", "90"),
    ("canary", "on"),
    ("multiprocess", 1),
    ("multiprocess_publish_millis", 60_001),
    ("multiprocess_dir", ""),
    ("multiprocess_dir", __file__),
    ("profile_on_regression", "off"),
]


def test_bad_input_tables_cover_every_setting() -> None:
    with_variables = {spec.name for spec in SETTINGS if spec.env} - _NO_BAD_TEXT
    assert {row[0] for row in BAD_ENVIRONMENT} == with_variables
    assert {row[0] for row in BAD_ARGUMENTS} == set(SPECS)
    for name, variable, _ in BAD_ENVIRONMENT:
        assert variable in SPECS[name].env


@pytest.mark.parametrize(("name", "variable", "text"), BAD_ENVIRONMENT)
def test_invalid_environment_variable_raises(name: str, variable: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={variable: text})
    error = info.value
    message = str(error)
    assert message.startswith(f"{name} (from {variable}): got {text!r}")
    assert SPECS[name].accepted in message
    assert (error.setting, error.value, error.source, error.accepted) == (
        name,
        text,
        variable,
        SPECS[name].accepted,
    )


@pytest.mark.parametrize(("name", "value"), BAD_ARGUMENTS)
def test_invalid_argument_raises(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value}, environ={})
    error = info.value
    message = str(error)
    assert message.startswith(f"{name} (configure argument): got {value!r}")
    assert SPECS[name].accepted in message
    assert error.setting == name
    assert error.value is value
    assert error.source == "configure argument"
    assert isinstance(error, ValueError)


def test_error_messages_read_as_documented() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"INFERSCOPE_RING_CAPACITY": "1000"})
    assert str(info.value) == (
        "ring_capacity (from INFERSCOPE_RING_CAPACITY): got '1000'; "
        "accepted: a power of two from 1024 to 16777216"
    )
    with pytest.raises(ConfigError) as info:
        load_settings({"counters": "fast"}, environ={})
    assert str(info.value) == (
        "counters (configure argument): got 'fast'; "
        "accepted: one of 'minimal', 'default', 'full', "
        "or a comma-separated list of 'thread_cpu', 'rusage', 'perf', 'rss', 'python_heap', 'cuda_memory'"
    )


@pytest.mark.parametrize(
    ("environ", "detail"),
    [
        ({"INFERSCOPE_COUNTERS": "thread_cpu,gpu"}, "(unknown counter 'gpu')"),
        ({"INFERSCOPE_METRICS_EXPORTER": "otlp,zipkin"}, "(unknown exporter 'zipkin')"),
        ({"INFERSCOPE_METRICS_EXPORTER": "none,otlp"}, "'none' cannot be combined"),
        ({"INFERSCOPE_HISTOGRAM_BOUNDARIES": "0.5,0.1"}, "(0.1 does not follow 0.5)"),
        ({"INFERSCOPE_HISTOGRAM_BOUNDARIES": "0.5,abc"}, "('abc' is not a number)"),
    ],
)
def test_error_points_at_the_bad_entry_of_a_list(environ: dict[str, str], detail: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(detail)):
        load_settings(environ=environ)


def test_http_json_is_rejected_with_the_reason() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json"})
    message = str(info.value)
    assert "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL" in message
    assert "the Python OTLP exporters support grpc and http/protobuf" in message


def test_unknown_argument_suggests_the_closest_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"ring_capacty": 4096}, environ={})
    message = str(info.value)
    assert message.startswith("unknown setting 'ring_capacty' (configure argument)")
    assert "did you mean 'ring_capacity'?" in message
    for name in SPECS:
        assert name in message
    assert info.value.setting == "ring_capacty"
    assert info.value.value == 4096


def test_unknown_argument_without_a_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"zzz": 1}, environ={})
    assert "did you mean" not in str(info.value)
    assert "prometheus_port" in str(info.value)


def test_the_derived_counter_mask_is_not_an_argument() -> None:
    with pytest.raises(ConfigError, match="did you mean 'counters'"):
        load_settings({"counter_mask": 0}, environ={})


def test_config_error_survives_pickling() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"INFERSCOPE_MAX_KEYS": "3"})
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert (copy.setting, copy.value, copy.source, copy.accepted) == (
        "max_keys",
        "3",
        "INFERSCOPE_MAX_KEYS",
        info.value.accepted,
    )


# --- SETTINGS and the docs ----------------------------------------------------------------------


def test_every_settings_field_has_exactly_one_spec_in_field_order() -> None:
    assert [spec.name for spec in SETTINGS] == SETTING_FIELDS


# Defaults documented as a value rather than as "unset" or "none".
VALUE_DEFAULTS = [s for s in SETTINGS if s.env and s.default != "unset" and not s.default.startswith("none")]


def test_value_defaults_leave_out_only_the_unset_ones() -> None:
    left_out = {s.name for s in SETTINGS} - {s.name for s in VALUE_DEFAULTS}
    assert left_out == {
        "service_name",
        "otlp_endpoint",
        "metrics_exporters",
        "meter_provider",
        "metric_exporters",
        "traces_exporters",
        "tracer_provider",
        "span_exporters",
    }


@pytest.mark.parametrize("spec", VALUE_DEFAULTS, ids=lambda s: s.name)
def test_documented_default_is_the_real_default(spec: SettingSpec) -> None:
    # Feeding the documented default back in through the variable changes nothing.
    assert load_settings(environ={spec.env[0]: spec.default}) == Settings()


def test_docs_table_is_generated_from_settings() -> None:
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(r"<!-- settings-table:start -->\n(.*?)<!-- settings-table:end -->", text, re.DOTALL)
    assert match, "docs/configuration.md lost its settings-table markers"
    assert match.group(1) == _markdown_table(), (
        "docs/configuration.md is out of date; regenerate the table with "
        "python3 -c 'from inferscope.config import _markdown_table; print(_markdown_table(), end=\"\")'"
    )


def test_docs_name_every_setting_and_variable() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for spec in SETTINGS:
        assert f"| `{spec.name}` |" in text
        for variable in spec.env:
            assert f"`{variable}`" in text
        if not spec.env:
            assert re.search(rf"\| `{spec.name}` \| configure\(\) only \|", text)
    for variable in (
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        assert variable in text
    assert "ERROR" in text
    assert "ConfigError" in text


def test_an_otel_sampler_of_another_system_is_ignored_not_refused() -> None:
    # OTEL_TRACES_SAMPLER is shared with the application's own SDK, which may know jaeger_remote.
    assert load_settings(environ={"OTEL_TRACES_SAMPLER": "jaeger_remote"}).trace_sampler == (
        "parentbased_traceidratio"
    )
    with pytest.raises(ConfigError, match=r"trace_sampler \(from INFERSCOPE_TRACE_SAMPLER\): got 'jaeger'"):
        load_settings(environ={"INFERSCOPE_TRACE_SAMPLER": "jaeger"})


@pytest.mark.parametrize(
    ("environ", "ratio"),
    [
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 0.5),
        # The argument of another sampler, or one that is not a ratio, means nothing to the ratio.
        ({"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "0.5"}, 0.01),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, 0.01),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}, 0.01),
        # INFERSCOPE_TRACE_RATIO wins over the sampler's argument.
        (
            {
                "OTEL_TRACES_SAMPLER_ARG": "0.5",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "INFERSCOPE_TRACE_RATIO": "0.1",
            },
            0.1,
        ),
    ],
)
def test_trace_ratio_follows_the_otel_sampler_argument(environ: dict[str, str], ratio: float) -> None:
    assert load_settings(environ=environ).trace_ratio == ratio


@pytest.mark.parametrize(
    ("value", "expected"),
    [("p99", "p99"), ("P95", "p95"), ("off", "off"), ("12.5", 12.5), (" 3 ", 3.0)],
)
def test_trace_slow_ms_takes_milliseconds_or_a_quantile(value: str, expected: object) -> None:
    assert load_settings(environ={"INFERSCOPE_TRACE_SLOW_MS": value}).trace_slow_ms == expected


@pytest.mark.parametrize("value", ["0", "-1", "p50", "slow", "nan"])
def test_trace_slow_ms_refuses_what_it_cannot_mean(value: str) -> None:
    with pytest.raises(ConfigError, match=r"trace_slow_ms \(from INFERSCOPE_TRACE_SLOW_MS\).*'p99'"):
        load_settings(environ={"INFERSCOPE_TRACE_SLOW_MS": value})


def test_tracing_is_on_only_with_somewhere_to_send_spans() -> None:
    assert not load_settings(environ={}).tracing
    assert load_settings(
        environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}
    ).traces_exporters == ("otlp",)
    assert load_settings(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}).tracing
    assert not load_settings(
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}
    ).tracing
    assert not load_settings({"traces_exporters": ["console"], "enabled": False}, environ={}).tracing
    with pytest.raises(ConfigError, match=r"traces_exporters \(configure argument\): got 'prometheus'"):
        load_settings({"traces_exporters": "prometheus"}, environ={})
    with pytest.raises(ConfigError, match="tracer_provider"):
        load_settings({"tracer_provider": object()}, environ={})
