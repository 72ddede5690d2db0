"""The regression detector's rules, on window streams built from known distributions.

Each stream has noise (lognormal durations, jittered CPU and host signals) drawn from a seeded
generator; the scenario tests in tests/scenarios/ run the same detector on a real service.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import inferscope
from inferscope.baseline import Baseline
from inferscope.detector import CAUSES, PRECEDENCE, Detector, DetectorSettings, Regression, theil_sen_slope
from inferscope.histogram import Histogram
from inferscope.windows import KeyWindow, ProcessWindow, Window

MB = 1024 * 1024
SETTINGS = DetectorSettings(window_seconds=1.0, baseline_seconds=10.0, threshold=0.2, sustain_seconds=4.0)


class Stream:
    """Builds one window per second of a model with stages ``preprocess`` and ``infer``."""

    def __init__(self, seed: int = 1, calls: int = 100) -> None:
        self.rng = np.random.default_rng(seed)
        self.t = 1_000_000.0
        self.calls = calls
        self.stage_ms = {"preprocess": 2.0, "infer": 8.0}
        self.cpu_share = {"preprocess": 0.95, "infer": 0.95}
        self.size = 32.0
        self.version = "1"
        self.process: dict[str, Any] = {
            "rss_bytes": 200 * MB,
            "canary_wall_seconds": 1e-4,
            "canary_cpu_seconds": 1e-4,
            "canary_runs": 2,
            "cpu_pressure": 0.02,
            "steal_fraction": 0.0,
            "throttled_seconds": 0.0,
            "cpu_model": "Test CPU",
            "cpu_count": 2.0,
            "fingerprint": "aaaa",
        }
        self.heap_growth: dict[str, float] = {}
        #: Process CPU per call outside the stages' threads (library thread pools), in seconds.
        self.helper_cpu = 0.0

    def window(self) -> Window:
        keys = []
        totals = np.zeros(self.calls)
        cpu_total = 0.0
        counters_total: dict[str, float] = {}
        for stage, ms in self.stage_ms.items():
            seconds = self.rng.lognormal(np.log(ms / 1e3), 0.15, self.calls)
            totals += seconds
            cpu = float(seconds.sum()) * self.cpu_share[stage] * self.rng.uniform(0.97, 1.03)
            cpu_total += cpu
            counters = {}
            if stage in self.heap_growth:
                counters["py_heap_change_bytes"] = self.heap_growth[stage]
            keys.append(
                KeyWindow(
                    "fraud",
                    self.version,
                    stage,
                    self.calls,
                    0,
                    Histogram.of(seconds),
                    float(seconds.sum()),
                    cpu,
                    float(seconds.sum()),
                    counters=counters,
                )
            )
        keys.insert(
            0,
            KeyWindow(
                "fraud",
                self.version,
                None,
                self.calls,
                0,
                Histogram.of(totals),
                float(totals.sum()),
                cpu_total,
                float(totals.sum()),
                process_cpu_seconds=cpu_total + self.helper_cpu * self.calls,
                counters=counters_total,
                size_sum=self.size * self.calls,
                size_count=self.calls,
            ),
        )
        noisy = dict(self.process)
        noisy["canary_wall_seconds"] *= self.rng.uniform(0.95, 1.05)
        if noisy.get("canary_wait_seconds") is not None:
            noisy["canary_wait_seconds"] *= self.rng.uniform(0.8, 1.2)
        window = Window("svc", self.t, self.t + 1.0, ProcessWindow(**noisy), tuple(keys))
        self.t += 1.0
        return window

    def run(self, detector: Detector, seconds: int) -> None:
        for _ in range(seconds):
            detector.on_window(self.window())


def steady(seconds: int = 12, **kwargs: Any) -> tuple[Detector, Stream]:
    detector = Detector(SETTINGS, **kwargs)
    stream = Stream()
    stream.run(detector, seconds)
    assert detector.anchor("fraud") is not None
    return detector, stream


def active(detector: Detector) -> list[Regression]:
    return [r for r in detector.regressions() if r.active]


def test_regression_has_exactly_the_documented_fields():
    assert [f.name for f in fields(Regression)] == [
        "model",
        "version",
        "stage",
        "cause",
        "metric",
        "baseline_value",
        "current_value",
        "change",
        "since",
        "shape",
        "evidence",
        "active",
    ]
    assert inferscope.regressions is not None
    assert set(PRECEDENCE) < set(CAUSES) and len(CAUSES) == 9


def test_steady_service_raises_nothing():
    detector, stream = steady()
    stream.run(detector, 120)
    assert detector.regressions() == []
    assert detector.errors == 0


def test_slower_stage_is_more_work_in_that_stage_only():
    detector, stream = steady()
    stream.stage_ms["preprocess"] = 8.0  # 4x, on the CPU
    stream.run(detector, 8)
    found = active(detector)
    assert [(r.stage, r.cause) for r in found] == [("preprocess", "more_work"), ("preprocess", "more_work")]
    assert {r.metric for r in found} == {"p95", "cpu"}
    p95 = next(r for r in found if r.metric == "p95")
    assert p95.change > 1.5
    assert p95.shape == "step"
    assert p95.evidence["candidates"]["contention"].startswith("canary")
    assert p95.since == pytest.approx(1_000_012.0)


def test_a_rise_shorter_than_the_sustain_time_is_dropped():
    detector, stream = steady()
    stream.stage_ms["infer"] = 30.0
    stream.run(detector, 3)  # sustain is 4 s
    stream.stage_ms["infer"] = 8.0
    stream.run(detector, 20)
    assert detector.regressions() == []


def test_a_cost_that_moved_between_stages_is_not_raised():
    detector, stream = steady()
    stream.stage_ms.update(preprocess=6.0, infer=4.0)  # the total stays 10 ms
    stream.run(detector, 12)
    assert active(detector) == []


def test_too_few_calls_are_not_enough():
    detector = Detector(SETTINGS)
    stream = Stream(calls=4)
    stream.run(detector, 12)
    stream.stage_ms["infer"] = 40.0
    stream.run(detector, 10)
    assert [r for r in active(detector) if r.metric == "p95"] == []


def test_contention_when_the_canary_slows_even_with_cpu_up():
    detector, stream = steady()
    # Every stage slows; infer's BLAS helpers spin while they wait: its CPU rises, its waiting more.
    stream.stage_ms.update(preprocess=4.0, infer=24.0)
    stream.cpu_share.update(preprocess=0.6, infer=0.5)
    stream.process.update(canary_wall_seconds=3e-4, cpu_pressure=0.6)
    stream.run(detector, 8)
    found = active(detector)
    assert found and {r.cause for r in found} == {"contention"}
    evidence = next(r for r in found if r.stage == "infer" and r.metric == "cpu").evidence
    assert evidence["canary_ratio"] > 2
    assert any("CPU per call rose too" in s for s in evidence["contention"])
    assert any("off the CPU" in s for s in evidence["contention"])


def test_a_stage_that_does_more_work_on_a_contended_machine_is_more_work():
    detector, stream = steady()
    stream.stage_ms.update(preprocess=2.4, infer=30.0)  # infer does 3x the work; preprocess waits
    stream.cpu_share["preprocess"] = 0.8
    stream.process.update(canary_wall_seconds=3e-4, cpu_pressure=0.6)
    stream.run(detector, 8)
    infer = [r for r in active(detector) if r.stage == "infer"]
    assert infer and {r.cause for r in infer} == {"more_work"}
    assert "its own work grew" in infer[0].evidence["candidates"]["contention"]
    assert infer[0].evidence["contention_also"]


def test_waiting_that_outgrows_cpu_without_host_signals_is_contention_and_voluntary_waits_are_not():
    detector, stream = steady()
    stream.cpu_share["infer"] = 0.3  # the same CPU, three times the wall: preempted
    stream.stage_ms["infer"] = 8.0 / 0.3 * 0.95
    stream.run(detector, 8)
    infer = [r for r in active(detector) if r.stage == "infer"]
    assert infer and {r.cause for r in infer} == {"contention"}
    assert "off the CPU" in infer[0].evidence["why"]


def test_data_growth_when_size_and_cost_grow_together():
    detector, stream = steady()
    stream.size *= 3
    stream.stage_ms = {stage: ms * 3 for stage, ms in stream.stage_ms.items()}
    stream.run(detector, 8)
    found = [r for r in active(detector) if r.stage is None or r.stage == "infer"]
    assert found and {r.cause for r in found} == {"data_growth"}
    assert found[0].evidence["size_per_call"] == [32.0, 96.0]
    assert abs(found[0].evidence["cost_per_item_change"]) < 0.1


def _pool(path: str, version: str) -> dict[str, Any]:
    return {path: {"user_api": "blas", "internal_api": "openblas", "version": version, "num_threads": 2}}


def test_dependency_change_names_the_packages_and_a_swapped_blas_in_one_line():
    env_then = {
        "fingerprint": "aaaa",
        "packages": {"numpy": "1.26.4", "scipy": "1.13.0"},
        "threadpools": {"libraries": _pool("numpy.libs/libopenblas", "0.3.23")},
    }
    env_now = {
        "fingerprint": "bbbb",
        "packages": {"numpy": "2.1.0", "scipy": "1.13.0"},
        "threadpools": {"libraries": _pool("numpy.libs/libscipy_openblas", "0.3.31")},
    }
    current = {"env": env_then}
    detector, stream = steady(environment=lambda: current["env"])
    detector._environment_cache = None
    current["env"] = env_now
    stream.process["fingerprint"] = "bbbb"
    stream.stage_ms["infer"] = 20.0
    stream.run(detector, 8)
    found = active(detector)
    assert found and {r.cause for r in found} == {"dependency_change"}
    assert found[0].evidence["changed"] == [
        "thread pools blas openblas 0.3.23 (2 threads) -> blas openblas 0.3.31 (2 threads)",
        "numpy 1.26.4 -> 2.1.0",
    ]


def test_model_change_and_machine_change():
    detector, stream = steady()
    stream.version = "2"
    stream.stage_ms["infer"] = 20.0
    stream.run(detector, 8)
    assert {r.cause for r in active(detector)} == {"model_change"}
    assert all(r.version == "2" for r in active(detector))

    detector, stream = steady()
    stream.process["cpu_count"] = 1.0
    stream.process["canary_wall_seconds"] = 2e-4
    stream.stage_ms["infer"] = 20.0
    stream.run(detector, 8)
    found = active(detector)
    assert {r.cause for r in found} == {"machine_change"}
    assert found[0].evidence["machine"] == ["usable CPUs 2 -> 1"]
    assert found[0].evidence["canary_ratio"] > 1.9
    assert (
        found[0].evidence["candidates"]["contention"]
        == "only the canary is slower, and it also waits for the GIL"
    )


def test_load_when_the_queue_grows_with_arrivals():
    detector = Detector(SETTINGS)
    stream = Stream()
    stream.stage_ms = {"queue": 1.0, "infer": 8.0}
    stream.cpu_share = {"queue": 0.02, "infer": 0.95}
    stream.run(detector, 12)
    stream.calls = 200
    stream.stage_ms["queue"] = 20.0
    stream.run(detector, 8)
    found = active(detector)
    assert found and {r.cause for r in found} == {"load"}
    assert {r.stage for r in found} == {"queue"}


def test_rss_growth_is_memory_growth_of_the_process_and_the_heap_names_its_stage():
    detector, stream = steady()
    stream.process["py_heap_bytes"] = 50 * MB
    for _ in range(12):
        stream.process["rss_bytes"] += 10 * MB
        stream.process["py_heap_bytes"] += 10 * MB
        stream.heap_growth = {"preprocess": 100.0, "infer": 10 * MB}
        detector.on_window(stream.window())
    found = {r.metric: r for r in active(detector)}
    assert found["rss"].cause == "memory_growth" and found["rss"].stage is None
    assert found["rss"].evidence["slope_mb_per_hour"] == pytest.approx(36000, rel=0.01)
    assert found["rss"].shape == "trend"
    # The heap had no anchor figure: tracemalloc was off while the anchor was taken.
    assert "py_heap" not in found


def test_heap_growth_charged_to_the_stage_that_allocated():
    detector = Detector(SETTINGS)
    stream = Stream()
    stream.process["py_heap_bytes"] = 50 * MB
    stream.run(detector, 12)
    for _ in range(10):
        stream.process["py_heap_bytes"] += 5 * MB
        stream.heap_growth = {"preprocess": 100.0, "infer": 5 * MB}
        detector.on_window(stream.window())
    heap = next(r for r in active(detector) if r.metric == "py_heap")
    assert heap.stage == "infer" and heap.cause == "memory_growth"


def test_open_and_close_are_logged_with_the_evidence(caplog):
    caplog.set_level(logging.INFO, logger="inferscope.regression")
    detector, stream = steady()
    stream.stage_ms["infer"] = 30.0
    stream.run(detector, 8)
    stream.stage_ms["infer"] = 8.0
    stream.run(detector, 12)
    assert active(detector) == []
    closed = detector.regressions()
    assert closed and not any(r.active for r in closed)
    records = [r for r in caplog.records if r.name == "inferscope.regression"]
    opened = [r for r in records if getattr(r, "inferscope.regression.state", None) == "open"]
    shut = [r for r in records if getattr(r, "inferscope.regression.state", None) == "closed"]
    assert opened and len(opened) == len(shut)
    record = opened[0]
    assert record.levelno == logging.WARNING
    assert getattr(record, "inferscope.regression.cause") == "more_work"
    assert getattr(record, "inferscope.model.name") == "fraud"
    assert isinstance(getattr(record, "inferscope.evidence.candidates.contention"), str)


def test_trend_shape_for_a_slow_creep():
    detector, stream = steady()
    for _ in range(40):
        stream.stage_ms["infer"] *= 1.03
        detector.on_window(stream.window())
    found = [r for r in active(detector) if r.metric == "p95"]
    assert found and all(r.shape == "trend" for r in found)


def test_tax_and_metric_points():
    detector, stream = steady()
    stream.stage_ms["infer"] = 18.0
    stream.run(detector, 8)
    (tax,) = detector.tax()
    assert tax.latency_p50_seconds == pytest.approx(0.010, rel=0.3)
    assert tax.cpu_cores == pytest.approx(0.010 * 0.95 * 100, rel=0.3)
    assert tax.cpu_hours_per_day == pytest.approx(tax.cpu_cores * 24)
    points = detector.metric_points()
    causes = {attrs["inferscope.regression.cause"] for _, attrs in points["inferscope.regression.active"]}
    assert causes == {"more_work"}
    quantiles = sorted(attrs["inferscope.quantile"] for _, attrs in points["inferscope.tax.latency"])
    assert quantiles == ["0.5", "0.95"]


def test_loaded_anchor_replaces_the_first_hour():
    detector, _ = steady()
    slow = Detector(SETTINGS)
    slow_stream = Stream(seed=3)
    slow_stream.stage_ms["infer"] = 30.0
    slow_stream.run(slow, 12)
    # The slow service's own anchor sees nothing; the fast service's anchor shows its tax.
    slow_stream.run(slow, 8)
    assert active(slow) == []
    anchor = detector.anchor("fraud")
    assert isinstance(anchor, Baseline)
    slow.set_anchor(anchor, save=False)
    slow_stream.run(slow, 8)
    assert {r.cause for r in active(slow)} == {"more_work"}


def test_a_failing_window_is_counted_not_raised():
    detector = Detector(SETTINGS)
    detector.on_window("not a window")  # type: ignore[arg-type]
    assert detector.errors == 1


def test_theil_sen_ignores_an_outlier():
    assert theil_sen_slope([0, 1, 2, 3, 4], [0, 1, 2, 3, 400]) == pytest.approx(1.0)
    assert theil_sen_slope([0, 1], [0, 1]) is None


def test_anchor_and_regressions_survive_a_restart(tmp_path):
    from inferscope.history import HistoryStore
    from inferscope.recorder import FlightRecorder

    path = tmp_path / "recorder.sqlite"
    stream = Stream()

    def run(detector: Detector, recorder: FlightRecorder, seconds: int) -> None:
        for _ in range(seconds):
            window = stream.window()
            assert recorder.save_window(window)
            detector.on_window(window)

    # The first process dies 6 s into its anchor; the second finishes it from the recorded history.
    first_recorder = FlightRecorder(path)
    first = Detector(SETTINGS, store=HistoryStore(first_recorder))
    run(first, first_recorder, 6)
    assert first.anchor("fraud") is None
    first_recorder.close()
    second_recorder = FlightRecorder(path)
    second = Detector(SETTINGS, store=HistoryStore(second_recorder))
    run(second, second_recorder, 6)
    anchor = second.anchor("fraud")
    assert anchor is not None and anchor.start_unix == 1_000_000.0 and anchor.seconds >= 10
    second_recorder.close()

    # A third process loads that anchor, and its regressions are stored as they open and close.
    third_recorder = FlightRecorder(path)
    store = HistoryStore(third_recorder)
    third = Detector(SETTINGS, store=store)
    stream.stage_ms["infer"] = 30.0
    run(third, third_recorder, 8)
    assert third.anchor("fraud") == anchor
    stored = store.regressions(model="fraud")
    assert stored and {(r.stage, r.cause, r.active) for r in stored} == {("infer", "more_work", True)}
    stream.stage_ms["infer"] = 8.0
    run(third, third_recorder, 12)
    assert {r.active for r in store.regressions(model="fraud")} == {False}
    third_recorder.close()


def test_status_reads_the_recorder(tmp_path, capsys):
    import json

    from inferscope.cli import main
    from inferscope.history import HistoryStore
    from inferscope.recorder import FlightRecorder

    path = tmp_path / "recorder.sqlite"
    recorder = FlightRecorder(path)
    detector = Detector(SETTINGS, store=HistoryStore(recorder))
    stream = Stream()
    for seconds, infer_ms in ((12, 8.0), (8, 24.0)):
        stream.stage_ms["infer"] = infer_ms
        for _ in range(seconds):
            window = stream.window()
            recorder.save_window(window)
            detector.on_window(window)
    recorder.close()

    assert main(["status", "--recorder", str(path), "--last", "4", "--json"]) == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["model"] == "fraud" and model["anchor"]["source"] == "anchor"
    rows = {row["stage"]: row for row in model["stages"]}
    assert rows["infer"]["p95_change"] > 1.5 and abs(rows["preprocess"]["p95_change"]) < 0.3
    assert {(r["stage"], r["cause"]) for r in model["regressions"] if r["active"]} == {("infer", "more_work")}
    # 16 ms more per call at 100 calls/s, 95% on the CPU: about 1.5 cores, 36 CPU-hours a day.
    assert model["tax"]["latency_p50_ms"] == pytest.approx(16, rel=0.3)
    assert model["tax"]["cpu_hours_per_day"] == pytest.approx(16e-3 * 0.95 * 100 * 24, rel=0.3)

    assert main(["status", "--recorder", str(path), "--last", "4"]) == 0
    text = capsys.readouterr().out
    assert "model fraud (service svc)" in text
    assert "more_work" in text and "CPU-hours per day" in text
    assert main(["status", "--recorder", str(tmp_path / "none.sqlite")]) == 2


def test_every_stage_slower_alike_is_the_machine_not_the_code():
    detector, stream = steady()
    # The same code, the same inputs: every stage takes 1.6x the CPU (a slower or shared core).
    stream.stage_ms = {stage: ms * 1.6 for stage, ms in stream.stage_ms.items()}
    stream.run(detector, 8)
    found = active(detector)
    assert found and {r.cause for r in found} == {"contention"}
    assert all("the machine runs the same code slower" in r.evidence["why"] for r in found if r.stage)


def test_configure_installs_the_detector_and_its_metric_points():
    from inferscope import detector as detector_module
    from inferscope.export import spec

    inferscope.configure(
        window_seconds=1, baseline_seconds=10, regression_sustain_seconds=4, metrics_exporters=()
    )
    try:
        installed = detector_module.detector()
        assert installed is not None and installed.settings == SETTINGS
        stream = Stream()
        stream.run(installed, 12)
        stream.stage_ms["infer"] = 30.0
        stream.run(installed, 8)
        points = {s.spec.name: s.observe() for s in spec.provided_signals()}
        active = points["inferscope.regression.active"]
        assert active and {p.attributes["inferscope.regression.cause"] for p in active} == {"more_work"}
        latency = {p.attributes["inferscope.quantile"]: p.value for p in points["inferscope.tax.latency"]}
        assert latency["0.5"] > 0.015
        assert points["inferscope.tax.cpu"][0].value > 1.0  # cores: ~20 ms more CPU x 100 calls/s
        assert inferscope.regressions() == installed.regressions()
    finally:
        inferscope.configure(metrics_exporters=())


def test_waits_for_a_core_counted_by_the_scheduler_are_contention():
    detector, stream = Detector(SETTINGS), Stream()
    stream.process.update(run_queue_seconds=0.02, process_cpu_seconds=1.0, canary_wait_seconds=2e-5)
    stream.run(detector, 12)
    # The same work, preempted: every stage waits, and the scheduler says for what.
    stream.stage_ms.update(preprocess=4.0, infer=16.0)
    stream.cpu_share.update(preprocess=0.5, infer=0.5)
    stream.process.update(run_queue_seconds=0.5, canary_wait_seconds=4e-4)
    stream.run(detector, 8)
    found = active(detector)
    assert found and {r.cause for r in found} == {"contention"}
    evidence = next(r for r in found if r.stage == "infer").evidence
    assert evidence["run_queue_per_cpu"] == [0.02, 0.5]
    assert any(s.startswith("run-queue wait per CPU second") for s in evidence["contention"])
    assert any(s.startswith("the canary's wait for a core") for s in evidence["contention"])


# --- windows recorded from a real service (benchmarks/fixtures/detector_windows.json) -----------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@functools.cache
def _benchmark() -> Any:
    """benchmarks/detector.py: its fixture of recorded one-second windows and its replay stream."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("detector_benchmark", BENCHMARKS / "detector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replay(slices: list[tuple[int, int]], *, slower: dict[str, float] | None = None, from_index: int = 0):
    """A detector fed the recorded windows ``slices`` (start, end) one after another, each standing
    for a minute as in the replay benchmark (an anchor and a sustain time of 20 windows); ``slower``
    scales the durations and CPU of those stages (and the inference's) from window ``from_index`` on."""
    bench = _benchmark()
    recorded = bench.load_fixture()
    minutes = bench.SETTINGS.window_seconds
    detector = Detector(replace(bench.SETTINGS, baseline_seconds=20 * minutes, sustain_seconds=20 * minutes))
    stream = bench.Stream(recorded, seed=0)
    stream._block = [row for first, end in slices for row in recorded[first:end]]

    def factor_of(stage: str | None, index: int) -> float:
        if not slower or index < from_index:
            return 1.0
        return max(slower.values()) if stage is None else slower.get(stage, 1.0)

    for index in range(len(stream._block)):
        detector.on_window(stream.window(index, factor_of))
    return detector


