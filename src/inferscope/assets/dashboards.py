"""Grafana dashboards over inferscope's Prometheus metrics, built with Grafana's typed builders
(``grafana-foundation-sdk``) from the metric specification (``export/spec.py``).

Two dashboards: an overview of every model of the chosen services (latency quantiles over 30 days,
the week-over-week p95, throughput, errors, CPU per inference, the tax the regression detector
measures, and inferscope's own health), and a page for one model (versions, stages and their CPU
against off-CPU time, the per-call counters, the process, the GPU, open regressions, with exemplars
that open the traces of slow calls). Both choose the Prometheus data source, the services (the
``job`` label: the scrape job, or ``service.name`` through an OTLP pipeline), models and versions
with variables.

The package ships the generated JSON (``files/grafana/``): ``inferscope assets`` writes it without
the SDK, which needs Python 3.11 or later. After a change here, regenerate the shipped files with
``python -m inferscope.assets``; tests/test_dashboards.py fails while they differ, and when a panel
names a metric or label that inferscope does not export. docs/dashboards.md explains the panels.

>>> sorted(dashboards())  # doctest: +SKIP
['inferscope-model.json', 'inferscope-overview.json']
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..export import spec
from ..export.prometheus import prometheus_label_name
from . import rules

__all__ = [
    "GRAFANA_RELEASE",
    "MODEL_UID",
    "OPTIONAL_PANELS",
    "OVERVIEW_UID",
    "dashboards",
    "generators",
    "panels",
    "render",
]

#: The Grafana release whose dashboard schema both the SDK build pinned in the test dependency group
#: and the @grafana/schema package that tests/test_dashboards.py type-checks against follow.
GRAFANA_RELEASE = "11.6.0"

OVERVIEW_UID = "inferscope-overview"
MODEL_UID = "inferscope-model"
_FOLDER = "grafana"

#: Panels that can be empty on a machine or pipeline that lacks what their metrics need (the
#: specification's needs), with the reason. Every other query returns data from a service with
#: counters="full" and tracing on (tests/integration/test_dashboards_prometheus.py).
OPTIONAL_PANELS: dict[str, str] = {
    "GPU time per stage call": 'torch with CUDA, and stages marked device="cuda"',
    "GPU utilization": "an NVIDIA GPU and nvidia-ml-py",
    "GPU memory": "an NVIDIA GPU and nvidia-ml-py",
    "GPU power and temperature": "an NVIDIA GPU and nvidia-ml-py",
    "GPU clock throttle reasons": "an NVIDIA GPU and nvidia-ml-py",
    "Peak CUDA memory per inference": "torch with CUDA and counters=full",
    "Instructions per stage call": "a PMU (hardware perf events), rare on virtual machines",
    "CPU migrations per stage call": "counters that name perf, on Linux with the C backend",
    "CPU throttling": "a cgroup CPU controller (containers)",
    "CPU pressure and steal": "Linux PSI (/proc/pressure) and /proc/stat steal",
    "Thread pool oversubscription": "a library with a thread pool of its own (numpy, torch...)",
    "Failed metric exports": "OTLP export: the Prometheus endpoint does not serve it",
}

# Label names as Prometheus sees inferscope's attributes (the rules use the same).
JOB, INSTANCE, LE = rules.JOB, rules.INSTANCE, rules.LE
MODEL, VERSION, STAGE, ERROR = rules.MODEL, rules.VERSION, rules.STAGE, rules.ERROR
REASON, CAUSE = rules.REASON, rules.CAUSE
QUANTILE_LABEL = prometheus_label_name("inferscope.quantile")

#: Grafana's interval variable for rates: at least four scrape intervals of the data source.
RATE = "$__rate_interval"

# The variables' selectors.
_SERVICE = f'{JOB}=~"$service"'
_INFERENCE = f'{_SERVICE}, {MODEL}=~"$model", {VERSION}=~"$version"'
_STAGE = f'{_INFERENCE}, {STAGE}=~"$stage"'
_PROCESS = f'{_SERVICE}, {INSTANCE}=~"$instance"'


def _name(metric: str) -> str:
    """The Prometheus name of a metric of the specification (KeyError if it is not one)."""
    return spec.get(metric).prometheus_name


DURATION, CPU = rules.INFERENCE_DURATION, rules.INFERENCE_CPU
STAGE_DURATION, STAGE_CPU = rules.STAGE_DURATION, rules.STAGE_CPU
STAGE_GPU = _name("inferscope.stage.gpu.time")


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    exemplar: bool = False
    heatmap: bool = False


@dataclass(frozen=True)
class Panel:
    """A panel before it is built: its kind, title, unit, queries and layout."""

    kind: str  # timeseries, stat, table, heatmap
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    height: int = 8
    stacked: bool = False
    #: Values at or above which a stat or series turns red.
    red_from: float | None = None


def _rate(series: str, selector: str, window: str = RATE, offset: str = "") -> str:
    return f"rate({series}{{{selector}}}[{window}]{f' offset {offset}' if offset else ''})"


def _sum_rate(by: Sequence[str], series: str, selector: str, window: str = RATE, offset: str = "") -> str:
    grouping = f"by ({', '.join(by)}) " if by else ""
    return f"sum {grouping}({_rate(series, selector, window, offset)})"


def _quantile(q: str, histogram: str, by: Sequence[str], selector: str, window: str = RATE) -> str:
    return f"histogram_quantile({q}, {_sum_rate((*by, LE), histogram + '_bucket', selector, window)})"


def _mean(histogram: str, by: Sequence[str], selector: str) -> str:
    """Mean value per call: the rate of the sum over the rate of the count."""
    return (
        f"{_sum_rate(by, histogram + '_sum', selector)}\n/\n{_sum_rate(by, histogram + '_count', selector)}"
    )


def _legend(*labels: str) -> str:
    return " ".join(f"{{{{{label}}}}}" for label in labels)


def _quantile_queries(histogram: str, by: Sequence[str], selector: str) -> tuple[Query, ...]:
    return tuple(
        Query(
            _quantile(q, histogram, by, selector), f"{_legend(*by)} p{float(q) * 100:g}", exemplar=q == "0.99"
        )
        for q in rules.QUANTILES
    )


def _error_ratio(by: Sequence[str]) -> str:
    # 0, not absent, while a model has no failed call (as the error-ratio rule).
    count = DURATION + "_count"
    failed = _sum_rate(by, count, f'{_INFERENCE}, {ERROR}!=""')
    every = _sum_rate(by, count, _INFERENCE)
    return f"(\n  {failed}\n  or 0 * {every}\n)\n/\n{every}"


def _per_call(counter: str, by: Sequence[str], calls: str, selector: str) -> str:
    """A counter's increase per call of the histogram ``calls`` (matched on ``by``)."""
    return f"{_sum_rate(by, counter, selector)}\n/\n{_sum_rate(by, calls + '_count', selector)}"


