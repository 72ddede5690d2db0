"""Verdicts: pass, regression or inconclusive, from a run, a baseline and a tolerance.

The ratio compared is current over baseline of the ``quantile`` (the median by default) of the
time per call, with an interval at ``1 - alpha`` on each side:

- **regression** when the interval's lower bound is above ``1 + max_increase``: slower beyond the
  tolerance, with at most ``alpha`` chance of saying so of a run that is not;
- **pass** when its upper bound is at most ``1 + max_increase``;
- **inconclusive** otherwise: the runner measures more and asks again while its time budget
  lasts, and what remains inconclusive is reported as such.

Which time: on one machine, wall time or the calling thread's CPU time, whichever the two runs
measured more precisely. CPU time is eligible only when the calls ran on the calling thread (CPU at
least ``CPU_BOUND_RATIO`` of wall time in both runs); it leaves out the time a busy machine made the
call wait for a core. When the machine canary ran significantly slower or faster than in the
baseline (its own interval excludes 1), the ratio is divided by the canary's.

Across machines (the environment fingerprints differ: another runner, CI against production), only
CPU per item divided by the canary's CPU time is compared: wall time and raw CPU time of another
machine say nothing about the code. The verdict says so.

A busier machine: when the run waited for a core far more than the baseline's did (run-queue wait,
the canary's wait, CPU pressure, steal or throttling beyond the baseline's noise: the detector's
contention signals), a rise is inconclusive, not a regression. A neighbour's load inflates even the
calling thread's CPU time (caches, memory bandwidth, a thread pool that spins): unchanged code
beside four CPU hogs measured +60% here, with the canary far less moved.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..baseline import ProcessFigures
from ..detector import machine_signals
from .runner import BenchRun
from .stats import Ratio, Sample, log_quantile_error, quantile_ratio, ratio_with_error
from .store import StoredBaseline

__all__ = ["CPU_BOUND_RATIO", "INCONCLUSIVE", "PASS", "REGRESSION", "Verdict", "check_below", "compare"]

PASS = "pass"
REGRESSION = "regression"
INCONCLUSIVE = "inconclusive"
#: CPU time stands for wall time only when calls spend at least this share of it on the CPU.
CPU_BOUND_RATIO = 0.8
#: The quantile names the baseline format keeps, by value.
_QUANTILE_NAMES = {0.5: "p50", 0.9: "p90", 0.95: "p95", 0.99: "p99"}


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check, with the figures that decided it."""

    outcome: str
    #: What was compared: "wall", "cpu" or "cpu_per_item" (canary-normalised, across machines),
    #: or "p99" for an absolute limit.
    metric: str
    quantile: float
    ratio: Ratio
    #: The tolerated ratio: 1 + max_increase, or the limit in seconds of an absolute check.
    threshold: float
    message: str
    calls: int
    baseline_calls: int = 0
    canary_ratio: float | None = None
    canary_corrected: bool = False
    cross_machine: bool = False
    #: Every ratio computed, by metric, the one not chosen included.
    ratios: dict[str, Ratio] = field(default_factory=dict)
    #: Why the machine gave this run less than the baseline's, when it did (then a rise is
    #: inconclusive): "CPU pressure 0% -> 99% of the time", ...
    contention: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.outcome == PASS

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "metric": self.metric,
            "quantile": self.quantile,
            "ratio": self.ratio.to_json(),
            "threshold": self.threshold,
            "message": self.message,
            "calls": self.calls,
            "baseline_calls": self.baseline_calls,
            "canary_ratio": self.canary_ratio,
            "canary_corrected": self.canary_corrected,
            "cross_machine": self.cross_machine,
            "ratios": {name: r.to_json() for name, r in self.ratios.items()},
            "contention": list(self.contention),
        }


def _outcome(ratio: Ratio, threshold: float) -> str:
    if not math.isfinite(ratio.point):
        return INCONCLUSIVE
    if ratio.low > threshold:
        return REGRESSION
    if ratio.high <= threshold:
        return PASS
    return INCONCLUSIVE


