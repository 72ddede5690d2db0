"""Per-stage cost of each counter set, and of each counter alone, against peers in the same run.

    python3 benchmarks/counters.py            # ~47 s: C backend here, pure-Python backend in a child
    python3 benchmarks/counters.py --quick    # ~10 s, fewer and shorter loops
    python3 benchmarks/counters.py --json counters.json

What: for each counter set (minimal, default, full) and each counter by name alone (thread_cpu,
rusage, perf, rss, python_heap, cuda_memory), set with ``inferscope.configure(counters=...)``, a tracked no-op
and a tracked function whose body is ``with inferscope.stage("x"): pass``. The stage costs
tracked-with-stage minus tracked-without, and the tracked-call overhead is tracked minus a bare
call of the same no-op. Each is shown with its ratio to ``minimal``. A counter that
``inferscope.counters_status()`` reports unavailable is skipped, and the table says why. The
peers, in the same process: OTel ``histogram.record`` with 2 attributes, and one
``time.thread_time_ns()`` call (the read that ``thread_cpu`` makes twice per stage).

Method: as benchmarks/overhead.py. Every figure is ns per call, the median over N round-robin
repeats of one ``timeit`` loop per case (gc off inside a loop). The pure-Python backend is chosen at
import, so its figures come from this script re-run in a child with INFERSCOPE_NO_EXTENSION=1,
which measures its own bare call and peers. The ring holds 2**20 records, no loop pushes more than
400,000, and the drainer aggregates every 60 s only; after every loop ``inferscope.snapshot()``
drains the ring outside the timed region and the records dropped in the loop are counted.
``python_heap`` starts tracemalloc: it runs during the loops of that counter (and of one more OTel
peer) only, and is stopped after each, so that it does not slow the other cases. Before each of
those loops 10,000 objects are allocated and kept, so that tracemalloc traces a live heap, as it
does in a program that runs with it: with a nearly empty trace table, the figures swing 3-5x from
one loop to the next.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import _common

import inferscope
from inferscope.counters import counter_mask, counter_names, perf_status

SETS = ("minimal", "default", "full")
SINGLE = ("thread_cpu", "rusage", "perf", "rss", "python_heap", "cuda_memory")
#: Records pushed by one timed loop at most: below half the 2**20-record ring.
MAX_RECORDS_PER_LOOP = 400_000
#: Targets: default - minimal <= 2 thread-clock reads (10% slack, a difference of medians), and
#: the stage with counters=full below a third of one OTel histogram.record.
CLOCK_READS = 2
CLOCK_SLACK = 1.1
FULL_STAGE_DIVISOR = 3

THREAD_TIME = "time.thread_time_ns()"
OTEL_RECORD = "OTel histogram.record, 2 attrs"
#: The same peer while tracemalloc runs, as it does for the whole program once python_heap is on.
OTEL_RECORD_TRACEMALLOC = "OTel histogram.record, 2 attrs, tracemalloc on"
#: Objects kept alive while tracemalloc runs, so that its trace table is that of a live program.
TRACED_BALLAST = 10_000


def noop() -> None:
    pass


tracked_noop = inferscope.track_inference(model="bench.counters")(noop)


@inferscope.track_inference(model="bench.counters.stage")
def tracked_with_stage() -> None:
    with inferscope.stage("x"):  # as serving code writes it: the lookup of the stage is included
        pass


# --- what is measured ------------------------------------------------------------------------------


def unavailable() -> dict[str, str]:
    """Counter name -> why it cannot be measured in this process (from ``counters_status()``).
    The sets are always measured: ``full`` falls back to the thread CPU clock without perf."""
    return {
        name: reason or state
        for name, (state, reason) in inferscope.counters_status().items()
        if name in SINGLE and state == "none"
    }


def reads(counters: str) -> str:
    """What a counter set reads in this process, besides the monotonic clock."""
    names = counter_names(counter_mask(counters))
    if not names:
        return "monotonic clock only"
    mode = perf_status()[0]
    return " + ".join(f"perf ({mode} events)" if name == "perf" else name for name in names)


class Tracemalloc:
    """Starts tracemalloc before a loop, with a ballast of live objects, and stops it after."""

    def __init__(self) -> None:
        self._ballast: list[object] = []

    def start(self) -> None:
        if not tracemalloc.is_tracing():  # configure(counters="python_heap") may have started it
            tracemalloc.start()
        self._ballast = [object() for _ in range(TRACED_BALLAST)]

    def stop(self) -> None:
        self._ballast = []
        tracemalloc.stop()  # tracemalloc slows every allocation: keep it off in the other cases


def _prepare(pipeline: _common.LoopPipeline, counters: str, traced: Tracemalloc) -> Callable[[], None]:
    def prepare() -> None:
        pipeline.use(counters)
        if counters == "python_heap":
            traced.start()

    return prepare


def _after(
    pipeline: _common.LoopPipeline, counters: str, case_name: str, traced: Tracemalloc
) -> Callable[[], None]:
    def after() -> None:
        pipeline.settle(case_name)
        if counters == "python_heap":
            traced.stop()

    return after


def measure(*, quick: bool) -> dict[str, Any]:
    repeats, target_seconds = (5, 0.02) if quick else (15, 0.06)
    skipped = unavailable()
    measured = [name for name in (*SETS, *SINGLE) if name not in skipped]
    pipeline = _common.LoopPipeline(ring_capacity=1 << 20, drain_interval_millis=60_000)
    pipeline.use("minimal")
    traced = Tracemalloc()
    cases = [_common.Case("bare call", "f()", {"f": noop})]
    for counters in measured:
        for name, func, per_call in (
            (f"tracked [{counters}]", tracked_noop, 1),
            (f"tracked + stage [{counters}]", tracked_with_stage, 2),
        ):
            cases.append(
                _common.Case(
                    name,
                    "f()",
                    {"f": func},
                    prepare=_prepare(pipeline, counters, traced),
                    after=_after(pipeline, counters, name, traced),
                    max_number=MAX_RECORDS_PER_LOOP // per_call,
                )
            )
    cases += [
        _common.Case(THREAD_TIME, "f()", {"f": time.thread_time_ns}),
        _common.otel_histogram_case(OTEL_RECORD),
    ]
    if "python_heap" in measured:
        peer = _common.otel_histogram_case(OTEL_RECORD_TRACEMALLOC)
        peer.prepare, peer.after = traced.start, traced.stop
        cases.append(peer)
    _common.progress(
        f"counters.py: backend={inferscope.backend()}, {len(cases)} cases x {repeats} repeats"
        + (f", skipped: {', '.join(skipped)}" if skipped else "")
    )
    _common.run_interleaved(cases, repeats, target_seconds)
    if tracemalloc.is_tracing():
        traced.stop()
    results = {case.name: case.summary() for case in cases}
    for name, counts in pipeline.drops.items():
        results[name]["dropped"] = counts
    resolved = {name: reads(name) for name in measured}
    inferscope.configure()  # back to the settings of the environment
    return {
        "backend": inferscope.backend(),
        "environment": _common.environment(),
        "repeats": repeats,
        "target_seconds_per_loop": target_seconds,
        "measured": measured,
        "skipped": skipped,
        "reads": resolved,
        "cases": results,
    }


def derive(run: dict[str, Any]) -> dict[str, Any]:
    """Per counter set: tracked overhead and stage enter+exit, and their ratios to minimal."""
    m = {name: case["median_ns"] for name, case in run["cases"].items()}
    clock, record = m[THREAD_TIME], m[OTEL_RECORD]
    sets: dict[str, dict[str, float]] = {}
    for name in run["measured"]:
        tracked = m[f"tracked [{name}]"]
        sets[name] = {"tracked": tracked - m["bare call"], "stage": m[f"tracked + stage [{name}]"] - tracked}
    base = sets["minimal"]
    for values in sets.values():
        values["tracked / minimal"] = values["tracked"] / base["tracked"]
        values["stage / minimal"] = values["stage"] / base["stage"]
        values["stage - minimal"] = values["stage"] - base["stage"]
        values["tracked - minimal"] = values["tracked"] - base["tracked"]
        values["stage - minimal, in clock reads"] = values["stage - minimal"] / clock
        values["stage / otel record"] = values["stage"] / record
    return {"bare": m["bare call"], "thread_time_ns": clock, "otel_record": record, "sets": sets}


# --- the report ------------------------------------------------------------------------------------


def _times(value: float) -> str:
    return f"{value:,.1f}x"


def cost_table(runs: dict[str, dict[str, Any]], derived: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, run in runs.items():
        d = derived[label]
        for name in (*SETS, *SINGLE):
            if name in run["skipped"]:
                rows.append((label, name, "skipped: unavailable here (see below)", *["-"] * 7))
                continue
            s = d["sets"][name]
            rows.append(
                (
                    label,
                    name,
                    run["reads"][name],
                    _common.ns(s["stage"]),
                    _times(s["stage / minimal"]),
                    _common.ns(s["stage - minimal"]),
                    f"{s['stage - minimal, in clock reads']:.2f}",
                    _common.fraction(s["stage"], d["otel_record"]),
                    _common.ns(s["tracked"]),
                    _times(s["tracked / minimal"]),
                )
            )
    headers = (
        "backend",
        "counters",
        "reads (besides the monotonic clock)",
        "stage ns",
        "/ minimal",
        "- minimal",
        "in thread_time_ns()",
        "of OTel record",
        "tracked ns",
        "/ minimal",
    )
    skipped = [
        f"skipped on {label}: {name}: {reason}"
        for label, run in runs.items()
        for name, reason in run["skipped"].items()
    ]
    return "\n".join([_common.table(headers, rows, left=3), *skipped])


def peers_table(derived: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]]) -> str:
    rows = []
    for label, d in derived.items():
        minimal = d["sets"]["minimal"]
        m = {name: case["median_ns"] for name, case in runs[label]["cases"].items()}
        for name in (THREAD_TIME, OTEL_RECORD, OTEL_RECORD_TRACEMALLOC):
            if name not in m:
                continue
            value = m[name]
            rows.append(
                (
                    label,
                    name,
                    _common.ns(value),
                    _times(value / minimal["stage"]),
                    _times(value / minimal["tracked"]),
                    _times(value / m[OTEL_RECORD]),
                )
            )
    headers = (
        "backend",
        "peer",
        "ns per call",
        "/ stage [minimal]",
        "/ tracked overhead [minimal]",
        "/ OTel record",
    )
    return _common.table(headers, rows, left=2)


def targets(runs: dict[str, dict[str, Any]], derived: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Informational: nothing here fails the script."""
    found = []
    for label, d in derived.items():
        clock, record = d["thread_time_ns"], d["otel_record"]
        default = d["sets"]["default"]
        for what, key in (("stage", "stage - minimal"), ("tracked call", "tracked - minimal")):
            value = default[key]
            found.append(
                {
                    "target": f"{what}, {label}: default - minimal <= {CLOCK_READS} thread-clock reads"
                    " (+10%)",
                    "backend": label,
                    "measured": f"{_common.ns(value)} ns = {value / clock:.2f} x time.thread_time_ns() "
                    f"({_common.ns(clock)} ns)",
                    "ok": value <= CLOCK_READS * clock * CLOCK_SLACK,
                }
            )
        stage = d["sets"]["full"]["stage"]
        found.append(
            {
                "target": f"stage enter+exit, full ({runs[label]['reads']['full']}), {label} "
                f"< 1/{FULL_STAGE_DIVISOR} of OTel histogram.record",
                "backend": label,
                "measured": f"{_common.ns(stage)} ns = {_common.fraction(stage, record)} "
                f"(limit {_common.ns(record / FULL_STAGE_DIVISOR)} ns)",
                "ok": stage < record / FULL_STAGE_DIVISOR,
            }
        )
    return found


