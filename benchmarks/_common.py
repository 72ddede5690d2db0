"""Helpers shared by the benchmark scripts: timing loops, tables, JSON, and the pure-Python re-run.

The scripts are run as files (``python3 benchmarks/overhead.py``), so Python puts this folder on
``sys.path`` and ``import _common`` finds this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

#: Set in the environment of a child process that re-runs a script on the pure-Python backend.
NO_EXTENSION_VARIABLE = "INFERSCOPE_NO_EXTENSION"
#: The flag a script passes to itself to say "you are the pure-Python child; write JSON and exit".
CHILD_FLAG = "--child"


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every script takes: ``--quick``, ``--json PATH`` and the hidden child flag."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (~10 s) with fewer repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    return parser


# --- timing ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One timed statement, run as a ``timeit`` loop.

    ``prepare`` runs before every timed loop and ``after`` after it, both outside the timed region
    (e.g. to switch the counter set, or to drain the ring and count drops).
    """

    name: str
    stmt: str
    namespace: Mapping[str, Any]
    prepare: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    #: Upper bound on calls per timed loop (keeps every loop well inside the ring's capacity).
    max_number: int = 10_000_000
    number: int = 0
    samples_ns: list[float] = field(default_factory=list)

    def timer(self) -> timeit.Timer:
        return timeit.Timer(self.stmt, globals=dict(self.namespace))

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples_ns)

    def summary(self) -> dict[str, Any]:
        return {
            "stmt": self.stmt,
            "median_ns": self.median_ns,
            "min_ns": min(self.samples_ns),
            "max_ns": max(self.samples_ns),
            "calls_per_repeat": self.number,
            "repeats_ns": self.samples_ns,
        }


def calibrate(case: Case, target_seconds: float) -> None:
    """Pick the loop size so that one timed loop lasts about ``target_seconds`` (this also warms up)."""
    timer = case.timer()
    if case.prepare:
        case.prepare()
    number = 10
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= 0.01 or number >= case.max_number:
            break
        number = min(number * 10, case.max_number)
    # A second loop of the same size: the first can include one-off costs (a thread starting).
    per_call = min(elapsed, timer.timeit(number)) / number
    if case.after:
        case.after()
    case.number = max(10, min(case.max_number, int(target_seconds / per_call)))


def run_interleaved(cases: Sequence[Case], repeats: int, target_seconds: float) -> None:
    """Time every case ``repeats`` times, round-robin, so slow drift on a noisy VM hits all alike.

    Each sample is ns per call of one ``timeit`` loop (``timeit`` turns the garbage collector off
    during the loop, as it always does).
    """
    for case in cases:
        calibrate(case, target_seconds)
    timers = {case.name: case.timer() for case in cases}
    for _ in range(repeats):
        for case in cases:
            if case.prepare:
                case.prepare()
            elapsed = timers[case.name].timeit(case.number)
            if case.after:
                case.after()
            case.samples_ns.append(elapsed / case.number * 1e9)


# --- the pure-Python child -------------------------------------------------------------------------


def run_child(script: str, args: Iterable[str], timeout_seconds: float = 300) -> dict[str, Any]:
    """Run ``script`` again with the C extension disabled and return the JSON it writes.

    The backend is chosen once, at import, so the pure-Python measurements need a process of
    their own. The child's stderr (progress lines) passes through.
    """
    env = dict(os.environ)
    env[NO_EXTENSION_VARIABLE] = "1"
    with tempfile.TemporaryDirectory(prefix="inferscope-bench-") as folder:
        path = os.path.join(folder, "child.json")
        command = [sys.executable, script, CHILD_FLAG, "--json", path, *args]
        subprocess.run(command, env=env, check=True, timeout=timeout_seconds, stdout=subprocess.DEVNULL)
        with open(path, encoding="utf-8") as file:
            return json.load(file)


def progress(message: str) -> None:
    """A progress line on stderr, so that stdout holds the tables alone."""
    print(message, file=sys.stderr, flush=True)


