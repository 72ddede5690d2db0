"""torch instrumentation with a real small MLP built in code: counts, per-layer stages, identical
results, training skipped, errors counted once, exact restoration."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import inferscope
from inferscope._keys import error_type_name
from inferscope._runtime import REGISTRY

try:
    import torch
except ImportError:
    if sys.version_info[:2] != (3, 11):
        # Not a CI failure: torch is installed for Python 3.11 only on these machines (CPU build).
        pytest.skip(
            f"torch is installed for Python 3.11 only here, and this is Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}: skipped, under CI too",
            allow_module_level=True,
        )
    # As tests.instrumentation.missing() does, at module level: skip, or fail under CI.
    message = "torch is not installed; pip install torch==2.13.0 (Python 3.11, the CPU build)"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the frameworks are required)", pytrace=False)
    pytest.skip(message, allow_module_level=True)

from torch import nn

from inferscope.instrumentation.torch import (
    DEVICE_ATTRIBUTE,
    TorchInstrumentor,
)
from tests.instrumentation import instrumenting

FEATURES, HIDDEN, OUTPUTS = 8, 16, 3


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class MLP(nn.Module):
    """stem -> layers.0 -> layers.1 -> head; ``layers`` is a ModuleList, which is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(FEATURES, HIDDEN)
        self.layers = nn.ModuleList([Block(HIDDEN), Block(HIDDEN)])
        self.head = nn.Linear(HIDDEN, OUTPUTS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


class Boom(Exception):
    pass


class Raising(nn.Module):
    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, FEATURES)
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc(x)
        raise self.exc


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


def inputs(rows: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, FEATURES, generator=torch.Generator().manual_seed(seed))


def rows() -> list[tuple[str | None, str | None, int]]:
    return [(r.model, r.stage, r.count) for r in inferscope.snapshot().rows]


def inference_attributes(model: str) -> list[dict[str, str]]:
    return [
        dict(info.attributes) for info in REGISTRY.infos() if info.kind == "inference" and info.model == model
    ]


@pytest.fixture
def instrument() -> Iterator[Any]:
    """``instrument(**options)`` instruments torch; teardown always uninstruments."""
    yield from instrumenting(TorchInstrumentor)


# --- what counts -----------------------------------------------------------------------------------


def test_top_level_calls_are_inferences_and_results_are_bitwise_equal(instrument):
    model, x = mlp(), inputs()
    with torch.no_grad():
        expected = model(x)
    instrument()
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model(x), expected)
    assert torch.equal(model(x), expected)  # eval mode, grad enabled: an inference too
    # The submodules (stem, layers.0, fc, act, head) are not inferences of their own.
    assert rows() == [("MLP", None, 5)]
    row = inferscope.snapshot().row("MLP")
    assert (row.version, row.errors) == (None, 0)


def test_stages_at_depth_1_are_the_layers_named_by_their_module_names(instrument):
    model, x = mlp(), inputs()
    with torch.no_grad():
        expected = model(x)
    instrument(stage_depth=1)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert rows() == [
        ("MLP", None, 3),
        ("MLP", "head", 3),
        ("MLP", "layers.0", 3),
        ("MLP", "layers.1", 3),
        ("MLP", "stem", 3),
    ]


def test_stages_at_depth_2_nest_under_the_layers(instrument):
    model, x = mlp(), inputs()
    instrument(stage_depth=2)
    with torch.no_grad():
        model(x)
    assert rows() == [
        ("MLP", None, 1),
        ("MLP", "head", 1),
        ("MLP", "layers.0", 1),
        ("MLP", "layers.0/act", 1),
        ("MLP", "layers.0/fc", 1),
        ("MLP", "layers.1", 1),
        ("MLP", "layers.1/act", 1),
        ("MLP", "layers.1/fc", 1),
        ("MLP", "stem", 1),
    ]


def test_training_calls_are_skipped_by_default(instrument):
    model, x = mlp(), inputs()
    instrument(stage_depth=1)
    model.train()
    model(x).sum().backward()  # grad enabled and training: not an inference, nor its submodules
    assert rows() == []
    with torch.no_grad():  # training mode under no_grad: an inference
        model(x)
    with torch.inference_mode():
        model(x)
    model.eval()
    model(x)  # eval mode with grad enabled: an inference
    assert inferscope.snapshot().row("MLP").count == 3


def test_track_training_records_training_calls(instrument):
    model, x = mlp(), inputs()
    instrument(track_training=True)
    model.train()
    model(x).sum().backward()
    assert rows() == [("MLP", None, 1)]