def report(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    derived = {label: derive(run) for label, run in runs.items()}
    found = targets(runs, derived)
    main = runs["c"] if "c" in runs else next(iter(runs.values()))
    parts = [
        "inferscope counters benchmark",
        _common.environment_line(main["environment"]),
        f"method: median of {main['repeats']} round-robin repeats of one timeit loop per case "
        f"(~{main['target_seconds_per_loop'] * 1e3:.0f} ms each, gc off in the loop); counters set with "
        "inferscope.configure(counters=...); stage = tracked-with-stage - tracked (the stage('x') lookup "
        "included); tracked overhead = tracked - bare; ring drained between loops, outside the timed "
        f"region; tracemalloc on (with {TRACED_BALLAST:,} live objects traced) only in the python_heap "
        "loops and its OTel peer; pure-Python figures come from a child process with "
        "INFERSCOPE_NO_EXTENSION=1 and use that child's own bare call and peers.",
        "",
        "Raw timings (ns per call; 'minus bare' = median - bare call of the same process)",
        _common.raw_timings_table(runs),
        "",
        "Cost per counter set (ns, medians; '- minimal' = stage - stage [minimal], also in "
        "time.thread_time_ns() calls of the same process; 'of OTel record' = stage / histogram.record)",
        cost_table(runs, derived),
        "",
        "Peers (same process as the figures they are compared with)",
        peers_table(derived, runs),
        "",
        "Targets (informational, nothing is asserted)",
        _common.table(
            ("target", "backend", "measured", "result"),
            [(t["target"], t["backend"], t["measured"], _common.verdict(t["ok"])) for t in found],
            left=3,
        ),
        "",
        _common.drops_line(runs),
    ]
    return "\n".join(parts), {"runs": runs, "derived": derived, "targets": found}


def main(argv: list[str] | None = None) -> int:
    return _common.run_main(__file__, __doc__, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
