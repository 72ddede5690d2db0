"""Prometheus recording and alert rules over inferscope's metrics, and their ``promtool`` unit tests.

Every metric and label a rule names comes from the metric specification (``export/spec.py``) and
the exporter's label conversion, so a renamed metric changes the rules with it; tests/test_assets.py
fails when a rule names anything inferscope does not export. Record names follow Prometheus's
``level:metric:operations`` convention: ``job_model_version:...`` is aggregated over the replicas
of a job (``job`` is the service: the scrape job, or ``service.name`` through an OTLP pipeline).

The thresholds are module constants, documented in docs/alerts.md; change them there and here, then
regenerate the shipped files (``python -m inferscope.assets``). ``rule_tests.py`` holds their
``promtool`` unit tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._keys import ERROR_TYPE, MODEL_NAME, MODEL_VERSION, STAGE_NAME
from ..export import spec
from ..export.prometheus import prometheus_label_name

__all__ = [
    "ALERTS",
    "QUANTILES",
    "RECORDS",
    "RULES_FILE",
    "Alert",
    "Record",
    "rule_groups",
]

#: The file name the rules are shipped under (their tests name it).
RULES_FILE = "inferscope-rules.yml"

#: The quantiles recorded from the duration histograms.
QUANTILES = ("0.5", "0.95", "0.99")
#: The rate window of every record.
WINDOW = "5m"

# Thresholds (docs/alerts.md explains each).
LATENCY_RISE = 1.2  # p95 above 120% of the same time a week earlier ...
LATENCY_FOR = "1h"  # ... for an hour
MIN_RATE_PER_S = 0.1  # below this rate of inferences a quantile or a ratio is noise: no alert
ERROR_RATIO = 0.05
ERROR_FOR = "10m"
MEMORY_GROWTH_BYTES_PER_HOUR = 50 * 2**20  # 50 MiB per hour ...
MEMORY_FOR = "3h"  # ... for three hours
THROTTLED_SHARE = 0.25  # a quarter of CFS periods throttled, as kubernetes-mixin's CPUThrottlingHigh
THROTTLED_FOR = "15m"
DROPPED_FOR = "10m"
REGRESSION_FOR = "5m"

# Label names as Prometheus sees inferscope's attributes.
JOB, INSTANCE, LE, QUANTILE, SEVERITY = "job", "instance", "le", "quantile", "severity"
MODEL = prometheus_label_name(MODEL_NAME)
VERSION = prometheus_label_name(MODEL_VERSION)
STAGE = prometheus_label_name(STAGE_NAME)
ERROR = prometheus_label_name(ERROR_TYPE)
REASON = "reason"
CAUSE = prometheus_label_name("inferscope.regression.cause")


def _name(metric: str, suffix: str = "") -> str:
    """The Prometheus name of a metric of the specification, with a histogram series' suffix."""
    return spec.get(metric).prometheus_name + suffix


INFERENCE_DURATION = _name("inferscope.inference.duration")
INFERENCE_CPU = _name("inferscope.inference.cpu.time")
STAGE_DURATION = _name("inferscope.stage.duration")
STAGE_CPU = _name("inferscope.stage.cpu.time")
PROCESS_CPU = _name("process.cpu.time")
PROCESS_MEMORY = _name("process.memory.usage")
CPU_PERIODS = _name("inferscope.container.cpu.periods")
CPU_THROTTLED_PERIODS = _name("inferscope.container.cpu.throttled.periods")
RECORDS_DROPPED = _name("inferscope.sdk.records.dropped")
REGRESSION_ACTIVE = _name("inferscope.regression.active")

_BY_MODEL = (JOB, MODEL)
_BY_VERSION = (JOB, MODEL, VERSION)
_BY_STAGE = (JOB, MODEL, VERSION, STAGE)
_BY_INSTANCE = (JOB, INSTANCE)


def _by(labels: Sequence[str]) -> str:
    return f"by ({', '.join(labels)})"


def _on(labels: Sequence[str]) -> str:
    return f"on ({', '.join(labels)})"


