"""Measuring a function for the gate: warm-up, calibration, rounds of tracked calls, the canary.

A run calls the function through ``track_inference`` (so its stages are measured as in
production) and times every call itself as well (wall and calling-thread CPU, exactly, for the
statistics). It measures in rounds of about ``round_seconds``: before each round the machine
canary runs a few times, and after it the pipeline's window is closed, so that every round is one
``Window`` of the model and the run turns into a ``Baseline`` of the same format as production's.

The pipeline is configured for benchmarking on first use: the flight recorder off, no exporter,
windows closed only by the runner. A benchmark never writes to the flight recorder of the machine
it runs on.

>>> run = BenchRunner(sum, [(([1, 2, 3],), {})], model="doc.sum", budget_seconds=0.2).measure()
>>> run.calls >= MIN_CALLS and run.items_per_call == 3.0
True
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..baseline import Baseline
from ..system.canary import Canary
from ..windows import Window
from .stats import Sample

__all__ = ["MIN_CALLS", "BenchRun", "BenchRunner", "Call", "prepare_pipeline"]

#: One call's positional and keyword arguments.
Call = tuple[tuple[Any, ...], Mapping[str, Any]]

#: A run makes at least this many calls, even past its time budget: fewer say nothing of a quantile.
MIN_CALLS = 20
#: Canary runs before each round (one run hashes 64 KiB: tens of microseconds).
CANARY_RUNS_PER_ROUND = 9
#: The length of the window the pipeline is given while benchmarks run: the runner closes them.
_BENCH_WINDOW_SECONDS = 86_400.0


def prepare_pipeline() -> None:
    """Configure inferscope for benchmarking, once: measuring on (with the thread CPU clock), the
    flight recorder off, no exporter. Kept as it is when already so."""
    import inferscope

    from ..config import RECORDER_OFF

    settings = inferscope.current_settings()
    if (
        settings is not None
        and settings.enabled
        and settings.recorder == RECORDER_OFF
        and not settings.metrics_exporters
        and not settings.tracing
        and settings.window_seconds == _BENCH_WINDOW_SECONDS
        and settings.counters != "minimal"
    ):
        return
    counters = "default" if settings is None or settings.counters == "minimal" else settings.counters
    inferscope.configure(
        enabled=True,
        recorder=RECORDER_OFF,
        metrics_exporters="none",
        traces_exporters="none",
        window_seconds=_BENCH_WINDOW_SECONDS,
        counters=counters,
    )


def _close_window() -> Window | None:
    from ..windows import WINDOWS

    WINDOWS.tick()  # applies the settings if the drainer has not yet
    return WINDOWS.close()


def items_of(call: Call) -> float:
    """Items in a call: the length of its first argument (a batch), else 1."""
    args = call[0]
    if args:
        try:
            return float(len(args[0]))
        except TypeError:
            pass
    return 1.0


@dataclass
class BenchRun:
    """What a run measured: per-call wall and CPU seconds, the canary, and one window per round."""

    model: str
    items_per_call: float
    warmup_calls: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=list)
    canary_wall: list[float] = field(default_factory=list)
    canary_cpu: list[float] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    seconds: float = 0.0
    #: The quantile the baseline's ``window_quantile`` is taken at.
    quantile: float = 0.95
    environment: Mapping[str, Any] | None = None

    @property
    def calls(self) -> int:
        return len(self.wall)

    def wall_sample(self) -> Sample:
        return Sample(np.asarray(self.wall), tuple(self.round_starts))

    def cpu_sample(self) -> Sample:
        return Sample(np.asarray(self.cpu), tuple(self.round_starts))

    def baseline(self) -> Baseline:
        """The run as a baseline (``source="ci"``), in the format of ``inferscope baseline``."""
        return Baseline.from_windows(
            self.model, self.windows, source="ci", quantile=self.quantile, environment=self.environment
        )

    @property
    def fingerprint(self) -> str | None:
        for window in reversed(self.windows):
            if window.process.fingerprint:
                return window.process.fingerprint
        return None


class BenchRunner:
    """Measures ``func`` over ``calls`` (cycled), within a time budget.

    ``measure()`` warms up, calibrates the calls per round and measures ``initial`` of the budget
    (all of it by default); ``extend()`` measures more rounds while the budget lasts, for a verdict
    that needs more samples.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        calls: Sequence[Call],
        *,
        model: str,
        budget_seconds: float = 3.0,
        items: float | None = None,
        warmup_seconds: float = 0.2,
        round_seconds: float = 0.25,
        quantile: float = 0.95,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not callable(func):
            raise TypeError(f"the benchmarked function must be callable, got {func!r}")
        if not calls:
            raise ValueError("no call to make: give the function's arguments, or a data file with a call")
        if not budget_seconds > 0:
            raise ValueError(f"budget_seconds must be positive, got {budget_seconds!r}")
        self.func = func
        self.calls = list(calls)
        self.model = model
        self.budget_seconds = float(budget_seconds)
        self.warmup_seconds = warmup_seconds
        self.round_seconds = round_seconds
        self.items = float(items) if items is not None else statistics.fmean(items_of(c) for c in self.calls)
        self._clock = clock
        self._canary = Canary()
        self._tracked: Callable[..., Any] | None = None
        self._calls_per_round = 1
        self._next = 0
        self.run = BenchRun(model=model, items_per_call=self.items, warmup_calls=0, quantile=quantile)

    @property
    def budget_left(self) -> float:
        return self.budget_seconds - self.run.seconds

    def _call(self) -> None:
        args, kwargs = self.calls[self._next % len(self.calls)]
        self._next += 1
        assert self._tracked is not None
        self._tracked(*args, **kwargs)

    def _start(self) -> None:
        import inferscope

        from ..system.fingerprint import cached_environment

        prepare_pipeline()
        items = self.items
        self._tracked = inferscope.track_inference(model=self.model, size=lambda *a, **k: items)(self.func)
        self.run.environment = cached_environment()
        # Warm-up: caches, lazy imports, JIT and allocator pools settle before anything counts.
        started = self._clock()
        calls = 0
        while calls < 3 or (self._clock() - started < self.warmup_seconds and calls < 10_000):
            self._call()
            calls += 1
        per_call = max((self._clock() - started) / calls, 1e-7)
        self.run.warmup_calls = calls
        self._calls_per_round = max(1, min(1_000_000, int(self.round_seconds / per_call)))
        _close_window()  # the warm-up's window is left out

    def measure(self, initial: float = 1.0) -> BenchRun:
        """Warm up, calibrate and measure ``initial`` (a fraction) of the budget, at least
        ``MIN_CALLS`` calls; returns the run."""
        if self._tracked is None:
            self._start()
        self._measure_for(max(self.budget_seconds * initial, 1e-3), min_calls=MIN_CALLS)
        return self.run

    def extend(self, seconds: float) -> bool:
        """Measure about ``seconds`` more, within what is left of the budget; False when none is."""
        seconds = min(seconds, self.budget_left)
        if seconds < self.round_seconds / 4 or self._tracked is None:
            return False
        self._measure_for(seconds, min_calls=0)
        return True

    def _measure_for(self, seconds: float, *, min_calls: int) -> None:
        run = self.run
        wall, cpu = run.wall, run.cpu
        perf, thread = time.perf_counter_ns, time.thread_time_ns
        started = self._clock()
        first_call = run.calls
        while True:
            for _ in range(CANARY_RUNS_PER_ROUND):
                canary_wall, canary_cpu = self._canary.run()
                run.canary_wall.append(canary_wall)
                run.canary_cpu.append(canary_cpu)
            run.round_starts.append(run.calls)
            round_started = self._clock()
            for _ in range(self._calls_per_round):
                c0 = thread()
                w0 = perf()
                self._call()
                w1 = perf()
                c1 = thread()
                wall.append((w1 - w0) / 1e9)
                cpu.append((c1 - c0) / 1e9)
                if self._clock() - round_started > 2 * self.round_seconds:
                    break  # slower than calibrated: keep the rounds short
            self._add_window()
            elapsed = self._clock() - started
            if elapsed >= seconds and run.calls - first_call >= min_calls:
                break
        run.seconds += self._clock() - started

    def _add_window(self) -> None:
        window = _close_window()
        if window is None:
            return
        keys = tuple(k for k in window.keys if k.model == self.model)
        if not keys:
            return
        walls = self.run.canary_wall[-CANARY_RUNS_PER_ROUND:]
        cpus = self.run.canary_cpu[-CANARY_RUNS_PER_ROUND:]
        process = replace(
            window.process,
            canary_wall_seconds=statistics.median(walls),
            canary_cpu_seconds=statistics.median(cpus),
            canary_runs=len(walls),
        )
        self.run.windows.append(replace(window, keys=keys, process=process))
