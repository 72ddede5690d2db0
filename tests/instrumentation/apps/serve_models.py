"""A small scoring job with no inferscope import, for ``opentelemetry-instrument python serve_models.py``.

It fits a scikit-learn Pipeline (scaler -> PCA -> logistic regression), scores with it ``--calls``
times, runs an ONNX model (written to ``--onnx-dir``) as many times, and records one metric of its
own through the OpenTelemetry API, so that a test can compare the Resource of inferscope's points
with the application's. It prints one JSON line with what it computed.

``--report`` adds which inferscope instrumentors are active (this imports inferscope, which
opentelemetry-instrument has imported already anyway).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models import fitted_pipeline, mlp_onnx, onnx_inputs
from opentelemetry import metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--onnx-dir", type=Path, default=None, help="run an ONNX model too")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()

    pipe, x = fitted_pipeline()
    predictions = [int(v) for v in pipe.predict(x)]
    for _ in range(args.calls - 1):
        pipe.predict(x)
    report: dict[str, object] = {"predictions": sum(predictions)}

    if args.onnx_dir is not None:
        import onnxruntime

        path = args.onnx_dir / "mlp.onnx"
        mlp_onnx(path, version=7)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for _ in range(args.calls):
            outputs = session.run(None, {"X": onnx_inputs()})
        report["onnx_sum"] = float(outputs[0].sum())

    metrics.get_meter("serve_models").create_counter("app.batches", unit="{batch}").add(args.calls)

    if args.report:
        import sys

        from inferscope.instrumentation.lightgbm import LightGBMInstrumentor
        from inferscope.instrumentation.onnxruntime import OnnxruntimeInstrumentor
        from inferscope.instrumentation.serving import AsgiInstrumentor, WsgiInstrumentor
        from inferscope.instrumentation.sklearn import SklearnInstrumentor
        from inferscope.instrumentation.tensorflow import TensorflowInstrumentor
        from inferscope.instrumentation.torch import TorchInstrumentor
        from inferscope.instrumentation.transformers import TransformersInstrumentor
        from inferscope.instrumentation.xgboost import XGBoostInstrumentor

        instrumentors = {
            "sklearn": SklearnInstrumentor(),
            "onnxruntime": OnnxruntimeInstrumentor(),
            "xgboost": XGBoostInstrumentor(),
            "lightgbm": LightGBMInstrumentor(),
            "torch": TorchInstrumentor(),
            "transformers": TransformersInstrumentor(),
            "keras": TensorflowInstrumentor(),
            "starlette": AsgiInstrumentor(),
            "flask": WsgiInstrumentor(),
        }
        # "patched": its wrappers are in place; "waiting": for the application to import the
        # framework; "off": not instrumented (the framework is not installed).
        report["instrumented"] = {
            name: "waiting" if i.waiting else "patched" if i.active else "off"
            for name, i in instrumentors.items()
        }
        report["imported"] = sorted(name for name in (*instrumentors, "tensorflow") if name in sys.modules)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
