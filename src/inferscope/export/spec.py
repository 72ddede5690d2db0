"""The one specification of every metric inferscope exports.

Each :class:`MetricSpec` says what a metric is (name, kind, unit, attributes, description), where its
values come from (the aggregates, a system signal, or a provider registered at run time), and what
it needs to exist on a machine (:class:`Need`: a GPU, a PMU, a counter set, a cgroup file...), with
the reason when that is missing. The OTLP points of ``export/points.py``, the Prometheus families
of ``export/prometheus.py``, the observable instruments of ``system/host.py`` and
``system/gpu.py``, the tables of docs/metrics.md and the collector tests all read it; dashboards
and alert rules are to be generated from it too.

Adding a metric is one entry in ``_ENTRIES`` plus its values: a field of the aggregates, a signal
reader in ``system/``, or, for metrics computed elsewhere (the regression detector's), a provider::

    from inferscope.export import spec

    def current_tax() -> list[tuple[float, dict[str, str]]]:
        return [(0.004, {"inferscope.model.name": "fraud"})]

    spec.register_provider("inferscope.tax.latency", current_tax)  # exported from the next collection

Regenerate the tables in docs/metrics.md with ``python -m inferscope.export docs/metrics.md``.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Instrument, Meter, Observation

from .._keys import ERROR_TYPE, MODEL_NAME, MODEL_VERSION, OVERFLOW_ATTRIBUTE, STAGE_NAME

__all__ = [
    "METRICS",
    "NEEDS",
    "Kind",
    "MetricSpec",
    "Need",
    "Signal",
    "create_observable",
    "get",
    "prometheus_name",
    "provided_signals",
    "register_provider",
    "render_tables",
    "unregister_provider",
]

Kind = Literal["histogram", "counter", "updown", "gauge"]
Source = Literal["aggregates", "system", "gpu", "provider"]

#: Values a provider returns: (value, attributes) pairs for the current moment.
ProvidedPoints = Iterable[tuple[float, Mapping[str, str | bool | int | float]]]


# --- needs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    """Something a metric needs before it can have points on a machine.

    ``probe()`` returns None where the need is met, else the reason it is not, in words a user can
    act on (``"no NVIDIA driver (NVMLError_LibraryNotFound)"``).
    """

    name: str
    description: str
    probe: Callable[[], str | None] = field(repr=False, compare=False)

    def reason(self) -> str | None:
        try:
            return self.probe()
        except Exception as error:  # a probe must never take the exporter down
            return f"probing {self.name} failed ({type(error).__name__}: {error})"


def _counter(name: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        from ..counters import COUNTERS, unavailable_reason

        return unavailable_reason(COUNTERS[name])

    return probe


def _perf(mode: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        from ..counters import perf_status

        found, reason = perf_status()
        if found == mode:
            return None
        if found == "hardware":
            return "a PMU is exposed: perf reads hardware events instead of software ones"
        return reason

    return probe


def _cuda() -> str | None:
    from ..counters.cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason(import_torch=False)
    if reason is None and "torch" not in sys.modules:
        return "torch is not imported yet (importing it here would take seconds)"
    return reason


def _gpu() -> str | None:
    from ..system.gpu import nvml_status

    ok, reason = nvml_status()
    return None if ok else reason


def _proc_file(path: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if os.path.exists(path) else f"{path} does not exist (not Linux?)"

    return probe


def _steal() -> str | None:
    from ..system.host import read_steal

    return None if read_steal() is not None else "/proc/stat has no steal field"


def _loadavg() -> str | None:
    from ..system.host import read_loadavg

    return None if read_loadavg() is not None else "the OS reports no load average"


def _psi() -> str | None:
    from ..system import cgroup
    from ..system.host import read_psi

    paths = cgroup.resolve_cgroup()
    if read_psi(paths.pressure_dir or Path("/proc/pressure")):
        return None
    return "no PSI files (/proc/pressure needs Linux 4.20+ with CONFIG_PSI, and psi=1 where it is off)"


def _cgroup_throttling() -> str | None:
    from ..system import cgroup

    if cgroup.read_throttling(cgroup.resolve_cgroup()) is not None:
        return None
    return "no cgroup CPU controller statistics (cpu.stat) for this process"


def _cgroup_cpu_limit() -> str | None:
    from ..system import cgroup

    paths = cgroup.resolve_cgroup()
    if not cgroup.cpu_limit_source_exists(paths):
        return "no cgroup CPU controller (cpu.max or cpu.cfs_quota_us) for this process"
    return (
        None if cgroup.read_cpu_limit(paths) is not None else "the cgroup has no CPU limit (unlimited quota)"
    )


def _cgroup_memory_limit() -> str | None:
    from ..system import cgroup

    paths = cgroup.resolve_cgroup()
    if not cgroup.memory_limit_source_exists(paths):
        return "no cgroup memory controller (memory.max or memory.limit_in_bytes) for this process"
    return None if cgroup.read_memory_limit(paths) is not None else "the cgroup has no memory limit"


def _thread_pools() -> str | None:
    from ..system.threads import check_oversubscription

    if check_oversubscription().ratios:
        return None
    return "no library with a thread pool of its own (numpy, torch, onnxruntime...) is loaded"


def _provided(metric: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if metric in _providers:
            return None
        return "no provider is registered for it (the regression detector is not running)"

    return probe


NEEDS: dict[str, Need] = {
    need.name: need
    for need in (
        Need(
            "counters:thread_cpu",
            "the counter set reads the thread CPU clock (default, full)",
            _counter("thread_cpu"),
        ),
        Need("counters:rusage", "counters include rusage (full)", _counter("rusage")),
        Need("counters:rss", "counters include rss (full)", _counter("rss")),
        Need(
            "counters:python_heap",
            "counters include python_heap (asked for by name)",
            _counter("python_heap"),
        ),
        Need("counters:cuda_memory", "counters include cuda_memory (full) and torch with CUDA", _cuda),
        Need("pmu", "counters include perf, on a machine that exposes a PMU", _perf("hardware")),
        Need(
            "perf_software",
            "counters include perf, on a machine without a PMU (C backend)",
            _perf("software"),
        ),
        Need("cuda", 'torch with CUDA, and stages marked device="cuda"', _cuda),
        Need("gpu", "an NVIDIA GPU, its driver and nvidia-ml-py (inferscope-sdk[gpu])", _gpu),
        Need("procfs", "Linux /proc/self/statm and /proc/self/status", _proc_file("/proc/self/statm")),
        Need("steal", "Linux /proc/stat with a steal field", _steal),
        Need("loadavg", "an OS with load averages", _loadavg),
        Need("psi", "Linux pressure stall information (/proc/pressure)", _psi),
        Need("cgroup_cpu", "a cgroup CPU controller (v1 cpu.stat or v2 cpu.stat)", _cgroup_throttling),
        Need("cgroup_cpu_limit", "a cgroup with a CPU quota", _cgroup_cpu_limit),
        Need("cgroup_memory_limit", "a cgroup with a memory limit", _cgroup_memory_limit),
        Need("thread_pools", "a library with its own thread pool loaded", _thread_pools),
    )
}


def _need_provider(metric: str) -> Need:
    return Need(f"provider:{metric}", "a provider registered with spec.register_provider", _provided(metric))


# --- the entries ----------------------------------------------------------------------------------

# Prometheus units as the OTel-to-Prometheus conversion spells them; annotations ({record}) have none.
_PROMETHEUS_UNITS = {
    "s": "seconds",
    "By": "bytes",
    "1": "ratio",
    "W": "watts",
    "J": "joules",
    "Cel": "celsius",
    "MHz": "megahertz",
}
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(name: str, unit: str, kind: Kind) -> str:
    """The Prometheus name of an OTel metric, as exposed: dots to underscores, the unit as a suffix
    (``_seconds``, ``_bytes``; gauges of unit ``1`` get ``_ratio``), and ``_total`` on counters.

    >>> prometheus_name("process.cpu.time", "s", "counter")
    'process_cpu_time_seconds_total'
    """
    base = _INVALID.sub("_", name)
    suffix = "" if unit.startswith("{") else _PROMETHEUS_UNITS.get(unit, _INVALID.sub("_", unit))
    if suffix == "ratio" and kind != "gauge":
        suffix = ""
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    return base + "_total" if kind == "counter" else base


@dataclass(frozen=True)
class MetricSpec:
    """One metric: what it is, where its values come from, and what it needs."""

    name: str
    kind: Kind
    unit: str
    description: str
    #: The attributes its points carry (some only on some points: ``error.type`` only on failures).
    attributes: tuple[str, ...] = ()
    source: Source = "aggregates"
    #: Docs section: inference, stage, counters, sdk, process, host, container, gpu, tax.
    group: str = "inference"
    needs: tuple[Need, ...] = ()
    #: When points appear even on a machine that has everything (empty: at every collection).
    when: str = ""
    #: Exported on the Prometheus endpoint (False: OTLP only).
    prometheus: bool = True
    #: The Prometheus name, when it differs from the standard conversion (kept for compatibility).
    prometheus_override: str = ""

    @property
    def monotonic(self) -> bool:
        return self.kind in ("counter", "histogram")

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus shows (counters with ``_total``; histograms without the
        ``_bucket``/``_sum``/``_count`` suffixes)."""
        return self.prometheus_override or prometheus_name(self.name, self.unit, self.kind)

    def unavailable_reason(self) -> str | None:
        """Why this metric cannot have points on this machine, or None when it can."""
        for need in self.needs:
            reason = need.reason()
            if reason is not None:
                return f"{self.name} needs {need.description}: {reason}"
        return None