def _sum_rate(series: str, labels: Sequence[str], selector: str = "", offset: str = "") -> str:
    window = f"[{WINDOW}]" + (f" offset {offset}" if offset else "")
    return f"sum {_by(labels)} (rate({series}{selector}{window}))"


@dataclass(frozen=True)
class Record:
    """A recording rule."""

    record: str
    expr: str
    labels: dict[str, str] = field(default_factory=dict)

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"record": self.record, "expr": self.expr}
        if self.labels:
            rule["labels"] = dict(self.labels)
        return rule


@dataclass(frozen=True)
class Alert:
    """An alert rule; ``summary`` and ``description`` are Prometheus templates."""

    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "expr": self.expr,
            "for": self.for_,
            "labels": {SEVERITY: self.severity},
            "annotations": {"summary": self.summary, "description": self.description},
        }


# --- recording rules --------------------------------------------------------------------------------

BUCKET_RATE = f"job_model_version:{INFERENCE_DURATION}_bucket:rate{WINDOW}"
MODEL_BUCKET_RATE = f"job_model:{INFERENCE_DURATION}_bucket:rate{WINDOW}"
DURATION_QUANTILE = f"job_model_version:{INFERENCE_DURATION}:quantile_rate{WINDOW}"
MODEL_DURATION_QUANTILE = f"job_model:{INFERENCE_DURATION}:quantile_rate{WINDOW}"
INFERENCES = f"job_model_version:inferscope_inferences:rate{WINDOW}"
MODEL_INFERENCES = f"job_model:inferscope_inferences:rate{WINDOW}"
ERRORS = f"job_model_version:inferscope_inference_errors:rate{WINDOW}"
ERROR_RATIO_RECORD = f"job_model_version:inferscope_inference_errors:ratio_rate{WINDOW}"
CPU_PER_INFERENCE = f"job_model_version:{INFERENCE_CPU}:mean_rate{WINDOW}"
STAGE_QUANTILE = f"job_model_version_stage:{STAGE_DURATION}:quantile_rate{WINDOW}"
STAGE_CPU_PER_CALL = f"job_model_version_stage:{STAGE_CPU}:mean_rate{WINDOW}"
STAGE_OFF_CPU = f"job_model_version_stage:inferscope_stage_off_cpu:ratio_rate{WINDOW}"
PROCESS_CPU_PER_INFERENCE = f"job_instance:inferscope_process_cpu_seconds_per_inference:rate{WINDOW}"
THROTTLED = f"job_instance:inferscope_container_cpu_throttled_periods:ratio_rate{WINDOW}"


def _quantiles(record: str, buckets: str, labels: Sequence[str]) -> list[Record]:
    return [
        Record(record, f"histogram_quantile({q}, sum {_by((*labels, LE))} ({buckets}))", {QUANTILE: q})
        for q in QUANTILES
    ]


def _stage_quantiles() -> list[Record]:
    buckets = f"rate({STAGE_DURATION}_bucket[{WINDOW}])"
    return _quantiles(STAGE_QUANTILE, buckets, _BY_STAGE)


