"""The performance gate: its statistics on real timings, its baseline files, the pytest plugin in a
real pytest run, and ``inferscope bench``.

Timings are never asserted: a slowdown here is twice the work (or a synthetic factor applied to
real timings), far beyond what a loaded machine does to two runs, and the same function is
compared with a tolerance no machine's weather reaches.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inferscope.aggregate import Histogram
from inferscope.baseline import Baseline, load_baselines
from inferscope.cli.demo_tax import CpuHogs
from inferscope.gate import stats
from inferscope.gate.data import load_calls, load_function
from inferscope.gate.result import BenchResult, Inconclusive, PerformanceRegression
from inferscope.gate.runner import CANARY_RUNS_PER_ROUND, BenchRun, BenchRunner
from inferscope.gate.store import (
    MAX_STORED_CALLS,
    StoredBaseline,
    baseline_file_name,
    read_baselines,
    write_baselines,
)
from inferscope.gate.verdict import INCONCLUSIVE, PASS, REGRESSION, check_below, compare
from inferscope.system.canary import Canary
from inferscope.windows import KeyWindow, ProcessWindow, Window

from .conftest import run_python

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
_DATA = np.random.default_rng(7).random(4096)


def work(units: int) -> float:
    """Fixed numpy work: ``units`` sorts of the same 4096 numbers."""
    total = 0.0
    for _ in range(units):
        total += float(np.sort(_DATA)[0])
    return total


def timed_run(units: int, calls: int = 400, rounds: int = 8, fingerprint: str = "f1") -> BenchRun:
    """A run timed as the runner times one (wall and thread CPU around each call, the canary
    before each round), without the pipeline: the statistics see real timings."""
    run = BenchRun(model="work", items_per_call=1.0, warmup_calls=0)
    canary = Canary()
    for _ in range(20):
        work(units)
    for _ in range(rounds):
        for _ in range(CANARY_RUNS_PER_ROUND):
            wall, cpu = canary.run()
            run.canary_wall.append(wall)
            run.canary_cpu.append(cpu)
        run.round_starts.append(run.calls)
        for _ in range(calls // rounds):
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            work(units)
            w1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            run.wall.append((w1 - w0) / 1e9)
            run.cpu.append((c1 - c0) / 1e9)
    run.windows.append(_window(run, fingerprint))
    return run


def _window(run: BenchRun, fingerprint: str) -> Window:
    key = KeyWindow(
        "work", None, None, run.calls, 0, Histogram.of(run.wall), float(sum(run.wall)), float(sum(run.cpu)),
        float(sum(run.wall)), size_sum=float(run.calls), size_count=run.calls,
    )  # fmt: skip
    process = ProcessWindow(
        canary_wall_seconds=float(np.median(run.canary_wall)),
        canary_cpu_seconds=float(np.median(run.canary_cpu)),
        canary_runs=len(run.canary_cpu),
        fingerprint=fingerprint,
    )
    return Window("tests", 0.0, 1.0, process, (key,))


def stored(run: BenchRun) -> StoredBaseline:
    return StoredBaseline.of_run(run)


def scaled(run: BenchRun, factor: float, canary_factor: float, fingerprint: str) -> BenchRun:
    """``run`` as if measured on a machine ``canary_factor`` times slower, code ``factor`` slower."""
    copy = replace(
        run,
        wall=[v * factor for v in run.wall],
        cpu=[v * factor for v in run.cpu],
        canary_wall=[v * canary_factor for v in run.canary_wall],
        canary_cpu=[v * canary_factor for v in run.canary_cpu],
        windows=[],
    )
    copy.windows.append(_window(copy, fingerprint))
    return copy


# --- statistics ----------------------------------------------------------------------------------


def test_the_interval_of_a_ratio_holds_the_true_ratio_and_narrows_with_more_calls():
    rng = np.random.default_rng(3)
    base = stats.Sample.of(rng.lognormal(0.0, 0.1, 2000), rounds=8)
    slow = stats.Sample.of(1.3 * rng.lognormal(0.0, 0.1, 2000), rounds=8)
    few = stats.Sample.of(slow.values[:100], rounds=4)
    ratio = stats.quantile_ratio(slow, base, 0.5, alpha=0.005, rng=rng)
    wide = stats.quantile_ratio(few, base, 0.5, alpha=0.005, rng=rng)
    assert ratio.low < 1.3 < ratio.high
    assert wide.low < ratio.low and wide.high > ratio.high
    assert ratio.divided_by(1.3).low < 1.0 < ratio.divided_by(1.3).high
    with pytest.raises(ValueError, match="alpha"):
        stats.quantile_ratio(slow, base, 0.5, alpha=0.7, rng=rng)


def test_rounds_that_drift_widen_the_interval_beyond_the_bootstrap_of_the_calls():
    rng = np.random.default_rng(5)
    steady = rng.normal(1.0, 0.01, 1600)
    drifting = steady * np.repeat([0.9, 1.1, 0.95, 1.05, 0.9, 1.1, 1.0, 1.0], 200)
    starts = tuple(range(0, 1600, 200))
    calm = stats.log_quantile_error(stats.Sample(steady, starts), 0.5, resamples=200, rng=rng)
    drift = stats.log_quantile_error(stats.Sample(drifting, starts), 0.5, resamples=200, rng=rng)
    assert drift > 3 * calm


def test_twice_the_work_is_a_regression_and_the_same_work_passes():
    base = timed_run(1)
    again = timed_run(1)
    double = timed_run(2)
    slow = compare(double, stored(base), max_increase=0.10)
    assert slow.outcome == REGRESSION, slow.message
    assert slow.ratio.low > 1.10
    assert "regression" in slow.message and "tolerance +10.0%" in slow.message
    same = compare(again, stored(base), max_increase=1.0)
    assert same.outcome == PASS, same.message
    assert set(same.ratios) <= {"wall", "cpu"} and same.metric in same.ratios
    assert not same.cross_machine


def test_a_baseline_of_another_machine_is_compared_on_cpu_per_item_over_the_canary():
    base = timed_run(1, fingerprint="ci-runner")
    # The same code on a machine 1.6 times slower: the canary slows as much as the calls. (These
    # are the baseline's own timings, scaled: two real runs of 0.3 s can differ by more than the
    # tolerance on a loaded machine, and it is the normalisation that is under test here.)
    # The tolerance (+50%) is under the machine's +60%, so only the canary's correction passes it,
    # and far above the noise of one run's rounds: the interval of the same run, scaled, reached
    # [-24%, +31%] on a loaded CI machine.
    elsewhere = scaled(base, 1.6, 1.6, fingerprint="production")
    verdict = compare(elsewhere, stored(base), max_increase=0.5)
    assert verdict.cross_machine and verdict.canary_corrected
    assert verdict.metric == "cpu_per_item"
    assert verdict.outcome == PASS, verdict.message
    assert "another environment" in verdict.message and "CPU per item" in verdict.message
    # Four times the work there, on that slower machine: still a regression.
    slower = scaled(timed_run(4), 1.6, 1.6, fingerprint="production")
    assert compare(slower, stored(base), max_increase=0.5).outcome == REGRESSION


def _under_pressure(run: BenchRun, pressure: float) -> BenchRun:
    """``run`` with the CPU pressure its rounds' windows read set to ``pressure``."""
    windows = [replace(w, process=replace(w.process, cpu_pressure=pressure)) for w in run.windows]
    return replace(run, windows=windows)


