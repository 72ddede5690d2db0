"""What a stage's CPU time costs, and how exact each way of getting it is, against OTel in one run.

    python3 benchmarks/stage_cpu.py            # ~40 s: C backend here, pure-Python backend in a child
    python3 benchmarks/stage_cpu.py --quick    # ~15 s
    python3 benchmarks/stage_cpu.py --json stage_cpu.json

The thread CPU clock (``CLOCK_THREAD_CPUTIME_ID``) is a system call on many VMs, and a stage that
reads it at entry and exit pays two. Three ways to give stages a CPU time, measured here:

- **every entry** (what ``counters="default"`` did before): two reads per stage entry, exact.
- **(a) a sample of a key's entries** (what it does now, ``Runtime.cpu_sample_every``, 64 by
  default): every entry of a stage entered on average 10 ms apart or more (a moving average of
  the gaps), else 1 entry in 64 at random. CPU per call is the sum over the entries read divided
  by how many were read (``cpu_sampled_count``).
- **(b) one read per inference, stages apportioned by wall time**: a stage costs what it costs
  without any counter (``counters="minimal"``), and its CPU is the inference's CPU times its share
  of the inference's wall time.

Part 1, cost: ns per stage enter + exit = (tracked call with a bound stage) - (tracked call alone),
in the same counter mode, as in benchmarks/overhead.py (median of round-robin ``timeit`` loops,
ring drained between loops outside the timed region), each against OTel's ``histogram.record``
with 2 attributes measured in the same process.

Part 2, exactness (C backend only): an inference with a busy stage (``spin``, pure CPU) and a
waiting one (``wait``, a sleep), run at full speed so that the sample is in force, once with every
entry read (the exact figure) and once with the default sample. It prints each stage's CPU per call
from the sample, and from (b), against the exact one. The two runs are separate, so the exact and
sampled figures differ by run-to-run noise as well (a few %).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import _common

import inferscope
from inferscope._records import STAGE_CPU_SAMPLE_EVERY
from inferscope._runtime import RUNTIME

RING_CAPACITY = 1 << 20
MAX_RECORDS_PER_LOOP = 400_000
#: DESIGN.md §7 and the counters target: a stage at most 1/50 of an OTel histogram.record.
STAGE_TARGET = 50

#: name -> (counter set, Runtime.cpu_sample_every)
MODES: dict[str, tuple[str, int]] = {
    "minimal": ("minimal", STAGE_CPU_SAMPLE_EVERY),
    "default, every entry": ("default", 1),
    "default, 1 in 16": ("default", 16),
    "default, 1 in 64 (the default)": ("default", STAGE_CPU_SAMPLE_EVERY),
}


def noop() -> None:
    pass


STAGE = inferscope.stage("x")


@inferscope.track_inference(model="bench.stage_cpu")
def tracked_with_stage() -> None:
    with STAGE:
        pass


tracked_noop = inferscope.track_inference(model="bench.stage_cpu.alone")(noop)


def cost_cases(pipeline: _common.LoopPipeline) -> list[_common.Case]:
    def use(counters: str, every: int) -> Callable[[], None]:
        def prepare() -> None:
            pipeline.use(counters)
            RUNTIME.cpu_sample_every = every

        return prepare

    cases = []
    for mode, (counters, every) in MODES.items():
        for label, func, stmt in (
            ("tracked", tracked_noop, "f()"),
            ("tracked + stage", tracked_with_stage, "f()"),
        ):
            cases.append(
                _common.Case(
                    f"{label} [{mode}]",
                    stmt,
                    {"f": func},
                    prepare=use(counters, every),
                    after=lambda name=f"{label} [{mode}]": pipeline.settle(name),
                    max_number=MAX_RECORDS_PER_LOOP // 2,
                )
            )
    cases.append(_common.Case("time.thread_time_ns()", "f()", {"f": time.thread_time_ns}))
    cases.append(_common.otel_histogram_case())
    return cases


# --- part 2: how exact -------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def exactness(calls: int) -> dict[str, dict[str, float | None]]:
    """CPU per call of the stages of one pipeline: exact, sampled (a), apportioned (b)."""
    inferscope.configure(
        counters="default",
        ring_capacity=RING_CAPACITY,
        drain_interval_millis=60_000,
        metrics_exporters="none",
    )

    def run(model: str, every: int) -> Any:
        RUNTIME.cpu_sample_every = every

        @inferscope.track_inference(model=model)
        def pipeline() -> None:
            with inferscope.stage("spin"):
                _spin(20e-6)
            with inferscope.stage("wait"):
                time.sleep(20e-6)

        for _ in range(calls):
            pipeline()
        return inferscope.snapshot()

    run("bench.stage_cpu.exact", 1)
    snap = run("bench.stage_cpu.sampled", STAGE_CPU_SAMPLE_EVERY)
    RUNTIME.cpu_sample_every = STAGE_CPU_SAMPLE_EVERY
    exact_inference = snap.row("bench.stage_cpu.exact")
    out: dict[str, dict[str, float | None]] = {}
    for stage in ("spin", "wait"):
        exact = snap.row("bench.stage_cpu.exact", stage)
        sampled = snap.row("bench.stage_cpu.sampled", stage)
        share = exact.mean / exact_inference.mean
        inference_cpu = exact_inference.cpu_per_call
        out[stage] = {
            "calls": float(sampled.count),
            "cpu_sampled_count": float(sampled.cpu_sampled_count),
            "exact_cpu_per_call": exact.cpu_per_call,
            "sampled_cpu_per_call": sampled.cpu_per_call,
            "apportioned_cpu_per_call": None if inference_cpu is None else inference_cpu * share,
        }
    return out


def measure(*, quick: bool) -> dict[str, Any]:
    repeats, target_seconds = (5, 0.03) if quick else (11, 0.08)
    pipeline = _common.LoopPipeline(ring_capacity=RING_CAPACITY, drain_interval_millis=60_000)
    pipeline.use("minimal")
    cases = cost_cases(pipeline)
    _common.progress(f"stage_cpu.py: backend={inferscope.backend()}, {len(cases)} cases x {repeats} repeats")
    _common.run_interleaved(cases, repeats, target_seconds)
    result: dict[str, Any] = {
        "backend": inferscope.backend(),
        "environment": _common.environment(),
        "repeats": repeats,
        "cases": {case.name: case.summary() for case in cases},
        "dropped": pipeline.drops,
    }
    if inferscope.backend() == "c":
        result["exactness"] = exactness(2_000 if quick else 10_000)
    RUNTIME.cpu_sample_every = STAGE_CPU_SAMPLE_EVERY
    inferscope.configure()
    return result


# --- the report ------------------------------------------------------------------------------------


def derive(run: dict[str, Any]) -> dict[str, float]:
    m = {name: case["median_ns"] for name, case in run["cases"].items()}
    out = {f"stage [{mode}]": m[f"tracked + stage [{mode}]"] - m[f"tracked [{mode}]"] for mode in MODES}
    out["tracked call [default], exact"] = m["tracked [default, every entry]"] - m["tracked [minimal]"]
    out["(b) stage, stages not read"] = out["stage [minimal]"]
    out["thread_time_ns()"] = m["time.thread_time_ns()"]
    out["otel record"] = m["OTel histogram.record, 2 attrs"]
    return out


def cost_table(derived: dict[str, dict[str, float]]) -> str:
    names = [
        "stage [minimal]",
        "stage [default, every entry]",
        "stage [default, 1 in 16]",
        "stage [default, 1 in 64 (the default)]",
        "(b) stage, stages not read",
        "tracked call [default], exact",
        "thread_time_ns()",
        "otel record",
    ]
    return _common.ratio_table(derived, names)


def _percent(value: float | None, exact: float | None) -> str:
    if value is None or not exact:
        return "-"
    return f"{(value - exact) / exact * 100:+.0f}%"


def _ns(seconds: float | None) -> str:
    return _common.ns(None if seconds is None else seconds * 1e9)


def exactness_table(found: dict[str, dict[str, float | None]]) -> str:
    rows = []
    for stage, f in found.items():
        exact, sampled, apportioned = (
            f["exact_cpu_per_call"],
            f["sampled_cpu_per_call"],
            f["apportioned_cpu_per_call"],
        )
        read = f"{f['cpu_sampled_count']:,.0f} of {f['calls']:,.0f}"
        rows.append(
            (
                stage,
                read,
                _ns(exact),
                _ns(sampled),
                _percent(sampled, exact),
                _ns(apportioned),
                _percent(apportioned, exact),
            )
        )
    headers = ("stage", "entries read (a)", "exact ns", "(a) ns", "(a) off by", "(b) ns", "(b) off by")
    return _common.table(headers, rows)


def report(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    derived = {label: derive(run) for label, run in runs.items()}
    main = runs["c"] if "c" in runs else next(iter(runs.values()))
    targets = []
    for label, d in derived.items():
        value = d["stage [default, 1 in 64 (the default)]"]
        targets.append(
            (
                f"stage, counters=default, {label} <= 1/{STAGE_TARGET} of OTel histogram.record",
                f"{_common.ns(value)} ns = {_common.fraction(value, d['otel record'])}",
                _common.verdict(value <= d["otel record"] / STAGE_TARGET),
            )
        )
    parts = [
        "inferscope stage CPU clock benchmark",
        _common.environment_line(main["environment"]),
        f"method: median of {main['repeats']} round-robin repeats of one timeit loop per case; "
        "stage = tracked-with-stage - tracked in the same mode; before = every entry, after = 1 in 64; "
        "pure-Python figures come from a child process with its own OTel peer.",
        "",
        "Cost (each backend against the OTel histogram.record of its own process)",
        cost_table(derived),
        "",
        "Target (informational, nothing is asserted)",
        _common.table(("target", "measured", "result"), targets, left=2),
    ]
    if "exactness" in main:
        parts += [
            "",
            "CPU per call of each stage (C backend): (a) the sample, (b) the inference's CPU by wall share",
            exactness_table(main["exactness"]),
        ]
    dropped = {label: run["dropped"] for label, run in runs.items()}
    total = sum(sum(c.values()) for d in dropped.values() for c in d.values())
    parts += ["", f"records dropped during the timed loops: {total or 'none'}"]
    return "\n".join(parts), {"runs": runs, "derived": derived}


def main(argv: list[str] | None = None) -> int:
    return _common.run_main(__file__, __doc__, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
