"""The two models that examples/fastapi_service.py serves, built and trained in code (no downloads).

- ``fraud``: a scikit-learn Pipeline (scaler -> PCA -> logistic regression) on 8 features.
- ``ranker``: a small torch MLP scoring the same 8 features, or None when torch is not installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = 8


def fraud_pipeline(seed: int = 0) -> Pipeline:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1_000, FEATURES))
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.1 * rng.normal(size=len(x)) > 0).astype(int)
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("pca", PCA(n_components=4)), ("clf", LogisticRegression())]
    )
    return pipe.fit(x, y)


try:
    import torch
    from torch import nn
except ImportError:  # the service then serves the scikit-learn model only
    torch = None

if torch is not None:

    class RankerMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(FEATURES, 32)
            self.out = nn.Linear(32, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.out(torch.relu(self.hidden(x)))).squeeze(-1)


def ranker_mlp(seed: int = 0) -> Any | None:
    """The torch model in eval mode, or None without torch. Its class name, ``RankerMLP``, is the
    model name inferscope's torch instrumentor reports, and ``inferscope_version`` its version (a
    plain attribute: setting it needs no inferscope import)."""
    if torch is None:
        return None
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # one request per worker thread: no oversubscription
    model = RankerMLP().eval()
    model.inferscope_version = "1"
    return model
