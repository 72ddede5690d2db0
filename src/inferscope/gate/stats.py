"""The statistics of the performance gate: how sure a ratio of two quantiles is.

A benchmark's calls are not independent draws: a busy neighbour slows a run of consecutive calls,
and a machine drifts between the moment the baseline was measured and now. So the uncertainty of a
quantile is taken as the larger of two estimates, both on the log scale (a ratio is a difference of
logs):

- a **moving-block bootstrap** of the calls (blocks of consecutive calls are resampled, so that
  bursts stay together), and
- the spread **between rounds**: the run is measured in several rounds, and the standard error of
  the mean of the per-round log quantiles says how much the quantile moved during the run.

The interval of a ratio is the normal interval of the difference of the two log quantiles, with
the standard errors of both sides combined (the bootstrap-t idea without the second level: the
tails of 0.1% needed here would take far more resamples than a percentile interval can afford in
a test's time budget).

>>> import numpy as np
>>> rng = np.random.default_rng(1)
>>> base = Sample.of(rng.normal(1.0, 0.02, 600), rounds=3)
>>> slow = Sample.of(rng.normal(1.2, 0.02, 600), rounds=3)
>>> ratio = quantile_ratio(slow, base, 0.5, alpha=0.005, rng=rng)
>>> 1.15 < ratio.low < ratio.point < ratio.high < 1.25
True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "DEFAULT_RESAMPLES",
    "Ratio",
    "Sample",
    "log_quantile_error",
    "quantile_ratio",
    "ratio_with_error",
]

#: Bootstrap resamples per standard error: 400 put the error of the error near 4%.
DEFAULT_RESAMPLES = 400
#: At most this many calls take part in one bootstrap (longer runs are thinned evenly): the cost of
#: a verdict stays bounded whatever the number of calls.
_MAX_BOOTSTRAP_CALLS = 4000
#: Rounds with fewer calls than this give no per-round quantile.
_MIN_ROUND_CALLS = 20


@dataclass(frozen=True)
class Sample:
    """Per-call figures (seconds) in call order, and where each round starts."""

    values: np.ndarray
    round_starts: tuple[int, ...] = (0,)

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray, rounds: int = 1) -> Sample:
        """``values`` cut into ``rounds`` rounds of equal length (for tests and documents)."""
        array = np.asarray(values, dtype=np.float64)
        step = max(1, len(array) // max(1, rounds))
        return cls(array, tuple(range(0, len(array), step))[: max(1, rounds)])

    def __len__(self) -> int:
        return len(self.values)

    def rounds(self) -> list[np.ndarray]:
        """The values of each round."""
        bounds = [*self.round_starts, len(self.values)]
        return [self.values[a:b] for a, b in itertools.pairwise(bounds) if b > a]

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.values, q))

    def scaled(self, factor: float) -> Sample:
        """Every value times ``factor`` (per item, or normalised by the canary)."""
        return Sample(self.values * factor, self.round_starts)


@dataclass(frozen=True)
class Ratio:
    """A ratio of quantiles (current over baseline) and its two-sided interval at ``1 - 2*alpha``.

    ``low`` is the one-sided lower bound at confidence ``1 - alpha``, ``high`` the upper one.
    """

    point: float
    low: float
    high: float
    #: The standard error of log(ratio).
    log_error: float
    #: The normal quantile of the bounds: ``1 - alpha``.
    z: float

    def divided_by(self, factor: float, log_error: float = 0.0) -> Ratio:
        """This ratio divided by another known to ``log_error`` (the canary's, say)."""
        return _bounded(self.point / factor, math.hypot(self.log_error, log_error), self.z)

    def to_json(self) -> dict[str, float | None]:
        """A JSON-ready dict (an unbounded side is None)."""
        figures = {"point": self.point, "low": self.low, "high": self.high, "log_error": self.log_error}
        return {name: value if math.isfinite(value) else None for name, value in figures.items()}


def _bounded(point: float, log_error: float, z: float) -> Ratio:
    if not math.isfinite(log_error) or not math.isfinite(point):
        return Ratio(point, 0.0, math.inf, math.inf, z)
    return Ratio(point, point * math.exp(-z * log_error), point * math.exp(z * log_error), log_error, z)


def _thinned(values: np.ndarray) -> np.ndarray:
    if len(values) <= _MAX_BOOTSTRAP_CALLS:
        return values
    return values[np.linspace(0, len(values) - 1, _MAX_BOOTSTRAP_CALLS).astype(np.int64)]


def _bootstrap_log_error(values: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> float:
    """The moving-block bootstrap standard error of log(quantile q of values)."""
    values = _thinned(values)
    n = len(values)
    if n < 2:
        return math.inf
    block = max(1, round(n ** (1 / 3)))
    blocks = math.ceil(n / block)
    estimates = np.empty(resamples)
    offsets = np.arange(block)
    # In chunks, so that memory stays near a few MB whatever the number of calls.
    chunk = max(1, 2_000_000 // n)
    for first in range(0, resamples, chunk):
        count = min(chunk, resamples - first)
        starts = rng.integers(0, n - block + 1, size=(count, blocks))
        index = (starts[:, :, None] + offsets).reshape(count, -1)[:, :n]
        estimates[first : first + count] = np.quantile(values[index], q, axis=1)
    positive = estimates[estimates > 0]
    if len(positive) < resamples // 2:
        return math.inf
    return float(np.std(np.log(positive), ddof=1))


def _between_rounds_log_error(sample: Sample, q: float) -> float:
    """The standard error of the mean per-round log quantile (0.0 with fewer than 3 rounds)."""
    logs = [
        math.log(v) for r in sample.rounds() if len(r) >= _MIN_ROUND_CALLS and (v := np.quantile(r, q)) > 0
    ]
    if len(logs) < 3:
        return 0.0
    return float(np.std(logs, ddof=1) / math.sqrt(len(logs)))


def log_quantile_error(sample: Sample, q: float, *, resamples: int, rng: np.random.Generator) -> float:
    """How sure log(quantile q of ``sample``) is: the larger of the block bootstrap's standard
    error and the between-rounds one."""
    return max(_bootstrap_log_error(sample.values, q, resamples, rng), _between_rounds_log_error(sample, q))


def quantile_ratio(
    current: Sample,
    baseline: Sample,
    q: float,
    *,
    alpha: float,
    rng: np.random.Generator,
    resamples: int = DEFAULT_RESAMPLES,
) -> Ratio:
    """The ratio of the ``q`` quantiles, current over baseline, with bounds at ``1 - alpha`` each side."""
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    cur, base = current.quantile(q), baseline.quantile(q)
    if cur <= 0 or base <= 0:
        return ratio_with_error(math.nan, math.inf, alpha)
    error = math.hypot(
        log_quantile_error(current, q, resamples=resamples, rng=rng),
        log_quantile_error(baseline, q, resamples=resamples, rng=rng),
    )
    return ratio_with_error(cur / base, error, alpha)


def ratio_with_error(point: float, log_error: float, alpha: float) -> Ratio:
    """A ratio known to ``log_error`` on the log scale, with its bounds at ``1 - alpha`` each side."""
    return _bounded(point, log_error, NormalDist().inv_cdf(1 - alpha))