def run_main(
    script_file: str,
    doc: str,
    measure: Callable[..., dict[str, Any]],
    report: Callable[[dict[str, dict[str, Any]]], tuple[str, dict[str, Any]]],
    argv: list[str] | None = None,
    *,
    child_measure: Callable[..., dict[str, Any]] | None = None,
) -> int:
    """The ``main()`` of a script that measures here and again on the pure-Python backend.

    Parses the common options (the description is the first line of ``doc``). As the pure-Python
    child, writes ``child_measure(quick=...)`` (``measure`` when not given) as JSON and returns.
    Otherwise runs ``measure(quick=...)``, re-runs the script in a pure-Python child when the C backend
    is in use, prints ``report(runs)``'s text and the machine load line, and writes the report's
    data, with the machine load added, to ``--json``.
    """
    name = os.path.basename(script_file)
    args = base_parser(doc.split("\n")[0]).parse_args(argv)
    if args.child:
        write_json(args.json, (child_measure or measure)(quick=args.quick))
        return 0
    import inferscope

    load = MachineLoad()
    runs = {inferscope.backend(): measure(quick=args.quick)}
    if inferscope.backend() == "c":
        progress(f"{name}: re-running on the pure-Python backend in a child process")
        runs["python"] = run_child(script_file, ["--quick"] if args.quick else [])
    else:
        progress(f"{name}: the C extension is not in use here; pure-Python figures only")
    text, data = report(runs)
    data["machine_load"] = load.summary()
    print(text)
    print(load_line(data["machine_load"]))
    write_json(args.json, data)
    return 0


# --- reporting -------------------------------------------------------------------------------------


class MachineLoad:
    """How busy the rest of the machine was while a benchmark ran (from /proc/stat).

    ``other_cpus``: CPUs' worth of time spent by every other process (all CPU time minus this
    process and its waited-for children); ``steal_cpus``: time the hypervisor gave to other guests.
    On a 2-core VM, anything above ~0.2 in either makes the figures noisier.
    """

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float]:
        with open("/proc/stat", encoding="ascii") as file:
            fields = [int(v) for v in file.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        own_seconds = own.user + own.system + own.children_user + own.children_system
        busy = (user + nice + system + irq + softirq) / ticks
        return busy, steal / ticks, own_seconds, time.monotonic()

    def summary(self) -> dict[str, float]:
        busy, steal, own, now = self._read()
        busy0, steal0, own0, start = self._start
        wall = max(now - start, 1e-9)
        return {
            "seconds": wall,
            "own_cpus": (own - own0) / wall,
            "other_cpus": max(0.0, (busy - busy0) - (own - own0)) / wall,
            "steal_cpus": (steal - steal0) / wall,
        }


def finish(
    data: dict[str, Any], report: Callable[[dict[str, Any]], str], load: MachineLoad, json_path: str | None
) -> int:
    """The end of a benchmark's ``main``: the machine's load into ``data``, the report and the load
    line printed, ``data`` written as JSON when asked; returns the exit status."""
    data["machine_load"] = load.summary()
    print(report(data))
    print(load_line(data["machine_load"]))
    write_json(json_path, data)
    return 0


def load_line(load: Mapping[str, float]) -> str:
    return (
        f"machine during the run ({load['seconds']:.0f} s): this benchmark {load['own_cpus']:.2f} CPUs, "
        f"other processes {load['other_cpus']:.2f} CPUs, steal {load['steal_cpus']:.2f} CPUs"
    )


def environment() -> dict[str, Any]:
    """What the figures were measured on: enough to tell two runs apart."""
    from importlib.metadata import version

    import numpy

    import inferscope

    cpu_model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "inferscope": inferscope.__version__,
        "backend": inferscope.backend(),
        "numpy": numpy.__version__,
        "opentelemetry_sdk": version("opentelemetry-sdk"),
        "prometheus_client": version("prometheus_client"),
        "switch_interval_s": sys.getswitchinterval(),
        "time_unix": int(time.time()),
    }


