"""The variants of a model that ``compare`` times, per framework.

A framework is recognised by the model's class, without importing anything: a torch module can only
exist once torch is imported, so ``sys.modules`` is asked, never ``import``. Each framework gives a
:class:`Plan`: its baseline (the way the model runs as it is) first, then the variants. A variant is
built lazily by ``build()``, which returns a call of no arguments that runs one inference on the
example input already converted to what that variant takes (a tensor, a float32 array): converting
the input is not timed. A variant that this platform cannot build carries the reason instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError
from ..instrumentation import is_sklearn_estimator

__all__ = ["FRAMEWORKS", "Plan", "Unavailable", "Variant", "as_arrays", "plan_for"]

#: The frameworks ``compare`` knows, and the variants each one compares (baseline first).
FRAMEWORKS: Mapping[str, tuple[str, ...]] = {
    "torch": ("eager", "torch.jit.trace", "torch.jit.script", "torch.compile", "onnxruntime"),
    "keras": ("eager", "tf.function", "tf.function(jit_compile=True)"),
    "sklearn": ("sklearn", "onnxruntime"),
    "xgboost": ("Booster.predict", "Booster.inplace_predict", "sklearn wrapper", "onnxruntime"),
    "lightgbm": ("Booster.predict", "sklearn wrapper", "onnxruntime"),
}

#: scikit-learn methods that ``method=`` may name.
SKLEARN_METHODS = ("predict", "predict_proba", "transform", "decision_function")

Call = Callable[[], Any]


class Unavailable(Exception):
    """A variant cannot be built on this platform; the message says why (and how to fix it)."""


@dataclass
class Variant:
    """One way of running the model. ``build()`` returns the call to time, or raises
    :class:`Unavailable`; ``outputs`` turns a call's result into the arrays that are checked
    against the baseline's; ``notes`` are shown with the variant (a deprecation, a precision)."""

    name: str
    build: Callable[[], Call]
    outputs: Callable[[Any], list[np.ndarray]] = field(default=lambda result: as_arrays(result))
    notes: list[str] = field(default_factory=list)
    #: The API this variant uses, when its library deprecates it: the deprecation warning that
    #: building raises is shown (or a note that says so, if it raised none), and the variant is
    #: compared still.
    deprecated: str | None = None


@dataclass
class Plan:
    """What a model is and how it is compared: ``variants[0]`` is the baseline."""

    framework: str
    framework_version: str | None
    model_name: str
    method: str | None
    variants: list[Variant]
    inputs: list[dict[str, Any]]


def as_arrays(result: Any) -> list[np.ndarray]:
    """A call's result as numpy arrays, in order: a tensor (torch, TensorFlow), an array, or
    lists, tuples and dicts (in their order) of them."""
    if result is None:
        return []
    if isinstance(result, np.ndarray):
        return [result]
    if isinstance(result, Mapping):
        return [a for value in result.values() for a in as_arrays(value)]
    if isinstance(result, (list, tuple)):
        return [a for value in result for a in as_arrays(value)]
    if hasattr(result, "detach"):  # a torch tensor, possibly on a device
        return [result.detach().cpu().numpy()]
    if hasattr(result, "numpy"):  # a TensorFlow eager tensor
        return [np.asarray(result.numpy())]
    return [np.asarray(result)]


def _last(result: Any) -> list[np.ndarray]:
    """The last output of an ONNX model: a classifier's probabilities (after its labels), or a
    regressor's only output."""
    return as_arrays(result)[-1:]


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _require(module: str, purpose: str, install: str | None = None) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(
            f"{purpose} needs {module}, which is not installed (pip install {install or module}): {exc}"
        ) from None


def _describe_inputs(inputs: Sequence[Any]) -> list[dict[str, Any]]:
    described = []
    for value in inputs:
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        described.append(
            {
                "type": f"{type(value).__module__}.{type(value).__qualname__}",
                "shape": None if shape is None else [int(d) if d is not None else None for d in shape],
                "dtype": None if dtype is None else str(dtype),
            }
        )
    return described