RECORDS: tuple[Record, ...] = (
    # Latency quantiles per model version, and per model over all its versions (the week-over-week
    # alert compares a model with itself across a deploy of a new version).
    Record(BUCKET_RATE, _sum_rate(f"{INFERENCE_DURATION}_bucket", (*_BY_VERSION, LE))),
    *_quantiles(DURATION_QUANTILE, BUCKET_RATE, _BY_VERSION),
    Record(MODEL_BUCKET_RATE, f"sum {_by((*_BY_MODEL, LE))} ({BUCKET_RATE})"),
    *_quantiles(MODEL_DURATION_QUANTILE, MODEL_BUCKET_RATE, _BY_MODEL),
    # Throughput, errors and their ratio (0, not absent, while a model has no failed call).
    Record(INFERENCES, _sum_rate(f"{INFERENCE_DURATION}_count", _BY_VERSION)),
    Record(MODEL_INFERENCES, f"sum {_by(_BY_MODEL)} ({INFERENCES})"),
    Record(ERRORS, _sum_rate(f"{INFERENCE_DURATION}_count", _BY_VERSION, f'{{{ERROR}!=""}}')),
    Record(ERROR_RATIO_RECORD, f"({ERRORS} or 0 * {INFERENCES}) / {INFERENCES}"),
    # CPU per inference: the inference thread's CPU time, and the whole process's (all its threads,
    # all workers of the instance) per inference.
    Record(
        CPU_PER_INFERENCE,
        f"{_sum_rate(f'{INFERENCE_CPU}_sum', _BY_VERSION)}\n/\n"
        f"{_sum_rate(f'{INFERENCE_CPU}_count', _BY_VERSION)}",
    ),
    Record(
        PROCESS_CPU_PER_INFERENCE,
        f"{_sum_rate(PROCESS_CPU, _BY_INSTANCE)}\n/\n"
        f"{_sum_rate(f'{INFERENCE_DURATION}_count', _BY_INSTANCE)}",
    ),
    # Stages: latency quantiles, CPU per call, and the share of their wall time spent off CPU
    # (waiting: I/O, locks, the GPU, a throttled or contended CPU).
    *_stage_quantiles(),
    Record(
        STAGE_CPU_PER_CALL,
        f"{_sum_rate(f'{STAGE_CPU}_sum', _BY_STAGE)}\n/\n{_sum_rate(f'{STAGE_CPU}_count', _BY_STAGE)}",
    ),
    Record(
        STAGE_OFF_CPU,
        # CPU per call over wall per call: a busy stage's CPU is read on a sample of its calls
        # (docs/counters.md), so the CPU histogram counts fewer calls than the duration one.
        f"clamp_min(\n  1 - (\n    {_sum_rate(f'{STAGE_CPU}_sum', _BY_STAGE)}\n"
        f"    / {_sum_rate(f'{STAGE_CPU}_count', _BY_STAGE)}\n  )\n"
        f"  / (\n    {_sum_rate(f'{STAGE_DURATION}_sum', _BY_STAGE)}\n"
        f"    / {_sum_rate(f'{STAGE_DURATION}_count', _BY_STAGE)}\n  ),\n  0\n)",
    ),
    # The share of CFS periods in which the container was throttled.
    Record(
        THROTTLED,
        f"{_sum_rate(CPU_THROTTLED_PERIODS, _BY_INSTANCE)}\n/\n{_sum_rate(CPU_PERIODS, _BY_INSTANCE)}",
    ),
)

# --- alert rules ------------------------------------------------------------------------------------

_P95 = f'{MODEL_DURATION_QUANTILE}{{{QUANTILE}="0.95"}}'
_P95_WEEK_AGO = (
    f"histogram_quantile(0.95, {_sum_rate(f'{INFERENCE_DURATION}_bucket', (*_BY_MODEL, LE), offset='1w')})"
)
_MODEL = f"{{{{ $labels.{MODEL} }}}}"
_JOB = f"{{{{ $labels.{JOB} }}}}"
_INSTANCE = f"{{{{ $labels.{INSTANCE} }}}}"

