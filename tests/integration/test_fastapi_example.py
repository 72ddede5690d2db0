"""examples/fastapi_service.py, served by uvicorn under ``opentelemetry-instrument`` and exporting
over OTLP to a real collector (rotel): the per-model, per-stage and serving series arrive, on the
same Resource as OpenTelemetry's own HTTP metrics, and the inference spans arrive as children of
OpenTelemetry's server spans. Once with torch, once with torch made
unimportable (the service then serves the scikit-learn model only)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
from tests.integration.conftest import Rotel, RotelPoint, free_port, parse_rotel_spans

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fastapi_service.py"
READY_TIMEOUT_S = 120.0  # importing torch and training the models
STOP_TIMEOUT_S = 60.0
CALLS = 4
ROW = [0.1, -0.2, 0.3, 0.4, -0.5, 0.6, 0.7, -0.8]
STREAM_ROWS = 3


def opentelemetry_instrument() -> str:
    candidate = Path(sys.executable).parent / "opentelemetry-instrument"
    found = str(candidate) if candidate.is_file() else shutil.which("opentelemetry-instrument")
    if found is None:
        pytest.skip("opentelemetry-instrument is not installed (pip install opentelemetry-instrumentation)")
    return found


def post(base: str, path: str, rows: list[list[float]]) -> tuple[int, Any]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps({"rows": rows}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, [json.loads(line) for line in text.splitlines()]


def wait_until_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the service exited with {process.returncode}:\n{log.read_text()}", pytrace=False)
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
                body: dict[str, Any] = json.load(response)
                return body
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    pytest.fail(f"the service was not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()}", pytrace=False)


def counts(points: list[RotelPoint], metric: str, *attributes: str) -> dict[tuple[str, ...], int]:
    return {
        tuple(p.attributes.get(name, "") for name in attributes): p.count
        for p in points
        if p.metric == metric
    }


def serve_and_call(rotel: Rotel, tmp_path: Path, pythonpath: list[Path]) -> tuple[dict[str, Any], Path]:
    """Start the example, call every endpoint, stop it with SIGTERM; returns ``/healthz``'s answer
    and the service's log."""
    port = free_port()
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OTEL_", "INFERSCOPE_")) or name == "INFERSCOPE_NO_EXTENSION"
    }
    env.update(
        {
            "OTEL_SERVICE_NAME": "scoring-api",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{rotel.grpc_endpoint}",
            # One export, at exit: every series shows once, with its final count.
            "OTEL_METRIC_EXPORT_INTERVAL": "600000",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_LOGS_EXPORTER": "none",
            # Zero-code keeps this share of the inferences under sampled server spans (besides the
            # slow and failed ones): all of them here, so that each request's trace can be checked.
            "INFERSCOPE_TRACE_RATIO": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(
        [*(str(p) for p in pythonpath), str(EXAMPLE.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    log = tmp_path / "service.log"
    argv = [
        opentelemetry_instrument(),
        sys.executable,
        str(EXAMPLE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            health = wait_until_ready(process, base, log)
            torch_served = "ranker" in health["models"]
            for _ in range(CALLS):
                status, body = post(base, "/predict/fraud", [ROW, ROW])
                assert status == 200 and len(body["probabilities"]) == 2, body
                status, body = post(base, "/predict/ranker", [ROW, ROW])
                assert status == (200 if torch_served else 404), body
            status, lines = post(base, "/predict/fraud/stream", [ROW] * STREAM_ROWS)
            assert status == 200 and len(lines) == STREAM_ROWS, lines
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, f"exit {process.returncode}\n{log.read_text()}"
    return health, log


@pytest.mark.integration
@pytest.mark.parametrize("with_torch", [True, False], ids=["torch", "without-torch"])
def test_the_fastapi_example_exports_models_and_serving_stages(
    rotel: Rotel, tmp_path: Path, with_torch: bool
) -> None:
    for module in ("fastapi", "uvicorn", "sklearn", "opentelemetry.distro"):
        pytest.importorskip(module)
    found = {ep.name for ep in entry_points(group="opentelemetry_instrumentor")}
    assert "inferscope_asgi" in found, (
        "the inferscope_asgi entry point is missing: reinstall (pip install -e .)"
    )
    pythonpath: list[Path] = []
    if with_torch:
        pytest.importorskip("torch")
    else:
        # torch's metadata stays installed (so its instrumentor is loaded and skips itself), but the
        # import fails, as on a machine without torch.
        blocked = tmp_path / "blocked"
        (blocked / "torch").mkdir(parents=True)
        (blocked / "torch" / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        )
        pythonpath.append(blocked)

    health, log = serve_and_call(rotel, tmp_path, pythonpath)
    text = log.read_text()
    assert "Traceback" not in text, text
    if with_torch:
        assert health["models"] == ["fraud", "ranker"]
    else:
        assert health["models"] == ["fraud"]
        assert "torch is not installed: serving only the scikit-learn model" in text

    rotel.wait_for_points(
        lambda p: (
            p.metric == "inferscope.stage.duration" and p.attributes.get("inferscope.stage.name") == "handler"
        ),
        timeout_s=30,
    )
    points = rotel.points()
    ours = [p for p in points if p.scope.split(" ")[0] == "inferscope"]
    http = [p for p in points if p.metric.startswith("http.server.")]
    assert ours and http, sorted({p.metric for p in points})
    # One pipeline: the application's HTTP metrics (OpenTelemetry's instrumentation) and ours.
    resource = http[0].resource
    assert resource["service.name"] == "scoring-api"
    assert all(p.resource == resource for p in ours)

    # Per model: every call of the fraud endpoint, and every row of the stream (scored in the response).
    pipeline_calls = CALLS + STREAM_ROWS
    expected_models = {("Pipeline", ""): pipeline_calls}
    if with_torch:
        expected_models[("RankerMLP", "1")] = CALLS
    assert (
        counts(ours, "inferscope.inference.duration", "inferscope.model.name", "inferscope.model.version")
        == expected_models
    )
    stages = counts(ours, "inferscope.stage.duration", "inferscope.model.name", "inferscope.stage.name")
    for step in ("scaler", "pca", "clf"):
        assert stages[("Pipeline", step)] == pipeline_calls

    # The serving stages: no model (the example names no route). Every POST had a JSON body, so a
    # queue stage; GET /healthz (at least the readiness call) has none.
    posts = 2 * CALLS + 1
    serving = {stage: n for (model, stage), n in stages.items() if model == ""}
    assert set(serving) == {"queue", "handler", "response"}, stages
    assert serving["queue"] == posts
    assert serving["handler"] == serving["response"] >= posts + 1
    errors = [p for p in ours if p.attributes.get("error.type")]
    assert not errors, [(p.metric, p.attributes) for p in errors]  # a 404 from the endpoint is no error

    # inferscope's aggregates go out once. The SDK exports its own instruments (the system signals
    # inferscope registered on its meter) once more when it shuts down at exit: once per export.
    aggregated = ("inferscope.inference.", "inferscope.stage.", "inferscope.sdk.")
    series = [
        (p.metric, tuple(sorted(p.attributes.items()))) for p in ours if p.metric.startswith(aggregated)
    ]
    assert len(series) == len(set(series)), "a series was exported twice"
    per_export = [(p.metric, tuple(sorted(p.attributes.items())), p.fields["Timestamp"]) for p in ours]
    assert len(per_export) == len(set(per_export)), "a series was exported twice in one export"
    assert "process.cpu.time" in {p.metric for p in ours}  # the system signals are not lost

    # Traces: OpenTelemetry's server span of each request, our inference span as its child (every
    # one is kept at INFERSCOPE_TRACE_RATIO=1), the Pipeline's steps below it.
    spans = parse_rotel_spans(rotel.output())
    requests = {s["ID"]: s for s in spans if s.get("Name", "").startswith("POST /predict/fraud")}
    inferences = [s for s in spans if s.get("Name") == "inference Pipeline"]
    assert len(inferences) == pipeline_calls, sorted({s.get("Name") for s in spans})
    for inference in inferences:
        parent = requests[inference["Parent ID"]]
        assert parent["Trace ID"] == inference["Trace ID"]
    by_id = {s["ID"]: s for s in inferences}
    steps = [s for s in spans if s.get("Name") == "stage clf"]
    assert len(steps) == pipeline_calls
    assert all(by_id[s["Parent ID"]]["Trace ID"] == s["Trace ID"] for s in steps)
