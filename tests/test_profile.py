"""``inferscope profile`` (cProfile split by stage) and the stacks sampled when a regression opens.

The command runs in its own interpreter on a real module with two stages, one of which does far more
work. The sampler reads the real stacks of threads held inside stages; the end-to-end test opens a
real regression in a running service with one-second windows and reads the profile back through
``inferscope status`` and the report's data.
"""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import inferscope
from inferscope.detector import Regression
from inferscope.profile import sampler as sampler_module
from inferscope.profile.sampler import StackSampler
from inferscope.profile.staged import profile_calls
from inferscope.profile.stored import profile_lines, profile_of, profiles_of
from inferscope.recorder import FlightRecorder

from .conftest import run_python

ROOT = Path(__file__).resolve().parent.parent

SERVICE_MODULE = """
import inferscope

def crunch_numbers(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    return total

def tidy(values):
    return [v for v in values]

@inferscope.track_inference(model="scorer")
def predict(values, rounds=1):
    with inferscope.stage("preprocess"):
        cleaned = tidy(values)
    with inferscope.stage("infer"):
        with inferscope.stage("head"):
            score = crunch_numbers(20000 * rounds)
    return score + len(cleaned)
"""


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferscope.cli", *argv],
        cwd=cwd,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _names(profile: dict[str, Any]) -> list[str]:
    return [entry["function"] for entry in profile["top"]]


