"""Every query of the shipped Grafana dashboards runs against a real Prometheus 2.42 holding a week
of real inferscope data, and returns some.

The data: a service (dashboard_service.py) under load serves inferscope's Prometheus endpoint; two
OpenMetrics scrapes of it, a few seconds apart, give each series its value and its rise. A week of
samples is made from them (counters keep rising by that rise, with a daily swing; gauges keep their
value), written as OpenMetrics with timestamps and backfilled with ``promtool tsdb
create-blocks-from openmetrics``, so that the week-over-week queries have a week earlier. The same
Prometheus also scrapes the live service, with exemplar storage on, for the exemplars.

Grafana's variables are resolved as Grafana would: each variable's ``label_values`` query runs
against Prometheus (and must find values), and the panels' queries get the values found, and
``$__rate_interval`` for the data's resolution. A query that returns nothing fails, except those of
the panels that ``dashboards.OPTIONAL_PANELS`` declares (GPU panels on a CPU machine...).
"""

from __future__ import annotations

import copy
import json
import math
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from inferscope import assets
from inferscope.assets import dashboards
from inferscope.assets.dashboards import panels

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Prometheus

pytestmark = [pytest.mark.integration, pytest.mark.expensive]

SERVICE = Path(__file__).parent / "dashboard_service.py"
START_TIMEOUT_S = 60
PROMTOOL = "/usr/bin/promtool"
#: The resolution of the backfilled week: Grafana's $__rate_interval is four of it at least.
STEP_S = 600
HISTORY_S = 7 * 86400 + 2 * 3600
BACKFILL_INSTANCE = "backfill:9464"
JOB = "inferscope"  # the scrape job of the Prometheus fixture
_CUMULATIVE = re.compile(r"(_total|_bucket|_count|_sum)$")


@pytest.fixture
def service(tmp_path: Path) -> Iterator[int]:
    """The port of a running dashboard_service.py."""
    errors = tmp_path / "service-stderr.txt"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(SERVICE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None and process.stdin is not None
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if not line.strip().isdigit():
            process.kill()
            process.wait(10)
            pytest.fail(f"the service did not start: {line}{errors.read_text()}")
        yield int(line)
    finally:
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def _scrape(port: int) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def week_of_openmetrics(first: str, second: str, now_s: float) -> str:
    """A week of samples up to ``now_s`` from two scrapes: each cumulative series (counters,
    histogram buckets, counts and sums) rises every STEP_S by its rise between the scrapes, scaled
    by a daily swing of +-50%; every other series keeps its value from the second scrape."""
    before = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(first)
        for s in family.samples
    }
    steps = int(HISTORY_S // STEP_S)
    start = now_s - steps * STEP_S
    times = [start + k * STEP_S for k in range(steps + 1)]
    swing = [1 + 0.5 * math.sin(2 * math.pi * t / 86400) for t in times]
    progress = [sum(swing[: k + 1]) - swing[0] for k in range(len(swing))]
    lines: list[str] = []
    for family in text_string_to_metric_families(second):
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = {**sample.labels, "job": JOB, "instance": BACKFILL_INSTANCE}
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            head = f"{sample.name}{{{text}}}"
            rise = 0.0
            if _CUMULATIVE.search(sample.name) and family.type in ("counter", "histogram"):
                rise = max(
                    sample.value - before.get((sample.name, tuple(sorted(sample.labels.items()))), 0), 0
                )
            lines += [
                f"{head} {sample.value + rise * p:.6g} {t:.3f}" for t, p in zip(times, progress, strict=True)
            ]
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def _backfill(text: str, tmp_path: Path) -> Path:
    source, storage = tmp_path / "week.om", tmp_path / "tsdb"
    source.write_text(text)
    # One block per 162 h (the hidden --max-block-duration): promtool reads the input once per block.
    result = subprocess.run(
        [
            PROMTOOL,
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            "--quiet",
            "--max-block-duration=162h",
            "--",
            str(source),
            str(storage),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return storage


# --- Grafana's side: variables and intervals ------------------------------------------------------

_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.*), *(?P<label>\w+)\)$", re.DOTALL)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _seconds(relative: str) -> float:
    match = re.fullmatch(r"now-(\d+)([smhdw])", relative)
    assert match, relative
    return int(match[1]) * _DURATION_UNITS[match[2]]


def _api(prometheus: Prometheus, path: str, **params: Any) -> Any:
    url = f"{prometheus.url}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as error:  # a query Prometheus rejects: say which, and why
        body = json.load(error)
    assert body["status"] == "success", f"{path} {params}: {body}"
    return body["data"]


def _substitute(text: str, values: dict[str, str]) -> str:
    for name in sorted(values, key=len, reverse=True):  # $version before $v...
        text = text.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    return text


def _regex_escape(value: str) -> str:
    """A value as Grafana's Prometheus data source puts it into a regex matcher: each regex
    metacharacter behind an escaped backslash (a backslash inside a PromQL string)."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def resolve_variables(dashboard: dict[str, Any], prometheus: Prometheus, now_s: float) -> dict[str, str]:
    """Each query variable's values as Grafana finds them (label_values over the dashboard's time
    range), formatted as Grafana puts a selection into a regex matcher: ``(a|b)`` for all values of
    a multi-value variable, the first value of a single one."""
    values: dict[str, str] = {}
    start = now_s - _seconds(dashboard["time"]["from"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"])
        assert match, f"${variable['name']}: not a label_values() query: {variable['query']}"
        selector = _substitute(match["selector"], values)
        series = _api(prometheus, "series", **{"match[]": selector, "start": start, "end": now_s})
        found = sorted({s[match["label"]] for s in series if match["label"] in s})
        assert found, f"${variable['name']} has no values: {variable['query']} -> {selector}"
        if variable.get("multi"):
            values[variable["name"]] = "(" + "|".join(_regex_escape(v) for v in found) + ")"
        else:
            values[variable["name"]] = _regex_escape("fraud" if "fraud" in found else found[0])
    return values


def run_queries(
    dashboard: dict[str, Any], prometheus: Prometheus, now_s: float
) -> dict[tuple[str, str], int]:
    """(panel title, refId) -> the number of series each query of the dashboard returned, with the
    variables resolved and the range of the dashboard's default time range."""
    values = resolve_variables(dashboard, prometheus, now_s)
    range_s = _seconds(dashboard["time"]["from"])
    step_s = max(STEP_S, math.ceil(range_s / 1000 / 60) * 60)  # Grafana: about one point a pixel
    values["__rate_interval"] = f"{max(step_s + STEP_S, 4 * STEP_S)}s"
    counts: dict[tuple[str, str], int] = {}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = _substitute(target["expr"], values)
            assert "$" not in expr, f"{panel['title']}: a variable left in {expr}"
            if target.get("instant"):
                result = _api(prometheus, "query", query=expr, time=now_s)["result"]
            else:
                result = _api(
                    prometheus, "query_range", query=expr, start=now_s - range_s, end=now_s, step=step_s
                )["result"]
            counts[(panel["title"], target["refId"])] = len(result)
    return counts


