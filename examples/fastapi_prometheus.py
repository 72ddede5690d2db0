"""FastAPI and Prometheus with inferscope: one ``/metrics`` for every worker.

The setup most services start with: a FastAPI app, served by several worker processes, scraped by
Prometheus. inferscope times the model and its stages in each worker, and ``/metrics``, whichever
worker answers it, serves all the workers merged, keeping what recycled workers had counted::

    uvicorn --app-dir examples fastapi_prometheus:app --workers 4 --port 8000
    curl -s localhost:8000/predict -H 'content-type: application/json' \
        -d '{"features": [0.2, 1.5, -0.3, 0.8]}'
    curl -s localhost:8000/metrics | grep '^inferscope_inference_duration_seconds_count'

Point Prometheus at ``http://<host>:8000/metrics`` (docs/multiprocess.md shows the scrape
configuration and the p95 and error-rate queries). gunicorn works the same way:
``gunicorn -c examples/gunicorn.conf.py -k uvicorn_worker.UvicornWorker fastapi_prometheus:app``.
"""

from __future__ import annotations

import math

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

import inferscope

# multiprocess=True: the workers publish to shared memory and every /metrics answer merges them.
# The same as INFERSCOPE_MULTIPROCESS=true in the environment.
inferscope.configure(service_name="fraud-api", multiprocess=True)

WEIGHTS = np.array([0.8, -1.2, 0.4, 2.0])
MEANS = np.array([0.1, 1.0, 0.0, 0.5])
SCALES = np.array([1.0, 2.0, 0.5, 1.5])


class Transaction(BaseModel):
    features: list[float]


class Score(BaseModel):
    fraud_probability: float
    flagged: bool


@inferscope.track_inference(model="fraud", version="3")
def score(features: list[float]) -> Score:
    with inferscope.stage("preprocess"):
        x = (np.asarray(features, dtype=np.float64) - MEANS) / SCALES
    with inferscope.stage("infer"):
        probability = 1.0 / (1.0 + math.exp(-float(x @ WEIGHTS)))
    with inferscope.stage("postprocess"):
        return Score(fraud_probability=probability, flagged=probability > 0.9)


app = FastAPI()
app.mount("/metrics", inferscope.make_asgi_app())


@app.post("/predict")
def predict(transaction: Transaction) -> Score:
    return score(transaction.features)
