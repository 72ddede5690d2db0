"""``inferscope report`` in a real browser: headless Chromium, driven over the DevTools protocol.

The reports come from a real run (examples/report_demo.py: a service with a regression injected
for real, and a second model with a hostile name). Each page must load with no console error and
no network request, draw every chart with finite points, show the hostile name as text with no
dialog, and list exactly the recorder's regressions. Screenshots are kept as test artifacts
(INFERSCOPE_TEST_ARTIFACTS, default: a folder in the temporary directory).
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inferscope.history import HistoryStore
from inferscope.recorder import FlightRecorder
from inferscope.report import render_html

from .test_report import HOSTILE, DemoRun, demo_run

pytestmark = pytest.mark.expensive

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
websocket = pytest.importorskip("websocket", reason="websocket-client is in the test dependency group")


def artifacts_dir() -> Path:
    path = Path(
        os.environ.get("INFERSCOPE_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "inferscope-artifacts"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One headless Chromium and one page of it, over the DevTools protocol."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1600",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.load(response)
        page = next(t for t in targets if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)
                if message["method"] == "Page.javascriptDialogOpening":
                    self.socket.send(
                        json.dumps(
                            {
                                "id": next(self.ids),
                                "method": "Page.handleJavaScriptDialog",
                                "params": {"accept": True},
                            }
                        )
                    )

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str, *, ready: int = 1, timeout: float = 30) -> None:
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while (self.evaluate("Number(document.body && document.body.dataset.ready || 0)") or 0) < ready:
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not render within {timeout} s: {self.errors()}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(params["entry"].get("text", "")[:500])
        return found

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"
        ]

    def dialogs(self) -> list[dict[str, Any]]:
        return [e["params"] for e in self.events if e["method"] == "Page.javascriptDialogOpening"]

    def close(self) -> None:
        sock = getattr(self, "socket", None)
        if sock is not None:
            sock.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    return demo_run(tmp_path_factory.mktemp("report-run"))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / "profile"
    profile.mkdir()
    opened = Browser(profile)
    try:
        yield opened
    finally:
        opened.close()


_CHARTS = """
window.inferscopeCharts.map(function (c) {
  return {model: c.model, id: c.id, finite: c.plot.data.slice(1).map(function (values) {
    return values.filter(function (v) { return typeof v === "number" && isFinite(v); }).length;
  })};
})
"""
_REGRESSIONS = """
Array.from(document.querySelectorAll("section.model")).map(function (s) {
  return {model: s.dataset.model, heading: s.querySelector("h2").textContent,
          rows: Array.from(s.querySelectorAll("tr[data-regression]"))
            .map(function (r) { return r.dataset.regression; })};
})
"""


def _check_page(page: Browser, data_models: list[dict[str, Any]], recorder_path: str, shot: Path) -> None:
    page.screenshot(shot)
    assert page.errors() == []
    assert page.dialogs() == []
    charts = page.evaluate(_CHARTS)
    assert charts, "no chart was drawn"
    for chart in charts:
        assert max(chart["finite"], default=0) >= 1, (
            f"chart {chart['id']} of {chart['model']} has no finite point"
        )
    for model in data_models:
        drawn = sorted(c["id"] for c in charts if c["model"] == model["model"])
        assert drawn == sorted(c["id"] for c in model["charts"])
        assert {"latency", "throughput", "stage_p95", "stage_split", "cpu", "memory", "canary"} <= set(drawn)
    # The hostile name is text: a heading that reads it, no element made of it.
    sections = page.evaluate(_REGRESSIONS)
    assert HOSTILE in [s["heading"] for s in sections]
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.body.textContent.indexOf(" + json.dumps(HOSTILE) + ")") >= 0
    # The regression list is the recorder's.
    recorder = FlightRecorder(recorder_path, create=False)
    try:
        store = HistoryStore(recorder)
        for section in sections:
            expected = sorted(
                (r.stage or "", r.metric, r.since) for r in store.regressions(model=section["model"])
            )
            shown = sorted(
                (stage, metric, float(since))
                for stage, metric, since in (row.split("|") for row in section["rows"])
            )
            assert shown == expected, section["model"]
        assert sum(len(s["rows"]) for s in sections) >= 1, "the run opened no regression to list"
    finally:
        recorder.close()


def test_the_report_of_a_real_run_renders_offline_with_no_request_no_error_and_hostile_names_as_text(
    browser, run
):
    url = Path(run.report).resolve().as_uri()
    browser.open(url)
    _check_page(browser, run.data["models"], run.recorder, artifacts_dir() / "report.png")
    assert browser.requests() == [url]  # the page itself, nothing else
    # The policy holds against a script that tries: the request is refused, not sent.
    outcome = browser.evaluate(
        "fetch('http://127.0.0.1:9/x')"
        ".then(function () { return 'sent'; }, function () { return 'refused'; })"
    )
    assert outcome == "refused"
    assert browser.requests() == [url]


def test_served_report_refreshes_from_the_recorder_and_fetches_only_its_own_origin(browser, run):
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inferscope.cli",
            "report",
            "--recorder",
            run.recorder,
            "--since",
            "1h",
            "--serve",
            "0",
            "--refresh",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        url = line.split("serving ", 1)[1].split()[0]
        browser.open(url, ready=2, timeout=30)  # the first render, then one refresh from data.json
        _check_page(browser, run.data["models"], run.recorder, artifacts_dir() / "report-served.png")
        origins = {u.split("/", 3)[2] for u in browser.requests()}
        assert origins == {url.split("/", 3)[2]}
        assert any(u.endswith("/data.json") for u in browser.requests())
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_markup_in_every_name_and_value_of_the_data_is_shown_as_text(browser, run, tmp_path):
    # The real run's data with every label, stage, cause and evidence value made hostile: whatever
    # a recorder could hold reaches the page as text, in the legends and tables uPlot and the page draw.
    data = copy.deepcopy(run.data)
    for n, model in enumerate(data["models"]):
        for chart in model["charts"]:
            chart["title"] = f"<b>{chart['title']}</b>"
            for series in chart["series"]:
                series["label"] = f"<img src=x onerror=alert({n})>{series['label']}"
        for regression in model["regressions"]:
            regression["stage"] = HOSTILE
            regression["cause"] = "<script>alert(2)</script>"
            regression["summary"] = HOSTILE
            regression["evidence"] = {"why": HOSTILE, "<i>name</i>": [HOSTILE]}
    page = tmp_path / "hostile.html"
    page.write_text(render_html(data), encoding="utf-8")
    url = page.resolve().as_uri()
    browser.open(url)
    browser.screenshot(artifacts_dir() / "report-hostile.png")
    assert browser.errors() == [] and browser.dialogs() == []
    assert browser.evaluate("document.querySelectorAll('img, b, i, main script').length") == 0
    legends = browser.evaluate(
        "Array.from(document.querySelectorAll('.u-legend .u-label')).map(e => e.textContent)"
    )
    assert any(label.startswith("<img src=x onerror=alert(") for label in legends)
    assert browser.requests() == [url]


def test_a_comparison_of_variants_is_a_section_of_the_report(browser, run, tmp_path):
    # A real comparison (a scikit-learn Pipeline against its ONNX Runtime conversion), saved as
    # `inferscope compare --output` saves it and added with `inferscope report --compare`.
    pytest.importorskip("skl2onnx")
    from inferscope.compare import compare

    from .instrumentation.apps.models import fitted_pipeline

    pipe, x = fitted_pipeline()
    saved = tmp_path / "compare.json"
    saved.write_text(compare(pipe, x[:16], seconds=0.2, rounds=4).to_json(), encoding="utf-8")
    page = tmp_path / "with-compare.html"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferscope.cli",
            "report",
            "--recorder",
            run.recorder,
            "--since",
            "1h",
            "--compare",
            str(saved),
            "-o",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    browser.open(page.resolve().as_uri())
    assert browser.errors() == [] and browser.dialogs() == []
    shown = browser.evaluate(
        "Array.from(document.querySelectorAll('section.compare tr')).map(function (r) {"
        "  return Array.from(r.children).map(function (c) { return c.textContent; }); })"
    )
    from inferscope.compare import load, report_section

    section = report_section(load(str(saved)))
    assert shown == [section["columns"], *section["rows"]]
    # A file that is not a comparison is refused with its name, and nothing is written.
    saved.write_text("{}", encoding="utf-8")
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "inferscope.cli",
            "report",
            "--recorder",
            run.recorder,
            "--compare",
            str(saved),
            "-o",
            str(tmp_path / "no.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and str(saved) in refused.stderr
    assert not (tmp_path / "no.html").exists()