INFERENCE_ATTRIBUTES = (MODEL_NAME, MODEL_VERSION, ERROR_TYPE)
STAGE_ATTRIBUTES = (*INFERENCE_ATTRIBUTES, STAGE_NAME)
GPU_ATTRIBUTES = ("hw.id", "hw.name", "hw.type", "hw.model", "hw.vendor", "hw.driver_version")
TAX_ATTRIBUTES = (MODEL_NAME, MODEL_VERSION, STAGE_NAME)

_N = NEEDS


def _histogram(name: str, description: str, *, stage: bool, needs: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(
        name,
        "histogram",
        "s",
        description,
        STAGE_ATTRIBUTES if stage else INFERENCE_ATTRIBUTES,
        group="stage" if stage else "inference",
        needs=tuple(_N[n] for n in needs),
    )


def _sdk(
    name: str,
    unit: str,
    description: str,
    attributes: tuple[str, ...] = (),
    *,
    when: str = "",
    prometheus: bool = True,
) -> MetricSpec:
    return MetricSpec(
        name, "counter", unit, description, attributes, group="sdk", when=when, prometheus=prometheus
    )


def _system(
    name: str,
    kind: Kind,
    unit: str,
    description: str,
    group: str,
    needs: tuple[str, ...],
    attributes: tuple[str, ...] = (),
) -> MetricSpec:
    return MetricSpec(name, kind, unit, description, attributes, "system", group, tuple(_N[n] for n in needs))


def _gpu_entry(name: str, kind: Kind, unit: str, description: str, extra: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(name, kind, unit, description, (*GPU_ATTRIBUTES, *extra), "gpu", "gpu", (_N["gpu"],))


def _tax(name: str, kind: Kind, unit: str, description: str, attributes: tuple[str, ...]) -> MetricSpec:
    return MetricSpec(
        name,
        kind,
        unit,
        description,
        attributes,
        "provider",
        "tax",
        (_need_provider(name),),
        when="while the regression detector reports them (an open regression, a measured tax)",
    )


_ENTRIES: tuple[MetricSpec, ...] = (
    _histogram("inferscope.inference.duration", "Wall-clock duration of tracked inferences.", stage=False),
    _histogram(
        "inferscope.inference.cpu.time",
        "Thread CPU time spent in tracked inferences.",
        stage=False,
        needs=("counters:thread_cpu",),
    ),
    _histogram("inferscope.stage.duration", "Wall-clock duration of stages within inferences.", stage=True),
    _histogram(
        "inferscope.stage.cpu.time",
        "Thread CPU time spent in stages within inferences.",
        stage=True,
        needs=("counters:thread_cpu",),
    ),
    _histogram(
        "inferscope.stage.gpu.time",
        'Device time of stages marked device="cuda", measured with CUDA events.',
        stage=True,
        needs=("cuda",),
    ),
    MetricSpec(
        "inferscope.inference.abandoned",
        "counter",
        "{inference}",
        "Generator inferences closed before they were exhausted.",
        INFERENCE_ATTRIBUTES,
        when="once a generator inference was closed or collected before it was exhausted",
    ),
    _sdk(
        "inferscope.sdk.records.dropped",
        "{record}",
        "Records dropped instead of aggregated, by reason.",
        ("reason",),
    ),
    _sdk(
        "inferscope.sdk.spans.dropped",
        "{span}",
        "Spans of kept calls that were not exported, by reason (rate_limit, unresolved).",
        ("reason",),
        when="while tracing is on, once a span was dropped",
    ),
    _sdk(
        "inferscope.sdk.keys.overflowed",
        "{key}",
        "Distinct keys folded into the overflow key because of the key cap.",
    ),
    _sdk("inferscope.sdk.errors", "{error}", "Internal instrumentation errors."),
    _sdk(
        "inferscope.sdk.exports.failed",
        "{export}",
        "Metric exports that failed or raised.",
        prometheus=False,
    ),
    # --- process, host, container (system/host.py) ---
    _system(
        "process.cpu.time",
        "counter",
        "s",
        "Total CPU seconds broken down by CPU mode",
        "process",
        (),
        ("cpu.mode",),
    ),
    _system(
        "process.memory.usage", "updown", "By", "Resident set size of the process", "process", ("procfs",)
    ),
    _system(
        "process.memory.virtual", "updown", "By", "Virtual memory size of the process", "process", ("procfs",)
    ),
    _system(
        "process.thread.count", "updown", "{thread}", "OS threads of the process", "process", ("procfs",)
    ),
    _system(
        "inferscope.process.threads.oversubscription",
        "gauge",
        "1",
        "Threads of each thread pool divided by the CPUs this process may use (affinity and cgroup quota); "
        "above 1 the pool is oversubscribed",
        "process",
        ("thread_pools",),
        ("library",),
    ),
    _system(
        "inferscope.host.cpu.steal.time",
        "counter",
        "s",
        "CPU time the hypervisor gave to other guests while this host was runnable (all CPUs)",
        "host",
        ("steal",),
    ),
    *(
        _system(
            f"system.linux.cpu.load_{window}",
            "gauge",
            "{thread}",
            f"Load average over {window}: runnable plus uninterruptible threads, host-wide",
            "host",
            ("loadavg",),
        )
        for window in ("1m", "5m", "15m")
    ),
    _system(
        "inferscope.host.pressure.stall.time",
        "counter",
        "s",
        "Time tasks stalled waiting for a resource (PSI): some = at least one task, full = all at once",
        "host",
        ("psi",),
        ("resource", "kind"),
    ),
    _system(
        "inferscope.container.cpu.periods",
        "counter",
        "{period}",
        "CFS enforcement periods that elapsed while the cgroup had runnable tasks",
        "container",
        ("cgroup_cpu",),
    ),
    _system(
        "inferscope.container.cpu.throttled.periods",
        "counter",
        "{period}",
        "CFS periods in which the cgroup used up its CPU quota and was throttled",
        "container",
        ("cgroup_cpu",),
    ),
    _system(
        "inferscope.container.cpu.throttled.time",
        "counter",
        "s",
        "Total time the cgroup's tasks were held back by the CPU quota",
        "container",
        ("cgroup_cpu",),
    ),
    _system(
        "inferscope.container.cpu.limit",
        "gauge",
        "{cpu}",
        "CPU limit of the cgroup (quota / period); absent when unlimited",
        "container",
        ("cgroup_cpu_limit",),
    ),
    _system(
        "inferscope.container.memory.limit",
        "gauge",
        "By",
        "Memory limit of the cgroup; absent when unlimited",
        "container",
        ("cgroup_memory_limit",),
    ),
    # --- GPU (system/gpu.py), semconv hw.* names ---
    _gpu_entry("hw.gpu.utilization", "gauge", "1", "Fraction of time the GPU ran kernels", ("hw.gpu.task",)),
    _gpu_entry("hw.gpu.memory.usage", "updown", "By", "GPU memory used"),
    _gpu_entry("hw.gpu.memory.limit", "updown", "By", "Size of the GPU memory"),
    _gpu_entry("hw.gpu.memory.utilization", "gauge", "1", "Fraction of GPU memory used"),
    _gpu_entry("hw.power", "gauge", "W", "Instantaneous power drawn by the GPU"),
    _gpu_entry("hw.energy", "counter", "J", "Energy consumed by the GPU since the driver loaded"),
    _gpu_entry("hw.temperature", "gauge", "Cel", "GPU die temperature", ("hw.parent", "hw.sensor_location")),
    _gpu_entry("inferscope.hw.gpu.clock.sm", "gauge", "MHz", "Current SM clock"),
    _gpu_entry(
        "inferscope.hw.gpu.clock.throttle",
        "gauge",
        "1",
        "1 for each clock event (throttle) reason active now, 0 otherwise",
        ("inferscope.hw.gpu.throttle.reason",),
    ),
    # --- the tax meter (values from the regression detector, through register_provider) ---
    _tax(
        "inferscope.regression.active",
        "gauge",
        "{regression}",
        "1 for each open regression of a key, with its cause; absent when none is open",
        (*TAX_ATTRIBUTES, "inferscope.regression.cause"),
    ),
    _tax(
        "inferscope.tax.latency",
        "gauge",
        "s",
        "Extra seconds an inference of the model takes now above its anchor, at the quantile "
        "inferscope.quantile (0.5 or 0.95): the latency tax",
        (*TAX_ATTRIBUTES, "inferscope.quantile"),
    ),
    _tax(
        "inferscope.tax.cpu",
        "gauge",
        "{cpu}",
        "Extra CPU-seconds per second the model spends now above its anchor at its current rate: "
        "the cores the CPU tax costs",
        TAX_ATTRIBUTES,
    ),
)


def _counter_entries() -> tuple[MetricSpec, ...]:
    """The per-inference and per-stage counters, one entry per exported name, from the counter
    tables of ``counters/`` (which also map them to record slots)."""
    from ..counters import _FIXED, _PERF_HARDWARE, _PERF_SOFTWARE, COUNTERS

    tables = [(name, _FIXED.get(bit, ())) for name, bit in COUNTERS.items() if name != "perf"]
    tables += [("pmu", _PERF_HARDWARE), ("perf_software", _PERF_SOFTWARE)]
    entries: dict[str, MetricSpec] = {}
    for need_name, metrics in tables:
        need = NEEDS.get(need_name) or NEEDS[f"counters:{need_name}"]
        for metric in metrics:
            for scope in ("inference", "stage"):
                if scope == "stage" and metric.inference_only:
                    continue
                name = f"inferscope.{scope}.{metric.suffix}"
                if name in entries:
                    continue
                kind: Kind = "counter" if metric.monotonic else "updown"
                attributes = STAGE_ATTRIBUTES if scope == "stage" else INFERENCE_ATTRIBUTES
                override = ""
                if kind == "counter" and metric.unit == "By":
                    # Exposed as ..._total before the unit suffix was added: kept for dashboards.
                    override = _INVALID.sub("_", name) + "_total"
                entries[name] = MetricSpec(
                    name,
                    kind,
                    metric.unit,
                    metric.description,
                    (*attributes, *(key for key, _ in metric.attributes)),
                    group="counters",
                    needs=(need,),
                    when="once the series' total is not zero",
                    prometheus_override=override,
                )
    return tuple(entries.values())


#: Every metric, by name.
METRICS: dict[str, MetricSpec] = {entry.name: entry for entry in (*_ENTRIES, *_counter_entries())}


def get(name: str) -> MetricSpec:
    """The entry of ``name``; a KeyError names a metric that is not in the specification."""
    return METRICS[name]


# --- signals: observed metrics, and the provider hook ---------------------------------------------


@dataclass(frozen=True)
class Signal:
    """A metric sampled when a reader collects (OTLP) or Prometheus scrapes: its entry and a
    function that returns the current points and never raises."""

    spec: MetricSpec
    observe: Callable[[], Sequence[Observation]]


def create_observable(
    meter: Meter, entry: MetricSpec, callbacks: Sequence[Callable[[CallbackOptions], Iterable[Observation]]]
) -> Instrument:
    """The OTel observable instrument of ``entry`` (counter, up-down counter or gauge) on ``meter``."""
    factory = {
        "counter": meter.create_observable_counter,
        "updown": meter.create_observable_up_down_counter,
        "gauge": meter.create_observable_gauge,
    }.get(entry.kind)
    if factory is None:
        raise ValueError(f"{entry.name} is a {entry.kind}, not an observable kind")
    instrument: Instrument = factory(
        entry.name, callbacks=list(callbacks), unit=entry.unit, description=entry.description
    )
    return instrument


_providers: dict[str, Callable[[], ProvidedPoints]] = {}
_providers_lock = threading.Lock()


def register_provider(name: str, provider: Callable[[], ProvidedPoints]) -> None:
    """Supply the values of a provider metric (``source="provider"``: the tax meter's).

    ``provider()`` is called at every collection and scrape, off the hot path, from an exporter
    thread; it returns ``(value, attributes)`` pairs for now and should return quickly. Replaces an
    earlier provider of the same metric. An exception it raises costs that collection's points of
    this metric only; it is counted and logged at most once a minute.

    >>> register_provider("inferscope.tax.cpu", lambda: [(0.002, {"inferscope.model.name": "m"})])
    >>> unregister_provider("inferscope.tax.cpu")
    """
    entry = METRICS.get(name)
    if entry is None or entry.source != "provider":
        provided = sorted(n for n, e in METRICS.items() if e.source == "provider")
        raise ValueError(f"{name!r} is not a provider metric of the specification; these are: {provided}")
    with _providers_lock:
        _providers[name] = provider


def unregister_provider(name: str) -> None:
    """Stop exporting ``name``'s points (idempotent)."""
    with _providers_lock:
        _providers.pop(name, None)


def _provided_points(name: str) -> list[Observation]:
    with _providers_lock:
        provider = _providers.get(name)
    if provider is None:
        return []
    return [Observation(value, dict(attributes)) for value, attributes in provider()]


def provided_signals() -> list[Signal]:
    """One signal per provider metric, whether or not a provider is registered yet: a provider
    registered later is picked up at the next collection."""
    return [
        Signal(entry, lambda name=entry.name: _provided_points(name))  # type: ignore[misc]
        for entry in METRICS.values()
        if entry.source == "provider"
    ]


def _after_fork_in_child() -> None:
    global _providers_lock
    _providers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --- docs -----------------------------------------------------------------------------------------

BEGIN_MARKER = "<!-- BEGIN GENERATED BY inferscope.export.spec: edit the specification, not this table -->"
END_MARKER = "<!-- END GENERATED BY inferscope.export.spec -->"

_GROUPS = (
    ("inference", "Inferences"),
    ("stage", "Stages"),
    ("counters", "Per-inference and per-stage counters"),
    ("sdk", "inferscope's own health"),
    ("process", "Process"),
    ("host", "Host"),
    ("container", "Container (cgroup)"),
    ("gpu", "GPU (NVML)"),
    ("tax", "Tax meter (from the regression detector)"),
)


def render_tables() -> str:
    """The Markdown tables of every metric, by group, as docs/metrics.md embeds them."""
    lines: list[str] = []
    for group, title in _GROUPS:
        entries = [e for e in METRICS.values() if e.group == group]
        if not entries:
            continue
        lines += [f"### {title}", "", "| metric | kind | unit | Prometheus | attributes | needs | what |"]
        lines.append("|---|---|---|---|---|---|---|")
        for e in entries:
            attributes = ", ".join(f"`{a}`" for a in e.attributes)
            needs = "; ".join(n.description for n in e.needs) or "—"
            if e.when:
                needs = f"{needs}; points {e.when}" if e.needs else f"points {e.when}"
            prometheus = f"`{e.prometheus_name}`" if e.prometheus else "(OTLP only)"
            what = e.description.rstrip(".").replace("|", "\\|")
            lines.append(
                f"| `{e.name}` | {e.kind} | {e.unit} | {prometheus} | {attributes} | {needs} | {what} |"
            )
        lines.append("")
    lines.append(
        f"Every metric of a tracked model also carries your static attributes, and the overflow series "
        f"carries `{OVERFLOW_ATTRIBUTE}` instead of the others."
    )
    return "\n".join(lines)


def replace_generated(text: str) -> str:
    """``text`` with the part between the markers replaced by :func:`render_tables`."""
    start, end = text.index(BEGIN_MARKER) + len(BEGIN_MARKER), text.index(END_MARKER)
    return text[:start] + "\n\n" + render_tables() + "\n\n" + text[end:]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inferscope.export docs/metrics.md``: rewrite the generated tables."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m inferscope.export PATH/TO/metrics.md", file=sys.stderr)
        return 2
    path = Path(args[0])
    path.write_text(replace_generated(path.read_text()))
    return 0
