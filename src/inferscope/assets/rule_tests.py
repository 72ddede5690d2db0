"""``promtool test rules`` unit tests of the rules of ``rules.py``.

Each test case feeds series in promtool's notation, one sample a minute: "a+bxN" is N+1 samples
from a rising by b, "_xN" N missing samples, "stale" the end of a series. Each alert has a series
that must fire and one beside it that must not, and is checked before its `for` has run out too.
Values of records are compared rounded (``round(expr, 0.0001)``): promtool 2.42 compares exactly.
The expected annotations are the alerts' templates filled in as Prometheus fills them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .rules import (
    ALERTS,
    CAUSE,
    CPU_PER_INFERENCE,
    CPU_PERIODS,
    CPU_THROTTLED_PERIODS,
    DURATION_QUANTILE,
    ERROR,
    ERROR_RATIO_RECORD,
    INFERENCE_CPU,
    INFERENCE_DURATION,
    INFERENCES,
    INSTANCE,
    JOB,
    LE,
    MODEL,
    MODEL_DURATION_QUANTILE,
    PROCESS_CPU,
    PROCESS_CPU_PER_INFERENCE,
    PROCESS_MEMORY,
    QUANTILE,
    QUANTILES,
    REASON,
    RECORDS_DROPPED,
    REGRESSION_ACTIVE,
    RULES_FILE,
    SEVERITY,
    STAGE,
    STAGE_CPU,
    STAGE_CPU_PER_CALL,
    STAGE_DURATION,
    STAGE_OFF_CPU,
    STAGE_QUANTILE,
    THROTTLED,
    VERSION,
)

__all__ = ["TESTS_FILE", "WEEK_TESTS_FILE", "rule_tests", "week_rule_tests"]

#: The file names the tests are shipped under, beside the rules' file.
TESTS_FILE = "inferscope-rules.test.yml"
#: The week-over-week alert's tests: a week of series, evaluated every 5 minutes to stay quick.
WEEK_TESTS_FILE = "inferscope-rules.week.test.yml"

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
    as ``value``: its templates filled in as Prometheus fills them. A template naming a label the
    alert does not carry raises KeyError: Prometheus would render it empty."""
    [found] = [a for a in ALERTS if a.alert == alert]
    filled = {}
    for key, text in (("summary", found.summary), ("description", found.description)):
        text = re.sub(r"\{\{ \$value \| \w+ \}\}", value, text)
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m[1]], text)
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
    # A stage of 60 ms (6 s per 100 calls) of which 15 ms on CPU: 75% off CPU. Its CPU was read on
    # 25 of the 100 calls (the stage CPU sample): per call it is still 15 ms.
    series += _histogram(STAGE_DURATION, stage, [(_P95_175MS, 20)])
    series += [
        _series(f"{STAGE_DURATION}_sum", stage, _counter([(6, 20)])),
        _series(f"{STAGE_CPU}_sum", stage, _counter([(0.375, 20)])),
        _series(f"{STAGE_CPU}_count", stage, _counter([(25, 20)])),
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