def test_a_rise_with_the_machine_under_more_cpu_pressure_than_the_baseline_is_inconclusive():
    # The rule on its own, whatever the machine running the test is doing (the run beside real CPU
    # hogs is the expensive test below): the same doubled timings, with and without the pressure.
    base = _under_pressure(timed_run(1), 0.02)
    doubled = scaled(timed_run(1), 2.0, 1.0, fingerprint="f1")
    calm = compare(_under_pressure(doubled, 0.02), stored(base), max_increase=0.10)
    assert calm.outcome == REGRESSION and not calm.contention, calm.message
    pressed = compare(_under_pressure(doubled, 0.9), stored(base), max_increase=0.10)
    assert pressed.outcome == INCONCLUSIVE, pressed.message
    assert pressed.contention == ("CPU pressure 2% -> 90% of the time",)
    assert pressed.message.startswith("inconclusive: ") and "not judged" in pressed.message
    assert pressed.to_json()["contention"] == list(pressed.contention)


@pytest.mark.expensive  # 16 CPU hogs: once per CI run, not once per core-suite pass
def test_a_rise_measured_beside_cpu_hogs_is_inconclusive_not_a_regression():
    def bench() -> BenchRun:
        return BenchRunner(work, [((1,), {})], model="work", budget_seconds=1.0).measure()

    def twice(run: BenchRun) -> BenchRun:
        return replace(run, wall=[2 * v for v in run.wall], cpu=[2 * v for v in run.cpu])

    base = bench()
    # Enough hogs that the run waits for a core far longer than the baseline did even when the
    # baseline ran beside other busy processes (a loaded machine): 8 per CPU.
    with CpuHogs(8 * (os.cpu_count() or 1)):
        time.sleep(0.3)
        busy = bench()
    # The same code beside the hogs: whatever its timings read, never a regression.
    beside = compare(busy, stored(base), max_increase=0.10)
    assert beside.outcome != REGRESSION, beside.message
    # Twice the time on that busy machine (its real rounds, with what the system read in them):
    # the machine's signals say it waited for a core...
    doubled = compare(twice(busy), stored(base), max_increase=0.10)
    figures = [(w.process.run_queue_seconds, w.process.cpu_pressure) for w in (*base.windows, *busy.windows)]
    assert doubled.outcome == INCONCLUSIVE, (doubled.message, figures)
    assert doubled.contention and "not judged" in doubled.message
    assert any("CPU pressure" in s or "run-queue" in s for s in doubled.contention), doubled.contention
    assert doubled.to_json()["contention"] == list(doubled.contention)
    # ... where the same doubling of the baseline's own rounds (the machine as it was then) is a
    # regression.
    same_machine = compare(twice(base), stored(base), max_increase=0.10)
    assert same_machine.outcome == REGRESSION and not same_machine.contention, same_machine.message


