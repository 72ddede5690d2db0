"""The operators' assets: the rules name only what inferscope exports, promtool accepts them and
their unit tests pass, the Kubernetes manifests carry the same rules, and ``inferscope assets``
writes exactly what the package ships."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferscope import assets, cli
from inferscope.assets import collectors, kubernetes, promql, rule_tests, rules

from ._output import ROOT

PROMTOOL = "/usr/bin/promtool"
PROMTOOL_TIMEOUT_S = 120


def _promtool() -> str:
    found = PROMTOOL if os.access(PROMTOOL, os.X_OK) else shutil.which("promtool")
    if found is None:
        message = (
            "promtool not found; install it with `apt-get install -y --no-install-recommends prometheus`"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: the rules must be checked there)", pytrace=False)
        pytest.skip(message)
    return found


# --- what the rules name -------------------------------------------------------------------------


def unknown_in_rules(rule_list: Iterable[dict[str, Any]]) -> list[str]:
    """What the rules name that inferscope does not export, nor the rules record or add."""
    rule_list = list(rule_list)
    recorded = {r["record"] for r in rule_list if "record" in r}
    added = {label for r in rule_list for label in r.get("labels", {})}
    problems = []
    for rule in rule_list:
        name = rule.get("record") or rule.get("alert")
        problems += [
            f"{name}: {p}" for p in promql.unknown_names(rule["expr"], series=recorded, labels=added)
        ]
        # Alert templates read labels too: "{{ $labels.x }}" of a label the alert lacks renders "".
        read = promql.template_labels(" ".join(rule.get("annotations", {}).values()))
        known = promql.exported_labels() | promql.TARGET_LABELS | added
        problems += [f"{name}: label {label}" for label in sorted(read - known)]
    return problems


def _all_rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_the_rules_name_only_metrics_and_labels_that_inferscope_exports() -> None:
    rule_list = _all_rules(rules.rule_groups())
    assert unknown_in_rules(rule_list) == []
    # Every metric a rule reads is one the specification exports to Prometheus.
    read = set().union(*(promql.names_in(r["expr"])[0] for r in rule_list))
    assert {
        "inferscope_inference_duration_seconds_bucket",
        "inferscope_stage_cpu_time_seconds_sum",
        "process_memory_usage_bytes",
        "inferscope_container_cpu_throttled_periods_total",
        "inferscope_sdk_records_dropped_total",
        "inferscope_regression_active",
    } <= read


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(inferscope_inference_duration_seconds_buckets[5m]) > 0", "metric"),
        ('inferscope_regression_active{inferscope_model="x"} > 0', "label"),
        ("sum by (job, model) (rate(inferscope_sdk_errors_total[5m]))", "label"),
        ("inferscope_sdk_exports_failed_total > 0", "metric"),  # OTLP only: not on /metrics
        ("rate(job:undefined:rate5m[1h] offset 1w)", "metric"),
    ],
)
def test_a_rule_naming_what_inferscope_does_not_export_is_caught(expr: str, problem: str) -> None:
    bad = {"alert": "Bad", "expr": expr, "annotations": {"summary": "{{ $labels.job }}"}}
    [found] = unknown_in_rules([*_all_rules(rules.rule_groups()), bad])
    assert found.startswith(f"Bad: {problem} ")


def test_names_in_reads_metrics_and_labels_of_an_expression() -> None:
    metrics, labels = promql.names_in(
        'histogram_quantile(0.95, sum by (job, le) (rate(a_bucket{x="1", y=~"b.c"}[5m] offset 1w)))'
        " / on (job) b:c:rate5m > 1.2 and ignoring(z) d"
    )
    assert metrics == {"a_bucket", "b:c:rate5m", "d"}
    assert labels == {"job", "le", "x", "y", "z"}


# --- the shipped files ---------------------------------------------------------------------------


def test_the_shipped_assets_are_what_the_generators_make() -> None:
    shipped = assets.shipped()
    assert set(shipped) == set(assets.generators()), "a shipped file without a generator, or the reverse"
    made = {}
    for relative, make in assets.generators().items():
        try:
            made[relative] = make()
        except ImportError:  # a generator's own tests cover it where its dependency installs
            continue
    assert {relative: shipped[relative] for relative in made} == made, (
        "the shipped assets differ from their generators: run python -m inferscope.assets"
    )
    assert {"prometheus", "kubernetes", "collectors"} <= {relative.split("/")[0] for relative in made}


def test_the_package_data_globs_ship_every_asset() -> None:
    # Python 3.10 has no tomllib: the table's lines, read as they are written.
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    patterns = re.findall(r'^\s*"([^"]+)",?$', table, re.MULTILINE)
    assert "py.typed" in patterns
    for relative in assets.shipped():
        path = Path("assets", assets.SHIPPED_DIR, relative)
        assert any(path.match(pattern) for pattern in patterns), path


def test_the_cli_writes_every_asset_and_keeps_a_changed_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "observability"
    assert cli.main(["assets", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    written = {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*") if p.is_file()}
    assert written == assets.shipped()
    assert sorted(printed) == sorted(str(out / relative) for relative in written)

    # Run again: the same files are fine; a file the user changed is kept unless --force.
    assert cli.main(["assets", "--out", str(out)]) == 0
    rules_file = out / "prometheus" / rules.RULES_FILE
    rules_file.write_text("# mine\n")
    (out / "collectors" / "rotel.env").unlink()
    capsys.readouterr()
    assert cli.main(["assets", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert rules_file.read_text() == "# mine\n"
    assert not (out / "collectors" / "rotel.env").exists()  # nothing is written when refused
    assert cli.main(["assets", "--out", str(out), "--force"]) == 0
    assert rules_file.read_text() == assets.shipped()[f"prometheus/{rules.RULES_FILE}"]


def test_the_cli_reports_a_folder_it_cannot_write(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["assets", "--out", str(blocker / "sub")]) == 1
    assert "cannot write" in capsys.readouterr().err


# --- promtool ------------------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    promtool = _promtool()
    assets.write_assets(tmp_path)  # what a user gets: the tests find the rules beside them
    folder = tmp_path / "prometheus"
    checked = _run([promtool, "check", "rules", rules.RULES_FILE], folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    count = len(rules.RECORDS) + len(rules.ALERTS)
    assert f"SUCCESS: {count} rules found" in checked.stdout
    tested = _run([promtool, "test", "rules", rule_tests.TESTS_FILE], folder)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.expensive
def test_promtool_week_over_week_unit_tests_pass(tmp_path: Path) -> None:
    promtool = _promtool()
    assets.write_assets(tmp_path)
    tested = _run([promtool, "test", "rules", rule_tests.WEEK_TESTS_FILE], tmp_path / "prometheus")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_unit_tests_exercise_every_alert_both_ways() -> None:
    cases = [*rule_tests.rule_tests()["tests"], *rule_tests.week_rule_tests()["tests"]]
    for alert in rules.ALERTS:
        checks = [
            c for case in cases for c in case.get("alert_rule_test", []) if c["alertname"] == alert.alert
        ]
        assert any(c["exp_alerts"] for c in checks), f"{alert.alert} is never expected to fire"
        assert any(not c["exp_alerts"] for c in checks), f"{alert.alert} is never expected to stay quiet"
        # Every case that fires leaves a series beside it that does not.
        for check in checks:
            [case] = [c for c in cases if check in c.get("alert_rule_test", [])]
            assert len(case["input_series"]) > len(check["exp_alerts"])
    records = {r.record for r in rules.RECORDS}
    tested = {promql.names_in(t["expr"])[0].pop() for case in cases for t in case.get("promql_expr_test", [])}
    assert records - tested <= {
        rules.BUCKET_RATE,
        rules.MODEL_BUCKET_RATE,
        rules.ERRORS,
        rules.MODEL_INFERENCES,
    }


@pytest.mark.parametrize(
    ("field", "broken"), [("for", "0m"), ("expr", "inferscope_regression_active > 1")], ids=["early", "never"]
)
def test_a_broken_rule_fails_its_unit_tests(tmp_path: Path, field: str, broken: str) -> None:
    # The unit tests can fail: an alert that fires too early, or never, does not pass them.
    promtool = _promtool()
    document = rules.rule_groups()
    [regression] = [r for r in _all_rules(document) if r.get("alert") == "InferscopeRegressionActive"]
    regression[field] = broken
    (tmp_path / rules.RULES_FILE).write_text(yaml.safe_dump(document))
    tests = rule_tests.rule_tests()
    tests["tests"] = [case for case in tests["tests"] if "regression" in case["name"]]
    (tmp_path / rule_tests.TESTS_FILE).write_text(yaml.safe_dump(tests))
    tested = _run([promtool, "test", "rules", rule_tests.TESTS_FILE], tmp_path)
    assert tested.returncode != 0
    assert "alertname: InferscopeRegressionActive" in tested.stdout + tested.stderr


# --- Kubernetes ----------------------------------------------------------------------------------


def test_the_prometheus_rule_carries_the_rules_file_groups(tmp_path: Path) -> None:
    shipped = assets.shipped()
    manifest = yaml.safe_load(shipped["kubernetes/prometheusrule.yaml"])
    rules_file = yaml.safe_load(shipped[f"prometheus/{rules.RULES_FILE}"])
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == rules_file
    assert "namespace" not in manifest["metadata"]  # kubectl apply -n puts it beside the service


def test_the_pod_monitor_scrapes_the_named_port_of_the_opted_in_pods() -> None:
    manifest = yaml.safe_load(assets.shipped()["kubernetes/podmonitor.yaml"])
    assert manifest["kind"] == "PodMonitor"
    key, value = kubernetes.POD_LABEL
    assert manifest["spec"]["selector"] == {"matchLabels": {key: value}}
    [endpoint] = manifest["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == kubernetes.POD_PORT and endpoint["path"] == "/metrics"
    # The job label is the service: the rules aggregate by it.
    assert manifest["spec"]["jobLabel"] == kubernetes.JOB_LABEL


# --- collectors ----------------------------------------------------------------------------------


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored (docker's --env-file format)."""
    settings = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"ROTEL_[A-Z0-9_]+", key) and value == value.strip(), line
        settings[key] = value
    return settings


