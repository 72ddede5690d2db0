"""The Grafana dashboards: built with grafana-foundation-sdk exactly as shipped, naming only what
inferscope exports, wired to their variables, and (expensive) type-checked by ``tsc`` against the
``@grafana/schema`` of the same Grafana release. tests/integration/test_dashboards_prometheus.py
runs every query against a real Prometheus."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from inferscope import assets
from inferscope.assets import dashboards, promql
from inferscope.assets.dashboards import panels
from inferscope.export import spec

from ._output import ROOT

#: The npm packages of the type check, pinned: @grafana/schema of the SDK's Grafana release, and a
#: TypeScript that reads it.
TYPESCRIPT = "5.8.3"
GRAFANA_SCHEMA = dashboards.GRAFANA_RELEASE
PACKAGES = (f"typescript@{TYPESCRIPT}", f"@grafana/schema@{GRAFANA_SCHEMA}")
NPM_TIMEOUT_S = 300
TSC_TIMEOUT_S = 300

#: Metrics exported through OTLP only, as Prometheus-compatible storage names them after the
#: standard conversion (a collector's prometheusremotewrite exporter, Mimir's OTLP endpoint).
OTLP_ONLY = {entry.prometheus_name for entry in spec.METRICS.values() if not entry.prometheus}
#: Values that stand in for Grafana's variables when a query is read as PromQL.
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def shipped() -> dict[str, dict[str, Any]]:
    return {
        relative.split("/", 1)[1]: json.loads(text)
        for relative, text in assets.shipped().items()
        if relative.startswith("grafana/")
    }


def problems(dashboard: dict[str, Any]) -> list[str]:
    """What the dashboard's queries and variables name that inferscope does not export."""
    found: list[str] = []

    def check(where: str, expr: str) -> None:
        as_promql = _VARIABLE.sub(lambda m: "5m" if m[1].startswith("__") else "x", expr)
        found.extend(f"{where}: {name}" for name in promql.unknown_names(as_promql, series=OTLP_ONLY))

    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), *(\w+)\)", variable["query"], re.DOTALL)
            if match is None:
                found.append(f"${variable['name']}: not a label_values() query")
                continue
            check(f"${variable['name']}", f"{match[1]} * on ({match[2]}) vector(1)")
    for panel in panels(dashboard):
        for target in panel["targets"]:
            check(f"{panel['title']} {target['refId']}", target["expr"])
    return found


# --- what is shipped ------------------------------------------------------------------------------


def test_the_shipped_dashboards_are_what_the_sdk_builds() -> None:
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk needs Python 3.11+")
    built = dashboards.dashboards()
    assert set(built) == set(shipped()) == {"inferscope-overview.json", "inferscope-model.json"}
    for name, document in built.items():
        assert assets.shipped()[f"grafana/{name}"] == dashboards.render(document), (
            f"{name} differs from what the SDK builds: run python -m inferscope.assets"
        )


def test_building_without_the_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "grafana_foundation_sdk", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"grafana-foundation-sdk \(Python 3\.11\+"):
        dashboards.dashboards()
    [make] = [m for relative, m in assets.generators().items() if relative.endswith("model.json")]
    with pytest.raises(ImportError, match="inferscope assets"):
        make()


def test_the_cli_writes_the_dashboards(tmp_path: Path) -> None:
    written = {p.relative_to(tmp_path).as_posix() for p in assets.write_assets(tmp_path)}
    assert {"grafana/inferscope-overview.json", "grafana/inferscope-model.json"} <= written
    assert json.loads((tmp_path / "grafana/inferscope-model.json").read_text())["uid"] == dashboards.MODEL_UID


# --- what the panels name -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inferscope-overview.json", "inferscope-model.json"])
def test_every_query_names_only_metrics_and_labels_that_inferscope_exports(name: str) -> None:
    assert problems(shipped()[name]) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("inferscope_inference_duration_seconds_bucket", "inferscope_inference_latency_bucket", "metric"),
        ("inferscope_model_name", "model", "label"),
        ("inferscope_tax_cpu", "inferscope_tax_cpu_seconds", "metric"),
    ],
)
def test_a_panel_naming_what_inferscope_does_not_export_is_caught(old: str, new: str, problem: str) -> None:
    broken = copy.deepcopy(shipped()["inferscope-overview.json"])
    changed = 0
    for panel in panels(broken):
        for target in panel["targets"]:
            if old in target["expr"]:
                target["expr"] = target["expr"].replace(old, new)
                changed += 1
    assert changed
    assert any(f"{problem} {new}" in found for found in problems(broken)), problems(broken)