def test_a_production_baseline_without_calls_is_compared_with_its_quantiles():
    base = timed_run(1)
    summary = StoredBaseline(base.baseline())  # as `inferscope baseline save` writes it
    double = compare(timed_run(2), summary, max_increase=0.10)
    assert double.outcome == REGRESSION, double.message
    assert "summary" in double.message


def test_an_absolute_limit_fails_above_passes_below_and_is_inconclusive_at_the_edge():
    run = timed_run(1)
    p99 = float(np.quantile(run.wall, 0.99))
    # Far from the limit either way: a loaded machine's tail is wide, but not a thousandfold.
    assert check_below(run, p99 / 1000, quantile=0.99, alpha=0.005).outcome == REGRESSION
    assert check_below(run, p99 * 1000, quantile=0.99, alpha=0.005).outcome == PASS
    assert check_below(run, p99, quantile=0.99, alpha=0.005).outcome == INCONCLUSIVE


class _NoMoreBudget:
    """A runner whose budget is spent: what a check does when it stays undecided."""

    def __init__(self, run: BenchRun) -> None:
        self.run = run
        self.budget_seconds = 1.0
        self.extensions = 0

    def extend(self, seconds: float) -> bool:
        self.extensions += 1
        return False


def test_a_result_raises_on_regression_and_reports_inconclusive_through_its_policy():
    base, double = timed_run(1), timed_run(2)
    result = BenchResult(_NoMoreBudget(double), name="t", baseline=stored(base))  # type: ignore[arg-type]
    with pytest.raises(PerformanceRegression, match="regression"):
        result.assert_no_regression(max_increase=0.10)
    assert result.verdicts[-1].outcome == REGRESSION
    with pytest.raises(Inconclusive, match="no baseline"):
        BenchResult(_NoMoreBudget(double), name="t").assert_no_regression()  # type: ignore[arg-type]
    seen = []
    edge = BenchResult(
        _NoMoreBudget(double),  # type: ignore[arg-type]
        name="t",
        on_inconclusive=lambda message, verdict: seen.append(message),
    )
    edge.assert_p99_below(float(np.quantile(double.wall, 0.99)))
    assert seen and seen[0].startswith("inconclusive:")
    saving = BenchResult(_NoMoreBudget(double), name="t", saving=True)  # type: ignore[arg-type]
    assert saving.assert_no_regression() is None and "saved" in saving.notes[0]
    with pytest.raises(ValueError, match="max_increase"):
        result.assert_no_regression(max_increase=-0.1)
    with pytest.raises(ValueError, match="limit"):
        result.assert_p99_below(0)