def test_a_raising_module_counts_one_error_and_the_exception_passes_unchanged(instrument):
    exc = Boom("bad input")
    model = Raising(exc).eval()
    instrument(stage_depth=1)
    with pytest.raises(Boom) as caught:
        model(inputs())
    assert caught.value is exc
    row = inferscope.snapshot().row("Raising")
    assert (row.count, row.errors) == (1, 1)
    assert row.error_types == {error_type_name(Boom): 1}
    assert inferscope.snapshot().row("Raising", "fc").errors == 0  # the stage before the raise


def test_an_error_inside_a_layer_is_one_error_of_the_inference(instrument):
    model = mlp()
    instrument(stage_depth=1)
    with pytest.raises(RuntimeError):
        model(torch.zeros(2, FEATURES + 1))  # wrong width: the stem raises
    snap = inferscope.snapshot()
    assert (snap.row("MLP").count, snap.row("MLP").errors) == (1, 1)
    assert snap.row("MLP", "stem").errors == 1
    assert [(r.model, r.stage) for r in snap.rows] == [("MLP", None), ("MLP", "stem")]


def test_a_base_exception_closes_the_entry_and_passes_through(instrument):
    model = Raising(KeyboardInterrupt()).eval()
    instrument()
    with pytest.raises(KeyboardInterrupt):
        model(inputs())
    assert inferscope.snapshot().row("Raising").errors == 1  # the fixture checks nothing is left open


def test_inside_a_tracked_inference_the_module_is_part_of_it(instrument):
    model, x = mlp(), inputs()
    instrument(stage_depth=1)

    @inferscope.track_inference(model="service")
    def serve(batch: torch.Tensor) -> torch.Tensor:
        with inferscope.stage("infer"), torch.no_grad():
            return model(batch)

    serve(x)
    assert rows() == [
        ("service", None, 1),
        ("service", "infer", 1),
        ("service", "infer/head", 1),
        ("service", "infer/layers.0", 1),
        ("service", "infer/layers.1", 1),
        ("service", "infer/stem", 1),
    ]


def test_calls_in_threads_are_counted_each(instrument):
    model, x = mlp(), inputs()
    instrument(stage_depth=1)

    def work() -> None:
        with torch.no_grad():
            for _ in range(10):
                model(x)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = inferscope.snapshot()
    assert snap.row("MLP").count == 40
    assert snap.row("MLP", "layers.1").count == 40


# --- which modules, and their names ---------------------------------------------------------------


def test_by_default_the_outermost_module_is_the_model(instrument):
    wrapper = Wrapper(mlp())
    instrument()
    with torch.no_grad():
        wrapper(inputs())
    assert rows() == [("Wrapper", None, 1)]


def test_models_selects_modules_even_inside_unselected_ones(instrument):
    inner = mlp()
    wrapper = Wrapper(inner)
    instrument(models=[inner], stage_depth=1)
    with torch.no_grad():
        wrapper(inputs())
        mlp(seed=3)(inputs())  # another MLP object: not selected
    assert rows() == [
        ("MLP", None, 1),
        ("MLP", "head", 1),
        ("MLP", "layers.0", 1),
        ("MLP", "layers.1", 1),
        ("MLP", "stem", 1),
    ]


def test_models_by_class_name(instrument):
    instrument(models=["MLP"])
    with torch.no_grad():
        Wrapper(mlp())(inputs())
        mlp(seed=3)(inputs())
        nn.Linear(FEATURES, 2)(inputs())
    assert rows() == [("MLP", None, 2)]


def test_model_names_by_object_alias_and_callable(instrument):
    first, second, third = mlp(), mlp(seed=1), Wrapper(mlp(seed=2))
    instrument(
        model_names={first: ("fraud", "3"), "Wrapper": "wrapped"},
    )
    with torch.no_grad():
        first(inputs())
        second(inputs())
        third(inputs())
    assert [(r.model, r.version, r.count) for r in inferscope.snapshot().rows] == [
        ("MLP", None, 1),
        ("fraud", "3", 1),
        ("wrapped", None, 1),
    ]


def test_model_names_callable(instrument):
    model = mlp()
    instrument(model_names=lambda module: ("scorer", 2) if isinstance(module, MLP) else None)
    with torch.no_grad():
        model(inputs())
        nn.Linear(FEATURES, 2)(inputs())
    assert [(r.model, r.version) for r in inferscope.snapshot().rows] == [("Linear", None), ("scorer", "2")]