# --- how the dashboards are wired -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["inferscope-overview.json", "inferscope-model.json"])
def test_the_variables_choose_service_model_and_version_and_every_query_uses_them(name: str) -> None:
    dashboard = shipped()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "service", "model", "version"} <= set(variables)
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), f"{panel['title']} has no description"
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert '=~"$service"' in target["expr"], f"{panel['title']} ignores $service"
            assert "[5m]" not in target["expr"], f"{panel['title']}: a fixed window, not $__rate_interval"
            for grouping in re.findall(r"\bby \(([^)]*)\)", target["expr"]):
                labels = [label.strip() for label in grouping.split(",")]
                assert len(set(labels)) == len(labels), f"{panel['title']}: by ({grouping})"
    rows = [panel["id"] for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = rows + [panel["id"] for panel in panels(dashboard)]
    assert len(set(ids)) == len(ids)


def test_the_model_page_follows_one_model_and_the_overview_all() -> None:
    overview, model = shipped()["inferscope-overview.json"], shipped()["inferscope-model.json"]
    assert overview["time"]["from"] == "now-30d"
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["model"].get("multi") is not True
    assert {v["name"]: v.get("includeAll") for v in overview["templating"]["list"]}["model"] is True
    for dashboard in (overview, model):
        # The dashboards link to each other by tag, keeping the variables and the time range.
        [link] = dashboard["links"]
        assert link["tags"] == dashboard["tags"] == ["inferscope"]
        assert link["includeVars"] and link["keepTime"]
        # The latency quantiles carry exemplars, the link from a slow dot to its trace.
        assert any(t.get("exemplar") for p in panels(dashboard) for t in p["targets"])


def test_the_declared_optional_panels_exist_and_name_what_they_need() -> None:
    titles = {p["title"] for d in shipped().values() for p in panels(d)}
    assert set(dashboards.OPTIONAL_PANELS) <= titles
    # GPU panels, at least, may be empty on a machine without one.
    assert {t for t in titles if t.startswith("GPU")} <= set(dashboards.OPTIONAL_PANELS)


# --- the JSON against Grafana's own types (expensive: npm and tsc) ------------------------------


def _npm_packages() -> Path:
    """typescript and @grafana/schema, installed once per pair of versions under build/npm."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("npm and node are needed to type-check the dashboards: apt-get install -y nodejs npm")
    folder = ROOT / "build" / "npm" / f"typescript-{TYPESCRIPT}_grafana-schema-{GRAFANA_SCHEMA}"
    tsc = folder / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true}\n')
        result = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-save", *PACKAGES],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return folder


_PANEL_TYPES = {
    "timeseries": "timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen",
    "stat": "stat/panelcfg/x/StatPanelCfg_types.gen",
    "table": "table/panelcfg/x/TablePanelCfg_types.gen",
    "heatmap": "heatmap/panelcfg/x/HeatmapPanelCfg_types.gen",
}


# JSON holds a string enum's values, which TypeScript does not take for the enum's members: the
# type as its JSON reads, each string enum replaced by the union of its values (`${Enum}`).
_AS_JSON = """type AsJSON<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? AsJSON<U>[]
    : T extends object
      ? { [K in keyof T]: AsJSON<T[K]> }
      : T;"""


def typescript_module(dashboard: dict[str, Any]) -> str:
    """A TypeScript module that compiles only if ``dashboard`` satisfies @grafana/schema's
    Dashboard, and each panel's options and custom field config its plugin's types."""
    lines = ['import type { Dashboard } from "@grafana/schema";', _AS_JSON]
    for kind, path in _PANEL_TYPES.items():
        lines.append(f'import type * as {kind} from "@grafana/schema/dist/esm/raw/composable/{path}";')
    lines.append(f"export const dashboard = {json.dumps(dashboard, indent=1)} satisfies AsJSON<Dashboard>;")
    for i, panel in enumerate(panels(dashboard)):
        kind = panel["type"]
        assert kind in _PANEL_TYPES, f"{panel['title']}: no options type for {kind} panels here"
        options = panel.get("options", {})
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
        checks = [(f"options{i}", options, f"{kind}.Options")]
        if kind != "stat":  # stat panels have no custom field config
            checks.append((f"custom{i}", custom, f"{kind}.FieldConfig"))
        for name, value, type_name in checks:
            lines.append(f"export const {name} = {json.dumps(value)} satisfies AsJSON<Partial<{type_name}>>;")
    return "\n".join(lines) + "\n"


@pytest.mark.expensive
def test_the_dashboards_satisfy_the_grafana_schema_types(tmp_path: Path) -> None:
    folder = _npm_packages()
    sources = []
    (tmp_path / "node_modules").symlink_to(folder / "node_modules")  # where tsc looks for them
    for name, dashboard in shipped().items():
        source = tmp_path / name.replace(".json", ".ts")
        source.write_text(typescript_module(dashboard))
        sources.append(source)
    # The same check fails on a dashboard that breaks the schema: a tooltip mode that is no
    # DashboardCursorSync, a panel without its grid height, a legend that is not a legend.
    broken = copy.deepcopy(shipped()["inferscope-overview.json"])
    broken["graphTooltip"] = "shared"
    first = next(panels(broken))
    del first["gridPos"]["h"]
    first["options"]["legend"]["displayMode"] = "grid"
    (tmp_path / "broken.ts").write_text(typescript_module(broken))
    sources.append(tmp_path / "broken.ts")
    result = subprocess.run(
        ["node", str(folder / "node_modules" / "typescript" / "bin" / "tsc"), "--noEmit", "--strict"]
        + ["--skipLibCheck", "--moduleResolution", "node10", "--module", "commonjs", "--target", "es2022"]
        + [s.name for s in sources],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TSC_TIMEOUT_S,
    )
    errors = [line for line in result.stdout.splitlines() if ": error TS" in line]
    assert [e for e in errors if not e.startswith("broken.ts(")] == [], result.stdout
    text = "\n".join(errors)
    assert "graphTooltip" in text or "DashboardCursorSync" in text, result.stdout
    assert "'h'" in text, result.stdout
    assert "grid" in text, result.stdout
