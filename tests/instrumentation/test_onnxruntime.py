"""onnxruntime instrumentation with a real ONNX graph (MatMul + Add + Relu) built in code."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import inferscope
from inferscope._keys import error_type_name
from tests.instrumentation import instrumenting, require
from tests.instrumentation.apps.models import mlp_onnx, onnx_inputs

ort = require("onnxruntime")
require("onnx")

from inferscope.instrumentation.onnxruntime import OnnxruntimeInstrumentor  # noqa: E402

PROVIDERS = ["CPUExecutionProvider"]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    mlp_onnx(path, version=7)
    return path


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments onnxruntime; teardown always uninstruments."""
    yield from instrumenting(OnnxruntimeInstrumentor)


def run_with_iobinding(session: Any, x: np.ndarray) -> np.ndarray:
    binding = session.io_binding()
    binding.bind_cpu_input("X", x)
    binding.bind_output("Y")
    session.run_with_iobinding(binding)
    result: np.ndarray = binding.copy_outputs_to_cpu()[0]
    return result


def test_run_and_run_with_iobinding_are_inferences_named_after_the_file(model_path, instrument):
    x = onnx_inputs()
    session = ort.InferenceSession(str(model_path), providers=PROVIDERS)
    expected = session.run(None, {"X": x})[0]
    expected_bound = run_with_iobinding(session, x)
    instrument()
    for _ in range(5):
        assert np.array_equal(session.run(None, {"X": x})[0], expected)
    for _ in range(3):
        assert np.array_equal(run_with_iobinding(session, x), expected_bound)
    row = inferscope.snapshot().row("mlp")
    assert (row.count, row.version, row.errors) == (8, "7", 0)
    assert [(r.model, r.stage) for r in inferscope.snapshot().rows] == [("mlp", None)]


def test_a_session_from_bytes_is_named_by_producer_and_graph(instrument):
    data = mlp_onnx(version=2, producer="trainer", graph="scorer")
    instrument()
    session = ort.InferenceSession(data, providers=PROVIDERS)
    session.run(None, {"X": onnx_inputs()})
    row = inferscope.snapshot().row("trainer:scorer")
    assert (row.count, row.version) == (1, "2")


def test_a_session_from_anonymous_bytes_is_named_by_its_hash(instrument):
    import hashlib

    data = mlp_onnx(version=0, producer="", graph="")
    instrument()
    ort.InferenceSession(data, providers=PROVIDERS).run(None, {"X": onnx_inputs()})
    name = "onnx-" + hashlib.sha256(data).hexdigest()[:12]
    row = inferscope.snapshot().row(name)
    assert (row.count, row.version) == (1, None)  # model_version 0 means "not set"


def test_model_names_and_models_by_alias(model_path, tmp_path, instrument):
    other_path = tmp_path / "other.onnx"
    mlp_onnx(other_path, seed=3)
    instrument(models=["mlp"], model_names={"mlp.onnx": ("fraud-mlp", "12")})
    ort.InferenceSession(str(model_path), providers=PROVIDERS).run(None, {"X": onnx_inputs()})
    ort.InferenceSession(str(other_path), providers=PROVIDERS).run(None, {"X": onnx_inputs()})
    snap = inferscope.snapshot()
    assert [(r.model, r.version, r.count) for r in snap.rows] == [("fraud-mlp", "12", 1)]


def test_model_names_by_session_object(model_path, instrument):
    session = ort.InferenceSession(str(model_path), providers=PROVIDERS)
    instrument(model_names={session: "scorer"})
    session.run(None, {"X": onnx_inputs()})
    assert inferscope.snapshot().row("scorer").count == 1


def test_inside_a_tracked_inference_a_run_is_part_of_it(model_path, instrument):
    session = ort.InferenceSession(str(model_path), providers=PROVIDERS)
    instrument()

    @inferscope.track_inference(model="service")
    def serve(x):
        with inferscope.stage("infer"):
            return session.run(None, {"X": x})

    serve(onnx_inputs())
    snap = inferscope.snapshot()
    assert [(r.model, r.stage, r.count) for r in snap.rows] == [("service", None, 1), ("service", "infer", 1)]


def test_errors_pass_through_unchanged_and_are_counted(model_path, instrument):
    session = ort.InferenceSession(str(model_path), providers=PROVIDERS)
    instrument()
    with pytest.raises(Exception) as caught:
        session.run(None, {"not_an_input": onnx_inputs()})
    row = inferscope.snapshot().row("mlp")
    assert (row.count, row.errors) == (1, 1)
    assert row.error_types == {error_type_name(type(caught.value)): 1}


def test_uninstrument_restores_the_originals_by_identity(model_path, instrument):
    from onnxruntime.capi.onnxruntime_inference_collection import Session

    originals = {name: Session.__dict__[name] for name in ("run", "run_with_iobinding")}
    instrumentor = instrument()
    assert all(Session.__dict__[name] is not original for name, original in originals.items())
    assert {(klass, name) for klass, name, _ in instrumentor.patched} == {
        (Session, "run"),
        (Session, "run_with_iobinding"),
    }
    instrumentor.uninstrument()
    assert all(Session.__dict__[name] is original for name, original in originals.items())
    assert ort.InferenceSession.run is originals["run"]
    ort.InferenceSession(str(model_path), providers=PROVIDERS).run(None, {"X": onnx_inputs()})
    assert inferscope.snapshot().rows == ()
    instrumentor.instrument()  # for the fixture's teardown


def test_instrument_twice_is_idempotent(model_path, instrument, caplog):
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        OnnxruntimeInstrumentor().instrument()
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    ort.InferenceSession(str(model_path), providers=PROVIDERS).run(None, {"X": onnx_inputs()})
    assert inferscope.snapshot().row("mlp").count == 1


def test_dependencies_name_the_installed_distribution():
    from inferscope.instrumentation.onnxruntime import package

    dependencies = tuple(OnnxruntimeInstrumentor().instrumentation_dependencies())
    assert len(dependencies) == 1
    assert dependencies[0] in package._instruments_any
    assert OnnxruntimeInstrumentor()._check_dependency_conflicts() is None
