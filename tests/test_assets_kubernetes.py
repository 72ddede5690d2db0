"""The shipped PrometheusRule and PodMonitor validate against the Prometheus operator's published
models (npm ``@kubernetes-models/prometheus-operator``, generated from the operator's CRDs), and a
broken one does not."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferscope import assets

pytestmark = pytest.mark.expensive

#: The models of prometheus-operator's CRDs, pinned: a new release may tighten the schemas.
MODELS = "@kubernetes-models/prometheus-operator@6.0.0"
NPM_TIMEOUT_S = 300

VALIDATE = """\
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import {
  PrometheusRule,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const models = { PodMonitor, PrometheusRule };
let failed = 0;
for (const manifest of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
  try {
    new models[manifest.kind](manifest).validate();
    console.log(`valid ${manifest.kind}`);
  } catch (error) {
    failed++;
    console.log(`invalid ${manifest.kind}: ${error.message}`);
  }
}
process.exit(failed ? 1 : 0);
"""


@pytest.fixture(scope="module")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the models installed and the script that validates manifests against them."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip(
            "node and npm are needed to validate against the operator's models (apt-get install nodejs npm)"
        )
    folder = tmp_path_factory.mktemp("k8s-models")
    (folder / "package.json").write_text('{"private": true}\n')
    installed = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-progress", MODELS],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_S,
    )
    if installed.returncode != 0:
        pytest.skip(f"npm could not install {MODELS}: {installed.stderr[-2000:]}")
    (folder / "validate.mjs").write_text(VALIDATE)
    return folder


def _validate(folder: Path, manifests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    path = folder / "manifests.json"
    path.write_text(json.dumps(manifests))
    node = shutil.which("node") or "node"
    return subprocess.run(
        [node, "validate.mjs", str(path)], cwd=folder, capture_output=True, text=True, timeout=60
    )


def _shipped() -> list[dict[str, Any]]:
    files = assets.shipped()
    return [yaml.safe_load(files[f"kubernetes/{name}.yaml"]) for name in ("prometheusrule", "podmonitor")]


def test_the_manifests_validate_against_the_operators_models(validator: Path) -> None:
    checked = _validate(validator, _shipped())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.split("\n")[:2] == ["valid PrometheusRule", "valid PodMonitor"]


def test_a_broken_manifest_does_not(validator: Path) -> None:
    rule, monitor = copy.deepcopy(_shipped())
    rule["spec"]["groups"][1]["rules"][0]["for"] = "an hour"
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "thirty seconds"
    checked = _validate(validator, [rule, monitor])
    assert checked.returncode == 1
    assert "invalid PrometheusRule: data/spec/groups/1/rules/0/for" in checked.stdout
    assert "invalid PodMonitor: data/spec/podMetricsEndpoints/0/interval" in checked.stdout
