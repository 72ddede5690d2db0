"""A real Prometheus 2.42 loads the shipped rules, scrapes a service that inferscope instruments,
and every rule evaluates: the recording rules produce series with plausible values, and the alert
on the in-process detector's regressions goes pending."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import inferscope
from inferscope import _pipeline, assets
from inferscope.assets import rules
from inferscope.export import spec

if TYPE_CHECKING:
    from conftest import Prometheus

pytestmark = [pytest.mark.integration, pytest.mark.expensive]

MODEL, VERSION = "rules-model", "7"
FAIL_EVERY = 4  # one call in four raises: an error ratio of 0.25
REGRESSION = "inferscope.regression.active"


def _api(prometheus: Prometheus, path: str) -> Any:
    with urllib.request.urlopen(f"{prometheus.url}/api/v1/{path}", timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def _serve_calls(stop: threading.Event) -> threading.Thread:
    @inferscope.track_inference(model=MODEL, version=VERSION)
    def predict(i: int) -> None:
        with inferscope.stage("preprocess"):
            sum(range(2_000))
        with inferscope.stage("infer"):
            time.sleep(0.002)  # off CPU
            if i % FAIL_EVERY == 0:
                raise ValueError("bad input")

    def loop() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            with contextlib.suppress(ValueError):
                predict(i)

    for i in range(1, 4 * FAIL_EVERY + 1):  # both series exist before the first scrape
        with contextlib.suppress(ValueError):
            predict(i)
    _pipeline.DRAINER.drain()
    thread = threading.Thread(target=loop, name="test-calls", daemon=True)
    thread.start()
    return thread


def _value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_the_shipped_rules_evaluate_over_a_scraped_service(
    start_prometheus: Callable[..., Prometheus], tmp_path: Path
) -> None:
    assets.write_assets(tmp_path / "assets")
    rules_file = tmp_path / "assets" / "prometheus" / rules.RULES_FILE
    stop = threading.Event()
    original = spec._providers.get(REGRESSION)  # the detector's, restored afterwards
    thread = None
    try:
        inferscope.configure(service_name="rules-svc", metrics_exporters=["prometheus"], prometheus_port=0)
        port = _pipeline.prometheus_port()
        assert port is not None
        regression = {
            "inferscope.model.name": MODEL,
            "inferscope.model.version": VERSION,
            "inferscope.stage.name": "infer",
            "inferscope.regression.cause": "more_work",
        }
        spec.register_provider(REGRESSION, lambda: [(1.0, regression)])
        thread = _serve_calls(stop)
        prometheus = start_prometheus([f"127.0.0.1:{port}"], rule_files=[rules_file])

        # Every recording rule produces series, except those whose inputs this machine lacks.
        throttling = spec.get("inferscope.container.cpu.periods").unavailable_reason()
        for record in dict.fromkeys(r.record for r in rules.RECORDS):
            if record == rules.THROTTLED and throttling:
                continue
            prometheus.wait_for(record, timeout_s=30)

        selector = f'{{inferscope_model_name="{MODEL}"}}'
        ratio = prometheus.wait_for(rules.ERROR_RATIO_RECORD + selector)
        assert [s["metric"]["inferscope_model_version"] for s in ratio] == [VERSION]
        assert _value(ratio[0]) == pytest.approx(1 / FAIL_EVERY, abs=0.1)

        quantiles = {
            s["metric"]["quantile"]: _value(s) for s in prometheus.query(rules.DURATION_QUANTILE + selector)
        }
        assert set(quantiles) == set(rules.QUANTILES)
        # Every call sleeps 2 ms; interpolation inside a bucket can put the median a little below.
        assert 0.001 <= quantiles["0.5"] <= quantiles["0.95"] <= quantiles["0.99"]

        off_cpu = {
            s["metric"]["inferscope_stage_name"]: _value(s)
            for s in prometheus.wait_for(rules.STAGE_OFF_CPU + selector)
        }
        assert set(off_cpu) >= {"preprocess", "infer"}
        assert all(0.0 <= share <= 1.0 for share in off_cpu.values())
        assert off_cpu["infer"] > 0.5  # it sleeps

        [cpu] = prometheus.wait_for(rules.CPU_PER_INFERENCE + selector)
        assert 0 < _value(cpu) < 1
        for sample in prometheus.query(rules.PROCESS_CPU_PER_INFERENCE):
            assert sample["metric"]["job"] == "inferscope"  # the scrape job of the fixture

        # No rule failed to evaluate, and the detector's regression is pending (for 5 minutes).
        groups = _api(prometheus, "rules")["groups"]
        evaluated = [rule for group in groups for rule in group["rules"]]
        assert len(evaluated) == len(rules.RECORDS) + len(rules.ALERTS)
        assert [(r["name"], r["lastError"]) for r in evaluated if r["health"] != "ok"] == []

        def pending() -> list[dict[str, Any]]:
            alerts = _api(prometheus, "alerts")["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "InferscopeRegressionActive"]

        deadline = time.monotonic() + 20
        while not pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        [alert] = pending()
        assert alert["state"] == "pending"
        assert alert["labels"]["inferscope_regression_cause"] == "more_work"
        assert alert["labels"]["inferscope_stage_name"] == "infer"
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        if original is not None:
            spec.register_provider(REGRESSION, original)
        else:
            spec.unregister_provider(REGRESSION)
        _pipeline.configure()