def test_every_dashboard_query_returns_data_from_a_week_of_inferscope_metrics(
    service: int, start_prometheus: Callable[..., Prometheus], tmp_path: Path
) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip(
            "promtool not found; install it with `apt-get install -y --no-install-recommends prometheus`"
        )
    first = _scrape(service)
    time.sleep(3)
    second = _scrape(service)
    now_s = time.time()
    storage = _backfill(week_of_openmetrics(first, second, now_s - 60), tmp_path)
    prometheus = start_prometheus(
        [f"127.0.0.1:{service}"], "--enable-feature=exemplar-storage", storage=storage
    )
    duration = f"{dashboards.DURATION}_count"
    backfilled = prometheus.query(f'{duration}{{instance="{BACKFILL_INSTANCE}"}}[1w] offset 1d')
    assert backfilled and all(len(s["values"]) > 500 for s in backfilled), "the backfilled week is missing"
    prometheus.wait_for(f'{duration}{{instance!="{BACKFILL_INSTANCE}"}}')  # the live scrape too

    shipped = {
        name.split("/")[-1]: json.loads(text)
        for name, text in assets.shipped().items()
        if name.startswith("grafana/")
    }
    assert set(shipped) == {f"{dashboards.OVERVIEW_UID}.json", f"{dashboards.MODEL_UID}.json"}
    empty: dict[str, list[str]] = {}
    now_s = time.time()
    for name, dashboard in shipped.items():
        for (title, ref), count in run_queries(dashboard, prometheus, now_s).items():
            if count == 0:
                empty.setdefault(title, []).append(f"{name} {ref}")
    unexpected = {title: where for title, where in empty.items() if title not in dashboards.OPTIONAL_PANELS}
    assert unexpected == {}, f"these panels' queries returned nothing: {unexpected}"
    print("empty here, as declared:", {title: dashboards.OPTIONAL_PANELS[title] for title in empty})

    # The same run finds a query that matches nothing: a version that does not exist.
    broken = copy.deepcopy(shipped[f"{dashboards.OVERVIEW_UID}.json"])
    [throughput] = [p for p in panels(broken) if p["title"] == "Throughput"]
    throughput["targets"][0]["expr"] = throughput["targets"][0]["expr"].replace('"$version"', '"no-such"')
    assert run_queries(broken, prometheus, now_s)[("Throughput", "A")] == 0

    # The week-over-week p95 compares two real hours: the daily swing leaves the p95 alone.
    overview = shipped[f"{dashboards.OVERVIEW_UID}.json"]
    [week] = [p for p in panels(overview) if p["title"] == "p95 against a week earlier"]
    values = resolve_variables(overview, prometheus, now_s)
    ratios = _api(prometheus, "query", query=_substitute(week["targets"][0]["expr"], values), time=now_s)
    assert ratios["result"], "no week-over-week ratio"
    for sample in ratios["result"]:
        assert 0.5 < float(sample["value"][1]) < 2, sample

    # Exemplars of kept spans, on the queries that ask for them, carry the trace id Grafana links on.
    def exemplars() -> list[dict[str, Any]]:
        model = resolve_variables(shipped[f"{dashboards.MODEL_UID}.json"], prometheus, time.time())
        model["__rate_interval"] = "1m"
        found = []
        for dashboard in shipped.values():
            for panel in panels(dashboard):
                for target in panel["targets"]:
                    if target.get("exemplar"):
                        expr = _substitute(target["expr"], {**values, **model})
                        found += prometheus.exemplars(expr)
        return found

    deadline = time.monotonic() + 30
    while not (found := exemplars()) and time.monotonic() < deadline:
        time.sleep(1)
    labels = [e["labels"] for series in found for e in series["exemplars"]]
    assert labels, "no exemplars on the panels that show them"
    assert all(re.fullmatch(r"[0-9a-f]{32}", label["trace_id"]) for label in labels)
