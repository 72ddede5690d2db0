"""The regression detector on replayed window streams: false alarms per 30 days, detection rate and delay.

The noise is real: benchmarks/fixtures/detector_recording.json.gz holds segments of one-second
windows recorded from the demo service (``inferscope.cli.demo_tax.TaxService``: preprocess, an
OpenBLAS infer, postprocess; one BLAS thread, ~90 calls/s) serving a steady load at nice 19 on a
shared 2-core VM, whose neighbours load it heavily for long stretches. A stream is built by
resampling the segments in blocks of 20 consecutive windows (so bursts and drifts keep their shape),
and each window stands for one ``window_seconds`` (a minute) of the simulated service. ``--merge K``
merges every K recorded seconds into one window first: the noise of K times more calls, and the
neighbours' bursts stretched 60/K times instead of 60 times. Injections scale the durations (each
value of the histogram) and the CPU of one stage (the inference grows by what that stage added in
the same window) or of every stage, by a step at a random time after the anchor, or by a trend
growing 1% an hour.

Settings are the defaults: 60-s windows, an anchor of 3600 s, threshold 0.2, sustain 3600 s, p95.
Every regression opened on steady service is printed with the rule that opened it, the machine's
figures over its windows and the windows' own figures against the anchor.

    python benchmarks/detector.py            # 30 simulated days and 10 trials per case (minutes)
    python benchmarks/detector.py --quick    # 5 days, 4 trials
    python benchmarks/detector.py --merge 10 # windows of ten recorded seconds each

Record another segment with ``python benchmarks/detector.py --record SECONDS --append`` (it serves
the demo service in this process; run it under ``nice -n 19``), or replace the fixture without
``--append``.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common
import numpy as np

from inferscope.detector import Detector, DetectorSettings, Regression
from inferscope.histogram import Histogram
from inferscope.recorder import histogram_from_json, histogram_to_json
from inferscope.windows import KeyWindow, ProcessWindow, Window

#: The long recording the benchmark replays (segments of one-second windows, gzip JSON).
RECORDING = Path(__file__).with_name("fixtures") / "detector_recording.json.gz"
#: A short recording (242 one-second windows, JSON) whose stretches tests/test_detector.py replays.
FIXTURE = Path(__file__).with_name("fixtures") / "detector_windows.json"
SETTINGS = DetectorSettings()
BLOCK = 20
DAY = 86400.0
START = 1_800_000_000.0


# --- the fixture -----------------------------------------------------------------------------


def record(seconds: float, pause_seconds: float, append: bool) -> None:
    """Serve the demo service steadily for ``seconds`` with one-second windows into a fresh flight
    recorder, then write the recorded windows to the fixture (gzip-compressed JSON) as a segment of
    their own, after the fixture's segments with ``append``."""
    import threading

    import inferscope
    from inferscope.cli.demo_tax import MODEL, TaxService, run_load
    from inferscope.history import HistoryStore
    from inferscope.recorder import FlightRecorder

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "recorder.sqlite")
        inferscope.configure(
            window_seconds=1.0,
            counters="thread_cpu,python_heap",
            metrics_exporters=(),
            recorder=path,
            recorder_max_bytes=1 << 30,
        )
        _quiet()
        service = TaxService(blas_threads=1)
        stop = threading.Event()
        load = threading.Thread(
            target=run_load, args=(service, stop), kwargs={"pause_seconds": pause_seconds}, daemon=True
        )
        began = time.time()
        load.start()
        try:
            stop.wait(seconds)
        finally:
            stop.set()
            load.join(timeout=10)
        time.sleep(2.5)  # the last windows close and reach the recorder
        windows = HistoryStore(FlightRecorder(path)).windows(None, MODEL)
    rows = [_window_to_json(w) for w in windows[2:-1]]  # not the start-up nor the last (partial) ones
    segments = []
    if append and RECORDING.exists():
        with gzip.open(RECORDING, "rt", encoding="utf-8") as source:
            segments = json.load(source)["segments"]
    segments.append(
        {
            "source": "inferscope.cli.demo_tax.TaxService, one BLAS thread, steady load "
            f"(a pause of {pause_seconds * 1000:g} ms between calls), one-second windows",
            "recorded_unix": began,
            "seconds": seconds,
            "host_cpus": os.cpu_count(),
            "windows": rows,
        }
    )
    RECORDING.parent.mkdir(exist_ok=True)
    with gzip.open(RECORDING, "wt", encoding="utf-8") as out:
        json.dump({"segments": segments}, out, separators=(",", ":"))
    total = sum(len(segment["windows"]) for segment in segments)
    print(
        f"recorded {len(rows)} windows; {RECORDING} holds {total} in {len(segments)} "
        f"segment(s), {RECORDING.stat().st_size / 1e6:.2f} MB"
    )