def _onnx_session(model_bytes: bytes, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    ort = _require("onnxruntime", "the onnxruntime variant")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no shape warnings on every run
    return ort.InferenceSession(model_bytes, sess_options=options, providers=list(providers))


def _onnx_call(session: Any, feeds: Sequence[Any]) -> Call:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(feeds):
        raise Unavailable(f"the ONNX model takes {len(names)} inputs, the example has {len(feeds)}")
    feed = dict(zip(names, feeds, strict=True))
    run = session.run
    return lambda: run(None, feed)


def _onnx_note(converter: str) -> str:
    runtime = _version("onnxruntime", "onnxruntime-gpu")
    return f"onnxruntime {runtime}, converted by {converter} {_version(converter)}"


# --- torch ---------------------------------------------------------------------------------------


def _torch_plan(model: Any, inputs: Sequence[Any]) -> Plan:
    torch = sys.modules["torch"]
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32

    def tensor(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        array = np.asarray(value)
        converted = torch.from_numpy(np.ascontiguousarray(array))
        if converted.is_floating_point():
            converted = converted.to(dtype)
        return converted.to(device)

    args = tuple(tensor(v) for v in inputs)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None

    def timed(module: Any) -> Call:
        no_grad = torch.no_grad

        def call() -> Any:
            with no_grad():
                result = module(*args)
            if synchronize is not None:  # the call returns once its kernels are queued
                synchronize()
            return result

        return call

    def trace() -> Call:
        with torch.no_grad():
            return timed(torch.jit.trace(model, args))

    def script() -> Call:
        return timed(torch.jit.script(model))

    def compiled() -> Call:
        return timed(torch.compile(model))

    def onnx() -> Call:
        _require("onnxscript", "torch.onnx.export")
        with torch.no_grad():
            program = torch.onnx.export(model, args, dynamo=True, verbose=False)
        if program is None:
            raise Unavailable("torch.onnx.export returned no program")
        providers: tuple[str, ...] = ("CPUExecutionProvider",)
        if device.type == "cuda":
            ort = _require("onnxruntime", "the onnxruntime variant")
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise Unavailable("the model is on CUDA and this onnxruntime has no CUDAExecutionProvider")
            providers = ("CUDAExecutionProvider",)
        session = _onnx_session(program.model_proto.SerializeToString(), providers)
        return _onnx_call(session, [a.detach().cpu().numpy() for a in args])

    return Plan(
        framework="torch",
        framework_version=_version("torch"),
        model_name=type(model).__name__,
        method=None,
        inputs=_describe_inputs(args),
        variants=[
            Variant("eager", lambda: timed(model)),
            Variant("torch.jit.trace", trace, deprecated="torch.jit.trace"),
            Variant("torch.jit.script", script, deprecated="torch.jit.script"),
            Variant(
                "torch.compile",
                compiled,
                notes=["start-up includes the first call, which compiles (tens of seconds on a CPU)"],
            ),
            Variant("onnxruntime", onnx, notes=["exported with torch.onnx.export(dynamo=True)"]),
        ],
    )


# --- Keras ---------------------------------------------------------------------------------------


def _keras_plan(model: Any, inputs: Sequence[Any]) -> Plan:
    keras = sys.modules["keras"]
    if len(inputs) != 1:
        raise TypeError(f"a Keras model is compared on one input (a batch), got {len(inputs)}")
    backend = keras.backend.backend()
    tf = sys.modules.get("tensorflow") if backend == "tensorflow" else None
    batch = tf.convert_to_tensor(inputs[0]) if tf is not None else np.asarray(inputs[0])

    def eager() -> Call:
        return lambda: model(batch, training=False)

    def graph(jit_compile: bool) -> Callable[[], Call]:
        def build() -> Call:
            if tf is None:
                raise Unavailable(f"tf.function needs Keras on TensorFlow; this Keras runs on {backend!r}")
            function = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)
            return lambda: function(batch)

        return build

    return Plan(
        framework="keras",
        framework_version=_version("keras"),
        model_name=getattr(model, "name", None) or type(model).__name__,
        method=None,
        inputs=_describe_inputs([batch]),
        variants=[
            Variant("eager", eager),
            Variant("tf.function", graph(False), notes=["a TensorFlow graph, without XLA"]),
            Variant(
                "tf.function(jit_compile=True)",
                graph(True),
                notes=["compiled by XLA: start-up includes the first call, which compiles"],
            ),
        ],
    )


# --- scikit-learn --------------------------------------------------------------------------------


def _float32(value: Any) -> np.ndarray:
    array = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
    try:
        return np.ascontiguousarray(array, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise Unavailable(f"the input cannot be converted to float32 for ONNX ({exc})") from None


def _default_method(model: Any, method: str | None) -> str:
    if method is None:
        return "predict_proba" if hasattr(model, "predict_proba") else "predict"
    if method not in SKLEARN_METHODS or not hasattr(model, method):
        offered = [m for m in SKLEARN_METHODS if hasattr(model, m)]
        raise ConfigError("method", method, ", ".join(offered), "compare() argument")
    return method


def _sklearn_plan(model: Any, inputs: Sequence[Any], method: str | None) -> Plan:
    if len(inputs) != 1:
        raise TypeError(f"a scikit-learn model is compared on one input (X), got {len(inputs)}")
    x = inputs[0]
    chosen = _default_method(model, method)
    bound = getattr(model, chosen)

    def onnx() -> Call:
        skl2onnx = _require("skl2onnx", "converting scikit-learn to ONNX")
        x32 = _float32(x)
        options = {id(model): {"zipmap": False}} if hasattr(model, "predict_proba") else None
        try:
            onx = skl2onnx.to_onnx(model, x32[:1], options=options)
        except Exception as exc:
            raise Unavailable(f"skl2onnx cannot convert this model: {type(exc).__name__}: {exc}") from None
        return _onnx_call(_onnx_session(onx.SerializeToString()), [x32])

    # skl2onnx's outputs: a classifier's label, then its probabilities; a regressor's or a
    # transformer's only output.
    pick = _last if chosen in ("predict_proba", "decision_function") else (lambda r: as_arrays(r)[:1])
    return Plan(
        framework="sklearn",
        framework_version=_version("scikit-learn"),
        model_name=type(model).__name__,
        method=chosen,
        inputs=_describe_inputs([x]),
        variants=[
            Variant("sklearn", lambda: lambda: bound(x), notes=[f"{type(model).__name__}.{chosen}"]),
            Variant(
                "onnxruntime",
                onnx,
                outputs=pick,
                notes=[_onnx_note("skl2onnx"), "runs in float32 (ONNX-ML operators)"],
            ),
        ],
    )


# --- xgboost and lightgbm ------------------------------------------------------------------------


def _wrapper_method(wrapper: Any) -> str:
    return "predict_proba" if hasattr(wrapper, "predict_proba") else "predict"


def _onnxmltools_variant(model: Any, x32: np.ndarray, convert: str, **options: Any) -> Variant:
    def build() -> Call:
        onnxmltools = _require("onnxmltools", "converting to ONNX")
        data_types = _require("onnxmltools.convert.common.data_types", "converting to ONNX", "onnxmltools")
        initial = [("input", data_types.FloatTensorType([None, int(x32.shape[1])]))]
        try:
            onx = getattr(onnxmltools, convert)(model, initial_types=initial, **options)
        except Exception as exc:
            raise Unavailable(f"onnxmltools cannot convert this model: {type(exc).__name__}: {exc}") from None
        return _onnx_call(_onnx_session(onx.SerializeToString()), [x32])

    notes = [_onnx_note("onnxmltools"), "runs in float32 (ONNX-ML TreeEnsemble)"]
    return Variant("onnxruntime", build, outputs=_last, notes=notes)


def _booster_plan(
    framework: str,
    model: Any,
    inputs: Sequence[Any],
    booster_of: Callable[[Any], Any],
    predictors: Callable[[Any, Any], list[Variant]],
    wrappers: str,
    convert: str,
    **convert_options: Any,
) -> Plan:
    """xgboost or lightgbm: ``predictors(booster, x)`` (the Booster's own, baseline first), the
    scikit-learn wrapper when ``model`` is one (``wrappers`` names those it could be), and ONNX."""
    if len(inputs) != 1:
        raise TypeError(f"a {framework} model is compared on one input (X), got {len(inputs)}")
    x = inputs[0]
    wrapper = None if isinstance(model, sys.modules[framework].Booster) else model
    booster = model if wrapper is None else booster_of(model)
    x32 = _float32(x)
    if x32.ndim != 2:
        raise ValueError(f"a {framework} model is compared on a 2-D input (rows, features), got {x32.shape}")

    def wrapped() -> Call:
        if wrapper is None:
            raise Unavailable(
                f"given a Booster: {framework} builds its scikit-learn wrapper in fit(); pass the fitted "
                f"{wrappers} to compare it"
            )
        bound = getattr(wrapper, _wrapper_method(wrapper))
        return lambda: bound(x)

    wrapper_notes = [] if wrapper is None else [f"{type(wrapper).__name__}.{_wrapper_method(wrapper)}"]
    return Plan(
        framework=framework,
        framework_version=_version(framework, f"{framework}-cpu"),
        model_name=type(model).__name__,
        method=None,
        inputs=_describe_inputs([x]),
        variants=[
            *predictors(booster, x),
            Variant("sklearn wrapper", wrapped, notes=wrapper_notes),
            _onnxmltools_variant(model, x32, convert, **convert_options),
        ],
    )


def _xgboost_plan(model: Any, inputs: Sequence[Any]) -> Plan:
    dmatrix = sys.modules["xgboost"].DMatrix

    def predictors(booster: Any, x: Any) -> list[Variant]:
        return [
            Variant(
                "Booster.predict",
                lambda: lambda: booster.predict(dmatrix(x)),
                notes=["builds a DMatrix on every call, as a service must"],
            ),
            Variant("Booster.inplace_predict", lambda: lambda: booster.inplace_predict(x)),
        ]

    wrappers = "XGBClassifier or XGBRegressor"
    return _booster_plan(
        "xgboost", model, inputs, lambda m: m.get_booster(), predictors, wrappers, "convert_xgboost"
    )


def _lightgbm_plan(model: Any, inputs: Sequence[Any]) -> Plan:
    def predictors(booster: Any, x: Any) -> list[Variant]:
        return [Variant("Booster.predict", lambda: lambda: booster.predict(x))]

    wrappers = "LGBMClassifier or LGBMRegressor"
    return _booster_plan(
        "lightgbm",
        model,
        inputs,
        lambda m: m.booster_,
        predictors,
        wrappers,
        "convert_lightgbm",
        zipmap=False,
    )


# --- recognition ---------------------------------------------------------------------------------


def _instance_of(model: Any, module: str, *names: str) -> bool:
    """Whether ``model`` is an instance of ``module.name`` for one of ``names``, if that module is
    imported (it must be, for such an instance to exist)."""
    loaded = sys.modules.get(module)
    if loaded is None:
        return False
    classes = tuple(c for c in (getattr(loaded, n, None) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(model, classes)


def framework_of(model: Any) -> str | None:
    """The framework of ``model`` (a key of :data:`FRAMEWORKS`), or None."""
    if _instance_of(model, "torch.nn", "Module"):
        return "torch"
    if _instance_of(model, "keras", "Model", "Layer"):
        return "keras"
    # The boosting libraries' scikit-learn wrappers are scikit-learn estimators too: asked first.
    if _instance_of(model, "xgboost", "Booster", "XGBModel"):
        return "xgboost"
    if _instance_of(model, "lightgbm", "Booster", "LGBMModel"):
        return "lightgbm"
    if is_sklearn_estimator(type(model)):
        return "sklearn"
    return None


def plan_for(model: Any, inputs: Sequence[Any], method: str | None) -> Plan:
    """The plan for ``model`` and its example ``inputs``. Raises TypeError for a model of no known
    framework or inputs it cannot take, ConfigError for a ``method`` that does not apply."""
    framework = framework_of(model)
    if framework is None:
        raise TypeError(
            f"compare() got a {type(model).__module__}.{type(model).__qualname__}, which is not a model "
            "it knows; accepted: a torch.nn.Module, a keras.Model, a scikit-learn estimator or Pipeline, "
            "an xgboost Booster or XGBModel, a lightgbm Booster or LGBMModel"
        )
    if not inputs:
        raise TypeError("compare() needs an example input: compare(model, x)")
    if method is not None and framework != "sklearn":
        raise ConfigError(
            "method", method, "None for a torch, Keras, xgboost or lightgbm model", "compare() argument"
        )
    if framework == "torch":
        return _torch_plan(model, inputs)
    if framework == "keras":
        return _keras_plan(model, inputs)
    if framework == "xgboost":
        return _xgboost_plan(model, inputs)
    if framework == "lightgbm":
        return _lightgbm_plan(model, inputs)
    return _sklearn_plan(model, inputs, method)
