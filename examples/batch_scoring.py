"""A scoring job: a scikit-learn-style pipeline with stages, a thread pool, and an OTLP/Prometheus export.

Run it as is to print the table, or export while it runs:

    python examples/batch_scoring.py
    OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 python examples/batch_scoring.py
    INFERSCOPE_METRICS_EXPORTER=prometheus python examples/batch_scoring.py --serve 30
"""

from __future__ import annotations

import argparse
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import inferscope

rng = np.random.default_rng(0)
WEIGHTS = rng.normal(size=(16, 4))


@inferscope.stage("featurize")
def featurize(rows: np.ndarray) -> np.ndarray:
    return np.hstack([rows, np.log1p(np.abs(rows))])


def score_shard(shard: np.ndarray) -> np.ndarray:
    with inferscope.stage("score"):
        return featurize(shard) @ WEIGHTS


@inferscope.track_inference(model="churn", version="2024-11", attributes={"team": "growth"})
def predict(batch: np.ndarray, pool: ThreadPoolExecutor) -> np.ndarray:
    with inferscope.stage("preprocess"):
        if np.isnan(batch).any():
            raise ValueError("batch has missing values")
        batch = (batch - batch.mean(axis=0)) / (batch.std(axis=0) + 1e-9)
    with inferscope.stage("infer"):
        # bind() carries the inference and the "infer" stage into the pool's threads.
        shards = np.array_split(batch, 4)
        parts = list(pool.map(inferscope.bind(score_shard), shards))
    with inferscope.stage("postprocess"):
        return np.argmax(np.vstack(parts), axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--serve", type=float, default=0, help="keep serving /metrics this many seconds")
    args = parser.parse_args()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i in range(args.batches):
            batch = rng.normal(size=(512, 8))
            if i % 50 == 49:
                batch[3, 3] = np.nan
            with contextlib.suppress(ValueError):  # counted under error.type
                predict(batch, pool)
    print(inferscope.snapshot().table())
    if args.serve and inferscope.prometheus_port():
        print(f"serving http://127.0.0.1:{inferscope.prometheus_port()}/metrics for {args.serve:g} s")
        time.sleep(args.serve)


if __name__ == "__main__":
    main()
