"""The regression detector on replayed window streams: false alarms per day, detection rate and delay.

The noise is real: benchmarks/fixtures/detector_windows.json holds windows recorded from a real run
of the demo service (``inferscope.cli.demo_tax.TaxService``, three stages) on a shared 2-core VM,
one-second windows. A stream is built by resampling that recording in blocks of consecutive windows
(so bursts and drifts keep their shape), and each window stands for one ``window_seconds`` of the
simulated service: the noise is that of one-second windows, larger than a minute's would be, so
the figures are conservative. Injections scale the durations (each value of the histogram) and the
CPU of a stage, or of every stage of the inference, by a step at a random time after the anchor, or
by a trend growing 1% an hour.

Settings are the defaults: 60-s windows, an anchor of 3600 s, threshold 0.2, sustain 3600 s, p95.

    python benchmarks/detector.py            # 30 simulated days and 10 trials per case (minutes)
    python benchmarks/detector.py --quick    # 5 days, 4 trials

Re-record the fixture with ``python benchmarks/detector.py --record SECONDS`` (runs the service).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

from inferscope.aggregate import Histogram
from inferscope.detector import Detector, DetectorSettings
from inferscope.recorder import histogram_from_json, histogram_to_json
from inferscope.windows import KeyWindow, ProcessWindow, Window

FIXTURE = Path(__file__).with_name("fixtures") / "detector_windows.json"
SETTINGS = DetectorSettings()
BLOCK = 20
DAY = 86400.0


# --- the fixture -----------------------------------------------------------------------------


def record(seconds: float) -> None:
    """Run the demo service steadily for ``seconds`` with one-second windows and write the fixture."""
    from inferscope.history import HistoryStore
    from inferscope.recorder import FlightRecorder

    service = Path(__file__).resolve().parents[1] / "tests" / "scenarios" / "service.py"
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "recorder.sqlite")
        subprocess.run(
            [
                sys.executable,
                str(service),
                "control",
                "--baseline-seconds",
                "5",
                "--inject-seconds",
                str(seconds),
            ],
            env=dict(os.environ, INFERSCOPE_RECORDER=path),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        windows = HistoryStore(FlightRecorder(path)).windows(None, "tax-demo")
    rows = []
    for w in windows[2:-1]:  # not the first (start-up) nor the last (partial) windows
        rows.append(
            {
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
        )
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(
        json.dumps({"source": "tests/scenarios/service.py control, 1-s windows", "windows": rows})
    )
    print(f"recorded {len(rows)} windows to {FIXTURE}")


def load_fixture(merge: int = 1) -> list[dict[str, Any]]:
    """The recorded windows; with ``merge`` > 1, each one merges that many consecutive recorded
    windows (a sliding merge, so the recording keeps its length): closer to the noise of a longer
    window, where a burst of a few seconds is diluted."""
    windows: list[dict[str, Any]] = json.loads(FIXTURE.read_text())["windows"]
    for w in windows:
        for k in w["keys"]:
            k["duration"] = histogram_from_json(k["duration"])
    if merge <= 1:
        return windows
    return [_merge(windows[i : i + merge]) for i in range(len(windows) - merge + 1)]


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
    for name in ("canary_wall_seconds", "canary_cpu_seconds", "cpu_pressure", "steal_fraction"):
        values = [w["process"][name] for w in group if w["process"].get(name) is not None]
        if values:
            process[name] = statistics.median(values)
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
        self.start = 1_800_000_000.0
        self._block: list[dict[str, Any]] = []

    def _next_recorded(self) -> dict[str, Any]:
        if not self._block:
            first = self.rng.randrange(0, max(1, len(self.recorded) - BLOCK))
            self._block = list(self.recorded[first : first + BLOCK])
        return self._block.pop(0)

    def window(self, index: int, factor_of: Any = None) -> Window:
        """Window ``index`` of the stream; ``factor_of(stage, t)`` scales a key's time and CPU."""
        raw = self._next_recorded()
        start = self.start + index * SETTINGS.window_seconds
        keys = []
        for k in raw["keys"]:
            factor = factor_of(k["stage"], index) if factor_of is not None else 1.0
            keys.append(
                KeyWindow(
                    "tax-demo",
                    "1",
                    k["stage"],
                    k["count"],
                    k["errors"],
                    _scaled(k["duration"], factor),
                    k["wall_seconds"] * factor,
                    None if k["cpu_seconds"] is None else k["cpu_seconds"] * factor,
                    k["cpu_wall_seconds"] * factor,
                    None if k["process_cpu_seconds"] is None else k["process_cpu_seconds"] * factor,
                    k["counters"],
                    k["size_sum"],
                    k["size_count"],
                )
            )
        return Window(
            "bench", start, start + SETTINGS.window_seconds, ProcessWindow(**raw["process"]), tuple(keys)
        )


def _quiet() -> None:
    logging.getLogger("inferscope.regression").setLevel(logging.ERROR)


