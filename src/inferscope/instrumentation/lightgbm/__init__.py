"""lightgbm: ``Booster.predict`` and the scikit-learn API (``LGBMClassifier``, ``LGBMRegressor``,
``LGBMRanker``) become tracked inferences.

>>> from inferscope.instrumentation.lightgbm import LightGBMInstrumentor
>>> LightGBMInstrumentor().instrument(model_names={booster: ("fraud", "3")})  # doctest: +SKIP

What counts, once:

- ``Booster.predict`` called from your code: one inference.
- ``predict``, ``predict_proba`` and ``decision_function`` of the scikit-learn API called from
  your code: one inference each. The Booster call they make inside is part of it, never an
  inference of its own.
- A call that lightgbm's own code makes (``LGBMClassifier.predict`` calling ``predict_proba``,
  then ``LGBMModel.predict``, then ``Booster.predict``; the dask estimators predicting in their
  workers) is never an inference of its own: the wrappers pass through when their caller's frame
  belongs to the ``lightgbm`` package. ``train``, ``fit`` and ``refit`` record nothing (lightgbm
  predicts through its internal predictor there, not through ``Booster.predict``).
- A call made while an inference is already open (your ``@track_inference``, or another
  instrumented framework call) is part of it (:func:`inference_open`).

The scikit-learn API and the scikit-learn instrumentor: ``LGBMModel`` subclasses scikit-learn's
``BaseEstimator``, so when the scikit-learn instrumentor is on it records these estimators itself,
with its options and its rules (Pipeline stages, nothing recorded inside ``fit`` or ``score``).
This instrumentor then leaves them to it, so that each call is counted once and named the same way
whichever instrumentor was started first: if the scikit-learn instrumentor is active when this one
is instrumented, the scikit-learn API methods are not wrapped at all; if it is started later, it
wraps our wrappers, which then pass straight through while it is active.

Model identity, after the options (see ``inferscope.instrumentation``):

- a Booster: ``lightgbm-`` and the first 12 hex digits of the SHA-256 of its saved model
  (``model_to_string()``), computed on its first call (about 3 ms per 100 trees of 31 leaves) and
  only when no option names it;
- a scikit-learn API estimator: its class name (``LGBMClassifier``);
- no version: lightgbm's model format carries none. Give one with ``model_names``.

Aliases that ``models`` and ``model_names`` match: the class name (``Booster``, ``LGBMClassifier``),
``module.QualifiedName`` (``lightgbm.basic.Booster``), and for a Booster its ``lightgbm-<hash>``
name.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import types
from collections.abc import Callable
from typing import Any

from .. import (
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    defining_class,
    inference_open,
    report_internal_error,
)
from ..sklearn import TRACKED_METHODS as _SKLEARN_TRACKED_METHODS
from ..sklearn import SklearnInstrumentor
from .package import _instruments, _instruments_any

__all__ = ["BOOSTER_METHODS", "ESTIMATOR_METHODS", "LightGBMInstrumentor", "booster_digest"]

#: Inference methods of ``lightgbm.Booster``.
BOOSTER_METHODS = ("predict",)
#: Inference methods of the scikit-learn API: those of the scikit-learn instrumentor that
#: lightgbm's estimator classes define (``predict``, ``predict_proba``,
#: ``decision_function``).
ESTIMATOR_METHODS = _SKLEARN_TRACKED_METHODS

_PACKAGE = "lightgbm"
_SKLEARN = SklearnInstrumentor()  # the singleton; its ``active`` says whether it records estimators


def booster_digest(booster: Any) -> str | None:
    """The first 12 hex digits of the SHA-256 of the Booster's saved model (``model_to_string()``);
    None when it cannot be saved."""
    try:
        text = booster.model_to_string()
    except Exception:
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _library_frame(frame: types.FrameType) -> bool:
    """Whether ``frame`` runs lightgbm's own code (a call it makes, not the application)."""
    module = frame.f_globals.get("__name__") or ""
    return module == _PACKAGE or module.startswith(_PACKAGE + ".")


def _aliases(cls: type) -> tuple[str, str]:
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


class _Entry:
    __slots__ = ("model",)

    def __init__(self, model: TrackedModel | None) -> None:
        #: None when ``models=`` leaves this object out: its calls pass through.
        self.model = model


