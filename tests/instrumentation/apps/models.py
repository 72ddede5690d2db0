"""Small real models built in code (no downloads), shared by the tests and the apps they run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 4
N_OUTPUTS = 3


def training_data(seed: int = 0, rows: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return x, y


def fitted_pipeline(seed: int = 0) -> tuple[Any, np.ndarray]:
    """StandardScaler -> PCA -> LogisticRegression, fitted; and inputs to predict on."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = training_data(seed)
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("pca", PCA(n_components=4)), ("clf", LogisticRegression())]
    )
    pipe.fit(x, y)
    return pipe, x[:32]


def mlp_onnx(
    path: Path | None = None,
    *,
    version: int = 7,
    producer: str = "inferscope-tests",
    graph: str = "mlp_graph",
    seed: int = 0,
) -> bytes:
    """A one-layer MLP (MatMul + Add + Relu) as an ONNX model; written to ``path`` when given."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(N_FEATURES, N_OUTPUTS)).astype(np.float32)
    bias = rng.normal(size=(N_OUTPUTS,)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["XW"]),
        helper.make_node("Add", ["XW", "B"], ["Z"]),
        helper.make_node("Relu", ["Z"], ["Y"]),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            graph,
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, N_FEATURES])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N_OUTPUTS])],
            initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
        ),
        producer_name=producer,
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8  # readable by every onnxruntime we support
    model.model_version = version
    if graph:  # the checker insists on a graph name; onnxruntime does not
        onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def onnx_inputs(seed: int = 1, rows: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)
