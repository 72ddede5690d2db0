"""What tracing costs: on the hot path (on, off, and an OTel SDK span), and in the drainer.

    python3 benchmarks/tracing.py            # ~60 s: C backend here, pure-Python backend in a child
    python3 benchmarks/tracing.py --quick    # ~20 s

Hot path. Every figure is ns per call, the median of round-robin repeats of one ``timeit`` loop
(as in overhead.py). "Not kept" means tracing is on (a span exporter is configured) but the call is
not sampled: trace_ratio 0, no slow threshold, so the figure is what every call pays for span ids
and context linkage. "Under a parent" runs the same call inside an attached, unsampled OTel span
context, so the parent is read from it at entry. The peer is an OTel SDK span
(``start_as_current_span`` with a ``BatchSpanProcessor``); target: a call that is not kept costs
at most 1/10 of it.

Drainer. The records of 10,000 inferences with three stages each (40,000 records, one second of
traffic at 10,000 inferences/s) are recorded with tracing on and the default retention (1% by
ratio, calls above their p99, errors), after a warm-up that gives every key its p99. Then the
drainer's work on them is timed in this thread's CPU time: aggregation alone (what tracing off
costs) and aggregation plus sampling and span building, handing kept spans to a
``BatchSpanProcessor`` whose exporter drops them (encoding and sending are the exporter's, on its
own thread, and not counted). Target: under 5% of one core at 10,000 inferences/s.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
import opentelemetry.context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

import inferscope
from inferscope import _pipeline
from inferscope._records import empty_records
from inferscope._runtime import RUNTIME

RING_CAPACITY = 1 << 20
MAX_RECORDS_PER_LOOP = 400_000
#: A call that is not kept must cost at most 1/TARGET_SPAN_FRACTION of one OTel SDK span.
TARGET_SPAN_FRACTION = 10
#: The drainer's share of one core at 10,000 inferences/s, at most.
TARGET_DRAINER_SHARE = 0.05
INFERENCES_PER_SECOND = 10_000


def noop() -> None:
    pass


@inferscope.track_inference(model="bench")
def tracked() -> None:
    pass


STAGE = inferscope.stage("infer")


@inferscope.track_inference(model="bench")
def tracked_with_stage() -> None:
    with STAGE:
        pass


class Modes:
    """Switches between tracing off and on (nothing kept); configure() runs only on a change."""

    def __init__(self) -> None:
        self.mode = ""
        self.exporter = _common.DiscardSpans()
        self.token: Any = None

    def use(self, mode: str) -> Callable[[], None]:
        def prepare() -> None:
            self._detach()
            if mode != self.mode:
                settings: dict[str, Any] = {
                    "counters": "minimal",
                    "ring_capacity": RING_CAPACITY,
                    "drain_interval_millis": 60_000,
                    "metrics_exporters": "none",
                    "traces_exporters": "none",
                }
                if mode != "off":
                    settings.update(span_exporters=[self.exporter], trace_ratio=0.0, trace_slow_ms="off")
                inferscope.configure(**settings)
                self.mode = mode
            if mode == "under a parent":
                unsampled = TraceFlags(TraceFlags.DEFAULT)
                parent = SpanContext(0x1234, 0x5678, is_remote=True, trace_flags=unsampled)
                self.token = otel_context.attach(set_span_in_context(NonRecordingSpan(parent)))

        return prepare

    def after(self) -> None:
        self._detach()
        inferscope.snapshot()  # drains the ring outside the timed region

    def _detach(self) -> None:
        if self.token is not None:
            otel_context.detach(self.token)
            self.token = None


def hot_path_cases(modes: Modes) -> list[_common.Case]:
    cases = [_common.Case("bare call", "f()", {"f": noop})]
    for mode in ("off", "not kept", "under a parent"):
        cases += [
            _common.Case(
                f"tracked [tracing {mode}]",
                "f()",
                {"f": tracked},
                prepare=modes.use(mode),
                after=modes.after,
                max_number=MAX_RECORDS_PER_LOOP,
            ),
            _common.Case(
                f"tracked + stage [tracing {mode}]",
                "f()",
                {"f": tracked_with_stage},
                prepare=modes.use(mode),
                after=modes.after,
                max_number=MAX_RECORDS_PER_LOOP // 2,
            ),
        ]
    return cases


def otel_span_case() -> _common.Case:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_common.DiscardSpans()))
    tracer = provider.get_tracer("bench")
    return _common.Case(
        "OTel SDK span, batch processor",
        'with tracer.start_as_current_span("x"):\n    pass',
        {"tracer": tracer},
        after=lambda: provider.force_flush(),
    )


# --- the drainer -------------------------------------------------------------------------------------


@inferscope.track_inference(model="served")
def served(i: int) -> None:
    with inferscope.stage("preprocess"):
        pass
    with inferscope.stage("infer"):
        pass
    with inferscope.stage("postprocess"):
        if i % 997 == 0:
            time.sleep(0.0002)  # a few slow calls, as real traffic has


def drainer_cost(rounds: int) -> dict[str, Any]:
    """CPU seconds of the drainer's work on one second of traffic at 10,000 inferences/s."""
    exporter = _common.DiscardSpans()
    buffer = empty_records(4 * INFERENCES_PER_SECOND)
    aggregate_s: list[float] = []
    traces_s: list[float] = []
    kept_spans: list[int] = []
    for _ in range(rounds):
        inferscope.configure(
            counters="default",
            ring_capacity=RING_CAPACITY,
            drain_interval_millis=60_000,
            metrics_exporters="none",
            traces_exporters="none",
            span_exporters=[exporter],
        )
        _pipeline.reset_aggregates()
        for i in range(2 * INFERENCES_PER_SECOND):  # warm-up: every key gets its p99
            served(i)
        _pipeline.DRAINER.drain()
        traces = _pipeline._exports.traces if _pipeline._exports is not None else None
        assert traces is not None
        for i in range(INFERENCES_PER_SECOND):
            served(i)
        n = RUNTIME.ring.drain(buffer)
        batch = buffer[:n]
        before = traces.spans_exported
        start = time.thread_time()
        _pipeline.AGGREGATOR.add(batch)
        middle = time.thread_time()
        traces.add(batch)
        end = time.thread_time()
        aggregate_s.append(middle - start)
        traces_s.append(end - middle)
        kept_spans.append(traces.spans_exported - before)
    inferscope.configure()
    records = 4 * INFERENCES_PER_SECOND
    trace_seconds = statistics.median(traces_s)
    spans = statistics.median(kept_spans)
    return {
        "records": records,
        "aggregate_cpu_s": statistics.median(aggregate_s),
        "traces_cpu_s": trace_seconds,
        "kept_spans": spans,
        "per_kept_span_us": trace_seconds / spans * 1e6 if spans else None,
    }


