"""``inferscope report``: the data it gathers from a real run's recorder, and the page it writes.

The recorder comes from a real run (examples/report_demo.py, in its own process): a service with a
slower library path injected for real, and a second model whose name is hostile markup. What the
report shows is compared with what the recorder and ``inferscope status`` say, never with figures
written by the test. The browser checks are in test_report_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from inferscope.cli import main
from inferscope.cli.report import parse_since
from inferscope.history import HistoryStore
from inferscope.recorder import FlightRecorder
from inferscope.report import collect, render_html, to_json

HOSTILE = "<img src=x onerror=alert(1)>"
ROOT = Path(__file__).resolve().parent.parent
#: An environment variable the recorder keeps in its environment (threads_env): it must not reach
#: the report.
_RECORDED_VARIABLE = ("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class DemoRun:
    recorder: str
    report: str
    data: dict[str, Any]
    output: str


def demo_run(directory: Path) -> DemoRun:
    """Run examples/report_demo.py in its own process, writing a recorder and a report under
    ``directory``; the data is gathered again from the recorder as the demo gathered it."""
    recorder, report = str(directory / "recorder.sqlite"), str(directory / "report.html")
    env = dict(os.environ, PYTHONPATH=str(ROOT), **dict([_RECORDED_VARIABLE]))
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "report_demo.py"),
            *("--output", report, "--recorder", recorder, "--also-model", HOSTILE),
            *("--baseline-seconds", "5", "--inject-seconds", "15", "--after-seconds", "2"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    opened = FlightRecorder(recorder, create=False)
    try:
        data = collect(opened, since_unix=time.time() - 3600, now_seconds=3.0)
    finally:
        opened.close()
    return DemoRun(recorder, report, data, done.stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    return demo_run(tmp_path_factory.mktemp("report-run"))


def _finite_points(values: list[Any]) -> int:
    return sum(1 for v in values if isinstance(v, float | int) and math.isfinite(v))


def test_every_model_of_the_recorder_gets_charts_on_one_time_axis(run):
    models = {m["model"]: m for m in run.data["models"]}
    assert set(models) == {"scoring", HOSTILE}
    for model in models.values():
        times = model["time"]
        assert times == sorted(times) and len(times) >= 5
        assert model["charts"], model["model"]
        for chart in model["charts"]:
            assert chart["series"], chart["id"]
            for series in chart["series"]:
                assert len(series["values"]) == len(times)
                assert _finite_points(series["values"]) >= 1, (chart["id"], series["label"])
        ids = {c["id"] for c in model["charts"]}
        assert {"latency", "throughput", "stage_p95", "stage_split", "cpu", "size", "memory", "canary"} <= ids
        stages = {s["label"] for c in model["charts"] if c["id"] == "stage_p95" for s in c["series"]}
        assert stages == {"preprocess", "infer", "postprocess"}


def test_the_anchor_is_drawn_as_reference_lines_at_its_stored_quantiles(run):
    recorder = FlightRecorder(run.recorder, create=False)
    try:
        anchor = HistoryStore(recorder).load_anchor(None, "scoring")
    finally:
        recorder.close()
    assert anchor is not None
    model = next(m for m in run.data["models"] if m["model"] == "scoring")
    latency = next(c for c in model["charts"] if c["id"] == "latency")
    references = {s["label"]: s["values"] for s in latency["series"] if s.get("dash")}
    base = anchor.stage(None)
    assert base is not None
    for name in ("p50", "p95", "p99"):
        values = references[f"anchor {name}"]
        assert len(values) == len(model["time"])
        assert values == [pytest.approx(base.quantiles[name] * 1e3, rel=1e-3)] * len(values)


def test_the_regression_list_is_the_recorders(run):
    recorder = FlightRecorder(run.recorder, create=False)
    try:
        store = HistoryStore(recorder)
        for model in run.data["models"]:
            stored = sorted(
                (r.stage or "", r.metric, r.since, r.cause) for r in store.regressions(model=model["model"])
            )
            shown = sorted(
                (r["stage"] or "", r["metric"], r["since"], r["cause"]) for r in model["regressions"]
            )
            assert shown == stored
    finally:
        recorder.close()
    assert any(m["regressions"] for m in run.data["models"]), "the injected slowdown opened no regression"


def test_the_tax_line_is_the_one_inferscope_status_prints(run):
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["status", "--recorder", run.recorder, "--last", "3", "--json"]) == 0
    status = {m["model"]: m["tax"] for m in json.loads(out.getvalue())["models"]}
    for model in run.data["models"]:
        expected, tax = status[model["model"]], model["tax"]
        assert (expected is None) == (tax is None)
        if tax is not None:
            for name in ("latency_p50_ms", "latency_p95_ms", "cpu_hours_per_day"):
                if expected[name] is None:
                    assert tax[name] is None
                else:
                    assert tax[name] == pytest.approx(expected[name], rel=2e-3, abs=1e-3)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.styles: list[str] = []
        self._open: tuple[str, dict[str, str | None]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._open = (tag, dict(attrs))

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            tag, attrs = self._open
            if tag == "script":
                self.scripts.append((attrs, data))
            else:
                self.styles.append(data)
            self._open = None


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_self_contained_under_a_policy_that_forbids_the_network(run):
    page = Path(run.report).read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    policies = [
        a["content"]
        for t, a in parser.tags
        if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert len(policies) == 1
    directives = dict(d.strip().split(" ", 1) for d in (policies[0] or "").split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'none'"
    code = [text for attrs, text in parser.scripts if attrs.get("type") is None]
    assert len(code) == 2 and set(directives["script-src"].split()) == {_digest(t) for t in code}
    assert set(directives["style-src"].split()) == {_digest(t) for t in parser.styles}
    # Nothing is loaded from anywhere: no element names a source, a link or a frame.
    for tag, attrs in parser.tags:
        assert tag not in ("link", "iframe", "img", "object", "embed", "base"), tag
        assert not {"src", "href", "action", "srcset"} & set(attrs), (tag, attrs)
    data = [text for attrs, text in parser.scripts if attrs.get("type") == "application/json"]
    assert len(data) == 1 and json.loads(data[0])["models"]


def test_hostile_names_and_the_runs_environment_and_arguments_stay_out_of_the_markup(run):
    page = Path(run.report).read_text(encoding="utf-8")
    assert HOSTILE not in page and "<img" not in page
    data = page.split('id="inferscope-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data
    assert HOSTILE in {m["model"] for m in json.loads(data)["models"]}
    # The recorder keeps the thread variables of the environment; the report does not.
    recorder = FlightRecorder(run.recorder, create=False)
    try:
        kept = [recorder.environment(f) for f, _, _ in recorder.fingerprints()]
    finally:
        recorder.close()
    name, value = _RECORDED_VARIABLE
    assert any((env or {}).get("threads_env", {}).get(name) == value for env in kept)
    assert name not in page and "threads_env" not in page
    # Nor do the run's arguments and paths: the recorder is named by its file name alone.
    assert str(Path(run.recorder).parent) not in page and "--also-model" not in page


@pytest.mark.parametrize(
    "text",
    ["</script><script>alert(1)</script>", "<!--", "a & b", "\u2028", "]]>", "<img src=x onerror=alert(1)>"],
)
def test_to_json_escapes_markup_and_round_trips(text):
    data = {"models": [{"model": text, "values": [1.5, math.nan, math.inf, None]}]}
    escaped = to_json(data)
    assert not set("<>&") & set(escaped)
    assert json.loads(escaped) == {"models": [{"model": text, "values": [1.5, None, None, None]}]}


def test_a_served_page_may_fetch_its_own_origin_only():
    policy = re.search(
        r'Content-Security-Policy" content="([^"]*)"',
        render_html({"models": [], "environment": []}, served=True),
    )
    assert policy is not None
    assert "connect-src 'self'" in policy.group(1) and "default-src 'none'" in policy.group(1)


def test_downsampling_keeps_each_model_within_max_points(run):
    recorder = FlightRecorder(run.recorder, create=False)
    try:
        data = collect(recorder, since_unix=time.time() - 3600, max_points=4, now_seconds=3.0)
    finally:
        recorder.close()
    for model, full in zip(data["models"], run.data["models"], strict=True):
        # Buckets of a quarter of the span the windows cover: four, and one more where a bucket
        # boundary splits the first one.
        assert 1 <= len(model["time"]) <= 5 < len(full["time"])
        assert model["bucket_seconds"] >= (full["time"][-1] - full["time"][0]) / 4
        assert {c["id"] for c in model["charts"]} == {c["id"] for c in full["charts"]}
        for chart in model["charts"]:
            assert all(_finite_points(s["values"]) >= 1 for s in chart["series"])
        assert model["regressions"] == full["regressions"]


def test_cli_writes_the_report_and_reports_bad_settings(run, tmp_path, capsys):
    output = tmp_path / "cli.html"
    assert main(["report", "--recorder", run.recorder, "--since", "2h", "-o", str(output)]) == 0
    assert "2 model(s)" in capsys.readouterr().out
    assert "inferscope-data" in output.read_text(encoding="utf-8")
    assert main(["report", "--recorder", run.recorder, "--model", "nope", "-o", str(output)]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    assert main(["report", "--recorder", str(tmp_path / "absent.sqlite"), "-o", str(output)]) == 2
    with pytest.raises(SystemExit):
        main(["report", "--since", "forever"])
    assert "--since: expected a period such as 30d" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 30 * 86400.0), ("12h", 43200.0), ("90m", 5400.0), ("600", 600.0)]
)
def test_parse_since(text, seconds):
    assert parse_since(text) == seconds
