"""What ``inferscope_bench(...)`` returns: the figures of a run and the gate's assertions.

>>> result = bench(sum, [1, 2, 3], budget_seconds=0.2)  # doctest: +SKIP
>>> result.assert_p99_below(0.150)                         # doctest: +SKIP
>>> result.stages[None].p99 < 0.150                       # doctest: +SKIP
True
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runner import BenchRun, BenchRunner
from .store import StoredBaseline
from .verdict import INCONCLUSIVE, REGRESSION, Verdict, check_below, compare

__all__ = [
    "DEFAULT_ALPHA",
    "MAX_LOOKS",
    "BenchResult",
    "Inconclusive",
    "PerformanceRegression",
    "StageFigures",
]

#: The chance, per check, of calling a run that is not slower a regression (split over the looks).
DEFAULT_ALPHA = 0.005
#: A check looks at the data at most this many times: after the first measurement, and after each
#: of the extra measurements the budget allows.
MAX_LOOKS = 4
#: The share of the budget measured before the first look, when a check is expected.
INITIAL_SHARE = 0.4


class PerformanceRegression(AssertionError):
    """A check failed: slower than the baseline beyond the tolerance, or above an absolute limit."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


class Inconclusive(Exception):
    """A check could not tell within its time budget (or had no baseline to compare with)."""

    def __init__(self, message: str, verdict: Verdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


def _raise_inconclusive(message: str, verdict: Verdict | None) -> None:
    raise Inconclusive(message, verdict)


@dataclass(frozen=True)
class StageFigures:
    """One stage (None: the whole inference) over the run: seconds per call."""

    stage: str | None
    count: int
    p50: float
    p95: float
    p99: float
    cpu_per_call: float | None
    process_cpu_per_call: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(self).items()
        }