def false_alarms(recorded: list[dict[str, Any]], days: float, seed: int) -> tuple[list[str], float]:
    """(the causes of the regressions opened, windows per second of replay) over ``days`` of
    steady service."""
    detector = Detector(SETTINGS)
    stream = Stream(recorded, seed)
    windows = int(days * DAY / SETTINGS.window_seconds)
    began = time.perf_counter()
    for index in range(windows):
        detector.on_window(stream.window(index))
    elapsed = time.perf_counter() - began
    opened = [r.cause for r in detector.regressions() if r.metric not in ("rss", "py_heap")]
    return opened, windows / elapsed


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
) -> float | None:
    """Hours from the injection to a regression that began with it (None: not within ``hours``)."""
    rng = random.Random(seed)
    detector = Detector(SETTINGS)
    stream = Stream(recorded, seed)
    begin = _anchor_windows() + rng.randrange(60, 240)  # an hour or more after the anchor
    per_hour = 3600.0 / SETTINGS.window_seconds

    def factor_of(key_stage: str | None, index: int) -> float:
        if index < begin or (stage is not None and key_stage not in (stage, None)):
            return 1.0
        if trend_per_hour:
            return 1.0 + trend_per_hour * (index - begin) / per_hour
        return 1.0 + step

    for index in range(begin + int(hours * per_hour)):
        detector.on_window(stream.window(index, factor_of))
        # A stage's injection must be found on that stage; the whole inference's on any key of the
        # model (its stages rise with it, and the detector reports the rise where it happens).
        injected = stream.start + begin * SETTINGS.window_seconds
        found = [
            r
            for r in detector.regressions()
            if r.active
            and (stage is None or r.stage == stage)
            and r.since >= injected - SETTINGS.window_seconds
        ]
        if found and index >= begin:
            return (index + 1 - begin) / per_hour
    return None


def _case(recorded: list[dict[str, Any]], trials: int, **kwargs: Any) -> tuple[float, float | None]:
    delays = [detect(recorded, seed=seed, **kwargs) for seed in range(trials)]
    found = [d for d in delays if d is not None]
    return len(found) / trials, statistics.median(found) if found else None


def main() -> int:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--days", type=float, default=30.0, help="simulated days of steady service (default 30)"
    )
    parser.add_argument("--trials", type=int, default=10, help="trials per injected case (default 10)")
    parser.add_argument("--record", type=float, metavar="SECONDS", help="re-record the fixture, then stop")
    parser.add_argument(
        "--merge",
        type=int,
        default=1,
        help="recorded one-second windows merged into each simulated window (default 1: the noisiest)",
    )
    args = parser.parse_args()
    if args.record:
        record(args.record)
        return 0
    _quiet()
    days, trials = (5.0, 4) if args.quick else (args.days, args.trials)
    recorded = load_fixture(args.merge)
    figures: dict[str, Any] = {
        "fixture_windows": len(recorded),
        "merge": args.merge,
        "days": days,
        "trials": trials,
    }
    causes, rate = false_alarms(recorded, days, seed=1)
    blamed = [c for c in causes if c != "contention"]
    figures["false_alarms_per_day"] = len(causes) / days
    figures["false_blame_per_day"] = len(blamed) / days
    figures["replay_windows_per_second"] = rate
    print(
        f"replay of {len(recorded)} recorded windows (each merging {args.merge} recorded second(s)) in "
        f"blocks of {BLOCK}; defaults: {SETTINGS}"
    )
    print(
        f"steady service, {days:g} simulated days: {len(causes)} regression(s) opened "
        f"({len(causes) / days:.3f} per day), {len(blamed)} of them blamed on a cause other than "
        f"contention ({len(blamed) / days:.3f} per day); {rate:,.0f} windows/s replayed"
    )
    print(
        "  (the recording comes from a shared VM whose neighbours load it in bursts: a burst that lasts "
        "the sustain time is real contention)"
    )
    print(f"\n{'injected':<30} {'key':<12} {'detected':>9} {'median delay':>14}")
    for stage in ("infer", None):
        where = stage or "(inference)"
        for step in (0.1, 0.2, 0.5):
            rate_found, delay = _case(recorded, trials, stage=stage, step=step, trend_per_hour=0.0, hours=4)
            figures[f"step_{step:g}_{where}"] = {"detected": rate_found, "median_delay_hours": delay}
            shown = "-" if delay is None else f"{delay:.2f} h"
            print(f"{f'step +{step:.0%}':<30} {where:<12} {rate_found:>9.0%} {shown:>14}")
        rate_found, delay = _case(
            recorded, max(2, trials // 2), stage=stage, step=0.0, trend_per_hour=0.01, hours=40
        )
        figures[f"trend_1pct_per_hour_{where}"] = {"detected": rate_found, "median_delay_hours": delay}
        shown = "-" if delay is None else f"{delay:.1f} h"
        print(f"{'trend +1%/hour':<30} {where:<12} {rate_found:>9.0%} {shown:>14}")
    print(
        "\nA step under the threshold (+10% < 20%) is not a regression by the rule; a trend of 1%/hour "
        "crosses +20% after ~20 h and is reported once it stayed above for the sustain time."
    )
    _common.write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
