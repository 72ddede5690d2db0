"""The shipped rotel agent configuration (collectors/rotel.env), run by the real rotel-agent between
an instrumented service and a second rotel standing in for the gateway: the service's metrics and
spans arrive there intact."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from tests.integration.conftest import (
    READY_TIMEOUT_S,
    _accepts,
    _Process,
    _report,
    _rotel_binary,
    free_port,
    parse_rotel_spans,
    wait_until,
)
from tests.test_assets import parse_env_file

import inferscope
from inferscope import _pipeline, assets

if TYPE_CHECKING:
    from conftest import Rotel

pytestmark = pytest.mark.integration

CALLS = 40
FAIL_EVERY = 5
BOUNDARIES = [0.0005, 0.001, 0.005, 0.01, 0.1, 1.0]


@contextlib.contextmanager
def _agent(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway: Rotel):
    """rotel-agent with the shipped settings, listening on free ports and forwarding to ``gateway``
    in place of the gateway's address: the only settings changed."""
    settings = parse_env_file(assets.shipped()["collectors/rotel.env"])
    grpc_port, http_port = free_port(), free_port()
    settings |= {
        "ROTEL_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
        "ROTEL_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
        "ROTEL_OTLP_EXPORTER_ENDPOINT": f"http://{gateway.grpc_endpoint}",
        "ROTEL_PID_FILE": str(tmp_path / "agent.pid"),
        "ROTEL_LOG_FILE": str(tmp_path / "agent.log"),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)  # the agent's environment: rotel reads its settings there
    process = _Process("rotel agent", [_rotel_binary(), "start"], tmp_path / "agent-output.txt", tmp_path)
    try:
        wait_until(
            lambda: process.check_alive() or (_accepts(grpc_port) and _accepts(http_port)),
            READY_TIMEOUT_S,
            "the rotel agent to listen",
        )
        yield grpc_port
    finally:
        process.stop()
        _report(request, process)


def test_metrics_and_spans_pass_through_the_rotel_agent_intact(
    rotel: Rotel, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = f"fleet-{uuid.uuid4().hex[:8]}"
    model = f"m-{uuid.uuid4().hex[:8]}"

    @inferscope.track_inference(model=model, version="2")
    def predict(i: int) -> None:
        with inferscope.stage("preprocess"):
            pass
        with inferscope.stage("infer"):
            time.sleep(0.001)
            if i % FAIL_EVERY == 0:
                raise ValueError

    with _agent(request, monkeypatch, tmp_path, rotel) as port:
        try:
            # As docs/deploy.md sets a service up behind the agent.
            inferscope.configure(
                service_name=service,
                otlp_endpoint=f"http://127.0.0.1:{port}",
                metrics_exporters=["otlp"],
                traces_exporters=["otlp"],
                trace_ratio=1.0,
                histogram_aggregation="explicit",
                histogram_boundaries=BOUNDARIES,
            )
            for i in range(1, CALLS + 1):
                with contextlib.suppress(ValueError):
                    predict(i)
            inferscope.shutdown()  # the final export, through the agent
        finally:
            _pipeline.configure()

        points = rotel.wait_for_points(
            lambda p: (
                p.resource.get("service.name") == service and p.metric == "inferscope.inference.duration"
            )
        )
    failures = CALLS // FAIL_EVERY
    by_error = {p.attributes.get("error.type", ""): p for p in points}
    assert {k: p.count for k, p in by_error.items()} == {"": CALLS - failures, "ValueError": failures}
    for point in points:
        assert point.attributes["inferscope.model.name"] == model
        assert point.attributes["inferscope.model.version"] == "2"
        assert point.data_type == "Histogram" and point.explicit_bounds == BOUNDARIES
        assert sum(point.explicit_counts.values()) == point.count
        assert point.sum >= 0.001 * point.count  # every call slept 1 ms
    stages = {
        p.attributes["inferscope.stage.name"]: p
        for p in rotel.points()
        if p.resource.get("service.name") == service
        and p.metric == "inferscope.stage.duration"
        and "error.type" not in p.attributes
    }
    assert {name: p.count for name, p in stages.items()} == {"preprocess": CALLS, "infer": CALLS - failures}

    def spans() -> list[dict[str, str]] | None:
        mine = [
            s
            for s in parse_rotel_spans(rotel.output())
            if s.get("Name", "").endswith(model) or s.get("Name", "").startswith("stage ")
        ]
        return mine if len([s for s in mine if s["Name"] == f"inference {model}"]) >= CALLS else None

    found = wait_until(spans, 10, f"{CALLS} inference spans at the gateway")
    roots = {s["ID"]: s for s in found if s["Name"] == f"inference {model}"}
    assert len(roots) == CALLS
    children = [s for s in found if s.get("Parent ID") in roots]
    assert len(children) == 2 * CALLS  # preprocess and infer of every call, linked to their root
    for child in children:
        assert child["Trace ID"] == roots[child["Parent ID"]]["Trace ID"]
    assert sum(s["Status code"] == "STATUS_CODE_ERROR" for s in roots.values()) == failures
