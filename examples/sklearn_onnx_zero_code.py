"""Zero-code instrumentation: a scikit-learn Pipeline and an ONNX model, and no inferscope import.

Run it under opentelemetry-instrument (pip install opentelemetry-distro onnx onnxruntime scikit-learn)
to get per-model and per-stage metrics, exported with the application's own OpenTelemetry metrics:

    # print what would be exported, as JSON on stdout
    OTEL_METRICS_EXPORTER=console OTEL_TRACES_EXPORTER=none OTEL_LOGS_EXPORTER=none \\
        opentelemetry-instrument python examples/sklearn_onnx_zero_code.py

    # export over OTLP to a collector
    OTEL_SERVICE_NAME=scoring OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \\
        opentelemetry-instrument python examples/sklearn_onnx_zero_code.py

The scikit-learn Pipeline is recorded as the model "Pipeline" with one stage per step (scaler, pca,
clf); the ONNX model as "churn_mlp" (the file's stem), version 3 (its model_version). Without
opentelemetry-instrument the script runs the same and records nothing. See docs/frameworks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from opentelemetry import metrics
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

rng = np.random.default_rng(0)


def train_pipeline() -> Pipeline:
    x = rng.normal(size=(500, 8))
    y = (x[:, 0] - x[:, 3] > 0).astype(int)
    pipe = Pipeline(
        [("scaler", StandardScaler()), ("pca", PCA(n_components=4)), ("clf", LogisticRegression())]
    )
    return pipe.fit(x, y)


def write_onnx_mlp(path: Path) -> None:
    """Linear layer + ReLU, built with onnx.helper (no exporter needed)."""
    weights = rng.normal(size=(8, 2)).astype(np.float32)
    bias = np.zeros(2, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["scores"]),
        ],
        "churn_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 2])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, producer_name="example", opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.model_version = 3
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    pipe = train_pipeline()
    batches_scored = metrics.get_meter("scoring").create_counter("scoring.batches", unit="{batch}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "churn_mlp.onnx"
        write_onnx_mlp(path)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        positives = 0
        for _ in range(args.batches):
            batch = rng.normal(size=(64, 8))
            positives += int(pipe.predict(batch).sum())
            session.run(None, {"x": batch.astype(np.float32)})
            batches_scored.add(1)
    print(f"scored {args.batches} batches, {positives} positives", file=sys.stderr)

    # Only to show the numbers here: under opentelemetry-instrument inferscope is already loaded.
    inferscope = sys.modules.get("inferscope")
    if inferscope is not None:
        print(inferscope.snapshot().table(), file=sys.stderr)


if __name__ == "__main__":
    main()
