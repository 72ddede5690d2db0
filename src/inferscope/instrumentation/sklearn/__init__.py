"""scikit-learn: inference calls of fitted estimators become tracked inferences, and a Pipeline's
steps become its stages.

>>> from inferscope.instrumentation.sklearn import SklearnInstrumentor
>>> SklearnInstrumentor().instrument(model_names={pipe: ("fraud", "3")})  # doctest: +SKIP
>>> pipe.predict(X)  # doctest: +SKIP  (one "fraud" inference; stages "scaler", "pca", "clf")

What counts:

- ``predict``, ``predict_proba``, ``predict_log_proba``, ``decision_function``, ``transform`` and
  ``score_samples`` of any estimator (any ``BaseEstimator`` subclass, yours included), called
  from your code, are one inference each.
- A ``Pipeline``'s step calls are stages named after the steps (``scaler``, ``pca``, ``clf``); the
  final step's call is a stage too. A Pipeline nested as a step nests its stages (``prep/scaler``).
- Calls that an estimator makes to other estimators (a Pipeline's steps, a meta-estimator's
  inner estimators, ``self.predict_proba`` inside ``self.predict``) are never inferences of their
  own. Nor is anything called inside ``fit``, ``fit_transform``, ``fit_predict``, ``partial_fit``
  or ``score`` (training and evaluation), nor a call made by scikit-learn's own code with no
  instrumented call around it (inner estimators run in joblib workers, ``cross_val_predict``).
- Inside an inference that is already open (your ``@track_inference``, or another instrumented
  framework call), an estimator call is not a second inference: a Pipeline's steps become stages
  under the open entry (``infer/scaler``), and a single estimator passes through.

How the patching works, and why this way: scikit-learn defines these methods on many classes
(``LinearClassifierMixin.predict``, ``StandardScaler.transform``, ``Pipeline.predict`` as an
``available_if`` descriptor), and most estimator modules are imported only when the application
needs them. So ``instrument()`` wraps the methods that each class defines itself, for every class
in the MRO of every ``BaseEstimator`` subclass that exists now, and wraps the ``__init_subclass__``
hooks of those classes so that estimator classes created later (a scikit-learn module imported
afterwards, your own subclasses) are wrapped when they are created. Subclasses that inherit a
method are covered by the wrapped definition. ``available_if`` descriptors are copied with their
function wrapped, so ``hasattr(pipe, "predict_proba")`` keeps following the final step. Our class
hook runs only once the outermost ``__init_subclass__`` of the chain returns, so scikit-learn's
``set_output`` wrapping of ``transform`` happens inside ours, not around it. ``uninstrument()``
puts back every replaced attribute, checked by identity; nothing else is imported or changed.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading
import types
from contextvars import ContextVar
from typing import Any

from ..._records import NO_MODEL_KEY
from ..._runtime import RUNTIME
from ...windows import add_batch_size
from .. import (
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    class_aliases,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = ["TRACKED_METHODS", "UNTRACKED_METHODS", "SklearnInstrumentor"]

#: Inference methods: an outermost call is one inference.
TRACKED_METHODS = (
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "transform",
    "score_samples",
)
#: Training and evaluation methods: nothing called inside them is recorded.
UNTRACKED_METHODS = ("fit", "fit_transform", "fit_predict", "partial_fit", "score")

Steps = dict[int, Any]  # id(step estimator) -> the Stage named after the step

#: What the innermost instrumented scikit-learn call of this context is doing. None: there is none.
#: A Steps mapping: calls on those objects are stages; other calls pass through. _UNTRACKED: inside
#: fit/score, where nothing is recorded. Identity matters: the two empty mappings are different.
_SCOPE: ContextVar[Steps | None] = ContextVar("inferscope_sklearn_scope", default=None)
_NO_STEPS: Steps = {}
_UNTRACKED: Steps = {}

_hook_depth = threading.local()

_FAILURE = "inferscope: scikit-learn instrumentation failed; the call is not recorded"


class _Entry:
    """What the instrumentor knows about one estimator object (cached per object)."""

    __slots__ = ("model", "pipeline", "snapshot", "steps", "tracked")

    def __init__(self, model: TrackedModel | None, pipeline: bool) -> None:
        #: None: not a model (not an estimator, or not one of ``models=``): calls pass through.
        self.model = model
        self.pipeline = pipeline
        #: For a Pipeline: its ``steps`` when ``steps`` (the stage map) was built.
        self.snapshot: tuple[Any, ...] | None = None
        self.steps: Steps = _NO_STEPS
        #: original method -> its tracked wrapper under this model's key
        self.tracked: dict[Any, Any] = {}

    def track(self, original: Any) -> Any:
        assert self.model is not None
        tracked = self.tracked[original] = self.model.tracked(original)
        return tracked


class _State:
    """Shared by every wrapper of one ``instrument()``; inactive once uninstrumented."""

    def __init__(
        self,
        options: InstrumentOptions,
        stages: bool,
        patches: Patches,
        base_estimator: type,
        pipeline: type,
    ) -> None:
        self.active = True
        self.options = options
        self.stages = stages
        self.patches = patches
        self.base_estimator = base_estimator
        self.pipeline = pipeline
        self.cache: IdentityCache[_Entry] = IdentityCache()
        #: class -> whether it is a Pipeline (see :meth:`is_pipeline_class`). Its keys are estimator
        #: classes, which ``seen`` holds already.
        self.pipeline_classes: dict[type, bool] = {}
        self.seen: set[type] = set()

    # --- identity -------------------------------------------------------------------------------

    def entry(self, est: Any) -> _Entry:
        found = self.cache.get(est)
        if found is None:
            found = self._resolve(est)
            self.cache.put(est, found)
        return found

    def _resolve(self, est: Any) -> _Entry:
        pipeline = self.is_pipeline_class(type(est))
        if not isinstance(est, self.base_estimator):
            return _Entry(None, pipeline)
        cls = type(est)
        return _Entry(self.options.model(est, ModelIdentity(cls.__name__), class_aliases(cls)), pipeline)

    def is_pipeline_class(self, cls: type) -> bool:
        """Whether ``cls`` is a Pipeline (or a subclass), remembered per class in
        ``pipeline_classes``: the wrapper asks on every nested call, and ``issubclass`` of an ABC
        costs a Python-level ``__subclasscheck__`` for every class that is not one."""
        found = self.pipeline_classes.get(cls)
        if found is None:
            try:
                found = self.pipeline_classes[cls] = issubclass(cls, self.pipeline)
            except Exception:  # a broken __subclasscheck__ on the way: not a Pipeline
                report_internal_error(_FAILURE)
                return False
        return found

    def steps(self, est: Any, entry: _Entry) -> Steps:
        """The stage map of a Pipeline (rebuilt when its steps changed), else the empty map."""
        if not self.stages or not entry.pipeline:
            return _NO_STEPS
        current = tuple(getattr(est, "steps", ()))
        if current != entry.snapshot:
            steps: Steps = {}
            for step in current:
                name, step_est = step[0], step[1]
                if step_est is None or isinstance(step_est, str):  # "passthrough", "drop"
                    continue
                # "/" separates stage paths; a step name never needs it.
                steps[id(step_est)] = RUNTIME.stage(str(name).replace("/", "_") or "step")
            entry.steps, entry.snapshot = steps, current
        return entry.steps

    # --- calls ----------------------------------------------------------------------------------

    def nested_pipeline(
        self, scope: Steps, original: Any, est: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A Pipeline's method called inside an instrumented call: a stage if ``est`` is one of the
        enclosing Pipeline's steps, and in any case with its own steps as the scope, so that a
        Pipeline inside a meta-estimator shows its stages. (The wrapper handles every other
        nested call itself.)"""
        stage = None
        inner: Steps | None = None
        try:
            stage = scope.get(id(est))
            inner = self.steps(est, self.entry(est))
        except Exception:
            report_internal_error(_FAILURE)
            inner = None
        if inner is None:
            return original(est, *args, **kwargs)
        if stage is None:
            token = _SCOPE.set(inner)
            try:
                return original(est, *args, **kwargs)
            finally:
                _SCOPE.reset(token)
        with stage:
            token = _SCOPE.set(inner)
            try:
                return original(est, *args, **kwargs)
            finally:
                _SCOPE.reset(token)

    # --- patching -------------------------------------------------------------------------------

    def patch_estimator_classes(self) -> None:
        """Wrap every estimator class that exists now (and the classes in their MROs)."""
        stack: list[type] = [self.base_estimator]
        found: set[type] = set()
        while stack:
            cls = stack.pop()
            if cls in found:
                continue
            found.add(cls)
            stack.extend(type.__subclasses__(cls))
        for cls in found:
            self.class_created(cls)

    def patch_class(self, cls: type) -> None:
        for klass in cls.__mro__:
            if klass is object or klass in self.seen:
                continue
            self.seen.add(klass)
            self._patch_own_methods(klass)

    def _patch_own_methods(self, klass: type) -> None:
        own = klass.__dict__
        for name in TRACKED_METHODS:
            if name in own:
                self._wrap(klass, name, _tracked_method)
        for name in UNTRACKED_METHODS:
            if name in own:
                self._wrap(klass, name, _untracked_method)
        hook = own.get("__init_subclass__")
        module = getattr(klass, "__module__", None) or ""
        # Only hooks that estimator classes go through: typing.Generic's, say, is left alone.
        if isinstance(hook, classmethod) and (
            issubclass(klass, self.base_estimator) or module.startswith("sklearn.")
        ):
            self.patches.replace(klass, "__init_subclass__", _class_hook(self, hook))

    def _wrap(self, klass: type, name: str, make: Any) -> None:
        attr = klass.__dict__[name]
        if isinstance(attr, types.FunctionType):
            self.patches.replace(klass, name, make(self, attr))
            return
        fn = getattr(attr, "fn", None)
        if isinstance(fn, types.FunctionType) and hasattr(type(attr), "__get__"):
            # An ``available_if`` descriptor: keep the descriptor (and its availability check),
            # wrap the function it binds.
            replacement = copy.copy(attr)
            replacement.fn = make(self, fn)
            self.patches.replace(klass, name, replacement)
        # Anything else (a property, a staticmethod, a C slot) is not an estimator method: left alone.

    def class_created(self, cls: type) -> None:
        """Wrap a (new) estimator class; a class that cannot be patched is left as it is."""
        if self.active and issubclass(cls, self.base_estimator):
            try:
                self.patch_class(cls)
            except Exception:
                report_internal_error(f"inferscope: could not instrument the class {cls.__qualname__}")