def test_a_noisy_stretch_of_a_real_service_whose_level_stays_within_the_noise_is_not_raised():
    # Recorded seconds 80-140 follow an anchor taken over seconds 40-60: most of their windows pass
    # the inference's p95 by the threshold and 3 noise units, but their median stays within 4.
    detector = replay([(40, 60), (80, 140)])
    assert [r for r in detector.regressions() if r.metric not in ("rss", "py_heap")] == []


def test_a_slower_stage_on_the_same_real_stretch_is_raised():
    detector = replay([(40, 60), (80, 140)], slower={"infer": 2.0}, from_index=30)
    found = [r for r in active(detector) if r.stage == "infer"]
    assert {r.metric for r in found} == {"p95", "cpu"}
    assert {r.cause for r in found} == {"more_work"}
    assert all(r.change > 0.5 and r.since >= 1_800_000_000.0 + 29 * 60 for r in found)


def test_a_wait_for_a_core_that_rises_within_its_own_noise_is_not_contention():
    # Recorded seconds 0-60 after an anchor over seconds 80-100, with the infer stage twice as slow:
    # the canary's wait for a core doubles, but by less than 3 times its window-to-window noise in
    # the anchor (the process's own extra work keeps the canary from a core as much): more work.
    detector = replay([(80, 100), (0, 60)], slower={"infer": 2.0}, from_index=25)
    anchor = detector.anchor("tax-demo")
    assert anchor is not None and anchor.process.canary_wait_noise > 0
    found = [r for r in active(detector) if r.stage is None and r.metric == "cpu"]
    assert len(found) == 1
    then, now = found[0].evidence["canary_wait_seconds"]
    assert now >= 2 * then and now - then < 3 * anchor.process.canary_wait_noise
    assert found[0].cause == "more_work"
    assert "contention" not in found[0].evidence