# --- panels ---------------------------------------------------------------------------------------


def _latency_rows(by: Sequence[str]) -> list[Panel]:
    week_over_week = (
        f"{_quantile('0.95', DURATION, by, _INFERENCE, '1h')}\n/\n"
        f"histogram_quantile(0.95, {_sum_rate((*by, LE), DURATION + '_bucket', _INFERENCE, '1h', '1w')})"
    )
    who = by[-1]
    return [
        Panel(
            "timeseries",
            "Inference latency p50, p95, p99",
            "Quantiles of the wall-clock duration of tracked inferences, from the duration "
            "histogram's buckets. The dots of the p99 are exemplars: the slow calls inferscope kept "
            "as spans; one opens its trace when the data source links exemplars to a trace store.",
            _quantile_queries(DURATION, by, _INFERENCE),
            unit="s",
        ),
        Panel(
            "stat",
            "p95 against a week earlier",
            f"The p95 of the last hour divided by that of the same hour a week earlier. The "
            f"InferscopeLatencyP95WeekOverWeek alert fires above {rules.LATENCY_RISE:g} for "
            f"{rules.LATENCY_FOR}.",
            (Query(week_over_week, _legend(who), instant=True),),
            unit="percentunit",
            red_from=rules.LATENCY_RISE,
        ),
        Panel(
            "timeseries",
            "Throughput",
            "Inferences per second, failed ones included.",
            (Query(_sum_rate(by, DURATION + "_count", _INFERENCE), _legend(*by)),),
            unit="reqps",
        ),
        Panel(
            "timeseries",
            "Error ratio",
            f"The share of inferences that raised. The InferscopeErrorRatioHigh alert fires above "
            f"{rules.ERROR_RATIO:.0%}.",
            (Query(_error_ratio(by), _legend(*by)),),
            unit="percentunit",
            red_from=rules.ERROR_RATIO,
        ),
        Panel(
            "timeseries",
            "Errors by exception type",
            "Failed inferences per second, by the type of the exception they raised (error.type).",
            (
                Query(
                    _sum_rate((*by, ERROR), DURATION + "_count", f'{_INFERENCE}, {ERROR}!=""'),
                    _legend(*by, ERROR),
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "timeseries",
            "CPU per inference",
            "Mean thread CPU time of an inference: a rise with the same latency means more work, "
            "latency rising without it means waiting (I/O, locks, a contended or throttled CPU).",
            (Query(_mean(CPU, by, _INFERENCE), _legend(*by)),),
            unit="s",
        ),
    ]


def _tax_panels(by: Sequence[str]) -> list[Panel]:
    tax_labels = (*by, STAGE)
    return [
        Panel(
            "timeseries",
            "Latency tax",
            "Extra seconds an inference takes now above its anchor baseline, at the p50 and p95, "
            "by stage, as inferscope's in-process regression detector measures it (docs/regressions.md).",
            (
                Query(
                    f"max by ({', '.join((*tax_labels, QUANTILE_LABEL))}) "
                    f"({_name('inferscope.tax.latency')}{{{_INFERENCE}}})",
                    f"{_legend(*tax_labels)} p{_legend(QUANTILE_LABEL)}",
                ),
            ),
            unit="s",
        ),
        Panel(
            "timeseries",
            "CPU tax",
            "Extra CPU cores the model spends now above its anchor at its current rate, summed "
            "over the replicas: what the regression costs in machines.",
            (
                Query(
                    f"sum by ({', '.join(tax_labels)}) ({_name('inferscope.tax.cpu')}{{{_INFERENCE}}})",
                    _legend(*tax_labels),
                ),
            ),
            unit="none",
            stacked=True,
        ),
        Panel(
            "table",
            "Open regressions",
            "Regressions the detector reports now, with their cause (contention, machine_change, "
            "dependency_change, model_change, data_growth, more_work, memory_growth, load, gpu). "
            "`inferscope status` on a replica shows the evidence.",
            (
                Query(
                    f"max by ({', '.join(dict.fromkeys((JOB, *by, VERSION, STAGE, CAUSE)))}) "
                    f"({_name('inferscope.regression.active')}{{{_INFERENCE}}})",
                    instant=True,
                ),
            ),
            unit="none",
            width=24,
            height=6,
        ),
    ]


def _health_panels(selector: str) -> list[Panel]:
    where = (JOB, INSTANCE)

    def rate_of(metric: str, extra: Sequence[str] = ()) -> Query:
        return Query(_sum_rate((*where, *extra), _name(metric), selector), _legend(*where, *extra))

    return [
        Panel(
            "timeseries",
            "Records dropped",
            "Calls that inferscope could not count, by reason (ring_full: the drainer falls "
            "behind; stack_depth: stages nested deeper than 32). Its latencies and counts miss them.",
            (rate_of("inferscope.sdk.records.dropped", (REASON,)),),
            unit="reqps",
            width=6,
        ),
        Panel(
            "timeseries",
            "Spans dropped",
            "Spans of slow or failed calls that were not exported, by reason (rate_limit: past "
            "trace_max_spans_per_second).",
            (rate_of("inferscope.sdk.spans.dropped", (REASON,)),),
            unit="ops",
            width=6,
        ),
        Panel(
            "timeseries",
            "Failed metric exports",
            "OTLP metric exports that failed or raised: the collector is down or slow. Through an "
            "OTLP pipeline only; a Prometheus scrape that fails shows in Prometheus's own `up`.",
            (rate_of("inferscope.sdk.exports.failed"),),
            unit="ops",
            width=6,
        ),
        Panel(
            "timeseries",
            "Internal errors and key overflow",
            "inferscope's own errors (each is logged at most once a minute), and new keys folded "
            "into the overflow series because of the key cap (max_keys).",
            (rate_of("inferscope.sdk.errors"), rate_of("inferscope.sdk.keys.overflowed")),
            unit="ops",
            width=6,
        ),
    ]


def _stage_panels() -> list[Panel]:
    by = (STAGE,)
    # Per call, each over its own count: a busy stage's CPU is read on a sample of its calls
    # (docs/counters.md), so the CPU histogram counts fewer calls than the duration one.
    on_cpu = _mean(STAGE_CPU, by, _STAGE)
    wall = _mean(STAGE_DURATION, by, _STAGE)
    off_cpu = f"clamp_min(\n  (\n{wall}\n  )\n  - (\n{on_cpu}\n  ),\n  0\n)"
    off_share = f"clamp_min(\n  1 - (\n{on_cpu}\n  )\n  / (\n{wall}\n  ),\n  0\n)"
    return [
        Panel(
            "timeseries",
            "Stage latency p95",
            "The p95 of each stage's wall-clock duration; exemplars open the trace of a slow stage.",
            (Query(_quantile("0.95", STAGE_DURATION, by, _STAGE), _legend(STAGE), exemplar=True),),
            unit="s",
        ),
        Panel(
            "timeseries",
            "Mean time per stage call",
            "Mean wall-clock duration of a call of each stage. Nested stages (infer/encoder) are "
            "counted in their parent too.",
            (Query(_mean(STAGE_DURATION, by, _STAGE), _legend(STAGE)),),
            unit="s",
        ),
        Panel(
            "timeseries",
            "CPU against off-CPU time per stage call",
            "Of a stage call's mean duration, the thread CPU time and the rest, off CPU: waiting "
            "for I/O, a lock, the GPU, or a core (contention, throttling).",
            (
                Query(on_cpu, f"{_legend(STAGE)} on CPU"),
                Query(off_cpu, f"{_legend(STAGE)} off CPU"),
            ),
            unit="s",
        ),
        Panel(
            "timeseries",
            "Off-CPU share per stage",
            "The share of each stage's wall-clock time spent off CPU.",
            (Query(off_share, _legend(STAGE)),),
            unit="percentunit",
        ),
        Panel(
            "timeseries",
            "GPU time per stage call",
            'Mean device time of stages marked device="cuda", measured with CUDA events.',
            (Query(_mean(STAGE_GPU, by, _STAGE), _legend(STAGE)),),
            unit="s",
        ),
        Panel(
            "heatmap",
            "Inference latency distribution",
            "Inferences per duration bucket over time: a second mode or a longer tail shows here "
            "before it moves the quantiles.",
            (
                Query(
                    _sum_rate((LE,), DURATION + "_bucket", _INFERENCE),
                    _legend(LE),
                    heatmap=True,
                ),
            ),
            unit="s",
        ),
    ]


def _counter_panels() -> list[Panel]:
    by = (STAGE,)

    def per_call(metric: str, extra: Sequence[str] = ()) -> Query:
        # ignoring(): the counters of a type (voluntary, involuntary...) over the calls of the stage.
        counter = _name(f"inferscope.stage.{metric}")
        calls = _sum_rate(by, STAGE_DURATION + "_count", _STAGE)
        if not extra:
            return Query(_per_call(counter, by, STAGE_DURATION, _STAGE), _legend(STAGE))
        ignoring = f"ignoring ({', '.join(extra)}) group_left"
        return Query(
            f"{_sum_rate((*by, *extra), counter, _STAGE)}\n/ {ignoring}\n{calls}", _legend(STAGE, *extra)
        )

    return [
        Panel(
            "timeseries",
            "Context switches per stage call",
            "Voluntary switches (the thread waited) and involuntary ones (it was preempted: "
            "contention) per call; needs counters=full.",
            (per_call("context_switches", ("type",)),),
            unit="short",
        ),
        Panel(
            "timeseries",
            "Page faults per stage call",
            "Minor and major page faults per call (memory first touched, or read from disk); "
            "needs counters=full.",
            (per_call("page_faults", ("type",)),),
            unit="short",
        ),
        Panel(
            "timeseries",
            "RSS growth by stage",
            "How fast the process's resident memory grows during each stage's calls (sampled calls "
            "scaled to all): the stage that leaks. Needs counters=full.",
            (
                Query(
                    f"sum by ({STAGE}) "
                    f"(deriv({_name('inferscope.stage.memory.rss.change')}{{{_STAGE}}}[{RATE}]))",
                    _legend(STAGE),
                ),
            ),
            unit="Bps",
        ),
        Panel(
            "timeseries",
            "Instructions per stage call",
            "Instructions retired per call, from hardware perf events: more work at the same clock.",
            (per_call("instructions"),),
            unit="short",
        ),
        Panel(
            "timeseries",
            "CPU migrations per stage call",
            "Moves of the thread to another CPU per call (perf software event): cold caches.",
            (per_call("cpu_migrations"),),
            unit="short",
        ),
    ]


def _process_panels() -> list[Panel]:
    where = (JOB, INSTANCE)
    throttled = (
        f"{_sum_rate(where, _name('inferscope.container.cpu.throttled.periods'), _PROCESS)}\n/\n"
        f"{_sum_rate(where, _name('inferscope.container.cpu.periods'), _PROCESS)}"
    )
    return [
        Panel(
            "timeseries",
            "Resident memory (RSS)",
            "Resident set size of each process serving the model. The InferscopeMemoryGrowth alert "
            f"fires when it grows by more than {rules.MEMORY_GROWTH_BYTES_PER_HOUR // 2**20} MiB an "
            f"hour for {rules.MEMORY_FOR}.",
            (Query(f"{_name('process.memory.usage')}{{{_PROCESS}}}", _legend(*where)),),
            unit="bytes",
        ),
        Panel(
            "timeseries",
            "Process CPU",
            "CPU cores each process uses, by mode (user, system): all its threads.",
            (
                Query(
                    _sum_rate((*where, "cpu_mode"), _name("process.cpu.time"), _PROCESS),
                    _legend(*where, "cpu_mode"),
                ),
            ),
            unit="none",
            stacked=True,
        ),
        Panel(
            "timeseries",
            "CPU throttling",
            "The share of CFS periods in which the container used up its CPU quota.",
            (Query(throttled, _legend(*where)),),
            unit="percentunit",
            red_from=rules.THROTTLED_SHARE,
        ),
        Panel(
            "timeseries",
            "CPU pressure and steal",
            "Time tasks waited for a CPU (PSI, some), and time the hypervisor gave the host's CPUs "
            "to other guests: noisy neighbours.",
            (
                Query(
                    _sum_rate(
                        (*where, "kind"),
                        _name("inferscope.host.pressure.stall.time"),
                        f'{_PROCESS}, resource="cpu"',
                    ),
                    f"{_legend(*where)} pressure {_legend('kind')}",
                ),
                Query(
                    _sum_rate(where, _name("inferscope.host.cpu.steal.time"), _PROCESS),
                    f"{_legend(*where)} steal",
                ),
            ),
            unit="percentunit",
        ),
        Panel(
            "timeseries",
            "Thread pool oversubscription",
            "Threads of each library's pool per CPU the process may use; above 1 they contend.",
            (
                Query(
                    f"max by ({JOB}, {INSTANCE}, library) "
                    f"({_name('inferscope.process.threads.oversubscription')}{{{_PROCESS}}})",
                    _legend(*where, "library"),
                ),
            ),
            unit="none",
            red_from=1.0,
        ),
    ]


def _gpu_panels() -> list[Panel]:
    where = (INSTANCE, "hw_id")

    def gauge(metric: str, legend: str = "") -> Query:
        return Query(
            f"max by ({', '.join(where)}) ({_name(metric)}{{{_PROCESS}}})", f"{_legend(*where)}{legend}"
        )

    return [
        Panel(
            "timeseries",
            "GPU utilization",
            "Fraction of time each GPU ran kernels.",
            (gauge("hw.gpu.utilization"),),
            unit="percentunit",
            width=6,
        ),
        Panel(
            "timeseries",
            "GPU memory",
            "GPU memory used, and the size of the GPU's memory.",
            (gauge("hw.gpu.memory.usage", " used"), gauge("hw.gpu.memory.limit", " size")),
            unit="bytes",
            width=6,
        ),
        Panel(
            "timeseries",
            "GPU power and temperature",
            "Power drawn (W) and die temperature (°C).",
            (gauge("hw.power", " W"), gauge("hw.temperature", " °C")),
            unit="short",
            width=6,
        ),
        Panel(
            "timeseries",
            "GPU clock throttle reasons",
            "1 while a clock event reason holds the SM clock down (power cap, thermal...).",
            (
                Query(
                    f"max by ({INSTANCE}, hw_id, inferscope_hw_gpu_throttle_reason) "
                    f"({_name('inferscope.hw.gpu.clock.throttle')}{{{_PROCESS}}})",
                    _legend(INSTANCE, "hw_id", "inferscope_hw_gpu_throttle_reason"),
                ),
            ),
            unit="none",
            width=6,
        ),
        Panel(
            "timeseries",
            "Peak CUDA memory per inference",
            "Mean extra CUDA memory an inference allocates at its peak (torch's caching allocator).",
            (
                Query(
                    _per_call(
                        _name("inferscope.inference.memory.cuda.peak"), (VERSION,), DURATION, _INFERENCE
                    ),
                    _legend(VERSION),
                ),
            ),
            unit="bytes",
            width=24,
        ),
    ]


# --- building -------------------------------------------------------------------------------------


def _build(
    uid: str,
    title: str,
    description: str,
    time_from: str,
    variables: Sequence[tuple[str, str, bool]],
    rows: Sequence[tuple[str, Sequence[Panel], bool]],
) -> dict[str, Any]:
    """One dashboard's JSON model: ``variables`` are (name, label_values query, multi); ``rows``
    are (title, panels, collapsed)."""
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import heatmap, stat, table, timeseries
    from grafana_foundation_sdk.builders import prometheus as prom
    from grafana_foundation_sdk.builders.common import StackingConfig, VizLegendOptions
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as model
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

    source = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
    builder = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["inferscope"])
        .editable()
        .time(time_from, "now")
        .refresh("1m")
        .tooltip(model.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("inferscope")
            .type(model.DashboardLinkType.DASHBOARDS)
            .tags(["inferscope"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for name, values_query, multi in variables:
        variable = (
            db.QueryVariable(name)
            .label(name.capitalize())
            .datasource(source)
            .query(values_query)
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(model.VariableSort.ALPHABETICAL_ASC)
        )
        if multi:
            variable = variable.multi(True).include_all(True).all_value(".*")
        builder = builder.with_variable(variable)

    panel_id = 0
    for row_title, panels, collapsed in rows:
        panel_id += 1
        row = db.Row(row_title).id(panel_id).collapsed(collapsed)
        built: list[Any] = []
        for panel in panels:
            panel_id += 1
            kind: Any = {
                "timeseries": timeseries.Panel,
                "stat": stat.Panel,
                "table": table.Panel,
                "heatmap": heatmap.Panel,
            }[panel.kind]()
            kind = (
                kind.id(panel_id)
                .title(panel.title)
                .description(panel.description)
                .datasource(source)
                .unit(panel.unit)
                .span(panel.width)
                .height(panel.height)
            )
            for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
                target = prom.Dataquery().ref_id(ref).expr(query.expr).datasource(source)
                if query.legend:
                    target = target.legend_format(query.legend)
                if query.instant:
                    target = target.instant()
                if panel.kind == "table":
                    target = target.format(PromQueryFormat.TABLE)
                if query.exemplar:
                    target = target.exemplar(True)
                if query.heatmap:
                    target = target.format(PromQueryFormat.HEATMAP)
                kind = kind.with_target(target)
            if panel.red_from is not None:
                kind = kind.thresholds(
                    db.ThresholdsConfig()
                    .mode(model.ThresholdsMode.ABSOLUTE)
                    .steps(
                        [
                            model.Threshold(value=None, color="green"),
                            model.Threshold(value=panel.red_from, color="red"),
                        ]
                    )
                )
            if panel.kind == "timeseries":
                kind = kind.legend(
                    VizLegendOptions()
                    .display_mode(common.LegendDisplayMode.TABLE)
                    .placement(common.LegendPlacement.BOTTOM)
                    .show_legend(True)
                    .calcs(["mean", "max", "lastNotNull"])
                )
                if panel.stacked:
                    kind = kind.stacking(StackingConfig().mode(common.StackingMode.NORMAL)).fill_opacity(30)
            elif panel.kind == "table":
                # One row per series: its labels and the value, without the evaluation time.
                hide_time = {"excludeByName": {"Time": True}, "renameByName": {"Value": "value"}}
                kind = kind.with_transformation(model.DataTransformerConfig("organize", options=hide_time))
            elif panel.kind == "heatmap":
                kind = kind.calculate(False).y_axis(heatmap.YAxisConfig().unit(panel.unit))
            built.append(kind)
        if collapsed:
            for kind in built:
                row = row.with_panel(kind)
            builder = builder.with_row(row)
        else:
            builder = builder.with_row(row)
            for kind in built:
                builder = builder.with_panel(kind)
    document: dict[str, Any] = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
    # The SDK writes an interval variable's defaults (auto, auto_count, auto_min) into every
    # variable; Grafana's schema has no such fields, and they mean nothing on these.
    for variable in document["templating"]["list"]:
        for key in ("auto", "auto_count", "auto_min"):
            variable.pop(key, None)
    return document


def _label_values(label: str, selector: str) -> str:
    return f"label_values({DURATION}_count{{{selector}}}, {label})"


def _overview() -> dict[str, Any]:
    by = (JOB, MODEL)
    return _build(
        OVERVIEW_UID,
        "inferscope / overview",
        "Every model of the chosen services: latency over 30 days, the week-over-week p95, "
        "throughput, errors, CPU per inference, the tax the regression detector measures, and "
        "inferscope's own health. docs/dashboards.md explains each panel.",
        "now-30d",
        (
            ("service", _label_values(JOB, ""), True),
            ("model", _label_values(MODEL, _SERVICE), True),
            ("version", _label_values(VERSION, f'{_SERVICE}, {MODEL}=~"$model"'), True),
        ),
        (
            ("Latency, throughput and errors", _latency_rows(by), False),
            ("The tax (regression detector)", _tax_panels(by), False),
            ("inferscope's health", _health_panels(_SERVICE), False),
        ),
    )


def _model() -> dict[str, Any]:
    by = (VERSION,)
    return _build(
        MODEL_UID,
        "inferscope / model",
        "One model: its versions, its stages and their CPU against off-CPU time, the per-call "
        "counters, the processes that serve it, the GPU, and open regressions with their cost. "
        "docs/dashboards.md explains each panel.",
        "now-24h",
        (
            ("service", _label_values(JOB, ""), True),
            ("model", _label_values(MODEL, _SERVICE), False),
            ("version", _label_values(VERSION, f'{_SERVICE}, {MODEL}=~"$model"'), True),
            (
                "stage",
                f"label_values({STAGE_DURATION}_count{{{_INFERENCE}}}, {STAGE})",
                True,
            ),
            ("instance", _label_values(INSTANCE, f'{_SERVICE}, {MODEL}=~"$model"'), True),
        ),
        (
            ("Latency, throughput and errors", _latency_rows(by), False),
            ("Stages", _stage_panels(), False),
            ("Regressions and their cost", _tax_panels(by), False),
            ("Counters per call (counters=full)", _counter_panels(), False),
            ("Processes", _process_panels(), False),
            ("GPU", _gpu_panels(), True),
            ("inferscope's health", _health_panels(_PROCESS), True),
        ),
    )


_DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    f"{OVERVIEW_UID}.json": _overview,
    f"{MODEL_UID}.json": _model,
}


def _require_sdk() -> None:
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "building the dashboards needs grafana-foundation-sdk (Python 3.11+; in the test "
            "dependency group). The built dashboards ship with inferscope: `inferscope assets "
            "--out DIR` writes them without it."
        ) from error


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard, freshly built: file name -> Grafana dashboard JSON model.

    Needs ``grafana-foundation-sdk`` (Python 3.11 or later); the built files ship with the package,
    and :func:`inferscope.assets.write_assets` writes those.
    """
    _require_sdk()
    return {name: build() for name, build in _DASHBOARDS.items()}


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard's JSON that is not a row, those inside collapsed rows included."""
    for panel in document["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def render(document: dict[str, Any]) -> str:
    """A dashboard's JSON as shipped: indented, keys sorted, one trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def generators() -> dict[str, Callable[[], str]]:
    """The shipped files (``grafana/NAME.json``) and how to generate each, for ``inferscope.assets``."""

    def generate(build: Callable[[], dict[str, Any]]) -> str:
        _require_sdk()
        return render(build())

    return {f"{_FOLDER}/{name}": partial(generate, build) for name, build in _DASHBOARDS.items()}
