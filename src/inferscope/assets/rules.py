"""Prometheus recording and alert rules over inferscope's metrics, and their ``promtool`` unit tests.

Every metric and label a rule names comes from the metric specification (``export/spec.py``) and
the exporter's label conversion, so a renamed metric changes the rules with it; tests/test_assets.py
fails when a rule names anything inferscope does not export. Record names follow Prometheus's
``level:metric:operations`` convention: ``job_model_version:...`` is aggregated over the replicas
of a job (``job`` is the service: the scrape job, or ``service.name`` through an OTLP pipeline).

The thresholds are module constants, documented in docs/alerts.md; change them there and here, then
regenerate the shipped files (``python -m inferscope.assets``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._keys import ERROR_TYPE, MODEL_NAME, MODEL_VERSION, STAGE_NAME
from ..export import spec
from ..export.metrics import prometheus_label_name

__all__ = [
    "ALERTS",
    "QUANTILES",
    "RECORDS",
    "RULES_FILE",
    "TESTS_FILE",
    "WEEK_TESTS_FILE",
    "Alert",
    "Record",
    "rule_groups",
    "rule_tests",
    "week_rule_tests",
]

#: The file names the rules and their tests are shipped under (the tests name the rules' file).
RULES_FILE = "inferscope-rules.yml"
TESTS_FILE = "inferscope-rules.test.yml"
#: The week-over-week alert's tests: a week of series, evaluated every 5 minutes to stay quick.
WEEK_TESTS_FILE = "inferscope-rules.week.test.yml"

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
        f"clamp_min(\n  1 - {_sum_rate(f'{STAGE_CPU}_sum', _BY_STAGE)}\n"
        f"  / {_sum_rate(f'{STAGE_DURATION}_sum', _BY_STAGE)},\n  0\n)",
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


# --- promtool unit tests ----------------------------------------------------------------------------
#
# Each test case feeds series in promtool's notation, one sample a minute: "a+bxN" is N+1 samples
# from a rising by b, "_xN" N missing samples, "stale" the end of a series. Each alert has a series
# that must fire and one beside it that must not, and is checked before its `for` has run out too.
# Values of records are compared rounded (round(expr, 0.0001)): promtool 2.42 compares exactly.

_SVC = {JOB: "fraud-svc", INSTANCE: "10.0.0.1:9464"}
_OTHER = {JOB: "fraud-svc", INSTANCE: "10.0.0.2:9464"}
_WEEK_MINUTES = 7 * 24 * 60
_ROUND_TO = "0.0001"

Phase = tuple[float | None, int]  # per minute (None: no samples), for this many minutes


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def _counter(phases: Sequence[Phase]) -> str:
    """The samples of a counter that rises by ``per_minute`` during each phase, or is absent."""
    parts, value = [], 0.0
    for per_minute, minutes in phases:
        if per_minute is None:
            parts.append(f"_x{minutes}")
            continue
        parts.append(f"{value:g}+{per_minute:g}x{minutes - 1}")
        value += per_minute * minutes
    return " ".join(parts)


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    return {"series": _selector(name, labels), "values": values}


#: The buckets of the test histograms, and cumulative counts per minute for each of them.
_LE = ("0.05", "0.1", "0.2", "0.4", "+Inf")
_P95_175MS = (20, 80, 100, 100, 100)  # p95 in (0.1, 0.2]: 0.1 + 0.1 * (95 - 80) / 20 = 0.175
_P95_350MS = (0, 40, 80, 100, 100)  # p95 in (0.2, 0.4]: 0.2 + 0.2 * (95 - 80) / 20 = 0.35
_P95_180MS = (20, 75, 100, 100, 100)  # p95: 0.1 + 0.1 * (95 - 75) / 25 = 0.18, 3% above 0.175

Buckets = tuple[int, ...]


def _histogram(name: str, labels: dict[str, str], phases: Sequence[tuple[Buckets | None, int]]) -> list[Any]:
    """The bucket and count series of a histogram with ``buckets`` (cumulative, one per ``_LE``)
    observed each minute of each phase."""
    series = [
        _series(
            f"{name}_bucket",
            {**labels, LE: le},
            _counter([(None if b is None else b[i], m) for b, m in phases]),
        )
        for i, le in enumerate(_LE)
    ]
    series.append(
        _series(f"{name}_count", labels, _counter([(None if b is None else b[-1], m) for b, m in phases]))
    )
    return series


def _samples(record: str, rows: Sequence[tuple[dict[str, str], float]]) -> list[dict[str, Any]]:
    return [{"labels": _selector(record, labels), "value": value} for labels, value in rows]


def _expect(expr: str, minute: int, rows: Sequence[tuple[dict[str, str], float]]) -> dict[str, Any]:
    """A promql_expr_test: ``expr`` at ``minute``, rounded, is ``rows`` (labels without a name)."""
    return {
        "expr": f"round({expr}, {_ROUND_TO})",
        "eval_time": f"{minute}m",
        "exp_samples": [{"labels": _selector("", labels), "value": value} for labels, value in rows],
    }


def _annotations(alert: str, labels: dict[str, str], value: str) -> dict[str, str]:
    """The annotations ``alert`` renders for ``labels`` and a ``$value`` that a template formats
    as ``value``: its templates filled in as Prometheus fills them."""
    [found] = [a for a in ALERTS if a.alert == alert]
    filled = {}
    for key, text in (("summary", found.summary), ("description", found.description)):
        text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m[1], ""), text)
        if "{{" in text:
            raise ValueError(f"{alert}'s {key} has a template the tests do not fill in: {text}")
        filled[key] = text
    return filled


def _alert_test(alert: str, minute: int, fired: Sequence[tuple[dict[str, str], str]]) -> dict[str, Any]:
    """An alert_rule_test: at ``minute``, ``alert`` fires for exactly these (labels, $value)."""
    [found] = [a for a in ALERTS if a.alert == alert]
    expected = []
    for labels, value in fired:
        full = {**labels, SEVERITY: found.severity}
        expected.append({"exp_labels": full, "exp_annotations": _annotations(alert, full, value)})
    return {"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": expected}


def _latency_case() -> dict[str, Any]:
    # Two models with 5 hours of history a week ago (a week of samples would make promtool slow),
    # then an hour before the regression starts, when version 4 of one replaces version 3.
    history, before, after = 300, 60, 180
    start = _WEEK_MINUTES + before
    gap = (None, _WEEK_MINUTES - history)
    fraud, ranker = {JOB: _SVC[JOB], MODEL: "fraud"}, {JOB: _SVC[JOB], MODEL: "ranker"}
    series = _histogram(
        INFERENCE_DURATION,
        {**_SVC, **fraud, VERSION: "3"},
        [(_P95_175MS, history), gap, (_P95_175MS, before), (None, after)],
    )
    series += _histogram(
        INFERENCE_DURATION, {**_SVC, **fraud, VERSION: "4"}, [(None, start), (_P95_350MS, after)]
    )
    # A model 3% slower than a week ago, which must not fire.
    series += _histogram(
        INFERENCE_DURATION,
        {**_SVC, **ranker, VERSION: "1"},
        [(_P95_175MS, history), gap, (_P95_175MS, before), (_P95_180MS, after)],
    )
    p95 = f'{MODEL_DURATION_QUANTILE}{{{QUANTILE}="0.95"}}'
    at = {QUANTILE: "0.95"}
    return {
        "name": "p95 twice that of a week ago fires after an hour, across versions; 3% slower does not",
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            _expect(p95, start - 10, [({**fraud, **at}, 0.175), ({**ranker, **at}, 0.175)]),
            _expect(p95, start + 30, [({**fraud, **at}, 0.35), ({**ranker, **at}, 0.18)]),
            # Per version, p50 (0.1 + 0.1 * (50 - 40) / 40) and p99 (0.2 + 0.2 * (99 - 80) / 20) too.
            _expect(
                f'{DURATION_QUANTILE}{{{MODEL}="fraud"}}',
                start + 30,
                [
                    ({**fraud, VERSION: "4", QUANTILE: q}, value)
                    for q, value in zip(QUANTILES, (0.125, 0.35, 0.39), strict=True)
                ],
            ),
        ],
        "alert_rule_test": [
            _alert_test("InferscopeLatencyP95WeekOverWeek", start + 50, []),
            _alert_test("InferscopeLatencyP95WeekOverWeek", start + 90, [(fraud, "200%")]),
        ],
    }


def _errors_case() -> dict[str, Any]:
    count = f"{INFERENCE_DURATION}_count"
    payments = {**_SVC, MODEL: "payments", VERSION: "2"}  # 10% of calls fail: fires
    search = {**_SVC, MODEL: "search", VERSION: "1"}  # 1% fail: does not
    ranker = {**_SVC, MODEL: "ranker", VERSION: "1"}  # none fail: its ratio is 0, not absent
    failed = {ERROR: "ValueError"}
    series = [
        _series(count, payments, _counter([(90, 40)])),
        _series(count, {**payments, **failed}, _counter([(10, 40)])),
        _series(count, search, _counter([(99, 40)])),
        _series(count, {**search, **failed}, _counter([(1, 40)])),
        _series(count, ranker, _counter([(100, 40)])),
    ]
    by_version = [{k: v for k, v in labels.items() if k != INSTANCE} for labels in (payments, search, ranker)]
    return {
        "name": "an error ratio above 5% fires after 10 minutes; 1% does not",
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            _expect(ERROR_RATIO_RECORD, 20, list(zip(by_version, (0.1, 0.01, 0.0), strict=True))),
            _expect(INFERENCES, 20, [(labels, 1.6667) for labels in by_version]),
        ],
        "alert_rule_test": [
            _alert_test("InferscopeErrorRatioHigh", 8, []),
            _alert_test("InferscopeErrorRatioHigh", 20, [(by_version[0], "10%")]),
        ],
    }


def _cpu_case() -> dict[str, Any]:
    labels = {**_SVC, MODEL: "fraud", VERSION: "3"}
    stage = {**labels, STAGE: "infer"}
    series = _histogram(INFERENCE_DURATION, labels, [(_P95_175MS, 20)])
    series += [
        # 3 CPU-seconds per 100 inferences in the inference thread; 5 in the process (all threads).
        _series(f"{INFERENCE_CPU}_sum", labels, _counter([(3, 20)])),
        _series(f"{INFERENCE_CPU}_count", labels, _counter([(100, 20)])),
        _series(PROCESS_CPU, {**_SVC, "cpu_mode": "user"}, _counter([(4, 20)])),
        _series(PROCESS_CPU, {**_SVC, "cpu_mode": "system"}, _counter([(1, 20)])),
    ]
    # A stage of 60 ms (6 s per 100 calls) of which 15 ms on CPU: 75% off CPU.
    series += _histogram(STAGE_DURATION, stage, [(_P95_175MS, 20)])
    series += [
        _series(f"{STAGE_DURATION}_sum", stage, _counter([(6, 20)])),
        _series(f"{STAGE_CPU}_sum", stage, _counter([(1.5, 20)])),
        _series(f"{STAGE_CPU}_count", stage, _counter([(100, 20)])),
    ]
    version = {k: v for k, v in labels.items() if k != INSTANCE}
    in_stage = {**version, STAGE: "infer"}
    return {
        "name": "CPU per inference, the process's CPU per inference, stage quantiles and off-CPU share",
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            _expect(CPU_PER_INFERENCE, 15, [(version, 0.03)]),
            _expect(PROCESS_CPU_PER_INFERENCE, 15, [({JOB: _SVC[JOB], INSTANCE: _SVC[INSTANCE]}, 0.05)]),
            _expect(
                STAGE_QUANTILE,
                15,
                [
                    ({**in_stage, QUANTILE: q}, v)
                    for q, v in zip(QUANTILES, (0.075, 0.175, 0.195), strict=True)
                ],
            ),
            _expect(STAGE_CPU_PER_CALL, 15, [(in_stage, 0.015)]),
            _expect(STAGE_OFF_CPU, 15, [(in_stage, 0.75)]),
        ],
    }


def _memory_case() -> dict[str, Any]:
    leaking = dict(_SVC)  # 100 MiB more each hour
    loaded = dict(_OTHER)  # 500 MB more once (a model loaded), then flat: must not fire
    per_minute = 100 * 2**20 / 60
    return {
        "name": "memory growing 100 MiB an hour fires after 3 hours; one step up does not",
        "interval": "1m",
        "input_series": [
            {"series": _selector(PROCESS_MEMORY, leaking), "values": f"200000000+{per_minute!r}x240"},
            {"series": _selector(PROCESS_MEMORY, loaded), "values": "200000000x30 700000000x210"},
        ],
        "alert_rule_test": [
            _alert_test("InferscopeMemoryGrowth", 170, []),
            _alert_test("InferscopeMemoryGrowth", 200, [(leaking, "100Mi")]),
        ],
    }


def _throttling_case() -> dict[str, Any]:
    series = []
    for labels, throttled in ((_SVC, 300), (_OTHER, 60)):  # 50% of periods throttled: fires; 10% not
        series.append(_series(CPU_PERIODS, labels, _counter([(600, 40)])))
        series.append(_series(CPU_THROTTLED_PERIODS, labels, _counter([(throttled, 40)])))
    return {
        "name": "half the CFS periods throttled fires after 15 minutes; a tenth does not",
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [_expect(THROTTLED, 20, [(_SVC, 0.5), (_OTHER, 0.1)])],
        "alert_rule_test": [
            _alert_test("InferscopeCPUThrottled", 10, []),
            _alert_test("InferscopeCPUThrottled", 25, [(_SVC, "50%")]),
        ],
    }


def _dropped_case() -> dict[str, Any]:
    steady = {**_SVC, REASON: "ring_full"}  # 5 a minute, for 30 minutes: fires
    burst = {**_OTHER, REASON: "ring_full"}  # 1,000 in one burst, then none: does not
    return {
        "name": "records dropped for 10 minutes fire; one burst does not",
        "interval": "1m",
        "input_series": [
            _series(RECORDS_DROPPED, steady, _counter([(5, 31)])),
            {"series": _selector(RECORDS_DROPPED, burst), "values": "0 0 1000x28"},
        ],
        "alert_rule_test": [
            _alert_test("InferscopeRecordsDropped", 8, []),
            _alert_test("InferscopeRecordsDropped", 25, [(steady, "25")]),
        ],
    }


def _regression_case() -> dict[str, Any]:
    open_ = {**_SVC, MODEL: "fraud", VERSION: "3", STAGE: "infer", CAUSE: "more_work"}
    closed = {**_OTHER, MODEL: "ranker", VERSION: "1", CAUSE: "contention"}  # open for 2 minutes
    return {
        "name": "a regression the detector keeps open fires after 5 minutes; one it closes does not",
        "interval": "1m",
        "input_series": [
            {"series": _selector(REGRESSION_ACTIVE, open_), "values": "1x20"},
            {"series": _selector(REGRESSION_ACTIVE, closed), "values": "1 1 stale"},
        ],
        "alert_rule_test": [
            _alert_test("InferscopeRegressionActive", 3, []),
            _alert_test("InferscopeRegressionActive", 10, [(open_, "1")]),
        ],
    }


def rule_tests() -> dict[str, Any]:
    """The ``promtool test rules`` file of every rule but the week-over-week alert."""
    return {
        "rule_files": [RULES_FILE],
        "evaluation_interval": "1m",
        "tests": [
            _errors_case(),
            _cpu_case(),
            _memory_case(),
            _throttling_case(),
            _dropped_case(),
            _regression_case(),
        ],
    }


def week_rule_tests() -> dict[str, Any]:
    """The ``promtool test rules`` file of the week-over-week alert: promtool evaluates every rule
    at every step of the week, so every 5 minutes rather than every minute."""
    return {"rule_files": [RULES_FILE], "evaluation_interval": "5m", "tests": [_latency_case()]}