def _window_to_json(w: Window) -> dict[str, Any]:
    return {
        "seconds": w.seconds,
        "process": {k: v for k, v in vars(w.process).items() if v is not None},
        "keys": [
            {
                "stage": k.stage,
                "count": k.count,
                "errors": k.errors,
                "duration": json.loads(histogram_to_json(k.duration)),
                "wall_seconds": k.wall_seconds,
                "cpu_seconds": k.cpu_seconds,
                "cpu_wall_seconds": k.cpu_wall_seconds,
                "process_cpu_seconds": k.process_cpu_seconds,
                "counters": dict(k.counters),
                "size_sum": k.size_sum,
                "size_count": k.size_count,
            }
            for k in w.keys
        ],
    }


def load_fixture(merge: int = 1, path: Path = FIXTURE) -> list[dict[str, Any]]:
    """The recorded windows of ``path`` (a JSON list of windows, or gzip JSON segments of them),
    oldest first. With ``merge`` > 1, every ``merge`` consecutive recorded windows of a segment
    become one: the noise of a longer window (more calls in each), and bursts of the neighbours'
    load stretched ``merge`` times less when each window stands for a minute of the service."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as source:
            data = json.load(source)
    else:
        data = json.loads(path.read_text())
    segments: list[dict[str, Any]] = (
        [segment["windows"] for segment in data["segments"]] if "segments" in data else [data["windows"]]
    )
    windows = []
    for segment in segments:
        for w in segment:
            for k in w["keys"]:
                k["duration"] = histogram_from_json(k["duration"])
        if merge > 1:
            segment = [_merge(segment[i : i + merge]) for i in range(0, len(segment) - merge + 1, merge)]
        windows.extend(segment)
    return windows


def _merge(group: list[dict[str, Any]]) -> dict[str, Any]:
    keys: dict[Any, dict[str, Any]] = {}
    for w in group:
        for k in w["keys"]:
            into = keys.get(k["stage"])
            if into is None:
                keys[k["stage"]] = dict(k, duration=k["duration"].copy(), counters=dict(k["counters"]))
                continue
            into["duration"].merge(k["duration"])
            for name in ("count", "errors", "wall_seconds", "cpu_wall_seconds", "size_sum", "size_count"):
                into[name] += k[name]
            for name in ("cpu_seconds", "process_cpu_seconds"):
                if k[name] is not None:
                    into[name] = (into[name] or 0.0) + k[name]
            for name, value in k["counters"].items():
                into["counters"][name] = into["counters"].get(name, 0.0) + value
    process = dict(group[len(group) // 2]["process"])
    for name in (
        "canary_wall_seconds",
        "canary_cpu_seconds",
        "canary_wait_seconds",
        "cpu_pressure",
        "steal_fraction",
    ):
        values = [w["process"][name] for w in group if w["process"].get(name) is not None]
        if values:
            process[name] = statistics.median(values)
    for name in ("process_cpu_seconds", "inference_cpu_seconds", "run_queue_seconds", "throttled_seconds"):
        values = [w["process"][name] for w in group if w["process"].get(name) is not None]
        if values:
            process[name] = sum(values)
    return {"seconds": sum(w["seconds"] for w in group), "process": process, "keys": list(keys.values())}


# --- streams -----------------------------------------------------------------------------------


def _scaled(hist: Histogram, factor: float) -> Histogram:
    """The histogram of the same calls each ``factor`` times as long (bucket midpoints)."""
    if factor == 1.0 or hist.count == 0:
        return hist
    offset, counts = hist._trimmed()
    base = 2.0 ** (2.0**-hist.scale)
    mids = base ** (np.arange(offset, offset + counts.size) + 0.5)
    values = np.repeat(mids, counts)
    return Histogram.of(np.concatenate([values, np.zeros(hist.zero_count)]) * factor)


class Stream:
    """A block-resampled stream of the recorded windows, with an optional injection."""

    def __init__(self, recorded: list[dict[str, Any]], seed: int) -> None:
        self.recorded = recorded
        self.rng = random.Random(seed)
        self.start = START
        self._block: list[dict[str, Any]] = []

    def _next_recorded(self) -> dict[str, Any]:
        if not self._block:
            first = self.rng.randrange(0, max(1, len(self.recorded) - BLOCK))
            self._block = list(self.recorded[first : first + BLOCK])
        return self._block.pop(0)

    def window(self, index: int, factor_of: Callable[[str | None, int], float] | None = None) -> Window:
        """Window ``index`` of the stream; ``factor_of(stage, index)`` scales each key's time and CPU."""
        raw = self._next_recorded()
        factors = {k["stage"]: factor_of(k["stage"], index) if factor_of else 1.0 for k in raw["keys"]}
        return self._build(raw, index, factors)

    def injected_window(self, index: int, injected: str | None, factor: float) -> Window:
        """Window ``index`` with the time and CPU of stage ``injected`` (None: of every stage) scaled
        by ``factor``; for one stage, the inference grows by what that stage added in the window."""
        raw = self._next_recorded()
        if injected is None or factor == 1.0:
            return self._build(raw, index, {k["stage"]: factor for k in raw["keys"]}, scale_process=True)
        factors = {k["stage"]: factor if k["stage"] == injected else 1.0 for k in raw["keys"]}
        stage = next((k for k in raw["keys"] if k["stage"] == injected), None)
        inference = next((k for k in raw["keys"] if k["stage"] is None), None)
        extra_cpu = 0.0
        if stage is not None and inference is not None and inference["wall_seconds"] > 0:
            factors[None] = 1.0 + stage["wall_seconds"] * (factor - 1.0) / inference["wall_seconds"]
            extra_cpu = (stage["cpu_seconds"] or 0.0) * (factor - 1.0)
        return self._build(raw, index, factors, extra_cpu=extra_cpu)

    def _build(
        self,
        raw: dict[str, Any],
        index: int,
        factors: dict[str | None, float],
        *,
        extra_cpu: float | None = None,
        scale_process: bool = False,
    ) -> Window:
        """The window of ``raw`` with each key's time and CPU scaled by its factor; with
        ``extra_cpu``, the inference's CPU grows by that many seconds instead (a stage's added
        CPU), and so do the process's."""
        start = self.start + index * SETTINGS.window_seconds
        keys = []
        for k in raw["keys"]:
            f = factors[k["stage"]]
            cpu, process_cpu = k["cpu_seconds"], k["process_cpu_seconds"]
            if k["stage"] is None and extra_cpu is not None:
                cpu = None if cpu is None else cpu + extra_cpu
                process_cpu = None if process_cpu is None else process_cpu + extra_cpu
            else:
                cpu = None if cpu is None else cpu * f
                process_cpu = None if process_cpu is None else process_cpu * f
            keys.append(
                KeyWindow(
                    "tax-demo",
                    "1",
                    k["stage"],
                    k["count"],
                    k["errors"],
                    _scaled(k["duration"], f),
                    k["wall_seconds"] * f,
                    cpu,
                    k["cpu_wall_seconds"] * f,
                    process_cpu,
                    k["counters"],
                    k["size_sum"],
                    k["size_count"],
                )
            )
        process = ProcessWindow(**raw["process"])
        added = extra_cpu or 0.0
        if scale_process:
            added = (process.inference_cpu_seconds or 0.0) * (factors.get(None, 1.0) - 1.0)
        if added:
            # The process spent what the injected work cost: its CPU and the inferences' share.
            process = replace(
                process,
                process_cpu_seconds=None
                if process.process_cpu_seconds is None
                else process.process_cpu_seconds + added,
                inference_cpu_seconds=None
                if process.inference_cpu_seconds is None
                else process.inference_cpu_seconds + added,
            )
        return Window("bench", start, start + SETTINGS.window_seconds, process, tuple(keys))


