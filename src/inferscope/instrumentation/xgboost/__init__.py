"""xgboost: ``Booster.predict`` and ``Booster.inplace_predict``, and the scikit-learn API
(``XGBClassifier``, ``XGBRegressor``, ``XGBRanker``, ...), become tracked inferences.

>>> from inferscope.instrumentation.xgboost import XGBoostInstrumentor
>>> XGBoostInstrumentor().instrument(model_names={booster: ("fraud", "3")})  # doctest: +SKIP

What counts, once:

- ``Booster.predict`` and ``Booster.inplace_predict`` called from your code: one inference each.
- ``predict`` and ``predict_proba`` of the scikit-learn API called from your code: one inference
  each. The Booster calls they make inside are part of it, never inferences of their own.
- A call that xgboost's own code makes (``XGBClassifier.predict`` calling ``XGBModel.predict`` and
  then ``Booster.inplace_predict``; ``Booster.eval_set`` predicting for a custom metric while it
  trains) is never an inference of its own: the wrappers pass through when their caller's frame
  belongs to the ``xgboost`` package. That is also why ``train`` and ``fit`` record nothing.
- A call made while an inference is already open (your ``@track_inference``, or another
  instrumented framework call) is part of it (:func:`inference_open`).

The scikit-learn API and the scikit-learn instrumentor: ``XGBModel`` subclasses scikit-learn's
``BaseEstimator``, so when the scikit-learn instrumentor is on it records these estimators itself,
with its options and its rules (Pipeline stages, nothing recorded inside ``fit`` or ``score``).
This instrumentor then leaves them to it, so that each call is counted once and named the same way
whichever instrumentor was started first: if the scikit-learn instrumentor is active when this one
is instrumented, the scikit-learn API methods are not wrapped at all; if it is started later, it
wraps our wrappers, which then pass straight through while it is active.

Model identity, after the options (see ``inferscope.instrumentation``):

- a Booster: ``xgboost-`` and the first 12 hex digits of the SHA-256 of its saved model (UBJSON),
  computed on its first call (about 1 ms per 100 trees of depth 6) and only when no option names it;
- a scikit-learn API estimator: its class name (``XGBClassifier``);
- the version: the Booster's ``version`` attribute (``booster.set_attr(version="3")``, saved with
  the model), when it is set.

Aliases that ``models`` and ``model_names`` match: the class name (``Booster``, ``XGBClassifier``),
``module.QualifiedName`` (``xgboost.core.Booster``), and for a Booster its ``xgboost-<hash>`` name.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .. import (
    BoosterState,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelEntry,
    ModelIdentity,
    Patches,
    TrackedModel,
    class_aliases,
    wrap_booster_library,
)
from ..sklearn import TRACKED_METHODS as _SKLEARN_TRACKED_METHODS
from ..sklearn import SklearnInstrumentor
from .package import _instruments, _instruments_any

__all__ = [
    "BOOSTER_METHODS",
    "ESTIMATOR_METHODS",
    "XGBoostInstrumentor",
    "booster_digest",
    "booster_version",
]

#: Inference methods of ``xgboost.Booster``.
BOOSTER_METHODS = ("predict", "inplace_predict")
#: Inference methods of the scikit-learn API: those of the scikit-learn instrumentor that
#: xgboost's estimator classes define (``predict``, ``predict_proba``).
ESTIMATOR_METHODS = _SKLEARN_TRACKED_METHODS

_PACKAGE = "xgboost"
_SKLEARN = SklearnInstrumentor()  # the singleton; its ``active`` says whether it records estimators


def booster_digest(booster: Any) -> str | None:
    """The first 12 hex digits of the SHA-256 of the Booster's saved model (UBJSON); None when it
    cannot be saved (an empty Booster)."""
    try:
        raw = booster.save_raw("ubj")
    except Exception:
        return None
    return hashlib.sha256(raw).hexdigest()[:12]


def booster_version(booster: Any) -> str | None:
    """The Booster's ``version`` attribute, when it is set."""
    try:
        value = booster.attr("version")
    except Exception:
        return None
    return value if isinstance(value, str) and value else None


class _State(BoosterState):
    """Shared by every wrapper of one ``instrument()``; inactive once uninstrumented."""

    def _resolve_estimator(self, est: Any) -> tuple[ModelEntry, bool]:
        """The estimator's entry, and whether it may be cached (not before it is fitted: its
        version is read from its Booster)."""
        cls = type(est)
        aliases = class_aliases(cls)
        if not self.options.selects(est, aliases):
            return ModelEntry(None), True
        try:
            booster = est.get_booster()
        except Exception:  # not fitted
            booster = None
        version = None if booster is None else booster_version(booster)
        identity = self.options.identity(est, ModelIdentity(cls.__name__, version), aliases)
        return ModelEntry(TrackedModel(identity, self.options.attributes)), booster is not None


class XGBoostInstrumentor(InferscopeInstrumentor):
    """Instruments ``xgboost.Booster.predict`` and ``inplace_predict``, and the scikit-learn API.

    Options of ``instrument()``, all optional:

    - ``models``: Boosters and estimators (by identity) or aliases (class name,
      ``module.QualifiedName``, a Booster's ``xgboost-<hash>`` name) that count as models; default
      all.
    - ``model_names``: ``{model or alias: name or (name, version)}`` or a callable
      ``f(model) -> name | (name, version) | None``.
    - ``attributes``: static attributes on every series of these models.

    While the scikit-learn instrumentor is on, its options name the scikit-learn API estimators.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any
    _module = "xgboost"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import xgboost
        from xgboost.sklearn import XGBModel

        state = _State(options, _PACKAGE, booster_digest, booster_version)
        wrap_booster_library(
            patches, state, xgboost.Booster, BOOSTER_METHODS, XGBModel, ESTIMATOR_METHODS, _SKLEARN
        )
        return state
