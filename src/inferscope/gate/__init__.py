"""The performance gate: measure a function, compare it with a baseline, and say pass, regression
or inconclusive (docs/ci.md).

Used by the pytest plugin (the ``inferscope_bench`` fixture) and ``inferscope bench``; usable
directly::

    from inferscope.gate import bench

    result = bench(model.predict, batch, budget_seconds=3.0)
    result.assert_p99_below(0.150)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .result import BenchResult, Inconclusive, PerformanceRegression, StageFigures
from .runner import BenchRunner, Call
from .store import StoredBaseline, read_baselines, write_baselines
from .verdict import Verdict

__all__ = [
    "BenchResult",
    "Inconclusive",
    "PerformanceRegression",
    "StageFigures",
    "StoredBaseline",
    "Verdict",
    "bench",
    "bench_calls",
    "read_baselines",
    "write_baselines",
]


def bench(func: Callable[..., Any], /, *args: Any, budget_seconds: float = 3.0, **kwargs: Any) -> BenchResult:
    """Benchmark ``func(*args, **kwargs)`` for about ``budget_seconds``; the result has no baseline
    (give one with :func:`bench_calls` to compare)."""
    return bench_calls(func, [(args, kwargs)], budget_seconds=budget_seconds)


def bench_calls(
    func: Callable[..., Any],
    calls: Sequence[Call],
    *,
    model: str | None = None,
    budget_seconds: float = 3.0,
    items: float | None = None,
    baseline: StoredBaseline | None = None,
    initial_share: float = 1.0,
) -> BenchResult:
    """Benchmark ``func`` over ``calls`` (each ``(args, kwargs)``, made in turn), as ``model``
    (default: the function's qualified name), measuring ``initial_share`` of the budget first and
    the rest only when a check needs it."""
    name = model or getattr(func, "__qualname__", None) or type(func).__qualname__
    runner = BenchRunner(func, calls, model=name, budget_seconds=budget_seconds, items=items)
    runner.measure(initial_share)
    return BenchResult(runner, name=name, baseline=baseline)