def test_profile_command_names_the_expensive_function_in_the_stage_that_calls_it(tmp_path):
    (tmp_path / "scoring.py").write_text(SERVICE_MODULE)
    data = tmp_path / "calls.jsonl"
    data.write_text("[[1, 2, 3]]\n[[4, 5], 2]\n")
    done = _cli(
        "profile",
        "scoring:predict",
        "--data",
        str(data),
        "--repeat",
        "3",
        "--json",
        "--output",
        "out",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["model"] == "scorer" and run["calls"] == 6
    stages = {s["stage"]: s for s in run["stages"]}
    assert set(stages) == {"preprocess", "infer", "infer/head", "(outside stages)"}
    assert stages["infer/head"]["entries"] == 6
    # The expensive function is charged to the stage open while it ran, and to no other stage.
    assert any(name.startswith("crunch_numbers (") for name in _names(stages["infer/head"]))
    assert any(name.startswith("tidy (") for name in _names(stages["preprocess"]))
    for other in ("preprocess", "infer", "(outside stages)"):
        assert not any("crunch_numbers" in name for name in _names(stages[other])), other
    assert any(name.startswith("crunch_numbers (") for name in _names(run["whole"]))
    # The .pstats files load in pstats and hold the same split.
    for stage in (*stages.values(), run["whole"]):
        assert stage["pstats"] is not None and (tmp_path / stage["pstats"]).is_file()
    head = pstats.Stats(str(tmp_path / stages["infer/head"]["pstats"]))
    functions = {name for (_, _, name) in head.stats}  # type: ignore[attr-defined]
    assert "crunch_numbers" in functions
    pre = pstats.Stats(str(tmp_path / stages["preprocess"]["pstats"]))
    assert "crunch_numbers" not in {name for (_, _, name) in pre.stats}  # type: ignore[attr-defined]
    whole = pstats.Stats(str(tmp_path / run["whole"]["pstats"]))
    assert {"crunch_numbers", "tidy", "predict"} <= {name for (_, _, name) in whole.stats}  # type: ignore[attr-defined]


def test_profile_command_prints_tables_and_takes_an_array_file(tmp_path):
    np = pytest.importorskip("numpy")
    (tmp_path / "arrays.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            import inferscope

            def heavy(x):
                return sum(float(v) for v in x for _ in range(200))

            @inferscope.track_inference
            def predict(x):
                with inferscope.stage("infer"):
                    return heavy(x)
            """
        )
    )
    np.save(tmp_path / "batch.npy", np.arange(64.0))
    done = _cli(
        "profile", "arrays:predict", "--data", "batch.npy", "--repeat", "2", "--top", "3", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "stage infer: 2 entries" in done.stdout and "heavy (arrays.py:" in done.stdout
    assert (tmp_path / "inferscope-profile" / "stage-infer.pstats").is_file()


def test_profile_command_reports_what_it_cannot_run(tmp_path, monkeypatch, capsys):
    from inferscope.cli import main

    # In this process: the pipeline stays as it is, and inferscope.stage is given back.
    monkeypatch.setattr(inferscope, "configure", lambda **settings: None)
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = inferscope.stage
    (tmp_path / "calls.jsonl").write_text("[1]\n")
    data = str(tmp_path / "calls.jsonl")
    assert main(["profile", "no_such_module_h16:predict", "--data", data]) == 2
    assert "cannot import 'no_such_module_h16'" in capsys.readouterr().err
    assert main(["profile", "json:loads", "--data", str(tmp_path / "calls.csv")]) == 2
    assert "unknown file type '.csv'" in capsys.readouterr().err
    (tmp_path / "broken_h16.py").write_text("def predict(x):\n    raise RuntimeError('boom')\n")
    assert main(["profile", "broken_h16:predict", "--data", data, "--repeat", "1"]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err
    assert inferscope.stage is stage


# --- the sampler's view of a stack -------------------------------------------------------------

RELEASE = threading.Event()


def wait_here() -> None:
    RELEASE.wait(30)


PREPROCESS = inferscope.stage("preprocess")


@inferscope.track_inference(model="sampled")
def nested(kind: str) -> None:
    if kind == "literal":
        with inferscope.stage("infer"):
            with inferscope.stage("encoder"):
                wait_here()
    elif kind == "module_variable":
        with PREPROCESS:
            wait_here()
    elif kind == "local":
        step = inferscope.stage("postprocess")
        with step:
            wait_here()
    elif kind == "decorated":
        decorated_step()
    elif kind == "dynamic":
        with inferscope.stage("dyn" + kind[:1]):  # a name built at run time is not seen
            wait_here()
    else:
        wait_here()


@inferscope.stage("serialize")
def decorated_step() -> None:
    wait_here()


class Model:
    def __init__(self) -> None:
        self.encoder_stage = inferscope.stage("encode")

    @inferscope.track_inference(model="method-model")
    def predict(self) -> None:
        with self.encoder_stage:
            wait_here()


@contextmanager
def held(target: Callable[..., None], *args: Any) -> Iterator[threading.Thread]:
    """A thread running ``target`` and held inside ``wait_here`` until the block ends."""
    RELEASE.clear()
    thread = threading.Thread(target=target, args=args)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _waiting(thread):
            time.sleep(0.005)
        assert _waiting(thread)
        yield thread
    finally:
        RELEASE.set()
        thread.join(10)


def _waiting(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code is wait_here.__code__:
            return True
        frame = frame.f_back
    return False


def _where(sampler: StackSampler, thread: threading.Thread) -> tuple[str | None, str, str]:
    frame = sys._current_frames()[thread.ident or 0]
    stack = []
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    stack.reverse()
    model, _, path, stage_at = sampler._where(stack)
    return model, "/".join(path), stack[stage_at].f_code.co_name


@pytest.mark.parametrize(
    ("kind", "path", "stage_frame"),
    [
        ("literal", "infer/encoder", "nested"),
        ("module_variable", "preprocess", "nested"),
        ("local", "postprocess", "nested"),
        ("decorated", "serialize", "decorated_step"),
        ("dynamic", "", "_bootstrap"),
        ("none", "", "_bootstrap"),
    ],
)
def test_the_stage_a_thread_is_in_is_read_from_its_stack(kind, path, stage_frame):
    sampler = StackSampler()
    with held(nested, kind) as thread:
        model, found, frame = _where(sampler, thread)
    assert model == "sampled"
    assert found == path
    if path:
        assert frame == stage_frame


def test_a_method_and_its_stage_held_in_an_attribute_are_found():
    with held(Model().predict) as thread:
        assert _where(StackSampler(), thread)[:2] == ("method-model", "encode")


@inferscope.track_inference(model="sized-model", size=len)
def sized_predict(batch: list[int]) -> None:
    with inferscope.stage("infer"):
        wait_here()


@inferscope.track_inference(model="streamed-model")
def streamed(n: int) -> Iterator[int]:
    yield from range(n)


def test_functions_tracked_with_a_size_or_as_generators_are_known_by_their_model():
    # Their wrappers are plain functions: they carry the key, as the tracked function does.
    with held(sized_predict, [1, 2, 3]) as thread:
        assert _where(StackSampler(), thread)[:2] == ("sized-model", "infer")
    for func in (sized_predict, streamed):
        assert isinstance(func.inferscope_key, int)
    RELEASE.set()
    run = profile_calls(sized_predict, [(([1, 2],), {})], warmup=0)
    assert run.model == "sized-model"  # not tracked a second time under its own name
    assert profile_calls(streamed, [((3,), {})], warmup=0).model == "streamed-model"


def _regression(stage: str | None, model: str = "sampled", metric: str = "p95") -> Regression:
    return Regression(
        model=model,
        version=None,
        stage=stage,
        cause="more_work",
        metric=metric,
        baseline_value=0.01,
        current_value=0.02,
        change=1.0,
        since=time.time(),
        shape="step",
        evidence={},
        active=True,
    )


def test_samples_of_the_stage_name_the_function_it_waits_in(tmp_path):
    sampler = StackSampler()
    target = sampler_module._Target("svc", "sampled", None, "infer/encoder", "p95", time.time())
    other = sampler_module._Target("svc", "sampled", None, "preprocess", "p95", time.time())
    with held(nested, "literal"):
        for _ in range(3):
            sampler._sample([target, other], threading.get_ident())
    assert (target.stage_samples, target.model_samples) == (3, 0)
    assert (other.stage_samples, other.model_samples) == (0, 3)  # the model's thread, another stage
    target.started_unix = other.started_unix = time.time()
    recorder = FlightRecorder(tmp_path / "recorder.sqlite")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampler_module, "_recorder", lambda: recorder)
        sampler._finish(target)
        sampler._finish(other)
    stored = {row["stage"]: row["payload"] for row in recorder.profiles(service="svc", model="sampled")}
    assert stored["infer/encoder"]["attribution"] == "stage"
    names = [entry["function"] for entry in stored["infer/encoder"]["top"]]
    assert any(name.startswith("wait_here (") for name in names)
    innermost = stored["infer/encoder"]["top"][0]
    assert innermost["share"] == 1.0
    # Where the stage was never seen, the model's stacks are stored, and say so.
    assert stored["preprocess"]["attribution"] == "model" and stored["preprocess"]["samples"] == 3
    assert sampler.stored == 2
    recorder.close()


def test_one_sampling_per_stage_per_hour_and_none_for_memory():
    inferscope.configure(metrics_exporters=())  # a running pipeline: the sampler stops at shutdown
    sampler = StackSampler()
    sampler.window_seconds = 0.05
    try:
        assert sampler.regression_opened("svc", _regression("infer"))
        assert not sampler.regression_opened("svc", _regression("infer", metric="cpu"))
        assert sampler.skipped == 1
        assert sampler.regression_opened("svc", _regression("preprocess"))
        assert not sampler.regression_opened("svc", _regression(None, metric="rss"))
        deadline = time.monotonic() + 20
        while len(sampler.recent) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {p.stage for p in sampler.recent} == {"infer", "preprocess"}
    finally:
        sampler.stop()
    assert sampler._thread is None or not sampler._thread.is_alive()


def test_the_setting_turns_sampling_off():
    inferscope.configure(profile_on_regression=False, metrics_exporters=())
    try:
        assert not sampler_module.regression_opened("svc", _regression("never-sampled"))
    finally:
        inferscope.configure(metrics_exporters=())
    assert inferscope.configure(metrics_exporters=()).profile_on_regression is True


def test_status_lines_of_a_stored_profile(tmp_path):
    recorder = FlightRecorder(tmp_path / "recorder.sqlite")
    since = time.time() - 30
    top = [{"function": "crunch (svc.py:3)", "samples": 9, "share": 0.9, "self_share": 0.8}]
    payload = {"attribution": "stage", "samples": 10, "seconds": 10.0, "top": top}
    assert recorder.save_profile("svc", "m", None, "infer", "p95", since, since + 5, since + 15, payload)
    assert recorder.save_profile("svc", "m", None, "other", "p95", since, since + 5, since + 15, payload)
    profiles = profiles_of(recorder, "svc", "m")
    regression = {"version": None, "stage": "infer", "since": since}
    found = profile_of(profiles, regression)
    assert found is not None and found["top"] == top and found["attribution"] == "stage"
    assert profile_of(profiles, {**regression, "since": since + 60}) is None  # begun before it
    text = "\n".join(profile_lines(found))
    assert "10 samples" in text and "90%" in text and "crunch (svc.py:3)" in text
    recorder.close()


def test_a_forked_child_runs_no_sampler_and_can_start_its_own():
    done = run_python(
        """
        import os, sys, threading, time
        import inferscope
        from inferscope.detector import Regression
        from inferscope.profile.sampler import SAMPLER

        def regression(stage):
            now = time.time()
            return Regression("m", None, stage, "more_work", "p95", 1.0, 2.0, 1.0, now, "step", {}, True)

        inferscope.configure(metrics_exporters=())
        SAMPLER.window_seconds = 30.0
        assert SAMPLER.regression_opened("svc", regression("infer"))
        assert SAMPLER._thread is not None and SAMPLER._thread.is_alive()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                names = [t.name for t in threading.enumerate()]
                assert "inferscope-stack-sampler" not in names, names
                assert SAMPLER._thread is None
                SAMPLER.window_seconds = 0.05
                assert SAMPLER.regression_opened("svc", regression("child-stage"))
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    if any(p.stage == "child-stage" for p in SAMPLER.recent):
                        break
                    time.sleep(0.02)
                assert any(p.stage == "child-stage" for p in SAMPLER.recent)
                SAMPLER.stop()
            except BaseException as exc:
                print("child:", repr(exc), file=sys.stderr)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert SAMPLER._thread is not None and SAMPLER._thread.is_alive()  # the parent's goes on
        thread = SAMPLER._thread
        start = time.monotonic()
        inferscope.shutdown()
        thread.join(5)
        assert not thread.is_alive(), "stops once the runtime is shut down"
        assert SAMPLER._thread is None and not SAMPLER.recent  # what it was sampling is dropped
        print("ok", round(time.monotonic() - start, 3))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


LIVE_SERVICE = """
import json, sys, threading, time
import inferscope
from inferscope.detector import detector as current_detector
from inferscope.profile.sampler import SAMPLER

SLOW = threading.Event()

def featurize(x):
    return [v + 1 for v in x]

def slow_path(x):
    return sum(i * i % 7 for i in range(400_000))

def fast_path(x):
    return len(x)

@inferscope.track_inference(model="live")
def predict(x):
    with inferscope.stage("preprocess"):
        x = featurize(x)
    with inferscope.stage("infer"):
        return slow_path(x) if SLOW.is_set() else fast_path(x)

inferscope.configure(
    window_seconds=1, baseline_seconds=4, regression_sustain_seconds=3, metrics_exporters=(),
    counters="thread_cpu", service_name="live-svc",
)
SAMPLER.window_seconds = 3.0
stop = threading.Event()

def load():
    while not stop.is_set():
        predict([1, 2, 3])
        time.sleep(0.002)

worker = threading.Thread(target=load, daemon=True)
worker.start()
detector = current_detector()
deadline = time.monotonic() + 60
while detector.anchor("live") is None and time.monotonic() < deadline:
    time.sleep(0.1)
SLOW.set()
while not any(p.stage == "infer" for p in SAMPLER.recent) and time.monotonic() < deadline + 60:
    time.sleep(0.1)
stop.set()
worker.join(10)
inferscope.shutdown()
print(json.dumps({"stored": SAMPLER.stored, "started": SAMPLER.started, "errors": SAMPLER.errors}))
"""


@pytest.mark.expensive
def test_a_real_regression_stores_the_top_functions_of_its_stage_and_status_shows_them(tmp_path):
    recorder_path = tmp_path / "recorder.sqlite"
    # A file, not `python -c`: the sampler reads the stage's `with` block from the source.
    (tmp_path / "live_service.py").write_text(LIVE_SERVICE)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "live_service.py")],
        env=dict(os.environ, INFERSCOPE_RECORDER=str(recorder_path)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["stored"] >= 1 and counts["errors"] == 0, (counts, done.stderr)

    recorder = FlightRecorder(recorder_path, create=False)
    rows = [r for r in recorder.profiles(service="live-svc", model="live") if r["stage"] == "infer"]
    assert rows, recorder.profiles(service="live-svc")
    payload = rows[0]["payload"]
    assert payload["attribution"] == "stage" and payload["samples"] > 0
    names = [entry["function"] for entry in payload["top"]]
    assert any(name.startswith("slow_path (") for name in names), names
    assert not any(name.startswith("featurize (") for name in names)
    assert payload["sampler_cpu_seconds"] <= payload["seconds"]

    # inferscope status shows them with the regression, in text and JSON.
    status = subprocess.run(
        [sys.executable, "-m", "inferscope.cli", "status", "--recorder", str(recorder_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    (model,) = json.loads(status.stdout)["models"]
    infer = [r for r in model["regressions"] if r["stage"] == "infer"]
    assert infer and any(r["profile"] and r["profile"]["attribution"] == "stage" for r in infer)
    assert any("slow_path (" in t["function"] for r in infer if r["profile"] for t in r["profile"]["top"])
    text = subprocess.run(
        [sys.executable, "-m", "inferscope.cli", "status", "--recorder", str(recorder_path), "--last", "600"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "sampled for" in text and "slow_path (" in text

    # The report's data carries the same profile with the regression.
    from inferscope.report import collect

    data = collect(recorder, since_unix=time.time() - 3600, model="live", now_seconds=60)
    reported = [r for m in data["models"] for r in m["regressions"] if r["stage"] == "infer"]
    assert any("slow_path (" in t["function"] for r in reported if r["profile"] for t in r["profile"]["top"])
    recorder.close()


@pytest.mark.expensive
def test_the_example_prints_the_sampled_functions_of_the_regressed_stage(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "profile_regression.py"),
            "--recorder",
            str(tmp_path / "r.sqlite"),
            "--sample-seconds",  # the sampler keeps to 1% of a core: a few stacks a second
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "sampled scoring/infer:" in done.stdout
    sampled = done.stdout.split("sampled scoring/infer:", 1)[1].split("flight recorder:", 1)[0]
    assert "renormalise (" in sampled  # the costly step, in the stage or the model's stacks
    assert "sampled for" in done.stdout  # inferscope status, under the regression