class BenchResult:
    """The figures of one benchmarked function, and its checks.

    ``stages`` maps each stage path (None for the whole inference) to its p50/p95/p99 and CPU per
    call, as the pipeline measured them; ``p50``/``p95``/``p99``, ``cpu_per_call`` and
    ``cpu_per_item`` are the whole call's, timed exactly around each call. ``verdicts`` lists the
    checks made so far.
    """

    def __init__(
        self,
        runner: BenchRunner,
        *,
        name: str,
        baseline: StoredBaseline | None = None,
        baseline_path: Path | None = None,
        saving: bool = False,
        alpha: float = DEFAULT_ALPHA,
        on_inconclusive: Callable[[str, Verdict | None], None] = _raise_inconclusive,
        rng: np.random.Generator | None = None,
    ) -> None:
        self._runner = runner
        self.name = name
        self.baseline = baseline
        self.baseline_path = baseline_path
        self.saving = saving
        self.alpha = alpha
        self._on_inconclusive = on_inconclusive
        self._rng = rng if rng is not None else np.random.default_rng()
        self.verdicts: list[Verdict] = []
        self.notes: list[str] = []

    @property
    def run(self) -> BenchRun:
        return self._runner.run

    @property
    def model(self) -> str:
        return self.run.model

    @property
    def calls(self) -> int:
        return self.run.calls

    def _quantile(self, q: float) -> float:
        return float(np.quantile(self.run.wall, q))

    @property
    def p50(self) -> float:
        return self._quantile(0.5)

    @property
    def p95(self) -> float:
        return self._quantile(0.95)

    @property
    def p99(self) -> float:
        return self._quantile(0.99)

    @property
    def cpu_seconds(self) -> float:
        """Calling-thread CPU seconds over all measured calls."""
        return float(sum(self.run.cpu))

    @property
    def cpu_per_call(self) -> float:
        return self.cpu_seconds / max(self.calls, 1)

    @property
    def cpu_per_item(self) -> float:
        return self.cpu_per_call / self.run.items_per_call

    @property
    def canary_wall_seconds(self) -> float | None:
        """The machine canary's median wall seconds per run during this benchmark."""
        return statistics.median(self.run.canary_wall) if self.run.canary_wall else None

    @property
    def canary_cpu_seconds(self) -> float | None:
        return statistics.median(self.run.canary_cpu) if self.run.canary_cpu else None

    @property
    def stages(self) -> dict[str | None, StageFigures]:
        """Per stage path (None: the whole inference), from the pipeline's own windows."""
        if not self.run.windows:
            return {}
        figures = {}
        for path, stage in self.run.baseline().stages.items():
            q = stage.quantiles
            figures[path] = StageFigures(
                path,
                stage.count,
                q.get("p50", math.nan),
                q.get("p95", math.nan),
                q.get("p99", math.nan),
                stage.cpu_per_call,
                stage.process_cpu_per_call,
            )
        return figures

    # --- checks ----------------------------------------------------------------------------------

    def _decide(self, check: Callable[[float], Verdict]) -> Verdict:
        alpha = self.alpha / MAX_LOOKS
        verdict = check(alpha)
        for _ in range(MAX_LOOKS - 1):
            if verdict.outcome != INCONCLUSIVE:
                break
            step = self._runner.budget_seconds * (1 - INITIAL_SHARE) / (MAX_LOOKS - 1)
            if not self._runner.extend(step):
                break
            verdict = check(alpha)
        self.verdicts.append(verdict)
        if verdict.outcome == REGRESSION:
            raise PerformanceRegression(verdict)
        if verdict.outcome == INCONCLUSIVE:
            self._on_inconclusive(f"inconclusive: {verdict.message}", verdict)
        return verdict

    def assert_p99_below(self, limit_seconds: float) -> Verdict:
        """Fail when the p99 of the time per call is above ``limit_seconds`` (beyond its own
        uncertainty); inconclusive when the interval holds the limit after the extra samples."""
        return self.assert_quantile_below(0.99, limit_seconds)

    def assert_quantile_below(self, quantile: float, limit_seconds: float) -> Verdict:
        """``assert_p99_below`` for any quantile (0.5, 0.95...)."""
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1, got {quantile!r}")
        if not limit_seconds > 0:
            raise ValueError(f"the limit must be a positive number of seconds, got {limit_seconds!r}")
        return self._decide(
            lambda alpha: check_below(self.run, limit_seconds, quantile=quantile, alpha=alpha)
        )

    def assert_no_regression(self, max_increase: float = 0.10, *, quantile: float = 0.5) -> Verdict | None:
        """Fail when this run is slower than its baseline by more than ``max_increase`` (0.10:
        10%), beyond the uncertainty of both; see ``inferscope.gate.verdict`` for what is compared.

        While baselines are being saved, nothing is compared (None). Without a baseline the check
        is inconclusive.
        """
        if not 0 <= max_increase < 10:
            raise ValueError(
                f"max_increase must be a fraction from 0 to 10 (0.10 is 10%), got {max_increase!r}"
            )
        if not 0 < quantile < 1:
            raise ValueError(f"quantile must be between 0 and 1, got {quantile!r}")
        if self.saving:
            self.notes.append(f"baseline saved to {self.baseline_path}; not compared")
            return None
        baseline = self.baseline
        if baseline is None:
            where = f" in {self.baseline_path}" if self.baseline_path is not None else ""
            message = (
                f"no baseline for {self.model}{where}: run the tests once with "
                "--inferscope-save-baseline (or `inferscope bench --save-baseline`) to write it"
            )
            self.notes.append(message)
            self._on_inconclusive(message, None)
            return None
        return self._decide(
            lambda alpha: compare(
                self.run, baseline, max_increase=max_increase, quantile=quantile, alpha=alpha, rng=self._rng
            )
        )

    # --- output ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary: the figures, the stages and every verdict."""
        return {
            "name": self.name,
            "model": self.model,
            "calls": self.calls,
            "warmup_calls": self.run.warmup_calls,
            "seconds": self.run.seconds,
            "items_per_call": self.run.items_per_call,
            "p50_seconds": self.p50,
            "p95_seconds": self.p95,
            "p99_seconds": self.p99,
            "cpu_seconds": self.cpu_seconds,
            "cpu_per_call_seconds": self.cpu_per_call,
            "cpu_per_item_seconds": self.cpu_per_item,
            "canary_wall_seconds": self.canary_wall_seconds,
            "canary_cpu_seconds": self.canary_cpu_seconds,
            "fingerprint": self.run.fingerprint,
            "baseline": str(self.baseline_path) if self.baseline_path is not None else None,
            "baseline_saved": self.saving,
            "stages": [figures.to_json() for figures in self.stages.values()],
            "verdicts": [v.to_json() for v in self.verdicts],
            "notes": list(self.notes),
        }
