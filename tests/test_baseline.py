"""Baselines: figures pooled from windows, and the versioned JSON format."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from inferscope.baseline import (
    BASELINE_FORMAT,
    Baseline,
    BaselineFormatError,
    KeyFigures,
    load_baselines,
    mad_noise,
    save_baselines,
)
from inferscope.histogram import Histogram
from inferscope.windows import CPU_READ_CALLS, SCHEMA_VERSION, KeyWindow, ProcessWindow, Window


def windows(count: int = 6, seed: int = 0) -> list[Window]:
    rng = np.random.default_rng(seed)
    result = []
    for i in range(count):
        infer = rng.lognormal(np.log(0.008), 0.2, 100)
        pre = rng.lognormal(np.log(0.002), 0.2, 100)
        keys = (
            KeyWindow(
                "fraud",
                "1" if i < 3 else "2",
                None,
                100,
                1,
                Histogram.of(infer + pre),
                float((infer + pre).sum()),
                float((infer + pre).sum()) * 0.9,
                float((infer + pre).sum()),
                process_cpu_seconds=float((infer + pre).sum()) * 1.5,
                counters={"involuntary_switches": 20.0},
                size_sum=3200.0,
                size_count=100,
            ),
            KeyWindow("fraud", "1", "infer", 100, 0, Histogram.of(infer), float(infer.sum())),
            KeyWindow("other", "1", None, 5, 0, Histogram.of([0.1] * 5), 0.5),
        )
        process = ProcessWindow(
            rss_bytes=100e6 + i,
            canary_wall_seconds=1e-4 * (1 + 0.01 * i),
            canary_cpu_seconds=1e-4,
            canary_runs=2,
            throttled_seconds=0.1,
            cpu_model="Test CPU",
            cpu_count=2.0,
            fingerprint="abcd",
        )
        result.append(Window("svc", 100.0 + i, 101.0 + i, process, keys))
    return result


def test_figures_pool_every_window_of_the_model():
    base = Baseline.from_windows("fraud", windows(), environment={"fingerprint": "abcd", "packages": {}})
    assert base.versions == ("1", "2")
    assert (base.start_unix, base.end_unix, base.window_seconds) == (100.0, 106.0, 1.0)
    inference = base.stage(None)
    assert inference is not None and base.stage("infer") is not None
    assert inference.count == 600 and inference.errors == 6 and inference.windows == 6
    assert inference.quantiles["p50"] == pytest.approx(0.0101, rel=0.1)
    assert inference.cpu_per_call == pytest.approx(inference.mean_seconds * 0.9)
    assert inference.process_cpu_per_call == pytest.approx(inference.mean_seconds * 1.5)
    assert inference.counters_per_call == {"involuntary_switches": 0.2}
    assert inference.size_per_call == 32.0
    assert inference.calls_per_second == 100.0
    assert 0 < inference.window_quantile_noise < 0.2 * inference.window_quantile
    assert base.stage("infer").cpu_per_call is None  # not measured
    assert base.process.throttled_fraction == pytest.approx(0.1)
    assert base.process.canary_wall_seconds == pytest.approx(1.025e-4)
    assert base.fingerprint == "abcd" and base.environment == {"fingerprint": "abcd", "packages": {}}


def test_a_busy_stage_s_cpu_and_off_cpu_per_call_are_at_most_the_mean_wall_time_of_all_its_calls():
    """A sample of a busy stage's calls that caught a long pause has a mean above what every call
    says together: a call's CPU and its time off the CPU are each at most its wall time."""
    rng = np.random.default_rng(1)
    walls = rng.lognormal(np.log(50e-6), 0.2, 1000)  # 1,000 calls of ~50 us

    def stage(read_cpu: list[float], read_wall: list[float]) -> KeyFigures:
        window = KeyWindow(
            "m",
            None,
            "postprocess",
            len(walls),
            0,
            Histogram.of(walls),
            float(walls.sum()),
            cpu_seconds=sum(read_cpu),
            cpu_wall_seconds=sum(read_wall),
            counters={CPU_READ_CALLS: float(len(read_cpu))},
        )
        return KeyFigures.pool([(window, 1.0)])

    mean_wall = float(walls.mean())
    typical = [float(w) for w in walls[:16]]
    # 16 calls read, one of which ran a 10 ms garbage collection, another waited 10 ms for the GIL.
    unlucky = stage([*typical[:14], 0.01, typical[15]], [*typical[:14], 0.01, typical[15] + 0.01])
    assert unlucky.cpu_per_call == unlucky.off_cpu_per_call == pytest.approx(mean_wall)
    # A sample like the calls keeps its own means, below the bound.
    lucky = stage([0.9 * w for w in typical], typical)
    assert lucky.cpu_per_call == pytest.approx(0.9 * sum(typical) / 16)
    assert lucky.off_cpu_per_call == pytest.approx(0.1 * sum(typical) / 16)


def test_process_cpu_per_inference_leaves_out_windows_not_yet_given_any():
    """The process CPU of an interval reaches the inferences a second late: the first window after
    a start is given none although its calls ran. It must not count as calls that cost nothing."""

    def inference(calls: int, process_cpu: float | None) -> KeyWindow:
        walls = np.full(calls, 1e-3)
        total = float(walls.sum())
        return KeyWindow("m", None, None, calls, 0, Histogram.of(walls), total, total, total, process_cpu)

    first, later = inference(100, 0.0), inference(300, 0.3)
    assert KeyFigures.pool([(first, 1.0)]).process_cpu_per_call is None
    pooled = KeyFigures.pool([(first, 1.0), (later, 1.0)])
    assert pooled.count == 400 and pooled.process_cpu_calls == 300
    assert pooled.process_cpu_per_call == pytest.approx(1e-3)  # not 0.3 s / 400 calls
    # Windows without the figure at all (stages, older records) are left out the same way.
    assert KeyFigures.pool([(inference(50, None), 1.0), (later, 1.0)]).process_cpu_per_call == pytest.approx(
        1e-3
    )


