"""A FastAPI service that serves a scikit-learn Pipeline and a torch model, with no inferscope import.

Run it under opentelemetry-instrument (pip install inferscope-sdk opentelemetry-distro fastapi uvicorn
scikit-learn, and torch if you have it) to export per-model, per-stage and per-request metrics over
OTLP, next to OpenTelemetry's own HTTP spans and metrics:

    OTEL_SERVICE_NAME=scoring-api OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 \\
        opentelemetry-instrument python examples/fastapi_service.py --port 8000

    curl -s localhost:8000/predict/fraud -H 'content-type: application/json' \\
        -d '{"rows": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]}'

What inferscope records, with no code here:

- the Pipeline as the model ``Pipeline``, with one stage per step (``scaler``, ``pca``, ``clf``);
- the torch model as ``RankerMLP`` version 1 (its class name; the version is the model's
  ``inferscope_version`` attribute);
- every request's serving stages: ``queue`` (receiving and parsing the JSON body), ``handler``
  (the endpoint, until its response starts) and ``response`` (sending it; for
  ``/predict/fraud/stream``, producing the stream, whose model calls are inferences too). They have
  no model name: naming a route's model takes code (docs/frameworks/serving.md).

Without torch the service serves the scikit-learn model only, and says so; ``/predict/ranker``
answers 404. Without opentelemetry-instrument it serves the same and records nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi_models import FEATURES, fraud_pipeline, ranker_mlp
from pydantic import BaseModel, field_validator

FRAUD = fraud_pipeline()
RANKER = ranker_mlp()  # None without torch
TORCH_MISSING = "torch is not installed: serving only the scikit-learn model (fraud)"


class Batch(BaseModel):
    """Rows of ``FEATURES`` numbers each."""

    rows: list[list[float]]

    @field_validator("rows")
    @classmethod
    def _rows_have_every_feature(cls, rows: list[list[float]]) -> list[list[float]]:
        if not rows or any(len(row) != FEATURES for row in rows):
            raise ValueError(f"rows must be a non-empty list of rows of {FEATURES} numbers")
        return rows

    def array(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.float32)


app = FastAPI(title="scoring-api")


@app.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"ok": True, "models": ["fraud", "ranker"] if RANKER is not None else ["fraud"]}


# Plain `def` endpoints: model calls are CPU-bound, so FastAPI runs them on its worker threads.
@app.post("/predict/fraud")
def predict_fraud(batch: Batch) -> dict[str, Any]:
    probabilities = FRAUD.predict_proba(batch.array())[:, 1]
    return {"model": "fraud", "probabilities": [round(float(p), 6) for p in probabilities]}


@app.post("/predict/ranker")
def predict_ranker(batch: Batch) -> dict[str, Any]:
    if RANKER is None:
        raise HTTPException(status_code=404, detail=TORCH_MISSING)
    import torch

    with torch.inference_mode():
        scores = RANKER(torch.from_numpy(batch.array()))
    return {"model": "ranker", "scores": [round(float(s), 6) for s in scores]}


@app.post("/predict/fraud/stream")
def stream_fraud(batch: Batch) -> StreamingResponse:
    """One JSON line per row, each scored as it is sent: the model calls run in the response."""
    rows = batch.array()

    def lines() -> Iterator[str]:
        for row in rows:
            probability = float(FRAUD.predict_proba(row[None, :])[0, 1])
            yield json.dumps({"probability": round(probability, 6)}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _exit_cleanly(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if RANKER is None:
        print(TORCH_MISSING, file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again. Under the default
    # handler that kills the process before exit handlers run, and so before OpenTelemetry's (and
    # inferscope's) last export; exiting normally instead flushes everything recorded.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the same clean exit
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