class _State:
    """Shared by every wrapper of one ``instrument()``; inactive once uninstrumented."""

    def __init__(self, options: InstrumentOptions) -> None:
        self.active = True
        self.options = options
        self.cache: IdentityCache[_Entry] = IdentityCache()

    def booster(self, booster: Any) -> TrackedModel | None:
        found = self.cache.get(booster)
        if found is None:
            found, final = self._resolve_booster(booster)
            if final:
                self.cache.put(booster, found)
        return found.model

    def estimator(self, est: Any) -> TrackedModel | None:
        found = self.cache.get(est)
        if found is None:
            found, final = self._resolve_estimator(est)
            if final:
                self.cache.put(est, found)
        return found.model

    def _resolve_booster(self, booster: Any) -> tuple[_Entry, bool]:
        """The Booster's entry, and whether it may be cached (not when the Booster could not be
        saved)."""
        cls = type(booster)
        digests: list[str | None] = []  # computed on first need, at most once

        def digest() -> str | None:
            if not digests:
                digests.append(booster_digest(booster))
            return digests[0]

        def aliases() -> tuple[str, ...]:
            hashed = digest()
            return _aliases(cls) if hashed is None else (f"{_PACKAGE}-{hashed}", *_aliases(cls))

        def default() -> ModelIdentity:
            hashed = digest()
            name = cls.__name__ if hashed is None else f"{_PACKAGE}-{hashed}"
            return ModelIdentity(name)

        model = None
        if self.options.selects(booster, aliases):
            identity = self.options.identity(booster, default, aliases)
            model = TrackedModel(identity, self.options.attributes)
        return _Entry(model), not digests or digests[0] is not None

    def _resolve_estimator(self, est: Any) -> tuple[_Entry, bool]:
        cls = type(est)
        aliases = _aliases(cls)
        if not self.options.selects(est, aliases):
            return _Entry(None), True
        identity = self.options.identity(est, ModelIdentity(cls.__name__), aliases)
        return _Entry(TrackedModel(identity, self.options.attributes)), True


def _tracked_method(
    state: _State, original: Any, model_of: Callable[[Any], TrackedModel | None], defer: bool
) -> Any:
    """A wrapper of ``original`` that tracks calls from the application. ``defer``: an estimator
    method, which passes through while the scikit-learn instrumentor records estimators."""

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active and not (defer and _SKLEARN.active):
            # The decision is made inside ``try`` and the call outside it: an exception of lightgbm
            # itself must pass through once, untouched, never be taken for our own failure.
            try:
                call = None
                if not _library_frame(sys._getframe(1)):
                    model = model_of(self)
                    if model is not None and not inference_open():
                        call = model.tracked(original)
            except Exception:
                report_internal_error("inferscope: lightgbm instrumentation failed; the call is not recorded")
                call = None
            if call is not None:
                return call(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    wrapper.__inferscope_original__ = original  # type: ignore[attr-defined]
    return wrapper


def _sklearn_records(base: type) -> bool:
    """Whether the scikit-learn instrumentor would record ``base``'s subclasses (they are
    scikit-learn estimators: lightgbm found scikit-learn when it was imported)."""
    return any(k.__module__ == "sklearn.base" and k.__name__ == "BaseEstimator" for k in base.__mro__)


def _estimator_classes(base: type) -> list[type]:
    """``base`` and its subclasses defined in the same module (lightgbm's scikit-learn API, not the
    dask estimators, nor yours: those inherit the wrapped methods they do not override)."""
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


class LightGBMInstrumentor(InferscopeInstrumentor):
    """Instruments ``lightgbm.Booster.predict`` and the scikit-learn API.

    Options of ``instrument()``, all optional:

    - ``models``: Boosters and estimators (by identity) or aliases (class name,
      ``module.QualifiedName``, a Booster's ``lightgbm-<hash>`` name) that count as models; default
      all.
    - ``model_names``: ``{model or alias: name or (name, version)}`` or a callable
      ``f(model) -> name | (name, version) | None``.
    - ``attributes``: static attributes on every series of these models.

    While the scikit-learn instrumentor is on, its options name the scikit-learn API estimators.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import lightgbm
        from lightgbm.sklearn import LGBMModel

        state = _State(options)
        for name in BOOSTER_METHODS:
            owner = defining_class(lightgbm.Booster, name)
            if owner is not None:
                wrapper = _tracked_method(state, owner.__dict__[name], state.booster, defer=False)
                patches.replace(owner, name, wrapper)
        defer = _sklearn_records(LGBMModel)
        if defer and _SKLEARN.active:
            return state  # the scikit-learn instrumentor records the estimators
        for cls in _estimator_classes(LGBMModel):
            for name in ESTIMATOR_METHODS:
                method = cls.__dict__.get(name)
                if isinstance(method, types.FunctionType):
                    patches.replace(cls, name, _tracked_method(state, method, state.estimator, defer=defer))
        return state