def test_the_version_comes_from_the_inferscope_version_attribute(instrument):
    model = mlp()
    model.inferscope_version = 5
    named = mlp(seed=1)
    named.inferscope_version = "2024-06"
    instrument(model_names={named: "ranker"})
    with torch.no_grad():
        model(inputs())
        named(inputs())
    assert [(r.model, r.version) for r in inferscope.snapshot().rows] == [("MLP", "5"), ("ranker", "2024-06")]


def test_an_invalid_version_attribute_is_ignored_with_a_warning(instrument, caplog):
    model = mlp()
    model.inferscope_version = 1.5
    instrument()
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(inputs())
    assert "inferscope_version" in caplog.text
    row = inferscope.snapshot().row("MLP")
    assert (row.count, row.version) == (1, None)


def test_the_device_and_the_attributes_are_on_the_series(instrument):
    # Names of their own: the key registry outlives each test.
    instrument(attributes={"team": "risk"}, model_names={"MLP": "device-mlp", "ReLU": "device-relu"})
    with torch.no_grad():
        mlp()(inputs())
        nn.ReLU()(inputs())  # no parameters at all: cpu
    assert inference_attributes("device-mlp") == [{DEVICE_ATTRIBUTE: "cpu", "team": "risk"}]
    assert inference_attributes("device-relu") == [{DEVICE_ATTRIBUTE: "cpu", "team": "risk"}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_cuda_is_recorded_with_device_cuda(instrument):
    model = mlp().cuda()
    x = inputs().cuda()
    with torch.no_grad():
        expected = model(x)
    instrument(stage_depth=1, model_names={model: "cuda-mlp"})
    with torch.no_grad():
        result = model(x)
        torch.cuda.synchronize()
        model.cpu()
        model(x.cpu())
    assert torch.equal(result, expected)
    # The device is looked up at every call: the move back to the CPU is a series of its own.
    assert sorted(a[DEVICE_ATTRIBUTE] for a in inference_attributes("cuda-mlp")) == ["cpu", "cuda"]
    assert inferscope.snapshot().row("cuda-mlp", "head").count == 2


# --- compiled, scripted and traced modules ---------------------------------------------------------


def test_torch_compile_counts_the_compiled_module_once_without_stages(instrument):
    model, x = mlp(), inputs()
    with torch.no_grad():
        expected = model(x)
    instrument(stage_depth=1)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: no graph break
    # The wrapper adds no guard that fails on the next call.
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for _ in range(3):
            assert torch.equal(compiled(x), expected)
    assert rows() == [("MLP", None, 3)]


@pytest.mark.parametrize("stage_depth", [0, 1])
def test_a_submodule_compiled_in_place_runs_its_compiled_call(instrument, stage_depth):
    model, x = mlp(), inputs()
    with torch.no_grad():
        expected = model(x)
    compiled_runs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        def run(*args: Any) -> Any:
            compiled_runs.append(1)
            return graph.forward(*args)

        return run

    # Module.compile() sets _compiled_call_impl, which torch's __call__ runs instead of _call_impl.
    # The wrapper must go through it where it passes a call through (depth 0) and inside a stage.
    for block in model.layers:
        block.compile(backend=backend, fullgraph=True)
    instrument(stage_depth=stage_depth)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert len(compiled_runs) == 6
    stages = ["head", "layers.0", "layers.1", "stem"] if stage_depth else []
    assert rows() == [("MLP", None, 3), *(("MLP", stage, 3) for stage in stages)]


def test_a_call_wrapper_installed_before_instrumenting_runs_for_every_module_call(instrument):
    original = nn.Module.__dict__["__call__"]
    seen: list[str] = []

    def counting(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append(type(self).__name__)
        return original(self, *args, **kwargs)

    nn.Module.__call__ = counting
    try:
        instrumentor = instrument(stage_depth=1)
        with torch.no_grad():
            mlp()(inputs())
        # MLP, stem, layers.0 (Block, fc, act), layers.1 (Block, fc, act), head.
        assert seen == ["MLP", "Linear", "Block", "Linear", "ReLU", "Block", "Linear", "ReLU", "Linear"]
        instrumentor.uninstrument()
        assert nn.Module.__dict__["__call__"] is counting
    finally:
        nn.Module.__call__ = original
    assert rows() == [
        ("MLP", None, 1),
        ("MLP", "head", 1),
        ("MLP", "layers.0", 1),
        ("MLP", "layers.1", 1),
        ("MLP", "stem", 1),
    ]
    instrumentor.instrument()  # for the fixture's teardown


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_tracing_is_not_an_inference_and_traced_modules_keep_the_name(instrument):
    model, x = mlp(), inputs()
    with torch.no_grad():
        expected = model(x)
    instrument(stage_depth=1)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)  # check_trace=True runs the module again: not counted
        scripted = torch.jit.script(model)
        torch.export.export(model, (x,))
        graph_module = torch.fx.symbolic_trace(model)
    assert rows() == []
    with torch.no_grad():
        assert torch.equal(traced(x), expected)
        assert torch.equal(scripted(x), expected)
        assert torch.equal(graph_module(x), expected)
    snap = inferscope.snapshot()
    # TorchScript runs the submodules in C++: no stages. A GraphModule calls its leaves directly.
    assert snap.row("MLP").count == 3
    assert {r.stage for r in snap.rows} == {
        None,
        "stem",
        "layers.0.fc",
        "layers.0.act",
        "layers.1.fc",
        "layers.1.act",
        "head",
    }


# --- instrumentation itself ------------------------------------------------------------------------


def test_uninstrument_restores_the_original_by_identity(instrument):
    original = nn.Module.__dict__["__call__"]
    instrumentor = instrument(stage_depth=1)
    assert nn.Module.__dict__["__call__"] is not original
    assert [(klass, name) for klass, name, _ in instrumentor.patched] == [(nn.Module, "__call__")]
    assert instrumentor.patched[0][2] is original
    instrumentor.uninstrument()
    assert nn.Module.__dict__["__call__"] is original
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl
    assert instrumentor.patched == []
    with torch.no_grad():
        mlp()(inputs())
    assert rows() == []
    instrumentor.instrument()  # for the fixture's teardown


def test_instrument_twice_is_idempotent(instrument, caplog):
    instrumentor = instrument()
    patched = instrumentor.patched
    with caplog.at_level(logging.WARNING):
        TorchInstrumentor().instrument(stage_depth=3)
    assert "already instrumented" in caplog.text
    assert instrumentor.patched == patched
    with torch.no_grad():
        mlp()(inputs())
    assert rows() == [("MLP", None, 1)]  # the first options hold: no stages


def test_invalid_options_are_rejected():
    with pytest.raises(TypeError, match="stage_depth"):
        TorchInstrumentor().instrument(stage_depth=-1)
    with pytest.raises(TypeError, match="stage_depth"):
        TorchInstrumentor().instrument(stage_depth=True)
    with pytest.raises(TypeError, match="track_training"):
        TorchInstrumentor().instrument(track_training="no")
    with pytest.raises(TypeError, match="did you mean 'stage_depth'"):
        TorchInstrumentor().instrument(stages_depth=1)
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl  # nothing was patched


def test_dependencies_are_met():
    from inferscope.instrumentation.torch import package

    assert tuple(TorchInstrumentor().instrumentation_dependencies()) == package._instruments
    assert TorchInstrumentor()._check_dependency_conflicts() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_inference_on_cuda_lasts_until_its_kernels_finish(instrument):
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda()
    x = torch.randn(4096, 4096, device="cuda")
    with torch.no_grad():
        model(x)
    torch.cuda.synchronize()
    instrument(model_names={model: "cuda-wait"})
    event_ms = []
    with torch.no_grad():
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
    row = inferscope.snapshot().row("cuda-wait")
    # The kernels' own time (CUDA events) is inside the recorded wall time, not after it.
    assert row.count == 20
    assert row.p50 * 1e3 >= 0.9 * sorted(event_ms)[10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_stages_of_a_model_on_cuda_measure_their_device_time(instrument):
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096)).cuda()
    x = torch.randn(4096, 4096, device="cuda")
    instrument(stage_depth=1, model_names={model: "cuda-layers"})
    with torch.no_grad():
        for _ in range(10):
            model(x)
    snap = inferscope.snapshot()
    inference = snap.row("cuda-layers")
    layers = [snap.row("cuda-layers", name) for name in ("0", "1", "2")]
    # Every layer's kernels are timed on the device (the ReLU too: it has no parameters of its
    # own), and the inference waited for all of them.
    assert [layer.gpu_count for layer in layers] == [10, 10, 10]
    assert layers[0].gpu_seconds > 10 * layers[0].p50 * 0.5
    assert sum(layer.gpu_seconds for layer in layers) <= inference.count * inference.max * 1.05


def test_cuda_sync_takes_a_bool(instrument):
    with pytest.raises(TypeError, match="cuda_sync must be True or False, got 'yes'"):
        instrument(cuda_sync="yes")