def _tracked_method(state: _State, original: Any) -> Any:
    """The replacement of an inference method.

    Every estimator call inside a Pipeline runs it too (``Pipeline.predict`` of three steps makes
    five such calls), so it is written for speed: the state it reads is bound to locals of this
    closure, and the outermost call and the step call are inline rather than in helper functions
    (each helper frame costs a call and a copy of the arguments). A nested call that is not a step
    costs the first test, a context-variable read and two dict lookups.
    """
    get_scope = _SCOPE.get
    set_scope = _SCOPE.set
    reset_scope = _SCOPE.reset
    cached_entry = state.cache.get
    resolve = state.entry
    pipeline_classes = state.pipeline_classes
    is_pipeline_class = state.is_pipeline_class
    stages = state.stages
    current_key = RUNTIME.current_key
    getframe = sys._getframe

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.active:
            return original(self, *args, **kwargs)
        scope = get_scope()
        if scope is None:
            # The outermost scikit-learn call of this context. The decision is made inside ``try``
            # and the call outside it: an exception of the estimator itself must pass through
            # once, untouched, never be taken for our own failure.
            call = original
            steps: Steps | None = None
            try:
                entry = cached_entry(self) or resolve(self)
                if entry.model is not None:
                    module = getframe(1).f_globals.get("__name__") or ""
                    # Not a call that scikit-learn's own code makes (cross_val_predict, a joblib
                    # worker running an inner estimator).
                    if module != "sklearn" and not module.startswith("sklearn."):
                        steps = _NO_STEPS
                        if entry.pipeline and stages:
                            steps = entry.steps
                            if tuple(getattr(self, "steps", ())) != entry.snapshot:
                                steps = state.steps(self, entry)
                        if current_key() == NO_MODEL_KEY or not inference_open():
                            call = entry.tracked.get(original) or entry.track(original)
                            add_batch_size(call, args, kwargs)  # rows of X: the input size
            except Exception:
                report_internal_error(_FAILURE)
                call, steps = original, None
            if steps is None:
                return original(self, *args, **kwargs)
            token = set_scope(steps)
            try:
                return call(self, *args, **kwargs)
            finally:
                reset_scope(token)
        if scope is _UNTRACKED:
            return original(self, *args, **kwargs)
        pipeline = pipeline_classes.get(type(self))
        if pipeline is None:
            pipeline = is_pipeline_class(type(self))
        if pipeline:
            return state.nested_pipeline(scope, original, self, args, kwargs)
        stage = scope.get(id(self))
        if stage is None:  # not a step of the enclosing Pipeline (an inner estimator, a self-call)
            return original(self, *args, **kwargs)
        # A step of the running Pipeline: its call is a stage, and what it calls in turn is not
        # (the empty scope), not even its own methods (``self.decision_function`` in ``predict``).
        with stage:
            token = set_scope(_NO_STEPS)
            try:
                return original(self, *args, **kwargs)
            finally:
                reset_scope(token)

    wrapper.__inferscope_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _untracked_method(state: _State, original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.active or _SCOPE.get() is _UNTRACKED:
            return original(self, *args, **kwargs)
        token = _SCOPE.set(_UNTRACKED)
        try:
            return original(self, *args, **kwargs)
        finally:
            _SCOPE.reset(token)

    wrapper.__inferscope_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _class_hook(state: _State, original: classmethod[Any, Any, Any]) -> classmethod[Any, Any, Any]:
    """An ``__init_subclass__`` that runs the original, then (once the outermost hook of the chain
    has returned, so after every other class hook) wraps the new class's methods."""
    func = original.__func__

    def __init_subclass__(cls: type, /, **kwargs: Any) -> None:
        depth = getattr(_hook_depth, "depth", 0)
        _hook_depth.depth = depth + 1
        try:
            func(cls, **kwargs)
        finally:
            _hook_depth.depth = depth
        if depth == 0:
            state.class_created(cls)

    __init_subclass__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return classmethod(__init_subclass__)


class SklearnInstrumentor(InferscopeInstrumentor):
    """Instruments scikit-learn estimators and Pipelines.

    Options of ``instrument()``, all optional:

    - ``models``: estimators (by identity) or class names that count as models; default all.
    - ``model_names``: ``{estimator or class name: name or (name, version)}`` or a callable
      ``f(estimator) -> name | (name, version) | None``. Default name: the estimator's class name.
    - ``attributes``: static attributes on every series of these models.
    - ``stages``: ``False`` to record Pipelines as one inference without per-step stages.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any
    _extra_options = {"stages": True}
    _module = "sklearn"

    def _check_options(self, extra: dict[str, Any]) -> None:
        if not isinstance(extra["stages"], bool):
            raise TypeError(f"stages must be True or False, got {extra['stages']!r}")

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        from sklearn.base import BaseEstimator
        from sklearn.pipeline import Pipeline

        state = _State(options, extra["stages"], patches, BaseEstimator, Pipeline)
        state.patch_estimator_classes()
        return state