def test_a_stage_slowed_to_a_few_calls_a_window_is_judged_on_pooled_windows():
    # Windows with fewer than 10 calls are pooled with the next ones, both to vote and to measure
    # the run's level: a service slowed down so much that it serves 4 calls a window is still judged.
    detector, stream = steady()
    stream.calls = 4
    stream.stage_ms["infer"] = 40.0  # 5x
    stream.run(detector, 30)
    found = [r for r in active(detector) if r.stage == "infer" and r.metric == "p95"]
    assert len(found) == 1 and found[0].cause == "more_work" and found[0].change > 2.0


def test_the_why_of_more_work_on_the_inference_quotes_the_cpu_figure_it_compares():
    # The inference's CPU is the process's CPU per call (library thread pools count): when helper
    # threads do more, the text quotes that figure's change, not the calling threads' flat one.
    detector, stream = steady()
    stream.helper_cpu = 0.015  # 10 ms of stage CPU per call, plus 15 ms in helper threads
    stream.run(detector, 8)
    (cpu,) = [r for r in active(detector) if r.stage is None and r.metric == "cpu"]
    assert cpu.cause == "more_work" and cpu.change > 1.0
    # The text is written when it opens; the change follows the last sustain period since.
    quoted = re.search(r"CPU per call ([+-]\d+)%", cpu.evidence["why"])
    assert quoted and int(quoted.group(1)) / 100 == pytest.approx(cpu.change, abs=0.05)