def _quiet() -> None:
    logging.getLogger("inferscope.regression").setLevel(logging.ERROR)


def _figure(detector: Detector, window: Window, stage: str | None, metric: str) -> float | None:
    """The figure the detector compares for one window: its p95, or CPU per call."""
    base = detector.anchor("tax-demo")
    key = next((k for k in window.keys if k.stage == stage), None)
    if key is None or base is None:
        return None
    if metric != "cpu":
        return key.duration.quantile(SETTINGS.quantile) if key.count else None
    stage_base = base.stage(stage)
    if stage is None and stage_base is not None and stage_base.process_cpu_per_call is not None:
        return None if key.process_cpu_seconds is None else key.process_cpu_seconds / key.count
    return None if key.cpu_seconds is None else key.cpu_seconds / key.count


def _alarm(detector: Detector, r: Regression) -> dict[str, Any]:
    """A regression opened on steady service, with the figures of the windows that opened it."""
    anchor = detector.anchor("tax-demo")
    base = anchor.stage(r.stage) if anchor is not None else None
    run = [w for w in detector.windows() if w.start_unix >= r.since - 1e-6]
    values = [v for v in (_figure(detector, w, r.stage, r.metric) for w in run) if v is not None]
    reference: tuple[float | None, float | None] = (None, None)
    if base is not None and r.metric == SETTINGS.metric_name:
        reference = (base.window_quantile, base.window_quantile_noise)
    elif base is not None and r.metric == "cpu":
        if r.stage is None and base.process_cpu_per_call is not None:
            reference = (base.process_cpu_per_call, base.process_cpu_per_call_noise)
        else:
            reference = (base.cpu_per_call, base.cpu_per_call_noise)
    ref, noise = reference
    machine = {}
    for name in ("cpu_pressure", "canary_wait_seconds"):
        run_values = [getattr(w.process, name) for w in run if getattr(w.process, name) is not None]
        then = getattr(anchor.process, name) if anchor is not None else None
        machine[name] = [then, statistics.median(run_values) if run_values else None]
    return {
        "cause": r.cause,
        "stage": r.stage,
        "metric": r.metric,
        "change": r.change,
        "shape": r.shape,
        "reference": r.evidence.get("reference"),
        "why": r.evidence.get("why"),
        "contention": r.evidence.get("contention"),
        "day": (r.since - START) / DAY,
        "windows": len(run),
        "machine": machine,
        "window_reference": ref,
        "window_noise": noise,
        "window_values": {
            "median": statistics.median(values) if values else None,
            "min": min(values) if values else None,
            "max": max(values) if values else None,
            "over_threshold": sum(1 for v in values if ref and v > ref * (1 + SETTINGS.threshold)),
        },
    }


