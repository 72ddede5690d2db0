"""Which way of running a model is fastest, with the same outputs: ``inferscope compare``.

Builds a small fraud model in code, then compares the ways its framework can run it: the
scikit-learn Pipeline against ONNX Runtime; an xgboost Booster's predict against its in-place
predictor, the scikit-learn wrapper and ONNX Runtime; lightgbm alike; a torch MLP eager against
TorchScript, torch.compile and ONNX Runtime; a Keras MLP eager against tf.function and XLA::

    python examples/compare_variants.py                        # the scikit-learn Pipeline
    python examples/compare_variants.py --framework xgboost    # or lightgbm, torch, keras
    python examples/compare_variants.py --output compare.json  # also the result as JSON

The model factories are importable, so the command line compares them too (from this folder)::

    python -c 'import numpy as np; np.save("batch.npy", np.random.default_rng(0).normal(size=(64, 8)))'
    inferscope compare compare_variants:pipeline --data batch.npy
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from inferscope.compare import compare

FEATURES = 8


def training_data(rows: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Transactions (amount, hour, merchant risk...) and whether each was fraud."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] * x[:, 2] + rng.normal(scale=0.5, size=rows) > 1.0).astype(int)
    return x, y


def batch(rows: int = 64, seed: int = 1) -> np.ndarray:
    """One request's batch: what the model serves."""
    return np.random.default_rng(seed).normal(size=(rows, FEATURES))


def pipeline() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = training_data()
    return Pipeline([("scaler", StandardScaler()), ("clf", LogisticRegression())]).fit(x, y)


def xgboost_model() -> Any:
    import xgboost

    x, y = training_data()
    return xgboost.XGBClassifier(n_estimators=50, max_depth=4, n_jobs=1).fit(x, y)


def lightgbm_model() -> Any:
    import lightgbm

    x, y = training_data()
    return lightgbm.LGBMClassifier(n_estimators=50, num_leaves=15, n_jobs=1, verbose=-1).fit(x, y)


def torch_model() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    ).eval()


def keras_model() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(2),
        ]
    )


MODELS = {
    "sklearn": pipeline,
    "xgboost": xgboost_model,
    "lightgbm": lightgbm_model,
    "torch": torch_model,
    "keras": keras_model,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=sorted(MODELS), default="sklearn")
    parser.add_argument("--rows", type=int, default=64, help="rows in the example batch (default: 64)")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed calls per variant (default: 1)")
    parser.add_argument("--output", help="also write the result as JSON to this file")
    args = parser.parse_args()

    example = batch(args.rows).astype(np.float32)  # torch and Keras models take float32
    result = compare(MODELS[args.framework](), example, seconds=args.seconds)
    print(result.table())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(result.to_json())


if __name__ == "__main__":
    main()
