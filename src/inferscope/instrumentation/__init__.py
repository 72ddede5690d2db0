"""Zero-code instrumentation: one OpenTelemetry ``BaseInstrumentor`` per framework.

Each framework lives in its own subpackage (``inferscope.instrumentation.sklearn``,
``inferscope.instrumentation.onnxruntime``) with a ``package.py`` that names the library versions it
instruments. ``opentelemetry-instrument`` loads them through the ``opentelemetry_instrumentor`` entry
points; by hand they are used as in OpenTelemetry contrib::

    from inferscope.instrumentation.sklearn import SklearnInstrumentor

    SklearnInstrumentor().instrument(model_names={fraud_pipeline: ("fraud", "3")})
    ...
    SklearnInstrumentor().uninstrument()  # every patched attribute is restored by identity

This module is the shared base:

- :class:`InferscopeInstrumentor` parses the options every instrumentor accepts (``models``,
  ``model_names``, ``attributes``), checks its own dependencies, records every attribute it
  replaces in :class:`Patches` and restores exactly those on ``uninstrument()``.
- :class:`IdentityCache` keeps per-object state (the model's interned key, a Pipeline's steps)
  keyed by identity and dropped when the object is collected, so resolving a model costs one dict
  lookup per call.
- :func:`inference_open` tells an instrumented call whether an inference is already open in this
  context (the user's ``@track_inference``, or another instrumented framework call). Such a call
  is not a second inference: it passes through, or adds its internals as stages under the open
  entry. That is how nothing is counted twice across frameworks.

Model identity, highest precedence first (the same for every framework):

1. ``model_names[obj]``: an entry keyed by the model object itself;
2. ``model_names(obj)``: when ``model_names`` is a callable, its result unless it is None;
3. ``model_names["alias"]``: an entry keyed by one of the framework's aliases for the object (the
   class name for scikit-learn, the file path or stem for onnxruntime; see each framework);
4. the framework's default (the class name; the file stem; the graph's producer and name).

A name is a ``str``; a name and a version are a ``(name, version)`` tuple or a :class:`ModelIdentity`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import sys
import threading
import types
import weakref
from abc import abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextvars import ContextVar
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any, Generic, NamedTuple, TypeVar

from opentelemetry.instrumentation.dependencies import DependencyConflict, get_dependency_conflicts
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from packaging.requirements import Requirement

from .._records import NO_MODEL_KEY
from .._runtime import REGISTRY, RUNTIME
from .._selflog import install_redaction, report_error
from ..tracking import _check_attributes, _check_model, _check_version
from ..windows import add_batch_size

__all__ = [
    "VERSION_ATTRIBUTE",
    "BoosterState",
    "IdentityCache",
    "InferscopeInstrumentor",
    "InstrumentOptions",
    "InstrumentationState",
    "ModelEntry",
    "ModelIdentity",
    "Patches",
    "TrackedModel",
    "call_in_scope",
    "class_aliases",
    "declared_version",
    "defining_class",
    "depth_and_training",
    "hashed_model_entry",
    "inference_open",
    "is_sklearn_estimator",
    "library_frame",
    "module_subclasses",
    "report_internal_error",
    "tracked_method",
    "wrap_booster_library",
    "wrap_defined_methods",
    "wrap_own_functions",
]

_logger = install_redaction(logging.getLogger("inferscope.instrumentation"))

V = TypeVar("V")
S = TypeVar("S")

#: Keyword arguments that some distros pass to every instrumentor. inferscope's metrics go where
#: ``inferscope.configure()`` (or the opentelemetry-instrument hook) sends them, so these are ignored.
_OTEL_PROVIDER_OPTIONS = frozenset(
    {"tracer_provider", "meter_provider", "logger_provider", "event_logger_provider"}
)


class ModelIdentity(NamedTuple):
    """The stable name (and optional version) under which a model's series are exported."""

    name: str
    version: str | None = None


ModelNamer = Mapping[Any, Any] | Callable[[Any], Any]


