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

import hashlib
from typing import Any

from .. import (
    BoosterState,
    InferscopeInstrumentor,
    InstrumentOptions,
    Patches,
    wrap_booster_library,
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
    _module = "lightgbm"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> BoosterState:
        import lightgbm
        from lightgbm.sklearn import LGBMModel

        state = BoosterState(options, _PACKAGE, booster_digest)
        wrap_booster_library(
            patches, state, lightgbm.Booster, BOOSTER_METHODS, LGBMModel, ESTIMATOR_METHODS, _SKLEARN
        )
        return state