# --- baseline files ------------------------------------------------------------------------------


def test_a_gate_baseline_is_a_baseline_file_that_keeps_its_calls(tmp_path):
    run = timed_run(1, calls=MAX_STORED_CALLS + 800, rounds=4)
    path = tmp_path / "deep" / "dir" / "b.json"
    write_baselines(path, [stored(run)])
    [plain] = load_baselines(path)  # baseline.py's own reader, as `inferscope baseline load` uses
    assert isinstance(plain, Baseline) and plain.model == "work"
    assert plain.stage(None).count == run.calls
    kept = read_baselines(path)["work"]
    assert kept.wall is not None and len(kept.wall) == MAX_STORED_CALLS
    assert len(kept.wall.round_starts) == 4 and kept.wall.round_starts[0] == 0
    assert kept.canary_cpu == tuple(round(v, 9) for v in run.canary_cpu)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in path.parent.iterdir() if p.name != "b.json"]  # no temporary left


def test_a_malformed_samples_object_is_named(tmp_path):
    path = tmp_path / "b.json"
    write_baselines(path, [stored(timed_run(1, calls=40, rounds=2))])
    document = json.loads(path.read_text())
    document["baselines"][0]["samples"]["cpu_seconds"] = [1.0]
    path.write_text(json.dumps(document))
    from inferscope.baseline import BaselineFormatError

    with pytest.raises(BaselineFormatError, match=r"baselines\[0\]\.samples is malformed"):
        read_baselines(path)


def test_a_test_id_becomes_a_safe_file_name():
    assert (
        baseline_file_name("tests/test_m.py::TestA::test_b[x/y z]")
        == "tests.test_m.py.TestA.test_b[x.y_z].json"
    )


# --- data files and targets ----------------------------------------------------------------------