def test_the_rotel_env_file_is_one_setting_a_line() -> None:
    settings = parse_env_file(assets.shipped()["collectors/rotel.env"])
    assert settings == {name: value for name, value, _ in collectors.ROTEL_SETTINGS}
    assert settings["ROTEL_EXPORTER"] == "otlp"


#: Component types of the OpenTelemetry Collector contrib distribution that the gateway uses.
OTELCOL_COMPONENTS = {
    "receivers": {"otlp"},
    "processors": {"memory_limiter", "batch", "tail_sampling"},
    "exporters": {"otlp", "prometheusremotewrite", "otlphttp"},
    "extensions": {"health_check"},
}


def test_the_opentelemetry_collector_config_is_consistent() -> None:
    # Syntax and consistency only: no OpenTelemetry Collector can run here.
    config = yaml.safe_load(assets.shipped()["collectors/otelcol-gateway.yaml"])
    for kind, types in OTELCOL_COMPONENTS.items():
        for name in config[kind]:
            assert name.split("/")[0] in types, (kind, name)
    service = config["service"]
    assert set(service["extensions"]) <= set(config["extensions"])
    used: dict[str, set[str]] = {"receivers": set(), "processors": set(), "exporters": set()}
    for pipeline, parts in service["pipelines"].items():
        assert pipeline.split("/")[0] in ("metrics", "traces", "logs")
        for kind in used:
            assert parts[kind], (pipeline, kind)
            assert set(parts[kind]) <= set(config[kind]), (pipeline, kind)
            used[kind] |= set(parts[kind])
    for kind, names in used.items():
        assert names == set(config[kind]), f"{kind} defined but unused: {set(config[kind]) - names}"
    # Tail sampling needs every span of a trace: memory_limiter first, batch after the decision.
    traces = service["pipelines"]["traces"]["processors"]
    assert traces.index("memory_limiter") < traces.index("tail_sampling") < traces.index("batch")
    kept = [p for p in config["processors"]["tail_sampling"]["policies"] if p["type"] == "string_attribute"]
    assert kept[0]["string_attribute"]["key"] == "inferscope.trace.kept"


def test_the_docs_describe_every_rule_and_threshold() -> None:
    text = (ROOT / "docs" / "alerts.md").read_text()
    for alert in rules.ALERTS:
        assert f"`{alert.alert}`" in text, alert.alert
        assert f"| {alert.for_} | {alert.severity} |" in text, alert.alert
    for record in {r.record for r in rules.RECORDS} - {rules.BUCKET_RATE, rules.MODEL_BUCKET_RATE}:
        assert f"`{record}`" in text, record
    for figure in (
        f"{rules.LATENCY_RISE:.0%}",
        f"{rules.ERROR_RATIO:.0%}",
        f"{rules.MEMORY_GROWTH_BYTES_PER_HOUR // 2**20} MiB",
        f"{rules.THROTTLED_SHARE:.0%}",
        f"{rules.MIN_RATE_PER_S:g} inferences a second",
    ):
        assert figure in text, figure
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "checked for syntax only" in deploy
    for relative in assets.shipped():
        if relative.startswith(("prometheus/", "kubernetes/", "collectors/")):
            assert relative.split("/")[-1] in text + deploy, relative