def _machine_rose(machine: dict[str, list[float | None]]) -> bool:
    """Whether the machine's own figures over a regression's windows show more load than in the
    anchor: CPU pressure up 10 points, or the canary's wait for a core doubled."""
    (p_then, p_now), (w_then, w_now) = machine["cpu_pressure"], machine["canary_wait_seconds"]
    pressure = p_then is not None and p_now is not None and p_now - p_then >= 0.10
    wait = w_then is not None and w_now is not None and w_now >= 2 * w_then
    return pressure or wait


def false_alarms(
    recorded: list[dict[str, Any]], days: float, seed: int
) -> tuple[list[dict[str, Any]], float]:
    """(the regressions opened, with the figures that opened them; windows per second of replay)
    over ``days`` of steady service."""
    detector = Detector(SETTINGS)
    stream = Stream(recorded, seed)
    windows = int(days * DAY / SETTINGS.window_seconds)
    seen: set[tuple[Any, ...]] = set()
    alarms = []
    began = time.perf_counter()
    for index in range(windows):
        detector.on_window(stream.window(index))
        for r in detector.regressions():
            name = (r.stage, r.metric, r.since)
            if r.active and name not in seen and r.metric not in ("rss", "py_heap"):
                seen.add(name)
                alarms.append(_alarm(detector, r))
    elapsed = time.perf_counter() - began
    return alarms, windows / elapsed