# --- waits for a core outside the calls -------------------------------------------------------------


def waiting(wait_seconds: float = 50e-6) -> tuple[Detector, Stream]:
    """A steady stream whose canary waits ``wait_seconds`` for a core per wake-up, anchored."""
    detector = Detector(SETTINGS)
    stream = Stream()
    stream.process["canary_wait_seconds"] = wait_seconds
    stream.run(detector, 12)
    assert detector.anchor("fraud") is not None
    return detector, stream


def test_a_wait_for_a_core_before_the_calls_is_contention_while_the_calls_stay_flat():
    # Neighbours take the cores: each wake-up waits 5 ms more for one, while the tracked calls
    # (10 ms at p50) take as long as in the anchor. The requests are late; the calls are not slower.
    detector, stream = waiting()
    stream.process["canary_wait_seconds"] = 5e-3
    stream.process["cpu_pressure"] = 0.6
    stream.run(detector, 8)
    found = active(detector)
    assert [(r.cause, r.stage, r.metric, r.shape) for r in found] == [
        ("contention", None, "cpu_wait", "step")
    ]
    (wait,) = found
    assert wait.baseline_value == pytest.approx(50e-6, rel=0.25)
    assert wait.current_value == pytest.approx(5e-3, rel=0.25)
    assert "the calls themselves are not slower" in wait.evidence["why"]
    assert any(s.startswith("CPU pressure") for s in wait.evidence["contention"])
    # The neighbours leave: it closes once the wait has been back for the sustain time.
    stream.process["canary_wait_seconds"] = 50e-6
    stream.process["cpu_pressure"] = 0.02
    stream.run(detector, 8)
    assert not active(detector)
    (closed,) = [r for r in detector.regressions() if r.metric == "cpu_wait"]
    assert not closed.active and closed.change > 50