def environment_line(env: Mapping[str, Any]) -> str:
    return (
        f"Python {env['python']} on {env['cpu_model']} ({env['usable_cpus']} usable CPUs), "
        f"load {env['loadavg_1m']:.2f}; inferscope {env['inferscope']} backend={env['backend']}, "
        f"numpy {env['numpy']}, opentelemetry-sdk {env['opentelemetry_sdk']}, "
        f"prometheus_client {env['prometheus_client']}"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, left: int = 1) -> str:
    """An aligned text table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in text_rows)])


def ratio_table(derived: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> str:
    """One row per name of ``derived[backend][name]`` (ns) and its fraction of that backend's
    ``otel record``, one pair of columns per backend."""
    rows = []
    for name in names:
        row: list[str] = [name]
        for values in derived.values():
            row += [ns(values[name]), fraction(values[name], values["otel record"])]
        rows.append(row)
    headers = ["ns per call (median)"]
    for label in derived:
        headers += [label, "of OTel record"]
    return table(headers, rows)


def ns(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def rate(value: float | None) -> str:
    """Records or calls per second, in millions when large."""
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M/s"
    return f"{value / 1e3:.1f} k/s"


def fraction(part: float, whole: float) -> str:
    """``part`` as a fraction of ``whole``, written 1/N (how many of ``part`` fit in ``whole``)."""
    if part <= 0:
        return "1/inf"
    return f"1/{whole / part:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def write_json(path: str | None, data: Mapping[str, Any]) -> None:
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, sort_keys=False)
        file.write("\n")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# --- inferscope set up for timed loops -------------------------------------------------------------


class LoopPipeline:
    """Configures inferscope for timed loops and counts, per case, the records dropped in its loops.

    The ring holds ``ring_capacity`` records and the drainer aggregates every
    ``drain_interval_millis`` only, so a loop that pushes fewer than half the ring's records is
    neither drained nor aggregated while it runs. ``settle`` (a case's ``after``) drains the ring
    with ``inferscope.snapshot()``, outside the timed region, so every loop starts with an empty
    ring, and adds the growth of ``snapshot().dropped`` to the case.
    """

    def __init__(self, ring_capacity: int = 1 << 20, drain_interval_millis: int = 60_000) -> None:
        self.ring_capacity = ring_capacity
        self.drain_interval_millis = drain_interval_millis
        self.counters: str | None = None
        self.drops: dict[str, dict[str, int]] = {}
        self._last = self._dropped()

    def use(self, counters: str) -> None:
        """Switch to the counter set ``counters``; ``configure`` runs only when it changes."""
        import inferscope

        if counters != self.counters:
            inferscope.configure(
                counters=counters,
                ring_capacity=self.ring_capacity,
                drain_interval_millis=self.drain_interval_millis,
                metrics_exporters="none",
            )
            self.counters = counters

    @staticmethod
    def _dropped() -> dict[str, int]:
        import inferscope

        return dict(inferscope.snapshot().dropped)  # snapshot() drains the ring first

    def settle(self, case_name: str) -> None:
        now = self._dropped()
        counts = self.drops.setdefault(case_name, {})
        for reason, total in now.items():
            counts[reason] = counts.get(reason, 0) + total - self._last.get(reason, 0)
        self._last = now


def otel_histogram_case(name: str = "OTel histogram.record, 2 attrs") -> Case:
    """The usual peer: ``histogram.record`` with 2 attributes, on a ``MeterProvider`` whose
    ``InMemoryMetricReader`` collects only when asked, so nothing is exported during the loop."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
    histogram = provider.get_meter("bench").create_histogram("bench.duration", unit="s")
    attributes = {"inferscope.model.name": "bench", "inferscope.stage.name": "infer"}
    return Case(
        name,
        "histogram.record(0.0012, attributes=attributes)",
        {"histogram": histogram, "attributes": attributes},
    )


def drops_text(case: Mapping[str, Any]) -> str:
    """The ``dropped`` counts of a case summary: "-" when not counted, "0", or "reason=n, ..."."""
    dropped = case.get("dropped")
    if dropped is None:
        return "-"
    total = sum(dropped.values())
    return str(total) if total == 0 else ", ".join(f"{k}={v}" for k, v in dropped.items() if v)


def raw_timings_table(runs: Mapping[str, Mapping[str, Any]], baseline: str = "bare call") -> str:
    """Every case of every run (backend label -> run with ``cases`` of ``Case.summary()`` dicts,
    plus ``dropped`` where counted): median, min, max, median minus ``baseline``, loop size, drops."""
    rows = []
    for label, run in runs.items():
        base = run["cases"][baseline]["median_ns"]
        for name, case in run["cases"].items():
            rows.append(
                (
                    label,
                    name,
                    ns(case["median_ns"]),
                    ns(case["min_ns"]),
                    ns(case["max_ns"]),
                    ns(case["median_ns"] - base),
                    f"{case['calls_per_repeat']:,}",
                    drops_text(case),
                )
            )
    headers = ("backend", "case", "median ns", "min ns", "max ns", "minus bare", "calls/loop", "dropped")
    return table(headers, rows, left=2)


def drops_line(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """One line naming every case of every run that dropped records during its timed loops."""
    drops = {
        f"{label}: {name}": case["dropped"]
        for label, run in runs.items()
        for name, case in run["cases"].items()
        if sum(case.get("dropped", {}).values())
    }
    return f"records dropped during the timed loops: {drops or 'none'}"


# --- OTel span peers -------------------------------------------------------------------------------


class DiscardSpans(SpanExporter):
    """A span exporter that counts what it is given and sends nothing: the peers' spans are built
    and batched as usual, and no network is involved."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class SpanDropCounter(logging.Handler):
    """Counts the spans the SDK's batch processor drops: it logs "Queue full" for each."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "Queue full" in record.getMessage():
            self.count += 1


def count_span_drops() -> SpanDropCounter:
    """A ``SpanDropCounter`` attached to the logger of the SDK's batch processor."""
    counter = SpanDropCounter()
    logging.getLogger("opentelemetry.sdk._shared_internal").addHandler(counter)
    return counter
