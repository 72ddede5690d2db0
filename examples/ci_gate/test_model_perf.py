"""A performance gate in CI: the fraud model's latency against an SLA and against its baseline.

Run it once on the main branch to save the baseline (commit .inferscope/baselines/), then on every
pull request::

    pytest examples/ci_gate --inferscope-save-baseline      # on main: write the baselines
    pytest examples/ci_gate --inferscope-markdown="$GITHUB_STEP_SUMMARY"   # on a pull request

See docs/ci.md for reading the verdicts.
"""

from __future__ import annotations

import functools

import inferscope


def predict(model, batch):
    """The serving function, with its stages as production runs it."""
    with inferscope.stage("preprocess"):
        features = batch.astype("float64", copy=False)
    with inferscope.stage("infer"):
        scores = model.predict_proba(features)[:, 1]
    with inferscope.stage("postprocess"):
        return (scores > 0.5).tolist()


def test_fraud_model(inferscope_bench, fraud_model, canonical_batch):
    # Items per call (for CPU per item) are the length of the first argument: the batch.
    result = inferscope_bench(functools.partial(predict, fraud_model), canonical_batch)
    result.assert_p99_below(0.150)  # the SLA: 150 ms at p99
    result.assert_no_regression(max_increase=0.10)  # at most 10% slower than the baseline
