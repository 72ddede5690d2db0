"""TensorFlow / Keras: calls and predictions of Keras models become tracked inferences, and their
layers (to a chosen depth) become stages.

>>> from inferscope.instrumentation.tensorflow import TensorflowInstrumentor
>>> TensorflowInstrumentor().instrument(model_names={model: ("fraud", "3")}, stage_depth=1)  # doctest: +SKIP
>>> model(x)  # doctest: +SKIP  (one "fraud" inference; a stage per layer: "hidden", "out")
>>> model.predict(x, verbose=0)  # doctest: +SKIP  (one "fraud" inference, no stages: a graph runs)

What counts:

- ``model(x)``, ``model.predict(...)`` and ``model.predict_on_batch(x)`` of a ``keras.Model``
  (``tf.keras.Model`` is the same class), called while no other model call runs in this context:
  one inference each. ``predict`` calls the model inside itself (in a ``tf.function``): that call
  is part of the one inference. What a model calls inside (its layers, nested models) is never an
  inference of its own. With ``models=``, only the chosen objects are models (a plain layer can be
  one), and one of them counts when it is called outside another chosen one.
- Eager calls only. A call made while TensorFlow builds a graph is tracing, not inference: inside
  a ``tf.function`` (``predict``'s first call traces one; so does your own ``@tf.function``),
  ``tf.saved_model.save`` and ``model.export``. Nor is a call on symbolic inputs (building a
  functional model from ``keras.Input``).
- Not while training: a call with ``training=True`` passes through unrecorded, with everything
  inside it, unless ``track_training=True``. Nothing inside ``fit``, ``evaluate``,
  ``train_on_batch`` or ``test_on_batch`` is recorded, not even a ``predict`` that a callback makes.
- ``stage_depth=n``: the layers that an eager model call runs become stages named after the layers
  (``layer.name``: ``dense``, or the name you gave), nested to ``n`` levels (``encoder/hidden``).
  ``predict`` runs a compiled graph, which calls no Python layer: no stages, unless the model was
  compiled with ``run_eagerly=True``.
- Inside an inference that is already open (your ``@track_inference``, or another instrumented
  framework call), a model call is not a second inference; with ``stage_depth`` its layers become
  stages under the open entry (``infer/dense``).

How it works, and why this way: every Keras layer call, a model's included, goes through
``keras.Layer.__call__``, and ``Model.predict``, ``predict_on_batch``, ``fit``, ``evaluate``,
``train_on_batch`` and ``test_on_batch`` are defined on the TensorFlow backend's trainer class.
``instrument()`` replaces those attributes on the classes that define them (found through
``keras.Model``'s MRO, not by internal module paths), and ``uninstrument()`` puts the very
originals back, checked by identity. Keras has no global hook that sees every model call and
its exception; the wrapper closes its entry once on every path, records the exception's type, and
lets the exception itself through. ``instrument()`` imports nothing: importing TensorFlow takes
seconds and hundreds of MB, which a service that has it installed but never uses must not pay.
When Keras is not imported yet, a post-import hook (wrapt's, as ``inferscope.system.threads``
uses) patches it as soon as the application imports it (``import tensorflow`` imports Keras),
in the importing thread, before that import returns.

Costs, measured with the C backend and the default counters on CPython 3.11: a layer call that is
not a stage pays a function call, a context-variable read and a dict lookup (about 0.2 µs); a
stage, what ``inferscope.stage`` costs plus a context-variable set and ``tf.executing_eagerly()``
(about 2 µs); an outermost model call, an identity-cache lookup, a check that its inputs are not
symbolic (a type test for one array or eager tensor, else a scan of the arguments as Keras's own
``__call__`` makes, about 1.5 µs) and what ``@track_inference`` costs (about 2.5 µs in all);
``predict``, about 2 µs. Keras's own eager ``Layer.__call__`` takes tens of microseconds, and an
eager call of a small model a millisecond or more.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np

from ..._records import NO_MODEL_KEY
from ..._runtime import RUNTIME
from .. import (
    VERSION_ATTRIBUTE,
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    call_in_scope,
    class_aliases,
    declared_version,
    defining_class,
    depth_and_training,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = [
    "PREDICT_METHODS",
    "TRAINING_METHODS",
    "VERSION_ATTRIBUTE",
    "TensorflowInstrumentor",
    "model_identity",
]

_logger = logging.getLogger("inferscope.instrumentation")

#: A model attribute that gives the version when ``model_names`` does not (as for torch).

#: Model methods whose outermost call is one inference (besides the model's own ``__call__``).
PREDICT_METHODS = ("predict", "predict_on_batch")
#: Model methods inside which nothing is recorded: training and evaluation.
TRAINING_METHODS = ("fit", "evaluate", "train_on_batch", "test_on_batch")

_FAILURE = "inferscope: tensorflow instrumentation failed; the call is not recorded"


class _Node:
    """A layer in the stage tree of one model: the stage its calls open, and the stages of the
    layers it calls (None when the depth is exhausted).

    ``children`` maps ``id(layer)`` to its node, built on the first call of this layer; a hit is
    confirmed by identity through ``ref`` (layers are held weakly, so the cache never keeps a model
    alive through a layer that refers back to it). ``stage`` is None for a model's own node.
    """

    __slots__ = ("built", "children", "ref", "remaining", "stage")

    def __init__(self, ref: weakref.ref[Any] | None, stage: Any, remaining: int) -> None:
        self.ref = ref
        self.stage = stage
        self.remaining = remaining
        self.children: dict[int, _Node] | None = None
        self.built = remaining <= 0

    def build(self, layer: Any) -> None:
        """The nodes of every layer under ``layer``, named after the layers. Keras keeps layer names
        unique (a functional model refuses duplicates; automatic names are numbered), so nesting
        follows the calls and a name is not repeated."""
        children: dict[int, _Node] = {}
        # Keras's own walk of a layer's sublayers (what ``Model.layers`` reads, one level deep).
        for sub in layer._flatten_layers(include_self=False, recursive=True):
            # "/" separates stage paths; a layer name never needs it.
            stage = RUNTIME.stage(str(sub.name).replace("/", "_") or type(sub).__name__)
            children[id(sub)] = _Node(weakref.ref(sub), stage, self.remaining - 1)
        self.children = children
        self.built = True


#: The scope of a call inside which nothing is recorded (training, tracing, depth 0, an unchosen
#: object's predict).
_PASS = _Node(None, None, 0)

#: The innermost model call of this context, as the node whose ``children`` the next layer calls
#: are looked up in. None: no model call is running.
_SCOPE: ContextVar[_Node | None] = ContextVar("inferscope_tensorflow_scope", default=None)

_NOT_A_MODEL = object()

#: Keyword values that are never symbolic tensors (``training=False``, ``mask=None``).
_PLAIN_TYPES = frozenset({bool, int, float, str, type(None)})


def _snake_case(name: str) -> str:
    """What Keras makes of a class name for an automatic layer name (``keras.utils.naming``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _automatic_name(name: str, cls: type) -> bool:
    """Whether ``name`` looks like the one Keras gives an unnamed layer of ``cls``: the class name in
    snake case, numbered from the second one on (``sequential``, ``sequential_3``). Such names
    depend on how many models of that class the process created before: they are not used as the
    model's name."""
    return re.fullmatch(rf"{re.escape(_snake_case(cls.__name__))}(_\d+)?", name) is not None


def model_identity(layer: Any) -> tuple[ModelIdentity, tuple[str, ...]]:
    """The default identity of a Keras model (or layer) and the aliases it is known by.

    The name: ``layer.name`` when it was given (``keras.Model(..., name="fraud")``), else the class
    name (``Sequential``, ``Functional``, your subclass). The version: the ``inferscope_version``
    attribute, when it is a str or an int. Aliases: ``layer.name``, the class name and
    ``module.QualifiedName``.
    """
    cls = type(layer)
    keras_name = getattr(layer, "name", None)
    aliases: tuple[str, ...] = class_aliases(cls)
    name = cls.__name__
    if isinstance(keras_name, str) and keras_name:
        aliases = (keras_name, *aliases)
        if not _automatic_name(keras_name, cls):
            name = keras_name
    version = declared_version(layer, name)
    return ModelIdentity(name, version), aliases


class _Entry:
    """What the instrumentor knows about one layer or model called outside any model call (cached
    per object)."""

    __slots__ = ("inside", "model", "root", "tracked")

    def __init__(self, model: TrackedModel | None, root: _Node) -> None:
        #: None: not a model (a plain layer, or not one of ``models=``); its calls pass through and
        #: do not open a scope.
        self.model = model
        #: The model's own node: its layers' stages.
        self.root = root
        #: The scope of ``predict``: the model's call inside it is its own node, not a stage.
        self.inside = _Node(None, None, 0)
        self.inside.children = {} if root.ref is None else {id(root.ref()): root}
        #: original function -> its tracked wrapper under this model's key
        self.tracked: dict[Any, Any] = {}

    def track(self, original: Any) -> Any:
        assert self.model is not None
        found = self.tracked[original] = self.model.tracked(original)
        return found


class _State:
    """Shared by the wrappers of one ``instrument()``; inactive once uninstrumented.

    Made when Keras is imported; :meth:`attach` patches it. TensorFlow's own functions are looked
    up on the first model call: Keras may be imported from inside TensorFlow's ``__init__``, before
    that has finished.
    """

    def __init__(self, options: InstrumentOptions, stage_depth: int, track_training: bool) -> None:
        self.active = True
        self.options = options
        self.stage_depth = stage_depth
        self.track_training = track_training
        self.cache: IdentityCache[_Entry] = IdentityCache()
        #: Whether ``models=`` was left out: then every ``keras.Model`` is a model, and plain layers
        #: are not; with it, the chosen objects are, layers included.
        self.every_model = options.selects(_NOT_A_MODEL, ())
        self.model_class: type = type(None)
        self.symbolic_class: type = type(None)
        self.flatten: Callable[[Any], list[Any]] = list
        #: Inputs that are never symbolic: a NumPy array, an eager tensor (added on first use).
        self.concrete_types: frozenset[type] = frozenset({np.ndarray})
        self.executing_eagerly: Callable[[], bool] = self._first_executing_eagerly

    def attach(self, keras: Any, patches: Patches) -> None:
        """Wrap Keras: ``Layer.__call__`` and the trainer's methods, on the classes of
        ``keras.Model``'s MRO that define them. Nothing when Keras runs on another backend."""
        backend = keras.backend.backend()
        if backend != "tensorflow":
            _logger.debug(
                "inferscope: Keras runs on the %r backend, not TensorFlow: it is not instrumented", backend
            )
            return
        self.model_class = keras.Model
        self.symbolic_class = keras.KerasTensor
        self.flatten = keras.tree.flatten
        owner = defining_class(self.model_class, "__call__")
        if owner is not None:
            patches.replace(owner, "__call__", _layer_call(self, owner.__dict__["__call__"]))
        for names, wrap in ((PREDICT_METHODS, _predict_method), (TRAINING_METHODS, _training_method)):
            for name in names:
                owner = defining_class(self.model_class, name)
                if owner is not None:
                    patches.replace(owner, name, wrap(self, owner.__dict__[name]))

    def _first_executing_eagerly(self) -> bool:
        tensorflow = importlib.import_module("tensorflow")  # imported by Keras on its TF backend
        self.concrete_types = frozenset({np.ndarray, type(tensorflow.constant(0))})
        self.executing_eagerly = tensorflow.executing_eagerly
        return bool(self.executing_eagerly())

    def entry(self, layer: Any) -> _Entry:
        found = self.cache.get(layer)
        if found is None:
            found = self._resolve(layer)
            self.cache.put(layer, found)
        return found

    def _resolve(self, layer: Any) -> _Entry:
        if self.every_model and not isinstance(layer, self.model_class):
            return _Entry(None, _PASS)
        default, aliases = model_identity(layer)
        options = self.options
        model = options.model(layer, default, aliases)
        if model is None:
            return _Entry(None, _PASS)
        if model.identity.version is None and default.version is not None:
            model = TrackedModel(ModelIdentity(model.identity.name, default.version), options.attributes)
        root = _Node(weakref.ref(layer), None, self.stage_depth)
        return _Entry(model, root)

    def symbolic(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the call has symbolic inputs (``keras.Input``): building a functional model.
        The common call, one array or tensor and plain keyword values (``training=False``), is
        answered without flattening the arguments."""
        if (
            len(args) == 1
            and type(args[0]) in self.concrete_types
            and all(type(value) in _PLAIN_TYPES for value in kwargs.values())
        ):
            return False
        symbolic = self.symbolic_class
        return any(isinstance(value, symbolic) for value in self.flatten((args, kwargs)))

    def outermost(self, original: Any, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A layer or model called while no model call runs in this context.

        The decision is made inside ``try`` and the call outside it: an exception of the model
        itself must pass through once, untouched, never be taken for our own failure.
        """
        call = original
        scope: _Node | None = None
        try:
            entry = self.cache.get(layer) or self.entry(layer)
            if entry.model is not None:
                scope = _PASS
                training = kwargs.get("training")
                if (
                    self.executing_eagerly()
                    and (self.track_training or training is None or not training)
                    and not self.symbolic(args, kwargs)
                ):
                    scope = entry.root
                    if not scope.built:
                        scope.build(layer)
                    if RUNTIME.current_key() == NO_MODEL_KEY or not inference_open():
                        call = entry.tracked.get(original) or entry.track(original)
        except Exception:
            report_internal_error(_FAILURE)
            call, scope = original, _PASS
        if scope is None:
            return original(layer, *args, **kwargs)
        return call_in_scope(_SCOPE, scope, call, layer, args, kwargs)

    def predict(self, original: Any, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``predict`` or ``predict_on_batch`` called while no model call runs in this context: one
        inference; the model's call inside it (traced into a graph, or eager with ``run_eagerly``)
        is part of it."""
        call = original
        scope: _Node | None = None
        try:
            entry = self.cache.get(model) or self.entry(model)
            if entry.model is not None:
                scope = entry.inside
                if RUNTIME.current_key() == NO_MODEL_KEY or not inference_open():
                    call = entry.tracked.get(original) or entry.track(original)
        except Exception:
            report_internal_error(_FAILURE)
            call, scope = original, _PASS
        if scope is None:
            return original(model, *args, **kwargs)
        return call_in_scope(_SCOPE, scope, call, model, args, kwargs)

    def stage_call(
        self, node: _Node, original: Any, layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A layer that is a stage of the running model (or, for the model's own node, the model
        inside its ``predict``): run it inside the stage, with its own layers looked up under it.
        Calls made while a graph is built (the first call's build, a ``tf.function`` inside the
        model) are not stages."""
        try:
            eager = self.executing_eagerly()
            if eager and not node.built:
                node.build(layer)
        except Exception:
            report_internal_error(_FAILURE)
            eager = False
        if not eager:
            return original(layer, *args, **kwargs)
        if node.stage is None:
            return call_in_scope(_SCOPE, node, original, layer, args, kwargs)
        with node.stage:
            return call_in_scope(_SCOPE, node, original, layer, args, kwargs)


def _layer_call(state: _State, original: Any) -> Any:
    get_scope = _SCOPE.get

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.active:
            return original(self, *args, **kwargs)
        scope = get_scope()
        if scope is None:
            return state.outermost(original, self, args, kwargs)
        children = scope.children
        if children:
            node = children.get(id(self))
            if node is not None and node.ref is not None and node.ref() is self:
                return state.stage_call(node, original, self, args, kwargs)
        return original(self, *args, **kwargs)

    __call__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __call__


def _predict_method(state: _State, original: Any) -> Any:
    get_scope = _SCOPE.get

    @functools.wraps(original)
    def predict(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Inside another model call or a training method, predict is part of what runs: it passes.
        if state.active and get_scope() is None:
            return state.predict(original, self, args, kwargs)
        return original(self, *args, **kwargs)

    predict.__inferscope_original__ = original  # type: ignore[attr-defined]
    return predict


def _training_method(state: _State, original: Any) -> Any:
    @functools.wraps(original)
    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active:
            return call_in_scope(_SCOPE, _PASS, original, self, args, kwargs)
        return original(self, *args, **kwargs)

    train.__inferscope_original__ = original  # type: ignore[attr-defined]
    return train


class TensorflowInstrumentor(InferscopeInstrumentor):
    """Instruments Keras models on TensorFlow: ``model(x)``, ``model.predict`` and
    ``model.predict_on_batch``.

    Options of ``instrument()``, all optional:

    - ``models``: models or layers (by identity), or names (``layer.name``, the class name) that
      count as models; default: every ``keras.Model`` called from outside another model call.
    - ``model_names``: ``{model or name: name or (name, version)}`` or a callable
      ``f(model) -> name | (name, version) | None``. Default name: the model's ``name`` when it was
      given, else its class name; the version, when ``model_names`` gives none: the model's
      ``inferscope_version`` attribute.
    - ``attributes``: static attributes on every series of these models.
    - ``stage_depth``: how many levels of layer calls become stages (default 0: none).
    - ``track_training``: also record model calls made with ``training=True``.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any
    _extra_options = {"stage_depth": 0, "track_training": False}
    # Importing TensorFlow costs seconds, hundreds of MB and lines on stderr; Keras is patched when
    # the application imports it (``import tensorflow`` does), in the importing thread, before the
    # import returns.
    _module = "keras"

    def _check_options(self, extra: dict[str, Any]) -> None:
        depth_and_training(extra)

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        stage_depth, track_training = depth_and_training(extra)
        state = _State(options, stage_depth, track_training)
        state.attach(sys.modules["keras"], patches)
        return state
