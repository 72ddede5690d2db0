"""inferscope's spans reach a real OTLP collector (rotel) over gRPC and HTTP, with their links."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
from tests.integration.conftest import parse_rotel_spans, wait_until

import inferscope
from inferscope import _pipeline

if TYPE_CHECKING:
    from conftest import Rotel

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_arrive_with_names_links_and_status(rotel: Rotel, protocol: str) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    port = rotel.grpc_port if protocol == "grpc" else rotel.http_port
    endpoint = f"http://127.0.0.1:{port}"
    try:
        inferscope.configure(
            traces_exporters=["otlp"], otlp_protocol=protocol, otlp_endpoint=endpoint, trace_ratio=1.0
        )

        @inferscope.track_inference(model=model, version="2")
        def predict(fail: bool) -> None:
            with inferscope.stage("infer"):
                if fail:
                    raise ValueError

        predict(False)
        with pytest.raises(ValueError):
            predict(True)
        inferscope.shutdown()
    finally:
        _pipeline.configure()
    spans = wait_until(lambda: _complete(parse_rotel_spans(rotel.output()), model), 10, "4 spans at rotel")
    roots = [s for s in spans if s["Name"] == f"inference {model}"]
    stages = [s for s in spans if s["Name"] == "stage infer"]
    assert len(roots) == 2 and len(stages) == 2
    by_id = {s["ID"]: s for s in roots}
    for stage in stages:
        parent = by_id[stage["Parent ID"]]
        assert parent["Trace ID"] == stage["Trace ID"]
        assert parent["Status code"] == stage["Status code"]
    assert sorted(s["Status code"] for s in roots) == ["STATUS_CODE_ERROR", "STATUS_CODE_UNSET"]
    assert all(not s["Parent ID"] for s in roots)


def _complete(spans: list[dict[str, str]], model: str) -> list[dict[str, str]] | None:
    mine = [s for s in spans if s.get("Name") in (f"inference {model}", "stage infer")]
    return mine if len(mine) >= 4 else None