# --- running -----------------------------------------------------------------------------------------


def measure(*, quick: bool, with_peers: bool = True) -> dict[str, Any]:
    repeats, target_seconds = (5, 0.03) if quick else (15, 0.1)
    modes = Modes()
    cases = hot_path_cases(modes)
    if with_peers:
        cases.append(otel_span_case())
    _common.progress(f"tracing.py: backend={inferscope.backend()}, {len(cases)} cases x {repeats} repeats")
    _common.run_interleaved(cases, repeats, target_seconds)
    modes.use("off")()
    _common.progress("tracing.py: the drainer on one second of traffic at 10,000 inferences/s")
    drainer = drainer_cost(3 if quick else 7)
    inferscope.configure()
    return {
        "backend": inferscope.backend(),
        "environment": _common.environment(),
        "repeats": repeats,
        "target_seconds_per_loop": target_seconds,
        "cases": {case.name: case.summary() for case in cases},
        "drainer": drainer,
    }


def report(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    main = runs["c"] if "c" in runs else next(iter(runs.values()))
    span_ns = main["cases"]["OTel SDK span, batch processor"]["median_ns"]
    rows, targets = [], []
    for label, run in runs.items():
        cases = run["cases"]
        bare = cases["bare call"]["median_ns"]
        for what in ("tracked", "tracked + stage"):
            off = cases[f"{what} [tracing off]"]["median_ns"] - bare
            for mode in ("not kept", "under a parent"):
                on = cases[f"{what} [tracing {mode}]"]["median_ns"] - bare
                rows.append(
                    (
                        label,
                        f"{what} [{mode}]",
                        _common.ns(off),
                        _common.ns(on),
                        _common.ns(on - off),
                        f"1/{span_ns / on:.1f}" if on > 0 else "-",
                    )
                )
                targets.append(
                    {
                        "target": f"{what}, tracing on, {mode}: <= 1/{TARGET_SPAN_FRACTION} of an OTel span",
                        "backend": label,
                        "measured": f"1/{span_ns / on:.1f}" if on > 0 else "-",
                        "ok": on * TARGET_SPAN_FRACTION <= span_ns,
                    }
                )
    drainer_rows = []
    for label, run in runs.items():
        d = run["drainer"]
        total = d["aggregate_cpu_s"] + d["traces_cpu_s"]
        drainer_rows.append(
            (
                label,
                f"{d['records']:,}",
                f"{d['aggregate_cpu_s'] * 1e3:.1f} ms",
                f"{d['traces_cpu_s'] * 1e3:.1f} ms",
                f"{d['kept_spans']:.0f}",
                f"{d['per_kept_span_us']:.1f} µs" if d["per_kept_span_us"] else "-",
                f"{total * 100:.2f}%",
            )
        )
        targets.append(
            {
                "target": f"drainer, {INFERENCES_PER_SECOND:,} calls/s, default retention: < 5% of a CPU",
                "backend": label,
                "measured": f"{total * 100:.2f}%",
                "ok": total < TARGET_DRAINER_SHARE,
            }
        )
    parts = [
        "inferscope tracing benchmark",
        _common.environment_line(main["environment"]),
        f"method: median of {main['repeats']} round-robin repeats of one timeit loop per case; overhead = "
        "median - bare call of the same process; the OTel span is measured in the main process only.",
        "",
        "Raw timings (ns per call)",
        _common.raw_timings_table(runs),
        "",
        f"Hot path: overhead with tracing off and on, against one OTel SDK span ({_common.ns(span_ns)} ns)",
        _common.table(("backend", "call", "off ns", "on ns", "added ns", "of an OTel span"), rows, left=2),
        "",
        "Drainer: CPU time for one second of traffic (10,000 inferences x 4 records), default retention",
        _common.table(
            ("backend", "records", "aggregate", "sample + spans", "kept spans", "per kept span", "of a core"),
            drainer_rows,
        ),
        "",
        "Targets (informational, nothing is asserted)",
        _common.table(
            ("target", "backend", "measured", "result"),
            [(t["target"], t["backend"], t["measured"], _common.verdict(t["ok"])) for t in targets],
            left=3,
        ),
    ]
    return "\n".join(parts), {"runs": runs, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    return _common.run_main(
        __file__,
        __doc__,
        measure,
        report,
        argv,
        child_measure=lambda quick: measure(quick=quick, with_peers=False),
    )


if __name__ == "__main__":
    sys.exit(main())