def test_data_files_give_calls(tmp_path):
    np.save(tmp_path / "batch.npy", np.ones((8, 3)))
    np.savez(tmp_path / "args.npz", np.zeros(4), np.ones(2), scale=np.array(2.0))
    (tmp_path / "calls.jsonl").write_text('[1, 2]\n{"x": 3}\n\n"text"\n')
    [((batch,), kwargs)] = load_calls(tmp_path / "batch.npy")
    assert batch.shape == (8, 3) and kwargs == {}
    [(positional, named)] = load_calls(tmp_path / "args.npz")
    assert [a.shape for a in positional] == [(4,), (2,)] and list(named) == ["scale"]
    assert load_calls(tmp_path / "calls.jsonl") == [((1, 2), {}), ((), {"x": 3}), (("text",), {})]
    (tmp_path / "bad.jsonl").write_text("[1,\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        load_calls(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"accepted: \.npy, \.npz, \.jsonl"):
        load_calls(tmp_path / "data.csv")


def test_targets_are_module_colon_function():
    assert load_function("json:dumps") is json.dumps
    for target, message in [
        ("json.dumps", "expected module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("json:nope", "has no attribute"),
        ("json:__doc__", "not callable"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_function(target)


# --- the pytest plugin ---------------------------------------------------------------------------


def test_the_plugin_is_registered_and_imports_nothing_heavy():
    entry_points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert entry_points.get("inferscope") == "inferscope_pytest"
    result = run_python(
        """
        import sys
        import inferscope_pytest
        heavy = ("numpy", "opentelemetry", "inferscope", "inferscope._pipeline", "inferscope.gate")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy or m in heavy))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


_TEST_FILE = """
    import os

    import numpy as np

    import inferscope

    DATA = np.random.default_rng(1).random(4096)

    def predict(batch):
        with inferscope.stage("preprocess"):
            units = int(os.environ.get("WORK_UNITS", "1"))
        with inferscope.stage("infer"):
            for _ in range(units):
                np.sort(batch)

    def test_model(inferscope_bench):
        result = inferscope_bench(predict, DATA)
        assert set(result.stages) == {None, "preprocess", "infer"}
        assert result.calls >= 20 and result.canary_cpu_seconds > 0
        result.assert_p99_below(60.0)
        result.assert_no_regression(max_increase=float(os.environ.get("MAX_INCREASE", "1.0")))
"""


@pytest.fixture
def gate_project(pytester, tmp_path, monkeypatch):
    """A project with one benchmark test; its runs must leave the flight recorder alone."""
    pytester.makepyfile(test_perf=textwrap.dedent(_TEST_FILE))
    recorder = tmp_path / "state" / "recorder.sqlite"
    monkeypatch.setenv("INFERSCOPE_RECORDER", str(recorder))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    for name in ("WORK_UNITS", "MAX_INCREASE", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(name, raising=False)
    yield pytester
    assert not (tmp_path / "state").exists(), "a benchmark wrote to the flight recorder"


def _run(pytester, *args, **env):
    """A real pytest run of the project, in a subprocess, with ``env`` added to its environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--inferscope-budget=0.3", "-rs", *args
        )


@pytest.mark.expensive
def test_saved_baseline_then_pass_then_regression(gate_project):
    strict = _run(gate_project, "--inferscope-inconclusive=fail")
    strict.assert_outcomes(failed=1)  # no baseline yet, and undecided checks fail when asked
    strict.stdout.fnmatch_lines(["*inferscope no baseline for test_perf.py::test_model*"])
    saved = _run(gate_project, "--inferscope-save-baseline")
    saved.assert_outcomes(passed=1)
    path = gate_project.path / ".inferscope" / "baselines" / "test_perf.py.test_model.json"
    [baseline] = load_baselines(path, source=None)
    assert baseline.model == "test_perf.py::test_model" and baseline.source == "ci"
    assert {None, "preprocess", "infer"} == set(baseline.stages)
    _run(gate_project, MAX_INCREASE="3.0").assert_outcomes(passed=1)  # the same work passes
    slow = _run(gate_project, WORK_UNITS="4", MAX_INCREASE="0.10")
    slow.assert_outcomes(failed=1)
    slow.stdout.fnmatch_lines(["*PerformanceRegression: regression:*tolerance +10.0%*"])
    assert slow.ret == pytest.ExitCode.TESTS_FAILED


def test_without_a_baseline_the_check_is_skipped(gate_project):
    missing = _run(gate_project)
    missing.assert_outcomes(skipped=1)
    missing.stdout.fnmatch_lines(
        ["*inferscope no baseline for test_perf.py::test_model*--inferscope-save-baseline*"]
    )
    assert missing.ret == pytest.ExitCode.OK


@pytest.mark.expensive
def test_markdown_and_json_reports_and_a_baseline_dir_setting(gate_project, tmp_path):
    gate_project.makeini("[pytest]\ninferscope_baseline_dir = perf/baselines\n")
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    report = tmp_path / "out" / "gate.json"
    result = _run(
        gate_project,
        "--inferscope-save-baseline",
        f"--inferscope-markdown={summary}",
        f"--inferscope-json={report}",
        GITHUB_STEP_SUMMARY=str(summary),
    )
    result.assert_outcomes(passed=1)
    assert (gate_project.path / "perf" / "baselines" / "test_perf.py.test_model.json").is_file()
    text = summary.read_text()
    assert text.startswith("earlier step\n## inferscope performance gate")  # appended, as Actions expects
    assert "| `test_perf.py::test_model` |" in text and "baseline saved" in text
    assert "| `test_perf.py::test_model` | infer |" in text
    document = json.loads(report.read_text())
    [entry] = document["benchmarks"]
    assert entry["model"] == "test_perf.py::test_model" and entry["baseline_saved"] is True
    assert {s["stage"] for s in entry["stages"]} == {None, "preprocess", "infer"}
    assert [v["metric"] for v in entry["verdicts"]] == ["p99"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "--inferscope-budget=abc",
            "--inferscope-budget=abc: expected a number of seconds from 0.05 to 3600*",
        ),
        ("--inferscope-budget=0", "--inferscope-budget=0: expected a number of seconds*"),
        (
            "--inferscope-inconclusive=maybe",
            "--inferscope-inconclusive=maybe: expected one of skip, fail, pass",
        ),
    ],
)
def test_bad_options_are_usage_errors_that_name_the_option(pytester, option, message):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}"])


def test_a_baseline_dir_that_is_a_file_is_a_usage_error(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    (pytester.path / "taken").write_text("")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--inferscope-baseline-dir=taken")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--inferscope-baseline-dir=taken:*exists and is not a directory"])