def _as_identity(value: object, where: str) -> ModelIdentity:
    """A ``model_names`` value (``"name"``, ``("name", version)`` or ModelIdentity), checked."""
    if isinstance(value, str):
        return ModelIdentity(_checked_name(value, where))
    if isinstance(value, tuple) and len(value) == 2:
        name, version = value
        try:
            checked_version = _check_version(version)
        except TypeError:
            raise TypeError(
                f"{where}: the version must be a non-empty str, an int or None, got {version!r}"
            ) from None
        return ModelIdentity(_checked_name(name, where), checked_version)
    raise TypeError(f"{where} must be a model name (str) or a (name, version) tuple, got {value!r}")


def _checked_name(name: object, where: str) -> str:
    try:
        checked = _check_model(name)
    except TypeError:
        checked = None
    if checked is None:
        raise TypeError(f"{where}: the model name must be a non-empty str, got {name!r}")
    return checked


#: A model's aliases, or a function that returns them when they are first needed.
Aliases = Sequence[str] | Callable[[], Sequence[str]]


def _evaluate(aliases: Aliases) -> Sequence[str]:
    return aliases() if callable(aliases) else aliases


class InstrumentOptions:
    """The options every inferscope instrumentor accepts, validated once at ``instrument()``.

    - ``models``: only these objects (matched by identity) or aliases (str) count as models; calls
      on anything else pass through untracked. Default: every model of the framework.
    - ``model_names``: a mapping (object or alias -> name or ``(name, version)``) or a callable
      ``f(obj) -> name | (name, version) | None``. See the module docstring for the precedence.
    - ``attributes``: static attributes added to every series of every model of this instrumentor
      (never request data: each distinct value is a new series).
    """

    __slots__ = (
        "_alias_filter",
        "_namer",
        "_names_by_alias",
        "_names_by_object",
        "_object_filter",
        "attributes",
    )

    def __init__(
        self,
        models: Iterable[object] | None = None,
        model_names: ModelNamer | None = None,
        attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        self._object_filter: dict[int, object] | None = None
        self._alias_filter: frozenset[str] = frozenset()
        if models is not None:
            if isinstance(models, (str, bytes)) or not isinstance(models, Iterable):
                raise TypeError(f"models must be a collection of models or aliases, got {models!r}")
            objects: dict[int, object] = {}
            aliases: set[str] = set()
            for item in models:
                if isinstance(item, str):
                    aliases.add(item)
                else:
                    objects[id(item)] = item  # the value keeps the id from being reused meanwhile
            self._object_filter = objects
            self._alias_filter = frozenset(aliases)
        self._names_by_object: dict[int, tuple[object, ModelIdentity]] = {}
        self._names_by_alias: dict[str, ModelIdentity] = {}
        self._namer: Callable[[Any], Any] | None = None
        if isinstance(model_names, Mapping):
            for key, value in model_names.items():
                identity = _as_identity(value, f"model_names[{key!r}]")
                if isinstance(key, str):
                    self._names_by_alias[key] = identity
                else:
                    self._names_by_object[id(key)] = (key, identity)
        elif callable(model_names):
            self._namer = model_names
        elif model_names is not None:
            raise TypeError(f"model_names must be a mapping or a callable, got {model_names!r}")
        self.attributes: dict[str, str] = _check_attributes(attributes)

    def selects(self, obj: object, aliases: Aliases) -> bool:
        """Whether ``obj`` (known by ``aliases``) is one of the ``models`` to track."""
        if self._object_filter is None:
            return True
        if self._object_filter.get(id(obj)) is obj:
            return True
        if not self._alias_filter:
            return False
        return any(alias in self._alias_filter for alias in _evaluate(aliases))

    def identity(
        self, obj: object, default: ModelIdentity | Callable[[], ModelIdentity], aliases: Aliases
    ) -> ModelIdentity:
        """The model identity of ``obj``, by the documented precedence.

        ``default`` and ``aliases`` may be functions, called only when they are needed: a default
        name that costs something to compute (a hash of the model) is not computed for a model that
        is named by object or by the callable.
        """
        by_object = self._names_by_object.get(id(obj))
        if by_object is not None and by_object[0] is obj:
            return by_object[1]
        if self._namer is not None:
            try:
                named = self._namer(obj)
            except Exception:
                report_internal_error("inferscope: the model_names callable raised; using the default name")
                named = None
            if named is not None:
                try:
                    return _as_identity(named, "the model_names callable's result")
                except TypeError:
                    report_internal_error("inferscope: the model_names callable returned an invalid name")
        if self._names_by_alias:
            for alias in _evaluate(aliases):
                found = self._names_by_alias.get(alias)
                if found is not None:
                    return found
        return default() if callable(default) else default

    def model(
        self, obj: object, default: ModelIdentity | Callable[[], ModelIdentity], aliases: Aliases
    ) -> TrackedModel | None:
        """The tracked model of ``obj`` (see :meth:`identity`), or None when ``models`` leaves it out."""
        if not self.selects(obj, aliases):
            return None
        return TrackedModel(self.identity(obj, default, aliases), self.attributes)


class TrackedModel:
    """One model as the hot path sees it: its interned key and its tracked methods.

    ``tracked(func)`` returns the backend's tracked-call wrapper of ``func`` under this model's key,
    created once per method, so a call costs what ``@track_inference`` costs.
    """

    __slots__ = ("_attributes", "_key", "_tracked", "identity")

    def __init__(self, identity: ModelIdentity, attributes: Mapping[str, str]) -> None:
        self.identity = identity
        self._attributes = attributes
        self._key: int | None = None
        self._tracked: dict[Callable[..., Any], Callable[..., Any]] = {}

    @property
    def key(self) -> int:
        """The interned key, taken on first use: a model that is never called uses no key."""
        if self._key is None:
            self._key = REGISTRY.inference_key(self.identity.name, self.identity.version, self._attributes)
        return self._key

    def tracked(self, func: Callable[..., Any]) -> Callable[..., Any]:
        found = self._tracked.get(func)
        if found is None:
            found = self._tracked[func] = RUNTIME.track(func, self.key)
        return found

    def __repr__(self) -> str:
        return f"<inferscope model {self.identity.name!r} version {self.identity.version!r}>"


class IdentityCache(Generic[V]):
    """Values per object, keyed by identity (never by ``__eq__``/``__hash__``), dropped when the
    object is garbage-collected.

    A hit is one dict lookup and one weak-reference call. Objects that cannot be weakly referenced
    are not cached; their value is computed on every call.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[Any], V]] = {}

    def get(self, obj: object) -> V | None:
        entry = self._entries.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: object, value: V) -> None:
        key = id(obj)
        entries = self._entries

        def forget(ref: weakref.ref[Any]) -> None:
            # Only if the id has not been reused by a newer object meanwhile.
            current = entries.get(key)
            if current is not None and current[0] is ref:
                entries.pop(key, None)

        try:
            ref = weakref.ref(obj, forget)
        except TypeError:
            return
        entries[key] = (ref, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Patches:
    """Attributes replaced on classes, restored exactly (by identity) on :meth:`restore`.

    Only attributes that a class defines itself (``name in cls.__dict__``) are replaced, never
    added, so restoring puts back the very object that was there. An attribute that someone else
    replaced after us is left alone; our wrapper then stays reachable only through theirs and
    passes calls straight through, because its instrumentor is no longer active.
    """

    def __init__(self) -> None:
        self._applied: list[tuple[type, str, object, object]] = []

    def replace(self, owner: type, name: str, replacement: object) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, replacement)
        self._applied.append((owner, name, original, replacement))

    def restore(self) -> None:
        for owner, name, original, replacement in reversed(self._applied):
            if owner.__dict__.get(name) is replacement:
                setattr(owner, name, original)
        self._applied.clear()

    def originals(self) -> list[tuple[type, str, object]]:
        """``(class, attribute, original)`` for every replacement in force, for tests and debugging."""
        return [(owner, name, original) for owner, name, original, _ in self._applied]

    def __len__(self) -> int:
        return len(self._applied)


def defining_class(cls: type, name: str) -> type | None:
    """The class in ``cls.__mro__`` whose own ``__dict__`` defines ``name``."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass
    return None


#: The attribute a model object may set to declare its version (a torch module, a Keras model, a
#: transformers model): ``model.inferscope_version = "3"``.
VERSION_ATTRIBUTE = "inferscope_version"


def declared_version(obj: object, name: str) -> str | None:
    """The version ``obj`` declares in its ``inferscope_version`` attribute, or None. One that is
    not a non-empty str or an int is logged and ignored: naming a model never fails a call."""
    declared = getattr(obj, VERSION_ATTRIBUTE, None)
    if declared is None:
        return None
    try:
        return _check_version(declared)
    except TypeError:
        _logger.warning(
            "inferscope: %s.%s must be a non-empty str or an int, got %r; the version is ignored",
            name,
            VERSION_ATTRIBUTE,
            declared,
        )
        return None


def depth_and_training(extra: Mapping[str, Any]) -> tuple[int, bool]:
    """The ``stage_depth`` and ``track_training`` options of the model-graph instrumentors, checked."""
    stage_depth = extra["stage_depth"]
    if isinstance(stage_depth, bool) or not isinstance(stage_depth, int) or stage_depth < 0:
        raise TypeError(f"stage_depth must be an int >= 0, got {stage_depth!r}")
    track_training = extra["track_training"]
    if not isinstance(track_training, bool):
        raise TypeError(f"track_training must be True or False, got {track_training!r}")
    return stage_depth, track_training


def class_aliases(cls: type) -> tuple[str, str]:
    """The aliases every class-named model is known by: ``Name`` and ``module.QualifiedName``."""
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def library_frame(frame: types.FrameType, package: str) -> bool:
    """Whether ``frame`` runs ``package``'s own code (a call it makes, not the application)."""
    module = frame.f_globals.get("__name__") or ""
    return module == package or module.startswith(package + ".")


def is_sklearn_estimator(base: type) -> bool:
    """Whether ``base`` subclasses scikit-learn's ``BaseEstimator``, so that the scikit-learn
    instrumentor would record it (its library found scikit-learn when it was imported)."""
    return any(k.__module__ == "sklearn.base" and k.__name__ == "BaseEstimator" for k in base.__mro__)


def module_subclasses(base: type) -> list[type]:
    """``base`` and its subclasses defined in the same module (a library's own classes, not those of
    other modules, nor yours: those inherit the wrapped methods they do not override)."""
    found: list[type] = []
    stack: list[type] = [base]
    while stack:
        cls = stack.pop()
        if cls in found:
            continue
        found.append(cls)
        subclasses: list[type] = type.__subclasses__(cls)
        stack.extend(sub for sub in subclasses if sub.__module__ == base.__module__)
    return found


def wrap_defined_methods(
    patches: Patches, cls: type, names: Iterable[str], wrap: Callable[[Any], object]
) -> None:
    """Replace each of ``names`` on the class of ``cls.__mro__`` that defines it by ``wrap(original)``;
    a name that no class defines is skipped."""
    for name in names:
        owner = defining_class(cls, name)
        if owner is not None:
            patches.replace(owner, name, wrap(owner.__dict__[name]))


def wrap_own_functions(
    patches: Patches, base: type, names: Iterable[str], wrap: Callable[[Any], object]
) -> None:
    """Replace each of ``names`` that ``base`` or one of its :func:`module_subclasses` defines itself
    as a plain function by ``wrap(original)``."""
    for cls in module_subclasses(base):
        for name in names:
            method = cls.__dict__.get(name)
            if isinstance(method, types.FunctionType):
                patches.replace(cls, name, wrap(method))


class ModelEntry:
    """The cached resolution of one object: its tracked model, or None."""

    __slots__ = ("model",)

    def __init__(self, model: TrackedModel | None) -> None:
        #: None when ``models=`` leaves this object out: its calls pass through.
        self.model = model


class InstrumentationState:
    """Shared by every wrapper of one ``instrument()``; inactive once uninstrumented."""

    def __init__(self, options: InstrumentOptions) -> None:
        self.active = True
        self.options = options
        self.cache: IdentityCache[ModelEntry] = IdentityCache()

    def cached_model(
        self, obj: Any, resolve: Callable[[Any], tuple[ModelEntry, bool]]
    ) -> TrackedModel | None:
        """``obj``'s tracked model: from the cache, else ``resolve(obj)``, which returns the entry
        and whether it may be cached."""
        found = self.cache.get(obj)
        if found is None:
            found, final = resolve(obj)
            if final:
                self.cache.put(obj, found)
        return found.model


def hashed_model_entry(
    options: InstrumentOptions,
    obj: Any,
    prefix: str,
    digest_of: Callable[[Any], str | None],
    version_of: Callable[[Any], str | None] | None = None,
) -> tuple[ModelEntry, bool]:
    """The entry of a model named by a hash of its saved form (``prefix-<hash>``, also an alias; the
    class name when it cannot be saved), and whether it may be cached (not when it could not be
    saved: it may be loaded in place before its next call). The hash is computed on first need, at
    most once; ``version_of`` gives the default version."""
    cls = type(obj)
    digests: list[str | None] = []

    def digest() -> str | None:
        if not digests:
            digests.append(digest_of(obj))
        return digests[0]

    def aliases() -> tuple[str, ...]:
        hashed = digest()
        return class_aliases(cls) if hashed is None else (f"{prefix}-{hashed}", *class_aliases(cls))

    def default() -> ModelIdentity:
        hashed = digest()
        name = cls.__name__ if hashed is None else f"{prefix}-{hashed}"
        return ModelIdentity(name, None if version_of is None else version_of(obj))

    model = options.model(obj, default, aliases)
    return ModelEntry(model), not digests or digests[0] is not None


def tracked_method(
    state: InstrumentationState,
    original: Any,
    model_of: Callable[[Any], TrackedModel | None],
    failure: str,
    library: str | None = None,
    defer_to: InferscopeInstrumentor | None = None,
    add_size: Callable[[Any, tuple[Any, ...], Mapping[str, Any]], None] | None = add_batch_size,
) -> Any:
    """A wrapper of ``original`` that tracks a call as one inference of ``model_of(self)``, unless
    an inference is already open. It passes through while ``state`` is inactive, while ``defer_to``
    (another instrumentor that records these calls) is active, and when called from ``library``'s
    own code. ``failure`` is reported when the bookkeeping fails. ``add_size(call, args, kwargs)``
    reports the input size of a tracked call (by default the batch's first dimension).

    The decision is made inside ``try`` and the call outside it: an exception of the library itself
    must pass through once, untouched, never be taken for our own failure.
    """

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active and not (defer_to is not None and defer_to.active):
            try:
                call = None
                if library is None or not library_frame(sys._getframe(1), library):
                    model = model_of(self)
                    if model is not None and not inference_open():
                        call = model.tracked(original)
                        if add_size is not None:
                            add_size(call, args, kwargs)
            except Exception:
                report_internal_error(failure)
                call = None
            if call is not None:
                return call(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    wrapper.__inferscope_original__ = original  # type: ignore[attr-defined]
    return wrapper


class BoosterState(InstrumentationState):
    """The state of a gradient-boosting instrumentor (xgboost, lightgbm): Boosters are named by a
    hash of their saved model (:func:`hashed_model_entry`), estimators by
    :meth:`_resolve_estimator`."""

    def __init__(
        self,
        options: InstrumentOptions,
        package: str,
        digest_of: Callable[[Any], str | None],
        version_of: Callable[[Any], str | None] | None = None,
    ) -> None:
        super().__init__(options)
        self.package = package
        self.digest_of = digest_of
        self.version_of = version_of

    def booster(self, booster: Any) -> TrackedModel | None:
        return self.cached_model(booster, self._resolve_booster)

    def estimator(self, est: Any) -> TrackedModel | None:
        return self.cached_model(est, self._resolve_estimator)

    def _resolve_booster(self, booster: Any) -> tuple[ModelEntry, bool]:
        return hashed_model_entry(self.options, booster, self.package, self.digest_of, self.version_of)

    def _resolve_estimator(self, est: Any) -> tuple[ModelEntry, bool]:
        """A scikit-learn API estimator's entry (named by its class), and whether it may be cached."""
        cls = type(est)
        return ModelEntry(self.options.model(est, ModelIdentity(cls.__name__), class_aliases(cls))), True


def wrap_booster_library(
    patches: Patches,
    state: BoosterState,
    booster: type,
    booster_methods: Iterable[str],
    estimator_base: type,
    estimator_methods: Iterable[str],
    sklearn: InferscopeInstrumentor,
) -> None:
    """Wrap a gradient-boosting library: the Booster's inference methods, and those of its
    scikit-learn API (``estimator_base`` and its subclasses in the same module). Calls from the
    library's own code pass through. When the estimators are scikit-learn estimators, the
    scikit-learn instrumentor (``sklearn``) records them while it is active: they are not wrapped
    when it is active now, and their wrappers pass through while it is."""
    package = state.package
    failure = f"inferscope: {package} instrumentation failed; the call is not recorded"
    wrap_defined_methods(
        patches,
        booster,
        booster_methods,
        lambda original: tracked_method(state, original, state.booster, failure, library=package),
    )
    defer = is_sklearn_estimator(estimator_base)
    if defer and sklearn.active:
        return  # the scikit-learn instrumentor records the estimators
    defer_to = sklearn if defer else None
    wrap_own_functions(
        patches,
        estimator_base,
        estimator_methods,
        lambda original: tracked_method(
            state, original, state.estimator, failure, library=package, defer_to=defer_to
        ),
    )


def call_in_scope(
    var: ContextVar[S],
    scope: S,
    call: Callable[..., Any],
    obj: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """``call(obj, *args, **kwargs)`` with ``var`` set to ``scope``, reset on every path."""
    token = var.set(scope)
    try:
        return call(obj, *args, **kwargs)
    finally:
        var.reset(token)


def inference_open() -> bool:
    """Whether an inference is open in this context: the user's ``@track_inference``, another
    instrumented framework call, or a stage inside one. A stage entered outside any inference does
    not count."""
    key = RUNTIME.current_key()
    if key == NO_MODEL_KEY:
        return False
    info = REGISTRY.info(key)
    return info.model is not None or info.overflow


def report_internal_error(message: str) -> None:
    """Count a failure of instrumentation bookkeeping (exported as ``inferscope.sdk.errors``) and
    log it with its traceback at most once a minute. Never raises."""
    report_error(message, logger=_logger)


#: Per instrumentor class: held while its framework is patched from the import hook, and while it
#: is instrumented or uninstrumented, so that the application's import of the framework in one
#: thread and ``uninstrument()`` in another never interleave. One lock per instrumentor, never held
#: while ``instrument()`` imports anything: a thread importing a framework holds that module's
#: import lock while the hook runs, and a lock shared with another import could close a cycle.
_ATTACH_LOCKS: dict[type, threading.RLock] = {}


def attach_lock(instrumentor: type) -> threading.RLock:
    """The lock of ``instrumentor`` (a class), made on first use."""
    return _ATTACH_LOCKS.setdefault(instrumentor, threading.RLock())


def _fresh_attach_locks() -> None:
    _ATTACH_LOCKS.clear()  # the forking thread's; a thread that held one is gone


os.register_at_fork(after_in_child=_fresh_attach_locks)


class InferscopeInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Base of every inferscope instrumentor.

    Subclasses set ``_instruments`` and ``_instruments_any`` (from their ``package.py``) and
    ``_module``, may set ``_extra_options`` (option name -> default) and :meth:`_check_options`,
    and implement :meth:`_apply`, which patches the framework through the :class:`Patches` it is
    given and returns the state its wrappers share.

    The framework is patched when the application imports ``_module``, never before: importing a
    framework costs seconds and hundreds of MB, and a service that has one installed but does not
    use it must not pay for it (``opentelemetry-instrument`` instruments every installed framework).
    When it is imported already, ``instrument()`` patches it at once. Options are checked by
    ``instrument()`` either way.

    ``instrument()`` and ``uninstrument()`` are idempotent: ``BaseInstrumentor`` ignores a second
    call (with a warning), and ``_uninstrument`` deactivates the wrappers and restores every patched
    attribute.
    """

    #: Requirements that must all be met (``package.py``).
    _instruments: tuple[str, ...] = ()
    #: Requirements of which one must be met: one library shipped as several distributions.
    _instruments_any: tuple[str, ...] = ()
    _extra_options: Mapping[str, object] = {}
    #: The module whose import the patching waits for.
    _module: str = ""

    _patches: Patches | None = None
    _state: Any = None
    #: Set while instrumented and waiting for ``_module``: the import hook of that instrumentation
    #: acts only while it is still the one in force (wrapt's hooks cannot be removed).
    _waiting: object | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """``_instruments``, plus the one requirement of ``_instruments_any`` whose distribution is
        installed (the first one when none is, so that a check reports it missing)."""
        if not self._instruments_any:
            return self._instruments
        for requirement in self._instruments_any:
            try:
                distribution(Requirement(requirement).name)
            except PackageNotFoundError:
                continue
            return (*self._instruments, requirement)
        return (*self._instruments, self._instruments_any[0])

    def _check_dependency_conflicts(self) -> DependencyConflict | None:
        return get_dependency_conflicts(list(self._instruments), list(self._instruments_any) or None)

    def _instrument(self, **kwargs: Any) -> None:
        if self._patches is not None:  # called directly, twice: keep the first instrumentation
            return
        options, extra = self._parse_options(kwargs)
        # opentelemetry-instrument skips this check (skip_dep_check) after its distribution-wide
        # one, which finds no "instruments" requirements in inferscope-sdk and so loads every
        # instrumentor: each checks its own framework here.
        conflict = self._check_dependency_conflicts()
        if conflict is not None:
            message = conflict._format_message(type(self).__name__)
            if conflict.found or conflict.found_any:
                _logger.error(message)  # installed, but at a version we do not support
            else:
                _logger.debug(message)
            return
        patches = Patches()
        lock = attach_lock(type(self))
        if self._module in sys.modules:
            # Patched here, without the lock: patching may import (sklearn.pipeline, say), and the
            # import may wait for a thread that is importing the framework and waits for the lock.
            try:
                state = self._apply(patches, options, extra)
            except BaseException:
                patches.restore()
                raise
            with lock:
                self._state, self._patches = state, patches
            return
        with lock:
            self._patches = patches  # active: the wrappers go in when the framework is imported
            self._waiting = waiting = object()

        def attach_when_imported(module: Any) -> None:
            with lock:
                if self._waiting is not waiting:
                    return  # uninstrumented (and maybe instrumented again) since
                self._waiting = None
                try:
                    self._state = self._apply(patches, options, extra)
                except Exception:  # an import hook must never break the application's import
                    patches.restore()
                    self._patches = self._state = None
                    report_internal_error(
                        f"inferscope: {self._module} could not be instrumented; its calls are not recorded"
                    )

        import wrapt

        wrapt.register_post_import_hook(attach_when_imported, self._module)

    def _uninstrument(self, **kwargs: Any) -> None:
        with attach_lock(type(self)):
            self._waiting = None
            patches, self._patches = self._patches, None
            state, self._state = self._state, None
            if state is not None:
                state.active = False
            if patches is not None:
                patches.restore()

    def _check_options(self, extra: dict[str, Any]) -> None:
        """Raise ``TypeError`` for a bad value among ``extra`` (the ``_extra_options``): checked by
        ``instrument()``, before the framework is imported."""

    @abstractmethod
    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> Any:
        """Patch the framework (``_module`` is imported); return the state object the wrappers
        share (it must have ``active``)."""

    def _parse_options(self, kwargs: dict[str, Any]) -> tuple[InstrumentOptions, dict[str, Any]]:
        known = {"models", "model_names", "attributes", *self._extra_options}
        unknown = [name for name in kwargs if name not in known and name not in _OTEL_PROVIDER_OPTIONS]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"{type(self).__name__}.instrument() got an unknown option {name!r}{hint} "
                f"(accepted: {', '.join(sorted(known))})"
            )
        options = InstrumentOptions(
            models=kwargs.get("models"),
            model_names=kwargs.get("model_names"),
            attributes=kwargs.get("attributes"),
        )
        extra = {name: kwargs.get(name, default) for name, default in self._extra_options.items()}
        self._check_options(extra)
        return options, extra

    @property
    def active(self) -> bool:
        """Whether this instrumentor's wrappers are in place, or wait for the framework's import:
        instrumented, and not uninstrumented since. (``is_instrumented_by_opentelemetry`` is also
        true when ``instrument()`` found its library missing and patched nothing.)"""
        return self._patches is not None

    @property
    def waiting(self) -> bool:
        """Whether this instrumentor waits for the application to import its framework."""
        return self._waiting is not None

    @property
    def patched(self) -> list[tuple[type, str, object]]:
        """``(class, attribute, original)`` for every attribute currently replaced."""
        return [] if self._patches is None else self._patches.originals()