def test_a_wait_for_a_core_that_is_small_against_the_call_is_not_raised():
    # Ten times the wait, but 0.45 ms on a call of 10 ms: under the 20% threshold of its latency.
    detector, stream = waiting()
    stream.process["canary_wait_seconds"] = 500e-6
    stream.run(detector, 10)
    assert not detector.regressions()


def test_a_wait_for_a_core_that_comes_and_goes_within_the_sustain_time_is_not_raised():
    detector, stream = waiting()
    stream.process["canary_wait_seconds"] = 5e-3
    stream.run(detector, 2)
    stream.process["canary_wait_seconds"] = 50e-6
    stream.run(detector, 10)
    assert not detector.regressions()


def test_a_wait_for_a_core_on_fewer_cpus_is_a_machine_change():
    detector, stream = waiting()
    stream.process["canary_wait_seconds"] = 5e-3
    stream.process["cpu_count"] = 1.0
    stream.run(detector, 8)
    (wait,) = [r for r in active(detector) if r.metric == "cpu_wait"]
    assert wait.cause == "machine_change"
    assert wait.evidence["machine"] == ["usable CPUs 2 -> 1"]
    assert wait.evidence["candidates"]["contention"] == "held, but machine_change comes first"


def test_a_rise_over_the_rolling_reference_is_judged_against_that_reference():
    # The anchor was taken on a busy machine; an hour of quiet follows (every stage cheaper), then
    # the neighbours come back. Against the quiet hour every stage rose, with CPU pressure: the
    # machine, judged against the same quiet hour, not against the busy anchor where nothing moved.
    detector = Detector(SETTINGS)
    stream = Stream()
    stream.process["cpu_pressure"] = 0.5
    stream.run(detector, 12)
    assert detector.anchor("fraud") is not None
    busy_ms, busy_share = dict(stream.stage_ms), dict(stream.cpu_share)
    stream.process["cpu_pressure"] = 0.02
    stream.stage_ms = {s: ms * 0.6 for s, ms in busy_ms.items()}
    stream.run(detector, 14)
    stream.process["cpu_pressure"] = 0.5
    stream.stage_ms, stream.cpu_share = busy_ms, busy_share
    stream.run(detector, 8)
    found = [r for r in detector.regressions() if r.evidence.get("reference") == "rolling"]
    assert found, [(r.stage, r.metric, r.cause, r.evidence.get("reference")) for r in detector.regressions()]
    assert {r.cause for r in found} == {"contention"}
    assert all(any(s.startswith("CPU pressure") for s in r.evidence["contention"]) for r in found)


def test_a_dependency_change_on_a_busy_machine_is_named_not_taken_for_spinning_helpers():
    # Another library makes infer do twice the work, on a machine that got busy meanwhile: infer
    # waits far more for a core too. Its waiting outgrowing its CPU is no sign of spinning helpers
    # when the software changed; the other stage, on the same machine, did no more work.
    detector, stream = steady()
    stream.process["fingerprint"] = "bbbb"
    stream.process["cpu_pressure"] = 0.5
    stream.stage_ms["infer"] = 32.0
    stream.cpu_share["infer"] = 0.4
    stream.run(detector, 8)
    (infer,) = [r for r in active(detector) if r.stage == "infer" and r.metric == "cpu"]
    assert infer.cause == "dependency_change", infer.evidence["why"]
    assert "contention_also" in infer.evidence
