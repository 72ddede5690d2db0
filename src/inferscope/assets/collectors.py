"""Collector configurations for a fleet: a rotel agent beside each service, and an OpenTelemetry
Collector gateway that samples traces and writes metrics to Prometheus-compatible storage.

::

    service (inferscope) --OTLP--> rotel agent (rotel.env) --OTLP--> gateway (otelcol-gateway.yaml)
                                                                       |-- metrics --> Prometheus
                                                                       '-- traces ---> trace store

tests/integration/test_assets_rotel.py runs the rotel agent with this very file, between a service
and a second rotel that prints what arrives. The OpenTelemetry Collector cannot run there, so its
configuration is checked for syntax and for the consistency of its pipelines only (docs/deploy.md
says so).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROTEL_SETTINGS", "otelcol_gateway", "rotel_env"]

#: The gateway's address as the agents reach it; replace it with yours.
GATEWAY_ENDPOINT = "http://otel-gateway:4317"
#: inferscope's exports of many keys (exponential histograms) can exceed gRPC's 4 MiB default.
MAX_RECV_MSG_SIZE_MIB = 16

#: rotel-agent's settings (its command-line options as environment variables), with why.
ROTEL_SETTINGS: tuple[tuple[str, str, str], ...] = (
    (
        "ROTEL_OTLP_GRPC_ENDPOINT",
        "localhost:4317",
        "Where inferscope sends OTLP: a sidecar shares the pod's localhost. An agent per node "
        "listens on 0.0.0.0 instead.",
    ),
    (
        "ROTEL_OTLP_HTTP_ENDPOINT",
        "localhost:4318",
        "The same, for OTLP over HTTP (otlp_protocol=http/protobuf).",
    ),
    (
        "ROTEL_OTLP_GRPC_MAX_RECV_MSG_SIZE_MIB",
        str(MAX_RECV_MSG_SIZE_MIB),
        "One metrics export of a service with thousands of keys can exceed gRPC's 4 MiB default.",
    ),
    ("ROTEL_EXPORTER", "otlp", "Forward everything over OTLP ..."),
    ("ROTEL_OTLP_EXPORTER_ENDPOINT", GATEWAY_ENDPOINT, "... to the gateway collector."),
    ("ROTEL_OTLP_EXPORTER_PROTOCOL", "grpc", ""),
    ("ROTEL_OTLP_EXPORTER_COMPRESSION", "gzip", ""),
    (
        "ROTEL_OTLP_EXPORTER_RETRY_MAX_ELAPSED_TIME",
        "60s",
        "inferscope's metrics are cumulative: the next export (every 60 s by default) carries what a "
        "lost one had, so retrying longer only queues stale data.",
    ),
)


def rotel_env() -> str:
    """The rotel agent's configuration as an environment file (``docker run --env-file``, a
    systemd ``EnvironmentFile=``, or ``set -a; . ./rotel.env; set +a`` before ``rotel-agent start``)."""
    lines = [
        "# rotel agent beside an inferscope service: receives its OTLP metrics and spans, batches",
        "# them, and forwards them to the gateway collector (otelcol-gateway.yaml).",
        "# rotel takes its settings from the environment: docker run --env-file rotel.env, a systemd",
        "# EnvironmentFile=, or `set -a; . ./rotel.env; set +a` before `rotel-agent start`.",
        "# In the service: OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 (metrics and spans go",
        "# there) and INFERSCOPE_HISTOGRAM_AGGREGATION=explicit (Prometheus then gets the classic",
        "# buckets that inferscope's rules read). See docs/deploy.md.",
    ]
    for name, value, why in ROTEL_SETTINGS:
        if why:
            lines.append("")
            lines += [f"# {line}" for line in _wrap(why)]
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 96) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def otelcol_gateway() -> dict[str, Any]:
    """An OpenTelemetry Collector (contrib distribution) gateway configuration: OTLP in, tail
    sampling of traces, metrics out through Prometheus remote write, traces out over OTLP."""
    return {
        "receivers": {
            "otlp": {
                "protocols": {
                    "grpc": {"endpoint": "0.0.0.0:4317", "max_recv_msg_size_mib": MAX_RECV_MSG_SIZE_MIB},
                    "http": {"endpoint": "0.0.0.0:4318"},
                }
            }
        },
        "processors": {
            "memory_limiter": {"check_interval": "1s", "limit_percentage": 80, "spike_limit_percentage": 20},
            # Decides on whole traces: every span of a trace must reach the same gateway (with
            # several gateways, route by trace id: the loadbalancing exporter in front).
            "tail_sampling": {
                "decision_wait": "10s",
                "num_traces": 100000,
                "expected_new_traces_per_sec": 1000,
                "policies": [
                    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
                    # inferscope already kept these calls in the process (docs/tracing.md): keep the
                    # traces they belong to, with the request's other spans.
                    {
                        "name": "kept-by-inferscope",
                        "type": "string_attribute",
                        "string_attribute": {"key": "inferscope.trace.kept", "values": ["slow", "error"]},
                    },
                    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 1000}},
                    {
                        "name": "a-share-of-the-rest",
                        "type": "probabilistic",
                        "probabilistic": {"sampling_percentage": 5},
                    },
                ],
            },
            "batch": {"send_batch_size": 8192, "timeout": "5s"},
        },
        "exporters": {
            # Prometheus (2.x: --web.enable-remote-write-receiver), Mimir, Thanos receive,
            # VictoriaMetrics... The names are inferscope's Prometheus names (docs/metrics.md).
            "prometheusremotewrite": {
                "endpoint": "http://prometheus:9090/api/v1/write",
                "resource_to_telemetry_conversion": {"enabled": False},
                "target_info": {"enabled": True},
            },
            "otlp/traces": {"endpoint": "trace-store:4317", "tls": {"insecure": True}},
        },
        "extensions": {"health_check": {"endpoint": "0.0.0.0:13133"}},
        "service": {
            "extensions": ["health_check"],
            "pipelines": {
                "metrics": {
                    "receivers": ["otlp"],
                    "processors": ["memory_limiter", "batch"],
                    "exporters": ["prometheusremotewrite"],
                },
                "traces": {
                    "receivers": ["otlp"],
                    "processors": ["memory_limiter", "tail_sampling", "batch"],
                    "exporters": ["otlp/traces"],
                },
            },
        },
    }
