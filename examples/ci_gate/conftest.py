"""Fixtures of the CI gate example: a small fraud model and its canonical batch."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


@pytest.fixture(scope="session")
def fraud_model():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2_000, 20))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(int)
    return make_pipeline(StandardScaler(), LogisticRegression()).fit(features, labels)


@pytest.fixture(scope="session")
def canonical_batch():
    """The batch every run is measured on: fixed, so that runs compare."""
    return np.random.default_rng(1).normal(size=(256, 20))