# --- inferscope bench ----------------------------------------------------------------------------


def _bench(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferscope.cli", "bench", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.expensive
def test_inferscope_bench_saves_then_checks_a_baseline(tmp_path):
    (tmp_path / "serve.py").write_text(
        textwrap.dedent(
            """
            import os
            import numpy as np
            import inferscope

            def predict(batch, scale=1.0):
                with inferscope.stage("infer"):
                    for _ in range(int(os.environ.get("WORK_UNITS", "1"))):
                        np.sort(batch * scale)
            """
        )
    )
    np.savez(tmp_path / "batch.npz", np.random.default_rng(2).random(4096), scale=np.array(2.0))
    common = ["serve:predict", "--data", "batch.npz", "--budget", "0.3"]
    saved = _bench(tmp_path, *common, "--save-baseline", "b.json")
    assert saved.returncode == 0, saved.stderr
    assert "infer" in saved.stdout and "baseline saved to b.json" in saved.stdout
    assert "4096 items per call" in saved.stdout
    same = _bench(tmp_path, *common, "--baseline", "b.json", "--max-increase", "3.0", "--json")
    assert same.returncode == 0, same.stdout + same.stderr
    [verdict] = json.loads(same.stdout)["verdicts"]
    assert verdict["outcome"] == "pass"
    slow = _bench(tmp_path, *common, "--baseline", "b.json", "--max-increase", "0.1", WORK_UNITS="4")
    assert slow.returncode == 1, slow.stdout + slow.stderr
    assert "regression:" in slow.stdout


def test_inferscope_bench_reports_bad_input_with_status_2(tmp_path):
    (tmp_path / "calls.csv").write_text("1,2\n")
    result = _bench(tmp_path, "json:dumps", "--data", "calls.csv")
    assert result.returncode == 2
    assert "unknown file type '.csv'; accepted: .npy, .npz, .jsonl" in result.stderr
    (tmp_path / "calls.jsonl").write_text("[1]\n")
    result = _bench(tmp_path, "json:dumps", "--data", "calls.jsonl", "--baseline", "calls.jsonl")
    assert result.returncode == 2 and "not an inferscope baseline file" in result.stderr


# --- the example ---------------------------------------------------------------------------------


@pytest.mark.expensive
def test_the_ci_gate_example_saves_and_checks_its_baseline(tmp_path):
    example = ROOT / "examples" / "ci_gate"
    args = [
        sys.executable, "-m", "pytest", str(example), "-q", "-p", "no:cacheprovider",
        "--rootdir", str(example), "--inferscope-budget=0.5",
        f"--inferscope-baseline-dir={tmp_path / 'baselines'}",
    ]  # fmt: skip
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("INFERSCOPE_RECORDER", None)
    saved = subprocess.run(
        [*args, "--inferscope-save-baseline"], env=env, capture_output=True, text=True, timeout=300
    )
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert list((tmp_path / "baselines").glob("*.json"))
    # The check of the same code passes. The example's tolerance is 10%, and on a shared 2-core
    # runner a neighbour can move even the calling thread's CPU time that much between two runs
    # (an A/A pair here once read +72% with the canary at +4.5%): a check that reports a regression
    # is run once more, as a CI job is rerun, and must pass then.
    for attempt in range(2):
        checked = subprocess.run(
            [*args, f"--inferscope-markdown={tmp_path / 'summary.md'}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if checked.returncode == 0 or "PerformanceRegression" not in checked.stdout or attempt:
            break
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "inferscope performance gate" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "state").exists()
