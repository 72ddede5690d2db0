"""The machine canary: what it costs, and how far it moves when the machine is contended.

    python3 benchmarks/canary.py            # ~60 s
    python3 benchmarks/canary.py --quick    # ~20 s

Cost: the CPU time of one run (SHA-256 over 64 KiB), and the share of a core it takes at the
drainer's pace (one run per ``Canary.interval_seconds``), next to the share one OTel SDK
``histogram.record`` per second would take, measured in the same run.

Sensitivity: the canary runs as it does in a service (one run, a short sleep, again) while real
processes compete for the CPUs: none, then spinning hogs (pure CPU), one and two per core, and
memory hogs (streaming over 64 MiB), one per core. Each phase prints, per window of 20 runs, the
median wall and CPU time of a run and the canary thread's wait for a core per wake-up, their
ratios to the quiet phase, and the noise between windows (1.4826 x MAD), the figure a detector
compares a rise with.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider

from inferscope.system.canary import Canary, CanaryResult


def _spin(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def _stream(stop_at: float) -> None:
    import numpy as np

    data = np.ones(8 * 2**20)  # 64 MiB, far beyond any last-level cache here
    while time.monotonic() < stop_at:
        data.sum()


def _phase(canary: Canary, windows: int, runs_per_window: int, pause: float) -> list[CanaryResult]:
    """The canary as the drainer runs it (one run, a sleep, again), in short windows."""
    results = []
    for _ in range(windows):
        for _ in range(runs_per_window):
            canary.maybe_run()
            time.sleep(pause)
        results.append(canary.take())
    return results


def _noise(values: list[float]) -> float:
    center = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - center) for v in values)


def cost(repeats: int) -> dict[str, float]:
    canary = Canary()
    cpus = sorted(canary.run()[1] for _ in range(repeats))
    per_run = cpus[len(cpus) // 2]
    histogram = MeterProvider().get_meter("bench").create_histogram("h")
    attributes = {"a": "1", "b": "2"}
    start = time.thread_time_ns()
    for _ in range(repeats):
        histogram.record(0.1, attributes)
    record = (time.thread_time_ns() - start) / repeats / 1e9
    share = per_run / canary.interval_seconds
    return {
        "run_cpu_us": per_run * 1e6,
        "runs_per_second": 1 / canary.interval_seconds,
        "core_share_percent": share * 100,
        "otel_record_us": record * 1e6,
        "runs_cost_in_otel_records": per_run / record,
    }


def sensitivity(windows: int, pause: float) -> list[dict[str, Any]]:
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("fork")
    canary = Canary(interval_seconds=0.0)
    _phase(canary, 1, 20, 0.0)  # warm up
    phases: list[dict[str, Any]] = []
    quiet: dict[str, float] = {}
    for name, target, hogs in (
        ("quiet", None, 0),
        ("spin x cores", _spin, cores),
        ("spin x 2 cores", _spin, 2 * cores),
        ("stream x cores", _stream, cores),
        ("quiet again", None, 0),
    ):
        seconds = windows * 20 * (pause + 0.0002) + 2.0
        workers = [context.Process(target=target, args=(time.monotonic() + seconds,)) for _ in range(hogs)]
        for worker in workers:
            worker.start()
        if workers:
            time.sleep(0.5)
        results = _phase(canary, windows, 20, pause)
        for worker in workers:
            worker.terminate()
            worker.join()
        walls = [r.wall_seconds for r in results if r.wall_seconds is not None]
        cpus = [r.cpu_seconds for r in results if r.cpu_seconds is not None]
        waits = [r.wait_seconds for r in results if r.wait_seconds is not None]
        figures = {
            "wall": statistics.median(walls),
            "cpu": statistics.median(cpus),
            "wait": statistics.median(waits) if waits else float("nan"),
        }
        quiet = quiet or figures
        phases.append(
            {
                "phase": name,
                "wall_us": figures["wall"] * 1e6,
                "cpu_us": figures["cpu"] * 1e6,
                "wait_us": figures["wait"] * 1e6,
                "wall_ratio": figures["wall"] / quiet["wall"],
                "cpu_ratio": figures["cpu"] / quiet["cpu"],
                "wait_ratio": figures["wait"] / quiet["wait"] if quiet["wait"] else float("nan"),
                "wall_noise_percent": 100 * _noise(walls) / figures["wall"],
                "wait_noise_percent": 100 * _noise(waits) / figures["wait"] if waits else float("nan"),
            }
        )
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs per phase")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    windows = 8 if args.quick else 25
    figures = {"cost": cost(2000 if args.quick else 10000), "sensitivity": sensitivity(windows, 0.01)}
    c = figures["cost"]
    print(
        f"cost: {c['run_cpu_us']:.1f} us CPU per run, {c['runs_per_second']:g} runs/s = "
        f"{c['core_share_percent']:.4f}% of a core; one run costs {c['runs_cost_in_otel_records']:.1f} "
        f"OTel histogram.record calls ({c['otel_record_us']:.2f} us each)"
    )
    print("per window of 20 runs (medians over the windows); noise = 1.4826 x MAD between windows")
    header = (
        "phase",
        "wall us",
        "cpu us",
        "wait us",
        "wall x",
        "cpu x",
        "wait x",
        "wall noise%",
        "wait noise%",
    )
    print(f"{header[0]:<16}" + "".join(f"{h:>12}" for h in header[1:]))
    for p in figures["sensitivity"]:
        cells = ("wall_us", "cpu_us", "wait_us", "wall_ratio", "cpu_ratio", "wait_ratio")
        print(
            f"{p['phase']:<16}"
            + "".join(f"{p[c]:12.2f}" for c in cells)
            + f"{p['wall_noise_percent']:12.1f}{p['wait_noise_percent']:12.1f}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
