"""The ``inferscope`` command: its help, the registration of commands, demo, doctor and version.

``inferscope env`` is covered with the fingerprint it prints, in test_system_fingerprint.py.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import types
import urllib.request

import pytest

import inferscope
from inferscope import cli
from inferscope.cli._command import Command, bounded

from ._output import ROOT, rows, run


def test_help_says_what_the_tool_is_for_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: inferscope ")
    assert "measures what each inference of a deployed model costs" in text
    assert "``" not in text  # no raw docstring markup
    for name in cli.COMMANDS:
        assert re.search(rf"^    {name} +\w", text, re.MULTILINE), name


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_registered_module_defines_the_command_of_its_name(name, capsys):
    command = cli.load_command(name)
    assert command.name == name
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: inferscope {name} ")


def test_a_new_command_is_a_module_and_one_registration_line(monkeypatch, capsys):
    module = types.ModuleType("inferscope.cli.hello")

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=bounded(int, 1, 3), default=1)

    def hello(args: argparse.Namespace) -> int:
        print("hello " * args.times)
        return 7

    module.COMMAND = Command(name="hello", help="say hello", run=hello, add_arguments=add_arguments)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "hello"))
    assert cli.main(["hello", "--times", "2"]) == 7
    assert capsys.readouterr().out.split() == ["hello", "hello"]
    with pytest.raises(SystemExit):
        cli.main(["hello", "--times", "4"])
    assert capsys.readouterr().err.startswith("usage: inferscope hello ")


def test_a_module_without_a_command_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "inferscope.cli.broken", types.ModuleType("inferscope.cli.broken"))
    with pytest.raises(TypeError, match=r"inferscope\.cli\.broken\.COMMAND must be"):
        cli.load_command("broken")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seconds", "0"], "argument --seconds: must be from 0.1 to 600, got 0"),
        (["--seconds", "601"], "argument --seconds: must be from 0.1 to 600, got 601"),
        (["--seconds", "nan"], "argument --seconds: must be from 0.1 to 600, got nan"),
        (["--seconds", "soon"], "argument --seconds: expected float, got 'soon'"),
        (["--threads", "0"], "argument --threads: must be from 1 to 64, got 0"),
        (["--threads", "2.5"], "argument --threads: expected int, got '2.5'"),
    ],
)
def test_demo_reports_a_bad_value_with_its_own_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: inferscope demo [-h] ")
    assert err.rstrip().endswith(f"inferscope demo: error: {message}")


def test_doctor_rejects_too_few_calls_with_its_own_usage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["doctor", "--calls", "99"])
    err = capsys.readouterr().err
    assert err.startswith("usage: inferscope doctor ")
    assert "argument --calls: must be from 100 to 10000000, got 99" in err


def test_version_names_the_version_and_the_backend(capsys):
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == (
        f"inferscope {inferscope.__version__} ({inferscope.backend()} backend: {inferscope.BACKEND_REASON})\n"
    )


def test_the_module_runs_as_the_command():
    assert run("-m", "inferscope.cli", "version").startswith(f"inferscope {inferscope.__version__} (")


def test_demo_prints_both_models_and_stages_the_backend_once_and_why_there_are_errors():
    text = run("-m", "inferscope.cli", "demo", "--seconds", "1", "--threads", "2")
    out = rows(text)
    assert int(out[("demo-fraud", "-")][0]) > 10
    assert int(out[("demo-fraud", "infer/layer1")][0]) > 10
    assert int(out[("demo-ranker", "queue")][0]) > 10
    assert text.count("backend:") == 1
    assert f"backend: {inferscope.backend()}\n" in text
    assert "NaN on purpose" in text
    # Only demo-fraud's preprocess stage raises, on purpose: the other rows count no error.
    assert all(errors == "0" for (model, stage), (*_, errors) in out.items() if model == "demo-ranker")
    assert "dropped records: none" in text
    assert "no exporter configured" in text


def test_demo_prints_the_prometheus_endpoint_while_it_serves():
    env = {**os.environ, "INFERSCOPE_METRICS_EXPORTER": "prometheus", "INFERSCOPE_PROMETHEUS_PORT": "0"}
    with subprocess.Popen(
        [sys.executable, "-m", "inferscope.cli", "demo", "--seconds", "60", "--threads", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as demo:
        try:
            assert demo.stdout is not None
            url = None
            for line in demo.stdout:  # the header arrives while the load runs
                if line.startswith("Prometheus endpoint: "):
                    url = line.split()[2]
                    break
                if not line.strip():
                    break
            assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
            deadline = time.monotonic() + 60
            body = ""
            while "inferscope_inference_duration_seconds_count{" not in body and time.monotonic() < deadline:
                time.sleep(0.2)
                with urllib.request.urlopen(url, timeout=10) as response:
                    assert response.status == 200
                    body = response.read().decode()
            assert 'inferscope_model_name="demo-fraud"' in body
            assert demo.poll() is None  # scraped while the demo was running
        finally:
            demo.terminate()
            demo.communicate(timeout=30)


def test_doctor_reports_every_counter_and_the_cost_of_each_set():
    text = run("-m", "inferscope.cli", "doctor", "--calls", "500")
    for name in ("thread_cpu", "rusage", "perf", "rss", "python_heap", "cuda_memory"):
        assert f"  {name} " in text
    costs = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    for counter_set in ("minimal", "default", "full"):
        # Differences of two timings: a number, whose sign a busy machine may flip.
        tracked_ns, stage_ns = (float(cell) for cell in costs[counter_set][-2:])
        assert abs(tracked_ns) < 1e6 and abs(stage_ns) < 1e6
    assert "GPU (NVML)" in text
