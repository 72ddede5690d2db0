"""Quantiles read from the exported OTLP histogram match numpy.percentile of the raw durations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import run_python

SERVICE = """
import json, sys
import numpy as np
import inferscope
from inferscope._runtime import REGISTRY, RUNTIME
from inferscope.testing import InMemoryMetricExporter

exporter = InMemoryMetricExporter()
inferscope.configure(metric_exporters=[exporter], histogram_max_buckets=MAX_BUCKETS)
key = REGISTRY.inference_key("quantiles")
rng = np.random.default_rng(SEED)
durations_ns = np.maximum(rng.lognormal(np.log(0.02), SIGMA, 50_000) * 1e9, 1).astype(np.int64)
for wall in durations_ns.tolist():  # through the same ring and drainer as a tracked call
    RUNTIME.record(key, None, 0, 0, wall, -1)
inferscope.shutdown()
[point] = exporter.latest_points("inferscope.inference.duration")
print(json.dumps({
    "raw": durations_ns.tolist(),
    "scale": point.scale, "zero": point.zero_count, "count": point.count,
    "offset": point.positive.offset, "buckets": list(point.positive.bucket_counts),
}))
"""


def exported_quantile(point: dict, q: float) -> float:
    """A quantile from the wire format alone: OTel bucket i holds (base**i, base**(i+1)]."""
    base = 2.0 ** (2.0 ** -point["scale"])
    counts = np.array(point["buckets"])
    rank = q * (point["count"] - 1)
    index = int(np.searchsorted(np.cumsum(counts), rank + 1 - point["zero"]))
    lower = base ** (point["offset"] + index)
    return float(lower * np.sqrt(base))  # the bucket's geometric midpoint


@pytest.mark.parametrize(
    ("seed", "sigma", "max_buckets", "tolerance"), [(1, 0.6, 1024, 0.01), (2, 0.3, 320, 0.01)]
)
def test_exported_histogram_quantiles_match_numpy(seed, sigma, max_buckets, tolerance):
    code = (
        SERVICE.replace("SEED", str(seed))
        .replace("SIGMA", str(sigma))
        .replace("MAX_BUCKETS", str(max_buckets))
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    point = json.loads(result.stdout)
    raw_seconds = np.array(point["raw"]) / 1e9
    assert point["count"] == len(raw_seconds) == 50_000
    assert point["scale"] == 6  # no downscale was needed for this spread
    for q in (0.5, 0.9, 0.95, 0.99):
        truth = float(np.percentile(raw_seconds, q * 100))
        estimate = exported_quantile(point, q)
        assert abs(estimate - truth) / truth <= tolerance, (q, estimate, truth)