ALERTS: tuple[Alert, ...] = (
    Alert(
        "InferscopeLatencyP95WeekOverWeek",
        f"(\n  {_P95}\n  / {_on(_BY_MODEL)}\n  {_P95_WEEK_AGO}\n) > {LATENCY_RISE:g}\n"
        f"and {_on(_BY_MODEL)}\n{MODEL_INFERENCES} >= {MIN_RATE_PER_S:g}",
        LATENCY_FOR,
        "warning",
        f"p95 latency of {_MODEL} ({_JOB}) is {{{{ $value | humanizePercentage }}}} of a week ago",
        f"The 95th percentile of {_MODEL}'s inference duration over {WINDOW}, all versions and "
        f"replicas of {_JOB}, has stayed above {LATENCY_RISE:.0%} of its value at the same time a week "
        f"earlier for {LATENCY_FOR}. `inferscope status` on a replica names the regressed stages "
        "and the cause.",
    ),
    Alert(
        "InferscopeErrorRatioHigh",
        f"{ERROR_RATIO_RECORD} > {ERROR_RATIO:g}\nand\n{INFERENCES} >= {MIN_RATE_PER_S:g}",
        ERROR_FOR,
        "critical",
        f"{{{{ $value | humanizePercentage }}}} of {_MODEL}'s inferences fail ({_JOB})",
        f"More than {ERROR_RATIO:.0%} of the inferences of {_MODEL} version "
        f"{{{{ $labels.{VERSION} }}}} raised an exception over {WINDOW}, for {ERROR_FOR}. "
        f"The {ERROR} label of {INFERENCE_DURATION}_count names the exceptions.",
    ),
    Alert(
        "InferscopeMemoryGrowth",
        f"deriv({PROCESS_MEMORY}[1h]) * 3600 > {MEMORY_GROWTH_BYTES_PER_HOUR}",
        MEMORY_FOR,
        "warning",
        f"{_INSTANCE} ({_JOB}) grows by {{{{ $value | humanize1024 }}}}B an hour",
        f"The resident memory of {_INSTANCE} has grown faster than "
        f"{MEMORY_GROWTH_BYTES_PER_HOUR // 2**20} MiB an hour for {MEMORY_FOR}: a leak, or a cache "
        "without a bound. The memory counters (counters=full) attribute RSS growth to models and "
        "stages.",
    ),
    Alert(
        "InferscopeCPUThrottled",
        f"{THROTTLED} > {THROTTLED_SHARE:g}",
        THROTTLED_FOR,
        "warning",
        f"{_INSTANCE} ({_JOB}) is CPU-throttled in {{{{ $value | humanizePercentage }}}} of periods",
        f"The container of {_INSTANCE} used up its CPU quota in more than {THROTTLED_SHARE:.0%} of "
        f"CFS periods for {THROTTLED_FOR}: inferences wait for CPU time. Raise the CPU limit, or "
        "size thread pools to it (inferscope_process_threads_oversubscription_ratio).",
    ),
    Alert(
        "InferscopeRecordsDropped",
        f"increase({RECORDS_DROPPED}[{WINDOW}]) > 0",
        DROPPED_FOR,
        "warning",
        f"{_INSTANCE} ({_JOB}) drops inferscope records ({{{{ $labels.{REASON} }}}})",
        f"inferscope on {_INSTANCE} has dropped records in every {WINDOW} for {DROPPED_FOR} "
        f"({{{{ $value | humanize }}}} in the last {WINDOW}), reason {{{{ $labels.{REASON} }}}}: "
        "its counts and latencies miss those calls. ring_full: the drainer falls behind (a larger "
        "ring_capacity, a shorter drain_interval_millis); stack_depth: stages nest deeper than 32.",
    ),
    Alert(
        "InferscopeRegressionActive",
        f"{REGRESSION_ACTIVE} > 0",
        REGRESSION_FOR,
        "warning",
        f"inferscope reports a {{{{ $labels.{CAUSE} }}}} regression of {_MODEL} on {_INSTANCE}",
        f"inferscope's in-process detector on {_INSTANCE} ({_JOB}) has an open regression of "
        f"{_MODEL} version {{{{ $labels.{VERSION} }}}}, stage {{{{ $labels.{STAGE} }}}}, cause "
        f"{{{{ $labels.{CAUSE} }}}}. `inferscope status` there shows the evidence; "
        "inferscope_tax_latency_seconds and inferscope_tax_cpu its cost.",
    ),
)


def rule_groups() -> dict[str, Any]:
    """The rules file: one group of records, one of alerts (the alerts read the records)."""
    return {
        "groups": [
            {"name": "inferscope.records", "rules": [r.rule() for r in RECORDS]},
            {"name": "inferscope.alerts", "rules": [a.rule() for a in ALERTS]},
        ]
    }