def _percent(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _sentence(outcome: str, what: str, ratio: Ratio, threshold: float, note: str = "") -> str:
    """``regression: <what> +12.0%<note>, interval [+8.1%, +16.0%], tolerance +10.0%``."""
    return (
        f"{outcome}: {what} {_percent(ratio.point)}{note}, interval [{_percent(ratio.low)}, "
        f"{_percent(ratio.high)}], tolerance {_percent(threshold)}"
    )


def _cpu_bound(wall: Sample, cpu: Sample) -> bool:
    median_wall = float(np.median(wall.values))
    return median_wall > 0 and float(np.median(cpu.values)) >= CPU_BOUND_RATIO * median_wall


def _canary(
    current: BenchRun, baseline: StoredBaseline, use_cpu: bool, alpha: float, rng: np.random.Generator
) -> Ratio | None:
    mine = current.canary_cpu if use_cpu else current.canary_wall
    theirs = baseline.canary_cpu if use_cpu else baseline.canary_wall
    if len(mine) < 3 or len(theirs) < 3:
        reference = baseline.baseline.process
        value = reference.canary_cpu_seconds if use_cpu else reference.canary_wall_seconds
        if not mine or not value:
            return None
        return ratio_with_error(statistics.median(mine) / value, math.inf, alpha)
    return quantile_ratio(Sample(np.asarray(mine)), Sample(np.asarray(theirs)), 0.5, alpha=alpha, rng=rng)


def compare(
    current: BenchRun,
    baseline: StoredBaseline,
    *,
    max_increase: float,
    quantile: float = 0.5,
    alpha: float = 0.005,
    rng: np.random.Generator | None = None,
) -> Verdict:
    """The verdict of ``current`` against ``baseline`` (see the module's text)."""
    verdict = _compare(current, baseline, max_increase, quantile, alpha, rng)
    if verdict.outcome != REGRESSION:
        return verdict
    signals = _contended(current, baseline)
    if not signals:
        return verdict
    return replace(
        verdict,
        outcome=INCONCLUSIVE,
        message=INCONCLUSIVE
        + verdict.message.removeprefix(REGRESSION)
        + f"; but the machine gave this run less than the baseline's ({'; '.join(signals)}): a rise "
        "measured beside a busy neighbour is not judged",
        contention=tuple(signals),
    )


def _contended(current: BenchRun, baseline: StoredBaseline) -> list[str]:
    """The detector's contention signals of this run's rounds against the baseline's."""
    if not current.windows:
        return []
    process = ProcessFigures.pool([(w.process, w.seconds) for w in current.windows])
    return machine_signals(baseline.baseline.process, process, {})


def _compare(
    current: BenchRun,
    baseline: StoredBaseline,
    max_increase: float,
    quantile: float,
    alpha: float,
    rng: np.random.Generator | None,
) -> Verdict:
    rng = rng if rng is not None else np.random.default_rng()
    threshold = 1.0 + max_increase
    cross = (
        baseline.baseline.fingerprint is not None
        and current.fingerprint is not None
        and baseline.baseline.fingerprint != current.fingerprint
    )
    if baseline.wall is None or baseline.cpu is None:
        return _compare_summary(current, baseline, threshold, quantile, alpha, cross)
    wall, cpu = current.wall_sample(), current.cpu_sample()
    ratios: dict[str, Ratio] = {}
    if cross:
        base_items = baseline.items_per_call or 1.0
        ratio = quantile_ratio(
            cpu.scaled(1 / current.items_per_call),
            baseline.cpu.scaled(1 / base_items),
            quantile,
            alpha=alpha,
            rng=rng,
        )
        canary = _canary(current, baseline, True, alpha, rng)
        metric = "cpu_per_item"
        ratios[metric] = ratio
        if canary is None or not math.isfinite(canary.point):
            return Verdict(
                INCONCLUSIVE,
                metric,
                quantile,
                ratio,
                threshold,
                "the baseline was measured in another environment (fingerprint "
                f"{baseline.baseline.fingerprint} -> {current.fingerprint}) and has no canary figures "
                "to normalise with: not compared",
                current.calls,
                len(baseline.wall),
                cross_machine=True,
                ratios=ratios,
            )
        normalised = ratio.divided_by(canary.point, canary.log_error)
        outcome = _outcome(normalised, threshold)
        return Verdict(
            outcome,
            metric,
            quantile,
            normalised,
            threshold,
            _sentence(
                outcome,
                "CPU per item",
                normalised,
                threshold,
                f" after the canary ({_percent(canary.point)})",
            )
            + "; the baseline was measured in another environment "
            f"(fingerprint {baseline.baseline.fingerprint} -> {current.fingerprint}), so only CPU per "
            "item normalised by the canary is compared",
            current.calls,
            len(baseline.wall),
            canary_ratio=canary.point,
            canary_corrected=True,
            cross_machine=True,
            ratios=ratios,
        )
    ratios["wall"] = quantile_ratio(wall, baseline.wall, quantile, alpha=alpha, rng=rng)
    if _cpu_bound(wall, cpu) and _cpu_bound(baseline.wall, baseline.cpu):
        ratios["cpu"] = quantile_ratio(cpu, baseline.cpu, quantile, alpha=alpha, rng=rng)
    metric = min(ratios, key=lambda name: ratios[name].log_error)
    ratio = ratios[metric]
    canary = _canary(current, baseline, metric == "cpu", alpha, rng)
    corrected = False
    note = ""
    if canary is not None and math.isfinite(canary.log_error) and (canary.low > 1 or canary.high < 1):
        ratio = ratio.divided_by(canary.point, canary.log_error)
        corrected = True
        note = f" after the machine canary ({_percent(canary.point)} against the baseline)"
    outcome = _outcome(ratio, threshold)
    what = "wall time" if metric == "wall" else "CPU time (wall time was noisier)"
    name = _QUANTILE_NAMES.get(quantile, f"q{quantile:g}")
    return Verdict(
        outcome,
        metric,
        quantile,
        ratio,
        threshold,
        _sentence(outcome, f"{name} {what}", ratio, threshold, note),
        current.calls,
        len(baseline.wall),
        canary_ratio=canary.point if canary is not None else None,
        canary_corrected=corrected,
        ratios=ratios,
    )


def _compare_summary(
    current: BenchRun,
    baseline: StoredBaseline,
    threshold: float,
    quantile: float,
    alpha: float,
    cross: bool,
) -> Verdict:
    """Against a baseline without samples (saved from production): its quantile, known to its
    window-to-window noise, against this run's."""
    stage = baseline.baseline.stage(None)
    rng = np.random.default_rng()
    if cross:
        base_cpu = stage.cpu_per_call if stage is not None else None
        base_items = (stage.size_per_call if stage is not None else None) or 1.0
        canary_base = baseline.baseline.process.canary_cpu_seconds
        mine = current.cpu_sample()
        if base_cpu is None or not canary_base or not current.canary_cpu:
            point = math.nan
        else:
            per_item = float(np.mean(mine.values)) / current.items_per_call
            canary = statistics.median(current.canary_cpu) / canary_base
            point = per_item / (base_cpu / base_items) / canary
        error = log_quantile_error(mine, 0.5, resamples=200, rng=rng)
        noise = stage.cpu_per_call_noise / stage.cpu_per_call if stage and stage.cpu_per_call else math.inf
        ratio = ratio_with_error(point, math.hypot(error, noise), alpha)
        metric = "cpu_per_item"
        described = "CPU per item normalised by the canary (another environment: nothing else compared)"
    else:
        name = _QUANTILE_NAMES.get(quantile)
        base_q = stage.quantiles.get(name) if stage is not None and name is not None else None
        mine = current.wall_sample()
        error = log_quantile_error(mine, quantile, resamples=200, rng=rng)
        if stage is not None and base_q and stage.window_quantile and quantile == baseline.baseline.quantile:
            noise = stage.window_quantile_noise / stage.window_quantile / math.sqrt(max(stage.windows, 1))
        else:
            noise = error  # unknown: taken as uncertain as this run
        point = mine.quantile(quantile) / base_q if base_q else math.nan
        ratio = ratio_with_error(point, math.hypot(error, noise), alpha)
        metric = "wall"
        described = f"{name or quantile} wall time against the baseline's summary (it keeps no calls)"
    outcome = _outcome(ratio, threshold)
    text = (
        _sentence(outcome, described, ratio, threshold)
        if math.isfinite(ratio.point)
        else f"{outcome}: the baseline lacks the figures to compare {described}"
    )
    return Verdict(
        outcome,
        metric,
        quantile,
        ratio,
        threshold,
        text,
        current.calls,
        stage.count if stage is not None else 0,
        cross_machine=cross,
        ratios={metric: ratio},
    )


def check_below(current: BenchRun, limit_seconds: float, *, quantile: float, alpha: float) -> Verdict:
    """Whether the ``quantile`` of the wall time per call is below ``limit_seconds``: fails only
    when the interval's lower bound is above the limit, passes when its upper bound is below."""
    sample = current.wall_sample()
    value = sample.quantile(quantile)
    error = log_quantile_error(sample, quantile, resamples=200, rng=np.random.default_rng())
    # The "ratio" of the value to the limit, so that the three-way rule is the one of compare().
    ratio = ratio_with_error(value / limit_seconds, error, alpha)
    outcome = _outcome(ratio, 1.0)
    name = _QUANTILE_NAMES.get(quantile, f"q{quantile:g}")
    return Verdict(
        outcome,
        name,
        quantile,
        ratio,
        limit_seconds,
        f"{outcome}: {name} {value * 1e3:.3f} ms (interval {ratio.low * limit_seconds * 1e3:.3f} to "
        f"{ratio.high * limit_seconds * 1e3:.3f} ms) against the limit {limit_seconds * 1e3:.3f} ms",
        current.calls,
    )