def _anchor_windows() -> int:
    return math.ceil(SETTINGS.baseline_seconds / SETTINGS.window_seconds)


def detect(
    recorded: list[dict[str, Any]],
    *,
    stage: str | None,
    step: float,
    trend_per_hour: float,
    seed: int,
    hours: float,
) -> tuple[float, str] | None:
    """(hours from the injection to a regression that began with it, its cause); None when not
    found within ``hours``."""
    rng = random.Random(seed)
    detector = Detector(SETTINGS)
    stream = Stream(recorded, seed)
    begin = _anchor_windows() + rng.randrange(60, 240)  # an hour or more after the anchor
    per_hour = 3600.0 / SETTINGS.window_seconds
    injected = stream.start + begin * SETTINGS.window_seconds

    def factor_at(index: int) -> float:
        if index < begin:
            return 1.0
        if trend_per_hour:
            return 1.0 + trend_per_hour * (index - begin) / per_hour
        return 1.0 + step

    for index in range(begin + int(hours * per_hour)):
        detector.on_window(stream.injected_window(index, stage, factor_at(index)))
        if index < begin:
            continue
        # A stage's injection must be found on that stage; the whole inference's on any key of the
        # model (its stages rise with it, and the detector reports the rise where it happens).
        found = [
            r
            for r in detector.regressions()
            if r.active
            and r.metric not in ("rss", "py_heap", "cpu_wait")
            and (stage is None or r.stage == stage)
            and r.since >= injected - SETTINGS.window_seconds
        ]
        if found:
            return (index + 1 - begin) / per_hour, found[0].cause
    return None


def _case(
    recorded: list[dict[str, Any]], trials: int, **kwargs: Any
) -> tuple[float, float | None, dict[str, int]]:
    """(detection rate, median delay in hours, the causes named) over ``trials`` seeds."""
    results = [detect(recorded, seed=seed, **kwargs) for seed in range(trials)]
    found = [r for r in results if r is not None]
    causes: dict[str, int] = {}
    for _, cause in found:
        causes[cause] = causes.get(cause, 0) + 1
    delay = statistics.median(d for d, _ in found) if found else None
    return len(found) / trials, delay, causes


