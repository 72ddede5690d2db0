"""What sampling a regressed stage's stacks costs the service while it runs.

    python3 benchmarks/profile_sampler.py [--quick] [--json PATH]

A tracked model with three stages (Python work in ``infer``, a short wait between calls, as a
service waits for its next request) runs on 1 and on 4 serving threads for a fixed time per trial,
and its calls per second are counted. Trials alternate, in the same run:

- ``plain``: no sampling;
- ``sampler``: the stack sampler of profile/sampler.py sampling ``infer`` for the whole trial, as it
  does for 10 s when a regression opens (100 Hz, its CPU kept under 1% of the time, the GIL's switch
  interval at 0.5 ms);
- ``cProfile``: the peer people reach for, enabled on every serving thread for the trial (on 3.12+
  one profiler sees every thread; before, one per thread through ``threading.setprofile``).

The slowdown of each against ``plain`` is the median of per-round ratios. The target (printed, not
asserted) is a slowdown of at most 2% for the sampler. Also printed: the samples it took inside
``infer`` and its own CPU time per second.
"""

from __future__ import annotations

import cProfile
import statistics
import sys
import threading
import time
from typing import Any

import _common

import inferscope
from inferscope.detector import Regression
from inferscope.profile.sampler import StackSampler

TARGET_SLOWDOWN = 0.02


def features(batch: list[float]) -> list[float]:
    return [v * 0.5 + 1.0 for v in batch]


def crunch(row: list[float]) -> float:
    total = 0.0
    for _ in range(40):
        for v in row:
            total += v * v
    return total


@inferscope.track_inference(model="bench-sampled")
def predict(batch: list[float]) -> float:
    with inferscope.stage("preprocess"):
        row = features(batch)
    with inferscope.stage("infer"):
        score = crunch(row)
    with inferscope.stage("postprocess"):
        return round(score, 3)


def _serve(stop: threading.Event, counts: list[int], index: int, profile: bool) -> None:
    batch = [float(i % 13) for i in range(64)]
    profiler = cProfile.Profile() if profile and sys.version_info < (3, 12) else None
    if profiler is not None:
        profiler.enable()
    calls = 0
    while not stop.is_set():
        predict(batch)
        calls += 1
        time.sleep(0.0002)  # the wait for the next request
    if profiler is not None:
        profiler.disable()
    counts[index] = calls


def trial(kind: str, threads: int, seconds: float, sampler: StackSampler, round_: int) -> dict[str, Any]:
    stop = threading.Event()
    counts = [0] * threads
    shared = cProfile.Profile() if kind == "cProfile" and sys.version_info >= (3, 12) else None
    workers = [
        threading.Thread(target=_serve, args=(stop, counts, i, kind == "cProfile")) for i in range(threads)
    ]
    if shared is not None:
        shared.enable()
    before = (sampler.started, len(sampler.recent))
    if kind == "sampler":
        sampler.window_seconds = seconds + 0.2
        regression = Regression(
            "bench-sampled", f"r{round_}-{threads}", "infer", "more_work", "p95", 1.0, 2.0, 1.0,
            time.time(), "step", {}, True,
        )  # fmt: skip
        sampler.regression_opened("bench", regression)
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    if shared is not None:
        shared.disable()
    result: dict[str, Any] = {"calls_per_second": sum(counts) / elapsed}
    if kind == "sampler":
        deadline = time.monotonic() + 5
        while len(sampler.recent) == before[1] and time.monotonic() < deadline:
            time.sleep(0.01)
        payload = sampler.recent[-1].payload if len(sampler.recent) > before[1] else {}
        result["samples"] = payload.get("stage_samples", 0)
        result["sampler_cpu_per_second"] = payload.get("sampler_cpu_seconds", 0.0) / max(
            payload.get("seconds", 1.0), 1e-9
        )
    return result


def measure(quick: bool = False) -> dict[str, Any]:
    inferscope.configure(metrics_exporters=(), recorder="off", canary=False)
    sampler = StackSampler()
    seconds, rounds = (1.0, 3) if quick else (2.0, 7)
    figures: dict[str, Any] = {}
    for threads in (1, 4):
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "sampler": [], "cProfile": []}
        for round_ in range(rounds):
            order = ["plain", "sampler", "cProfile"] if round_ % 2 == 0 else ["cProfile", "sampler", "plain"]
            for kind in order:
                _common.progress(f"profile_sampler: {threads} thread(s), round {round_ + 1}/{rounds}: {kind}")
                runs[kind].append(trial(kind, threads, seconds, sampler, round_))
        slowdown = {
            kind: statistics.median(
                1.0 - r["calls_per_second"] / p["calls_per_second"]
                for r, p in zip(runs[kind], runs["plain"], strict=True)
            )
            for kind in ("sampler", "cProfile")
        }
        figures[str(threads)] = {
            "calls_per_second": {
                k: _common.median(r["calls_per_second"] for r in v) for k, v in runs.items()
            },
            "slowdown": slowdown,
            "samples_per_trial": _common.median(r["samples"] for r in runs["sampler"]),
            "sampler_cpu_per_second": _common.median(r["sampler_cpu_per_second"] for r in runs["sampler"]),
            "trial_seconds": seconds,
            "rounds": rounds,
            "runs": runs,
        }
    sampler.stop()
    inferscope.shutdown()
    return figures


def report(figures: dict[str, Any]) -> str:
    rows = []
    for threads, f in figures.items():
        calls = f["calls_per_second"]
        rows.append(
            [
                threads,
                _common.rate(calls["plain"]),
                _common.rate(calls["sampler"]),
                f"{f['slowdown']['sampler']:+.1%}",
                _common.rate(calls["cProfile"]),
                f"{f['slowdown']['cProfile']:+.1%}",
                f"{f['samples_per_trial']:.0f}",
                f"{f['sampler_cpu_per_second']:.2%}",
                _common.verdict(f["slowdown"]["sampler"] <= TARGET_SLOWDOWN),
            ]
        )
    headers = [
        "threads", "plain", "sampler", "slowdown", "cProfile", "slowdown", "samples in infer",
        "sampler CPU", f"sampler <= {TARGET_SLOWDOWN:.0%}",
    ]  # fmt: skip
    return _common.table(headers, rows)


def main() -> int:
    args = _common.base_parser(__doc__.split("\n")[0]).parse_args()
    load = _common.MachineLoad()
    figures = measure(quick=args.quick)
    print(_common.environment_line(_common.environment()))
    print("calls per second (median of trials) and slowdown against plain (median of per-round ratios)")
    print(report(figures))
    data = {"figures": figures, "machine_load": load.summary(), "environment": _common.environment()}
    print(_common.load_line(data["machine_load"]))
    _common.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