def test_environment_of_another_fingerprint_is_not_kept():
    base = Baseline.from_windows("fraud", windows(), environment={"fingerprint": "other"})
    assert base.environment is None


def test_no_window_of_the_model():
    with pytest.raises(ValueError, match="no window holds a call of model 'nope'"):
        Baseline.from_windows("nope", windows())


def test_save_and_load_round_trip(tmp_path):
    base = Baseline.from_windows("fraud", windows())
    other = Baseline.from_windows("other", windows(seed=2))
    path = tmp_path / "baseline.json"
    save_baselines(path, [base, other])
    document = json.loads(path.read_text())
    assert document["format"] == BASELINE_FORMAT and document["schema_version"] == SCHEMA_VERSION
    loaded = load_baselines(path)
    assert [b.model for b in loaded] == ["fraud", "other"]
    assert loaded[0].source == "file"
    assert loaded[0].stages == base.stages
    assert loaded[0].process == base.process
    assert load_baselines(path, source=None)[0].source == "anchor"


def test_wrong_schema_version_and_format_say_what_to_do(tmp_path):
    path = tmp_path / "b.json"
    save_baselines(path, [Baseline.from_windows("fraud", windows())])
    document = json.loads(path.read_text())
    document["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(document))
    with pytest.raises(BaselineFormatError, match="upgrade inferscope"):
        load_baselines(path)
    path.write_text(json.dumps({"fingerprint": "x"}))
    with pytest.raises(BaselineFormatError, match="not an inferscope baseline file"):
        load_baselines(path)
    path.write_text("{not json")
    with pytest.raises(BaselineFormatError, match="is not JSON"):
        load_baselines(path)
    document["schema_version"] = SCHEMA_VERSION
    del document["baselines"][0]["stages"][0]["count"]
    path.write_text(json.dumps(document))
    with pytest.raises(BaselineFormatError, match=r"baselines\[0\].*malformed"):
        load_baselines(path)


def test_mad_noise_ignores_outliers():
    assert mad_noise([1.0, 1.0, 1.0, 1.0, 100.0]) == 0.0
    assert mad_noise([1.0, 2.0]) == 0.0


def test_cli_saves_and_loads_anchors(tmp_path, capsys):
    from inferscope.cli import main
    from inferscope.history import HistoryStore
    from inferscope.recorder import FlightRecorder

    source = FlightRecorder(tmp_path / "a.sqlite")
    for window in windows():
        source.save_window(window)
    anchor = Baseline.from_windows("fraud", windows())
    HistoryStore(source).save_baseline(anchor)
    source.close()

    out = tmp_path / "anchors.json"
    assert main(["baseline", "save", str(out), "--recorder", str(tmp_path / "a.sqlite")]) == 0
    (saved,) = load_baselines(out)
    assert saved.stages == anchor.stages and saved.model == "fraud"
    ci = tmp_path / "ci.json"
    assert (
        main(
            [
                "baseline",
                "save",
                str(ci),
                "--from",
                "windows",
                "--model",
                "other",
                "--recorder",
                str(tmp_path / "a.sqlite"),
            ]
        )
        == 0
    )
    (bench,) = load_baselines(ci, source=None)
    assert bench.source == "ci" and bench.model == "other" and bench.stage(None).count == 30

    target = tmp_path / "b.sqlite"
    assert main(["baseline", "load", str(out), "--recorder", str(target), "--service", "prod"]) == 0
    store = HistoryStore(FlightRecorder(target))
    loaded = store.load_anchor("prod", "fraud")
    assert loaded is not None and loaded.stages == anchor.stages and loaded.source == "file"
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "inferscope.baseline", "schema_version": 99, "baselines": []}')
    assert main(["baseline", "load", str(bad), "--recorder", str(target)]) == 2
    assert "upgrade inferscope" in capsys.readouterr().err
    assert main(["baseline", "save", str(out), "--recorder", str(tmp_path / "missing.sqlite")]) == 2


def test_the_noise_of_the_contention_signals_is_kept_and_older_files_load_without_it(tmp_path):
    rng = np.random.default_rng(3)
    pressures = rng.uniform(0.0, 0.4, 30)
    waits = rng.uniform(1e-4, 9e-4, 30)
    stream = windows(30)
    stream = [
        Window(
            w.service,
            w.start_unix,
            w.end_unix,
            replace(w.process, cpu_pressure=float(p), canary_wait_seconds=float(c)),
            w.keys,
        )
        for w, p, c in zip(stream, pressures, waits, strict=True)
    ]
    base = Baseline.from_windows("fraud", stream)
    assert base.process.cpu_pressure_noise == pytest.approx(mad_noise(list(pressures)))
    assert base.process.canary_wait_noise == pytest.approx(mad_noise(list(waits)))
    path = tmp_path / "baseline.json"
    save_baselines(path, [base])
    assert load_baselines(path)[0].process == base.process
    document = json.loads(path.read_text())
    for name in ("cpu_pressure_noise", "canary_wait_noise", "run_queue_per_cpu_noise"):
        del document["baselines"][0]["process"][name]
    path.write_text(json.dumps(document))
    assert load_baselines(path)[0].process.cpu_pressure_noise == 0.0