def main() -> int:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--days", type=float, default=30.0, help="simulated days of steady service (default 30)"
    )
    parser.add_argument("--trials", type=int, default=10, help="trials per injected case (default 10)")
    parser.add_argument("--record", type=float, metavar="SECONDS", help="re-record the fixture, then stop")
    parser.add_argument(
        "--append", action="store_true", help="--record: add a segment to the fixture's segments"
    )
    parser.add_argument(
        "--pause-ms", type=float, default=10.0, help="--record: pause between calls (default 10 ms)"
    )
    parser.add_argument(
        "--merge",
        type=int,
        default=1,
        help="recorded one-second windows merged into each simulated window (default 1: the noisiest)",
    )
    parser.add_argument(
        "--fixture", default=str(RECORDING), help="the recorded windows (default: %(default)s)"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        default=["preprocess", "infer", "inference"],
        help="the keys to inject into ('inference': every stage; default preprocess infer inference)",
    )
    args = parser.parse_args()
    if args.record:
        record(args.record, args.pause_ms / 1000.0, args.append)
        return 0
    _quiet()
    days, trials = (5.0, 4) if args.quick else (args.days, args.trials)
    recorded = load_fixture(args.merge, Path(args.fixture))
    windows = len(recorded)
    figures: dict[str, Any] = {
        "fixture_windows": windows,
        "merge": args.merge,
        "days": days,
        "trials": trials,
    }
    alarms, rate = false_alarms(recorded, days, seed=1)
    blamed = [a for a in alarms if a["cause"] != "contention"]
    confirmed = [a for a in alarms if a["cause"] == "contention" and _machine_rose(a["machine"])]
    figures["false_alarms"] = len(alarms)
    figures["false_alarms_per_30_days"] = len(alarms) / days * 30
    figures["false_blame_per_30_days"] = len(blamed) / days * 30
    figures["contention_with_the_machine_busier_per_30_days"] = len(confirmed) / days * 30
    figures["false_alarm_details"] = alarms
    figures["replay_windows_per_second"] = rate
    print(
        f"replay of {windows} recorded windows (each merging {args.merge} recorded second(s)) in "
        f"blocks of {BLOCK}; defaults: {SETTINGS}"
    )
    print(
        f"steady service, {days:g} simulated days: {len(alarms)} regression(s) opened "
        f"({len(alarms) / days * 30:.1f} per 30 days), {len(blamed)} of them blamed on a cause other "
        f"than contention; {rate:,.0f} windows/s replayed"
    )
    print(
        f"  {len(confirmed)} of the contention ones came while the recorded machine was busier than in "
        "the anchor (CPU pressure up 10 points, or the canary's wait for a core doubled): the "
        "neighbours' load, stretched by the replay"
    )
    for a in alarms:
        values = a["window_values"]
        print(
            f"  day {a['day']:.2f}: {a['cause']} {a['stage'] or '(inference)'} {a['metric']} "
            f"{a['change']:+.0%} ({a['shape']}, against the {a['reference']}): {a['why']}"
        )
        pressure, wait = a["machine"]["cpu_pressure"], a["machine"]["canary_wait_seconds"]
        if None not in pressure and None not in wait:
            print(
                f"    the machine over its windows (anchor -> run, medians): CPU pressure "
                f"{pressure[0]:.0%} -> {pressure[1]:.0%}, the canary's wait for a core "
                f"{wait[0] * 1e3:.2f} -> {wait[1] * 1e3:.2f} ms"
            )
        if a["window_reference"] is not None:
            print(
                f"    its {a['windows']} windows: median {values['median']:.4g}, {values['min']:.4g} to "
                f"{values['max']:.4g}, {values['over_threshold']} above +{SETTINGS.threshold:.0%}; "
                f"anchor {a['window_reference']:.4g}, noise {a['window_noise']:.3g}"
            )
    header = f"{'injected':<16} {'key':<12} {'detected':>9} {'median delay':>13}  causes named"
    print(f"\n{header}")
    for stage in args.stages:
        where = "(inference)" if stage == "inference" else stage
        key = None if stage == "inference" else stage
        cases = [(f"step +{step:.0%}", step, 0.0, 4.0, trials) for step in (0.1, 0.2, 0.5)]
        cases.append(("trend +1%/hour", 0.0, 0.01, 40.0, max(2, trials // 2)))
        for name, step, trend, hours, count in cases:
            found, delay, causes = _case(
                recorded, count, stage=key, step=step, trend_per_hour=trend, hours=hours
            )
            figures[f"{name} {where}"] = {"detected": found, "median_delay_hours": delay, "causes": causes}
            shown = "-" if delay is None else f"{delay:.2f} h"
            named = ", ".join(f"{c} {n}" for c, n in sorted(causes.items()))
            print(f"{name:<16} {where:<12} {found:>9.0%} {shown:>13}  {named}")
    print(
        "\nA step under the threshold (+10% < 20%) is not a regression by the rule; a trend of 1%/hour "
        "crosses +20% after ~20 h and is reported once it stayed above for the sustain time. A stage's "
        "injection raises the inference by what the stage added in each window."
    )
    _common.write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
