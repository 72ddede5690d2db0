"""The regression detector: on every closed window, compare each key with its baselines, and name one
cause for every regression that lasts.

For each model it keeps an anchor baseline (the first ``baseline_seconds`` of the model's history, or
a loaded file) and a rolling reference (the same hour a day earlier from the flight recorder, else the
trailing history in memory). Per stage first, then per inference, two figures are compared: the
``regression_quantile`` of the duration and the CPU per call (process CPU per inference where it is
shared out, so that BLAS and other helper threads count). A window *exceeds* when its figure is more
than ``regression_threshold`` above the baseline's and more than three times the baseline's own
window-to-window noise (1.4826 x MAD) above it. A run of exceeding windows becomes a regression when
it lasts ``regression_sustain_seconds`` and the pooled figure of the run, over at least
``MIN_CALLS`` calls, still exceeds, and the run's level (the median of its windows' figures) is
``LEVEL_NOISE_UNITS`` noise units above; a run that goes away sooner is dropped. A stage whose cost only
moved from a sibling while the inference stayed flat is not raised, and a parent (or the inference)
is not raised when an open regression of a descendant explains most of its rise. RSS and the Python
heap are watched for sustained growth (MB per hour).

Each regression names one cause from a closed vocabulary, tried in a fixed order (``PRECEDENCE``);
the evidence holds the figures, and why every other cause lost. docs/regressions.md explains them.

>>> from inferscope.detector import CAUSES
>>> CAUSES[0], CAUSES[-1]
('machine_change', 'memory_growth')
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .baseline import (
    MIN_WINDOW_CALLS,
    Baseline,
    KeyFigures,
    ProcessBaseline,
    ProcessFigures,
    StageBaseline,
)
from .windows import Window

if TYPE_CHECKING:
    from .history import HistoryStore

__all__ = [
    "CAUSES",
    "MIN_CALLS",
    "PRECEDENCE",
    "Detector",
    "DetectorSettings",
    "Regression",
    "TaxPoint",
    "describe",
    "detector",
    "install",
    "machine_signals",
    "regressions",
    "set_detector",
    "tax_of",
]

_logger = logging.getLogger("inferscope.regression")

#: The causes, in the order they are tried (the first whose condition holds is named). Conditions
#: outside the code come first (the machine, neighbours, traffic, the inputs), then what was
#: deployed (the environment, the model), then where the time went (the GPU), then ``more_work``,
#: which holds when nothing else does. ``data_growth`` precedes ``contention``: it holds only when
#: the cost per item stayed flat, which contention would not leave. ``memory_growth`` is the cause
#: of the memory figures.
PRECEDENCE = (
    "machine_change",
    "data_growth",
    "contention",
    "load",
    "dependency_change",
    "model_change",
    "gpu",
    "more_work",
)
CAUSES = (*PRECEDENCE, "memory_growth")

#: Calls a run of windows must hold before it can be reported.
MIN_CALLS = 30
#: A window exceeds only when its figure is this many noise units (1.4826 x MAD) above the baseline.
NOISE_UNITS = 3.0
#: A run opens only when the median of its windows' figures is this many noise units above the
#: baseline (the noise of a rolling reference is at least the anchor's, relative to its level).
LEVEL_NOISE_UNITS = 4.0
#: Windows of a candidate that may miss (not exceed) in a row before it is dropped, at the least.
_MAX_MISSES = 2
#: The share of a candidate's windows that must exceed for it to last.
_MIN_HIT_SHARE = 0.6
#: Contention signals: the canary slower by this factor; PSI, steal and throttling up by these
#: fractions of the time; involuntary switches per call up this factor and by this many.
CANARY_RATIO = 1.3
PRESSURE_RISE = 0.10
STEAL_RISE = 0.05
THROTTLED_RISE = 0.05
SWITCHES_RATIO = 2.0
SWITCHES_RISE = 0.5
#: The process's run-queue wait per CPU second, and the canary's wait for a core per wake-up
#: (seconds), must double and rise by these to count.
RUN_QUEUE_RISE = 0.1
CANARY_WAIT_RISE = 50e-6
#: Off-CPU time per call must grow this many times faster than CPU time per call to count.
OFF_CPU_OUTGROWS = 1.5
#: A descendant's (or a sibling's) change that covers this share of a key's change explains it.
_EXPLAINED_SHARE = 0.5
#: Memory growth under this many bytes over the anchor is not raised, however fast.
MIN_MEMORY_GROWTH_BYTES = 16 * 1024 * 1024
#: A stage's rise (per inference) under this share of the inference's cost is not raised.
MATERIAL_SHARE = 0.01
#: Regressions kept after they close, for ``regressions()``.
_RECENT_CLOSED = 100

_HOUR = 3600.0
_DAY = 86400.0
#: While a model has no anchor, the recorder is read again this often for its first windows (other
#: workers write the same file) and for an anchor another worker completed; in between, this
#: process's windows are added in memory.
_HISTORY_REREAD_SECONDS = 300.0
_MB = 1024.0 * 1024.0


@dataclass(frozen=True)
class Regression:
    """A regression of one key: its cause, the figures that prove it, and whether it is still open.

    ``stage`` is the stage path, or None for the whole inference (or the process, for
    ``memory_growth`` that no stage can be charged with, and for ``cpu_wait``); ``metric`` is the
    quantile (``p95``), ``cpu``, ``cpu_wait`` (a wait for a core before the calls), ``rss`` or
    ``py_heap``; ``change`` is a fraction (0.25 is +25%); ``since`` is the start
    of the first window of the rise (Unix seconds); ``shape`` is ``step`` or ``trend``.
    """

    model: str
    version: str | None
    stage: str | None
    cause: str
    metric: str
    baseline_value: float
    current_value: float
    change: float
    since: float
    shape: str
    evidence: Mapping[str, Any]
    active: bool


@dataclass(frozen=True)
class TaxPoint:
    """What a model pays now over its anchor: extra seconds per inference at p50 and p95, and the
    extra CPU seconds per second (cores) at the current rate."""

    model: str
    version: str | None
    latency_p50_seconds: float | None
    latency_p95_seconds: float | None
    cpu_cores: float | None
    calls_per_second: float | None

    @property
    def cpu_hours_per_day(self) -> float | None:
        """The CPU tax in CPU-hours per day."""
        return None if self.cpu_cores is None else self.cpu_cores * 24.0


@dataclass(frozen=True)
class DetectorSettings:
    """The detector's settings (``configure()``'s window_seconds, baseline_seconds, regression_*)."""

    window_seconds: float = 60.0
    baseline_seconds: float = 3600.0
    threshold: float = 0.2
    sustain_seconds: float = 3600.0
    quantile: float = 0.95

    @classmethod
    def of(cls, settings: Any) -> DetectorSettings:
        """From an ``inferscope.Settings``."""
        return cls(
            window_seconds=settings.window_seconds,
            baseline_seconds=settings.baseline_seconds,
            threshold=settings.regression_threshold,
            sustain_seconds=settings.regression_sustain_seconds,
            quantile=settings.regression_quantile,
        )

    @property
    def metric_name(self) -> str:
        """The name of the quantile metric: ``p95`` for 0.95, ``p99.9`` for 0.999."""
        return f"p{self.quantile * 100:g}"


@dataclass
class _Open:
    regression: Regression
    clear_since: float | None = None


@dataclass
class _Track:
    """A candidate run of exceeding windows of one (model, stage, metric), and its open regression."""

    since: float | None = None
    hits: int = 0
    misses: int = 0
    votes: int = 0
    reference: str = "anchor"
    opened: _Open | None = None
    suppressed: str | None = None
    #: Windows with too few calls to vote, waiting to be pooled with the next ones.
    pending: list[Window] = field(default_factory=list)


def _fraction(now: float | None, base: float | None) -> float | None:
    if now is None or base is None or base <= 0 or not math.isfinite(now) or not math.isfinite(base):
        return None
    return now / base - 1.0


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _ms(value: float | None) -> float | None:
    return None if value is None else _round(value * 1e3, 4)


def _is_ancestor(parent: str | None, child: str | None) -> bool:
    if child is None or parent == child:
        return False
    return parent is None or child.startswith(parent + "/")


def _parent(path: str) -> str | None:
    return path.rsplit("/", 1)[0] if "/" in path else None


def theil_sen_slope(times: Sequence[float], values: Sequence[float]) -> float | None:
    """The median of the pairwise slopes (robust to outliers), None with fewer than 3 points.

    >>> theil_sen_slope([0, 1, 2, 3], [0, 2, 4, 100])
    2.0
    """
    if len(times) < 3:
        return None
    slopes = [
        (values[j] - values[i]) / (times[j] - times[i])
        for i in range(len(times))
        for j in range(i + 1, len(times))
        if times[j] != times[i]
    ]
    return statistics.median(slopes) if slopes else None


class Detector:
    """Compares every closed window with the baselines and keeps the regressions.

    ``on_window`` is the window listener (the drainer calls it once per ``window_seconds``). It
    never raises: a failure is counted in ``errors`` and logged once a minute.

    Example::

        detector = Detector(DetectorSettings(window_seconds=1, baseline_seconds=10, sustain_seconds=3))
        for window in windows:
            detector.on_window(window)
        detector.regressions()
    """

    def __init__(
        self,
        settings: DetectorSettings | None = None,
        *,
        store: HistoryStore | None = None,
        environment: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.settings = settings or DetectorSettings()
        self.store = store
        self._environment = environment
        self._environment_cache: Mapping[str, Any] | None = None
        self._service = ""
        self._lock = threading.Lock()
        keep = max(3.0 * self.settings.sustain_seconds, 4 * self.settings.window_seconds)
        self._history: deque[Window] = deque(
            maxlen=min(100_000, math.ceil(keep / self.settings.window_seconds) + 2)
        )
        self._anchors: dict[str, Baseline] = {}
        self._anchor_loaded: set[str] = set()
        self._anchor_windows: dict[str, list[Window]] = {}
        self._anchor_read: dict[str, float] = {}
        self._rolling: dict[str, tuple[float, Baseline | None]] = {}
        self._tracks: dict[tuple[str, str | None, str], _Track] = {}
        self._closed: deque[Regression] = deque(maxlen=_RECENT_CLOSED)
        #: Published atomically after each window: readers never take the lock.
        self._published: tuple[Regression, ...] = ()
        self._tax: tuple[TaxPoint, ...] = ()
        self.errors = 0
        self._last_error_log = 0.0
        self.windows_seen = 0

    # --- public ------------------------------------------------------------------------------

    def on_window(self, window: Window) -> None:
        """Take one closed window: update the anchors, the candidates and the regressions."""
        try:
            with self._lock:
                self._on_window(window)
        except Exception:
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log >= 60.0:
                self._last_error_log = now
                _logger.exception("inferscope: the regression detector failed on a window")

    def regressions(self) -> list[Regression]:
        """The open regressions, then the recently closed ones (newest first)."""
        return list(self._published)

    def tax(self) -> list[TaxPoint]:
        """The tax of each model with an anchor, over the last ``regression_sustain_seconds``."""
        return list(self._tax)

    def anchor(self, model: str) -> Baseline | None:
        """The anchor of ``model``, once it has one."""
        return self._anchors.get(model)

    def set_anchor(self, baseline: Baseline, *, save: bool = True) -> None:
        """Use ``baseline`` as the anchor of its model from now on (and store it in the recorder)."""
        with self._lock:
            self._anchors[baseline.model] = baseline
            self._anchor_loaded.add(baseline.model)
            self._anchor_windows.pop(baseline.model, None)
        if save:
            self._stored("save_baseline", baseline)

    def windows(self) -> list[Window]:
        """The windows in memory, oldest first."""
        return list(self._history)

    def after_fork_in_child(self) -> None:
        """A forked child keeps the anchors and starts its own windows and regressions."""
        self._lock = threading.Lock()
        self._history.clear()
        self._tracks.clear()
        self._closed.clear()
        self._rolling.clear()
        self._anchor_windows.clear()
        self._anchor_read.clear()
        self._published = ()
        self._tax = ()

    # --- per window --------------------------------------------------------------------------

    def _on_window(self, window: Window) -> None:
        self.windows_seen += 1
        self._service = window.service
        self._history.append(window)
        models = sorted({k.model for k in window.keys})
        for model in models:
            self._update_anchor(model, window)
        for model in sorted({m for m in models if m in self._anchors} | {t[0] for t in self._tracks}):
            if model in self._anchors:
                self._evaluate_model(model, window)
        self._evaluate_memory(window)
        for model in sorted(self._anchors):
            self._evaluate_wait(model, window)
        self._publish()

    def _stored(self, method: str, *args: Any) -> Any:
        """Call ``self.store.<method>(*args)``; None without a store or when it failed."""
        if self.store is None:
            return None
        try:
            return getattr(self.store, method)(*args)
        except Exception:
            self.errors += 1
            _logger.debug("inferscope: the flight recorder's %s failed", method, exc_info=True)
            return None

    def _current_environment(self) -> Mapping[str, Any] | None:
        if self._environment is None:
            return None
        if self._environment_cache is None:
            try:
                self._environment_cache = self._environment()
            except Exception:
                return None
        return self._environment_cache

    def _update_anchor(self, model: str, window: Window) -> None:
        if model in self._anchors:
            return
        if model not in self._anchor_loaded:
            self._anchor_loaded.add(model)
            stored = self._stored("load_anchor", window.service, model)
            if isinstance(stored, Baseline):
                self._anchors[model] = stored
                _logger.info("inferscope: the anchor baseline of model %r is the stored one", model)
                return
        collected = self._anchor_span(model, window)
        if not collected:
            return
        covered = collected[-1].end_unix - collected[0].start_unix
        if covered + 1e-6 < self.settings.baseline_seconds:
            return
        environment = self._current_environment()
        anchor = Baseline.from_windows(
            model, collected, source="anchor", quantile=self.settings.quantile, environment=environment
        )
        self._anchor_windows.pop(model, None)
        self._anchors[model] = anchor
        self._stored("save_baseline", anchor)
        _logger.info(
            "inferscope: anchor baseline of model %r taken over %.0f s (%d windows)",
            model,
            anchor.seconds,
            len(collected),
        )

    def _anchor_span(self, model: str, window: Window) -> list[Window]:
        """The windows of the model's first ``baseline_seconds``, whichever process recorded them.

        Read from the recorder when the model is first seen (the recorder holds this window
        already) and again every ``_HISTORY_REREAD_SECONDS`` while the span is short, then kept in
        memory with this process's windows added: the recorder is never read per window. A
        re-read adopts an anchor that another worker stored meanwhile (and returns nothing)."""
        seconds = self.settings.baseline_seconds
        now = time.monotonic()
        read_at = self._anchor_read.get(model)
        if self.store is not None and (read_at is None or now - read_at >= _HISTORY_REREAD_SECONDS):
            self._anchor_read[model] = now
            if read_at is not None:
                stored = self._stored("load_anchor", window.service, model)
                if isinstance(stored, Baseline):
                    self._anchors[model] = stored
                    self._anchor_windows.pop(model, None)
                    _logger.info("inferscope: the anchor baseline of model %r is the stored one", model)
                    return []
            recorded = self._stored("first_windows", window.service, model, seconds)
            if recorded:
                self._anchor_windows[model] = list(recorded)
                return self._anchor_windows[model]
        collected = self._anchor_windows.setdefault(model, [])
        # As the recorder would return them: the windows that end within twice the span.
        if not collected or window.end_unix <= collected[0].start_unix + 2 * seconds + 1e-6:
            collected.append(window)
        return collected

    def _rolling_reference(self, model: str, now: float) -> Baseline | None:
        """The same hour a day earlier from the recorder, else the trailing history held in memory
        (the windows between 3 and 2 sustain periods ago); refreshed once per sustain period."""
        cached = self._rolling.get(model)
        refresh = max(self.settings.sustain_seconds, self.settings.window_seconds)
        if cached is not None and now - cached[0] < refresh:
            return cached[1]
        reference: Baseline | None = None
        day_ago = self._stored(
            "windows", self._service, model, now - _DAY - _HOUR / 2, now - _DAY + _HOUR / 2
        )
        if day_ago and len(day_ago) >= 3:
            reference = Baseline.from_windows(
                model, day_ago, source="rolling", quantile=self.settings.quantile
            )
        if reference is None:
            sustain = self.settings.sustain_seconds
            trailing = [
                w
                for w in self._history
                if now - 3 * sustain <= w.start_unix and w.end_unix <= now - 2 * sustain
            ]
            if len(trailing) >= 3 and any(k.model == model for w in trailing for k in w.keys):
                reference = Baseline.from_windows(
                    model, trailing, source="rolling", quantile=self.settings.quantile
                )
        self._rolling[model] = (now, reference)
        return reference

    # --- figures -----------------------------------------------------------------------------

    def _span(self, start: float, end: float) -> list[Window]:
        return [w for w in self._history if w.start_unix >= start - 1e-6 and w.end_unix <= end + 1e-6]

    @staticmethod
    def _pool(windows: Iterable[Window], model: str, stage: str | None) -> KeyFigures:
        return KeyFigures.pool(
            (k, w.seconds) for w in windows for k in w.keys if k.model == model and k.stage == stage
        )

    def _value(self, figures: KeyFigures, metric: str, base: StageBaseline, pooled: bool) -> float | None:
        if metric == "cpu":
            if base.stage is None and base.process_cpu_per_call is not None:
                return figures.process_cpu_per_call
            return figures.cpu_per_call
        if figures.count < (MIN_CALLS if pooled else MIN_WINDOW_CALLS):
            return None
        return figures.duration.quantile(self.settings.quantile)

    @staticmethod
    def _reference(base: StageBaseline, metric: str, pooled: bool) -> tuple[float | None, float]:
        if metric == "cpu":
            if base.stage is None and base.process_cpu_per_call is not None:
                return base.process_cpu_per_call, base.process_cpu_per_call_noise
            return base.cpu_per_call, base.cpu_per_call_noise
        if pooled:
            return base.quantiles.get("q"), base.window_quantile_noise
        return base.window_quantile, base.window_quantile_noise

    def _exceeds(self, value: float | None, reference: float | None, noise: float, level: float) -> bool:
        if value is None or reference is None or reference <= 0:
            return False
        return value > reference * (1.0 + level) and value - reference > NOISE_UNITS * noise

    # --- keys --------------------------------------------------------------------------------

    def _evaluate_model(self, model: str, window: Window) -> None:
        anchor = self._anchors[model]
        rolling = self._rolling_reference(model, window.end_unix)
        keys = {k.stage for k in window.keys if k.model == model}
        keys |= {t[1] for t in self._tracks if t[0] == model and t[2] in ("cpu", self.settings.metric_name)}
        # Deepest stages first, the inference last: a parent sees its descendants' decisions.
        ordered = sorted(keys, key=lambda s: (-1 if s is None else s.count("/"), s or ""), reverse=True)
        for stage in ordered:
            base = anchor.stage(stage)
            if base is None:
                continue
            for metric in (self.settings.metric_name, "cpu"):
                self._evaluate_key(model, stage, metric, window, anchor, base, rolling)

    def _evaluate_key(
        self,
        model: str,
        stage: str | None,
        metric: str,
        window: Window,
        anchor: Baseline,
        base: StageBaseline,
        rolling: Baseline | None,
    ) -> None:
        thr = self.settings.threshold
        track = self._tracks.setdefault((model, stage, metric), _Track())
        # A window with too few calls to say anything is pooled with the next ones (a slow service,
        # or one slowed down so much that it serves a few calls a window).
        voting = [*track.pending, window]
        figures = self._pool(voting, model, stage)
        if (
            figures.count < MIN_WINDOW_CALLS
            and window.end_unix - voting[0].start_unix < self.settings.sustain_seconds
        ):
            track.pending = voting
            return
        track.pending = []
        value = self._value(figures, metric, base, pooled=False)
        ref, noise = self._reference(base, metric, pooled=False)
        rolling_base = rolling.stage(stage) if rolling is not None else None
        exceeds_anchor = self._exceeds(value, ref, noise, thr)
        exceeds_rolling = False
        if rolling_base is not None:
            r_ref, r_noise = self._reference(rolling_base, metric, pooled=False)
            exceeds_rolling = self._exceeds(value, r_ref, r_noise, thr)
        if track.opened is not None:
            self._update_open(track, model, stage, metric, window, anchor, base, value, ref, noise)
            return
        if value is None:
            return  # too few calls to vote
        if exceeds_anchor or exceeds_rolling:
            track.reference = "anchor" if exceeds_anchor else "rolling"
        what = f"{model} {stage or '(inference)'} {metric}"
        if not self._vote(track, exceeds_anchor or exceeds_rolling, voting[0].start_unix, window, what):
            return
        reference_base = base if track.reference == "anchor" or rolling_base is None else rolling_base
        self._try_open(track, model, stage, metric, window, anchor, reference_base, rolling)

    def _vote(self, track: _Track, exceeds: bool, start_unix: float, window: Window, what: str) -> bool:
        """Count one window's vote (``exceeds``; the votes began at ``start_unix``). True when the
        track has exceeded for the sustain time, in most of its windows."""
        if exceeds:
            if track.since is None:
                track.since, track.hits, track.misses, track.votes = start_unix, 0, 0, 0
            track.hits += 1
            track.votes += 1
            track.misses = 0
        elif track.since is not None:
            track.misses += 1
            track.votes += 1
            # Gone: misses in a row for a sixth of the sustain time (two at least), or most votes
            # missed. A noisy window inside a lasting rise is not enough to drop it.
            allowed = max(
                _MAX_MISSES, math.ceil(self.settings.sustain_seconds / self.settings.window_seconds / 6)
            )
            if track.misses >= allowed or (track.votes >= 4 and track.hits < _MIN_HIT_SHARE * track.votes):
                _logger.debug(
                    "inferscope: a rise went back within %.0f s: dropped", window.end_unix - track.since
                )
                track.since, track.hits, track.misses, track.votes = None, 0, 0, 0
            return False
        if track.since is None or window.end_unix - track.since + 1e-6 < self.settings.sustain_seconds:
            return False
        return track.hits >= _MIN_HIT_SHARE * track.votes

    def _try_open(
        self,
        track: _Track,
        model: str,
        stage: str | None,
        metric: str,
        window: Window,
        anchor: Baseline,
        base: StageBaseline,
        rolling: Baseline | None,
    ) -> None:
        assert track.since is not None
        thr = self.settings.threshold
        span = self._span(track.since, window.end_unix)
        current = self._pool(span, model, stage)
        value = self._value(current, metric, base, pooled=True)
        ref, _ = self._reference(base, metric, pooled=True)
        if current.count < MIN_CALLS or value is None or ref is None or ref <= 0 or value <= ref * (1 + thr):
            return
        if not self._level_exceeds(model, stage, metric, span, anchor, base):
            return
        reason = self._explained(model, stage, metric, span, anchor, current, base)
        if reason is not None:
            if track.suppressed != reason:
                _logger.debug("inferscope: %s %s %s not raised: %s", model, stage, metric, reason)
            track.suppressed = reason
            return
        track.suppressed = None
        reference = "anchor" if base is anchor.stage(stage) else "rolling"
        # The machine, the environment and the other stages are compared with the same reference
        # as the figure that rose: a rise over a quiet hour is not judged against the anchor's hour.
        compared = rolling if reference == "rolling" and rolling is not None else anchor
        cause, evidence = self._attribute(model, stage, metric, span, compared, base, current, value, ref)
        evidence["reference"] = reference
        evidence["calls"] = current.count
        evidence["windows"] = len(span)
        version = self._version(span, model)
        regression = Regression(
            model=model,
            version=version,
            stage=stage,
            cause=cause,
            metric=metric,
            baseline_value=ref,
            current_value=value,
            change=value / ref - 1.0,
            since=track.since,
            shape=self._shape(model, stage, metric, base, track.since, window.end_unix, ref, value),
            evidence=evidence,
            active=True,
        )
        track.opened = _Open(regression)
        self._stored("save_regression", self._service, regression)
        _log_regression(regression, opened=True)
        self._sample_stacks(regression)

    def _sample_stacks(self, regression: Regression) -> None:
        """Sample the regressed stage's stacks for a short while (profile/sampler.py; the
        ``profile_on_regression`` setting): for the process's own detector only, never raised."""
        if self is not _DETECTOR:
            return
        try:
            from .profile.sampler import regression_opened

            regression_opened(self._service, regression)
        except Exception:
            self.errors += 1
            _logger.debug("inferscope: sampling the stacks of a regression failed", exc_info=True)

    def _level_exceeds(
        self,
        model: str,
        stage: str | None,
        metric: str,
        span: Sequence[Window],
        anchor: Baseline,
        base: StageBaseline,
    ) -> bool:
        """Whether the run's level (the median of its windows' figures) is above the threshold and
        ``LEVEL_NOISE_UNITS`` times the reference's window-to-window noise. A rolling reference spans
        one sustain period, often too few independent minutes to measure its own noise: its relative
        noise is at least the anchor's."""
        ref, noise = self._reference(base, metric, pooled=False)
        if ref is None or ref <= 0:
            return False
        anchor_base = anchor.stage(stage)
        if anchor_base is not None and anchor_base is not base:
            a_ref, a_noise = self._reference(anchor_base, metric, pooled=False)
            if a_ref:
                noise = max(noise, a_noise / a_ref * ref)
        # Windows with too few calls count pooled with the next ones, as they vote (a service slowed
        # down to a few calls a window is still judged).
        values: list[float] = []
        chunk: list[Window] = []
        for w in span:
            chunk.append(w)
            figures = self._pool(chunk, model, stage)
            if figures.count >= MIN_WINDOW_CALLS:
                value = self._value(figures, metric, base, pooled=False)
                if value is not None:
                    values.append(value)
                chunk = []
        if not values:
            return False
        level = statistics.median(values)
        return level > ref * (1.0 + self.settings.threshold) and level - ref > LEVEL_NOISE_UNITS * noise

    def _update_open(
        self,
        track: _Track,
        model: str,
        stage: str | None,
        metric: str,
        window: Window,
        anchor: Baseline,
        base: StageBaseline,
        value: float | None,
        ref: float | None,
        noise: float,
    ) -> None:
        assert track.opened is not None
        opened = track.opened
        regression = opened.regression
        if value is not None:
            level = self.settings.threshold / 2.0
            if self._exceeds(value, regression.baseline_value, noise, level):
                opened.clear_since = None
            elif opened.clear_since is None:
                opened.clear_since = window.start_unix
        sustain = max(self.settings.sustain_seconds, 2 * self.settings.window_seconds)
        # While it still exceeds, the regression follows the last sustain period; once it is going
        # away, it keeps the figures it had, so that a closed regression says how large it was.
        span = self._span(max(regression.since, window.end_unix - sustain), window.end_unix)
        current = self._pool(span, model, stage)
        pooled = self._value(current, metric, base, pooled=True)
        if pooled is not None and opened.clear_since is None:
            regression = replace(
                regression,
                current_value=pooled,
                change=pooled / regression.baseline_value - 1.0,
            )
        if opened.clear_since is not None and window.end_unix - opened.clear_since + 1e-6 >= sustain:
            self._close(track, replace(regression, active=False))
            return
        opened.regression = regression
        # Stored every window while open: a reader of the recorder tells an open regression from one
        # whose process stopped by when its row was last updated.
        self._stored("save_regression", self._service, regression)

    def _close(self, track: _Track, regression: Regression) -> None:
        track.opened = None
        track.since, track.hits, track.misses, track.votes = None, 0, 0, 0
        self._closed.appendleft(regression)
        self._stored("save_regression", self._service, regression)
        _log_regression(regression, opened=False)

    def _version(self, span: Sequence[Window], model: str) -> str | None:
        for w in reversed(span):
            for k in w.keys:
                if k.model == model and k.stage is None:
                    return k.version
        return None

    # --- suppression: a cost that moved, a parent explained by a descendant ---------------------

    def _mean_delta(
        self, span: Sequence[Window], model: str, stage: str | None, metric: str, anchor: Baseline
    ) -> float | None:
        base = anchor.stage(stage)
        if base is None:
            return None
        current = self._pool(span, model, stage)
        if metric == "cpu":
            now, then = current.cpu_per_call, base.cpu_per_call
        else:
            now, then = current.mean_seconds, base.mean_seconds
        if now is None or then is None:
            return None
        # A stage's cost per inference: its calls per inference times its cost per call.
        inference = self._pool(span, model, None)
        base_inference = anchor.stage(None)
        if stage is not None and inference.count and base_inference is not None and base_inference.count:
            return now * current.count / inference.count - then * base.count / base_inference.count
        return now - then

    def _explained(
        self,
        model: str,
        stage: str | None,
        metric: str,
        span: Sequence[Window],
        anchor: Baseline,
        current: KeyFigures,
        base: StageBaseline,
    ) -> str | None:
        """Why this key should not be raised, or None."""
        delta = self._mean_delta(span, model, stage, metric, anchor)
        if delta is None or delta <= 0:
            return None
        covered = 0.0
        for (m, s, mt), track in self._tracks.items():
            if m == model and mt == metric and track.opened is not None and _is_ancestor(stage, s):
                child = self._mean_delta(span, model, s, metric, anchor)
                covered = max(covered, child or 0.0)
        if covered >= _EXPLAINED_SHARE * delta:
            return f"an open regression of a stage below explains {covered / delta:.0%} of the rise"
        inference = anchor.stage(None)
        total_then = None
        if inference is not None:
            total_then = inference.cpu_per_call if metric == "cpu" else inference.mean_seconds
        if stage is not None and total_then and delta < MATERIAL_SHARE * total_then:
            return (
                f"the rise ({delta * 1e3:.4f} ms per inference) is under {MATERIAL_SHARE:.0%} of the "
                "inference's cost"
            )
        if stage is None:
            return None
        total = self._mean_delta(span, model, None, metric, anchor)
        base_total = anchor.stage(None)
        total_ref = None
        if base_total is not None:
            total_ref = base_total.cpu_per_call if metric == "cpu" else base_total.mean_seconds
        if total is None or not total_ref:
            return None
        parent = _parent(stage)
        siblings = [s for s in anchor.stages if s is not None and s != stage and _parent(s) == parent]
        moved = sum(min(0.0, self._mean_delta(span, model, s, metric, anchor) or 0.0) for s in siblings)
        flat = abs(total) < self.settings.threshold / 2.0 * total_ref
        if flat and -moved >= _EXPLAINED_SHARE * delta:
            return (
                f"the cost moved from sibling stages ({-moved * 1e3:.3f} ms per inference less there) while "
                f"the inference stayed within {abs(total) / total_ref:.0%} of its baseline"
            )
        return None

    # --- shape -------------------------------------------------------------------------------

    def _shape(
        self,
        model: str,
        stage: str | None,
        metric: str,
        base: StageBaseline,
        since: float,
        end: float,
        ref: float,
        value: float,
    ) -> str:
        """``trend`` when the windows before the rise were already a quarter of the way up, or when the
        run itself keeps rising (its fitted rise is at least 30% of the excess); else ``step``."""

        def series(windows: Iterable[Window]) -> tuple[list[float], list[float]]:
            times, values = [], []
            for w in windows:
                v = self._value(self._pool([w], model, stage), metric, base, pooled=False)
                if v is not None:
                    times.append(w.end_unix)
                    values.append(v)
            return times, values

        excess = value - ref
        if excess <= 0:
            return "step"
        lookback = max(self.settings.sustain_seconds, 3 * self.settings.window_seconds)
        _, before = series(self._span(since - lookback, since))
        if len(before) >= 2 and statistics.median(before) - ref > 0.25 * excess:
            return "trend"
        times, during = series(self._span(since, end))
        slope = theil_sen_slope(times, during)
        if slope is not None and slope * (times[-1] - times[0]) >= 0.3 * excess:
            return "trend"
        return "step"

    # --- attribution -------------------------------------------------------------------------

    def _attribute(
        self,
        model: str,
        stage: str | None,
        metric: str,
        span: Sequence[Window],
        anchor: Baseline,
        base: StageBaseline,
        current: KeyFigures,
        value: float,
        ref: float,
    ) -> tuple[str, dict[str, Any]]:
        thr = self.settings.threshold
        process = ProcessFigures.pool([(w.process, w.seconds) for w in span])
        pb = anchor.process
        evidence: dict[str, Any] = {
            "metric_ms": [_ms(ref), _ms(value)],
            "wall_per_call_ms": [_ms(base.mean_seconds), _ms(current.mean_seconds)],
            "cpu_per_call_ms": [_ms(base.cpu_per_call), _ms(current.cpu_per_call)],
            "off_cpu_per_call_ms": [_ms(base.off_cpu_per_call), _ms(current.off_cpu_per_call)],
        }
        if base.process_cpu_per_call is not None and current.process_cpu_per_call is not None:
            evidence["process_cpu_per_call_ms"] = [
                _ms(base.process_cpu_per_call),
                _ms(current.process_cpu_per_call),
            ]
        why: dict[str, str] = {}
        holds: dict[str, bool] = {}

        # machine_change: where the process runs differs from the anchor's.
        moved = _machine_moved(pb, process)
        holds["machine_change"] = bool(moved)
        if moved:
            evidence["machine"] = moved
        why["machine_change"] = (
            "; ".join(moved) if moved else "same CPU model, CPU count and quota as the anchor"
        )

        # contention: the machine gives this process less than before.
        canary_ratio = None
        canary_slow = False
        if process.canary_wall_seconds and pb.canary_wall_seconds:
            canary_ratio = process.canary_wall_seconds / pb.canary_wall_seconds
        if canary_ratio is not None:
            evidence["canary_ratio"] = _round(canary_ratio, 3)
            floor = max(
                CANARY_RATIO, 1.0 + NOISE_UNITS * pb.canary_wall_noise / (pb.canary_wall_seconds or 1.0)
            )
            canary_slow = canary_ratio >= floor
        signals = machine_signals(pb, process, evidence)
        switches_then = base.counters_per_call.get("involuntary_switches")
        switches_now = current.counter_per_call("involuntary_switches")
        if switches_now is not None:
            evidence["involuntary_switches_per_call"] = [_round(switches_then, 3), _round(switches_now, 3)]
            then = switches_then or 0.0
            if switches_now >= SWITCHES_RATIO * then and switches_now - then >= SWITCHES_RISE:
                signals.append(f"involuntary switches per call {then:.2f} -> {switches_now:.2f}")
        # Off the CPU: the calling thread spends most of the rise waiting, and its waiting grew
        # faster than its CPU time (more of the same work makes both grow alike, BLAS helpers
        # included). Preempted (contention) unless the thread switched out on its own (voluntary
        # switches up, involuntary not: I/O, locks, sleeps), which rusage tells.
        off_then, off_now = base.off_cpu_per_call, current.off_cpu_per_call
        mean_then, mean_now = base.mean_seconds, current.mean_seconds
        off_up = _waits_more(base, current, thr)
        share_then = off_then / mean_then if off_then is not None and mean_then else 0.0
        share_now = off_now / mean_now if off_now is not None and mean_now else 0.0
        voluntary_then = base.counters_per_call.get("voluntary_switches")
        voluntary_now = current.counter_per_call("voluntary_switches")
        waits_on_its_own = (
            voluntary_now is not None
            and voluntary_now >= SWITCHES_RATIO * (voluntary_then or 0.0)
            and not any(s.startswith("involuntary") for s in signals)
        )
        if off_up and not waits_on_its_own:
            signals.append(
                f"the calling thread is off the CPU {share_now:.0%} of the time (anchor {share_then:.0%}): "
                f"{_ms(off_then)} -> {_ms(off_now)} ms per call"
            )
        controls = self._controls(model, stage, span, anchor)
        growths = [f.cpu_per_call / b.cpu_per_call for b, f in controls if f.cpu_per_call and b.cpu_per_call]
        if growths:
            evidence["cpu_growth_other_stages"] = _round(statistics.median(growths), 3)
        if not signals and controls:
            # Contention is the machine's, not one stage's: the other stages of the same calls,
            # at the same time, show it where this one's figures cannot. They wait far longer...
            waiting = sum(_waits_more(b, f, thr) for b, f in controls)
            if waiting and 2 * waiting >= len(controls):
                signals.append(
                    f"{waiting} of {len(controls)} other stages wait off the CPU far longer than in the "
                    "anchor"
                )
            # ... or every stage runs its same code slower, with the same inputs, software and model.
            own = _fraction(current.cpu_per_call, base.cpu_per_call)
            machine = statistics.median(growths) if growths else None
            if (
                not signals
                and machine is not None
                and own is not None
                and machine >= 1 + thr
                and 1 + own <= (1 + thr) * machine
                and not self._inputs_software_or_model_changed(model, span, anchor, process)
            ):
                signals.append(
                    f"the other stages' CPU per call grew {machine:.1f}x too, with the same inputs, software "
                    "and model: the machine runs the same code slower"
                )
        if canary_slow and canary_ratio is not None:
            # The canary runs on a Python thread: its wall time includes waiting for the GIL, so in a
            # busy process it corroborates the other signals and is not enough alone.
            if signals:
                signals.insert(0, f"the canary takes {canary_ratio:.2f}x as long")
            else:
                evidence["canary_alone"] = (
                    "slower, with no other sign of contention (it also waits for the GIL)"
                )
        holds["contention"] = bool(signals)
        own_work = self._own_work_grew(model, stage, span, anchor, base, current) if signals else None
        if signals and own_work is not None:
            # The other stages ran on the same machine at the same time: they are the control.
            holds["contention"] = False
            evidence["contention_also"] = signals
            why["contention"] = f"the machine is contended ({'; '.join(signals)}), but {own_work}"
        elif signals:
            cpu_then, cpu_now = base.cpu_per_call, current.cpu_per_call
            if cpu_then and cpu_now and cpu_now > (1 + thr) * cpu_then:
                signals.append(
                    f"CPU per call rose too ({cpu_now / cpu_then:.1f}x): "
                    "threads spin while they wait for a core"
                )
            evidence["contention"] = signals
            why["contention"] = "; ".join(signals)
        else:
            why["contention"] = (
                "the calling thread waits longer, but it switches out on its own (voluntary switches "
                "up): I/O, locks or sleeps of the stage itself"
                if off_up
                else "only the canary is slower, and it also waits for the GIL"
                if "canary_alone" in evidence
                else "canary, CPU pressure, steal, throttling, switches and off-CPU time as in the anchor, "
                "within their noise"
            )

        # load: a queueing key grew with the arrival rate.
        inference = self._pool(span, model, None)
        rate_then, rate_now = self._rate(anchor), inference.calls_per_second
        evidence["calls_per_second"] = [_round(rate_then, 3), _round(rate_now, 3)]
        rate_up = rate_then is not None and rate_now is not None and rate_now >= (1 + thr) * rate_then
        queueing = self._queueing(model, stage, span, anchor)
        holds["load"] = rate_up and queueing
        why["load"] = (
            f"arrivals {rate_then:.1f}/s -> {rate_now:.1f}/s and the queueing stage grew"
            if holds["load"] and rate_then is not None and rate_now is not None
            else (
                "the arrival rate rose but no queueing stage grew"
                if rate_up
                else "the arrival rate did not rise"
            )
        )

        # data_growth: more input per call at the same cost per item.
        size_then, size_now = base.size_per_call, current.size_per_call
        inference_base = anchor.stage(None)
        if size_now is None and stage is not None and inference_base is not None:
            # The input size is reported per inference: a stage's per-item cost uses it.
            size_then, size_now = inference_base.size_per_call, inference.size_per_call
        per_item_change = None
        if size_then and size_now:
            evidence["size_per_call"] = [_round(size_then, 4), _round(size_now, 4)]
            cost_then = base.cpu_per_call if metric == "cpu" else base.mean_seconds
            cost_now = current.cpu_per_call if metric == "cpu" else current.mean_seconds
            if cost_then and cost_now:
                per_item_change = _fraction(cost_now / size_now, cost_then / size_then)
                evidence["cost_per_item_change"] = _round(per_item_change, 4)
        size_up = size_then is not None and size_now is not None and size_now >= (1 + thr) * size_then
        per_item_flat = per_item_change is not None and per_item_change <= thr / 2
        holds["data_growth"] = size_up and per_item_flat
        if holds["data_growth"]:
            why["data_growth"] = (
                f"input size per call x{size_now / size_then:.2f}, cost per item {per_item_change:+.0%}"  # type: ignore[operator]
            )
        elif size_up:
            why["data_growth"] = (
                f"the input grew, but the cost per item rose too ({per_item_change:+.0%})"
                if per_item_change is not None
                else "the input grew, but the cost per item is not known"
            )
        else:
            why["data_growth"] = (
                "input size per call did not rise" if size_now is not None else "no input size is reported"
            )

        # dependency_change: the software fingerprint differs from the anchor's.
        fingerprint_now = process.fingerprints[-1] if process.fingerprints else None
        changed = (
            anchor.fingerprint is not None
            and fingerprint_now is not None
            and fingerprint_now != anchor.fingerprint
        )
        holds["dependency_change"] = changed
        if changed and anchor.fingerprint is not None and fingerprint_now is not None:
            evidence["fingerprint"] = [anchor.fingerprint, fingerprint_now]
            names = self._changed_software(anchor, fingerprint_now)
            if names:
                evidence["changed"] = names
            why["dependency_change"] = (
                "the environment changed: " + ", ".join(names)
                if names
                else f"the fingerprint changed ({anchor.fingerprint} -> {fingerprint_now})"
            )
        else:
            why["dependency_change"] = (
                "same environment fingerprint as the anchor" if fingerprint_now else "no fingerprint recorded"
            )

        # model_change: a version the anchor never saw.
        versions_now = sorted(
            {k.version for w in span for k in w.keys if k.model == model and k.version is not None}
        )
        new_versions = [v for v in versions_now if v not in anchor.versions]
        holds["model_change"] = bool(new_versions) and bool(anchor.versions)
        if holds["model_change"]:
            evidence["versions"] = [list(anchor.versions), versions_now]
        why["model_change"] = (
            f"version {', '.join(anchor.versions)} -> {', '.join(new_versions)}"
            if holds["model_change"]
            else "same model version as the anchor"
        )

        # gpu: device time per call rose.
        gpu_then, gpu_now = base.gpu_per_call, current.gpu_per_call
        gpu_up = gpu_then is not None and gpu_now is not None and gpu_now >= (1 + thr) * gpu_then
        holds["gpu"] = gpu_up
        if gpu_now is not None:
            evidence["gpu_per_call_ms"] = [_ms(gpu_then), _ms(gpu_now)]
        why["gpu"] = (
            "device time per call rose"
            if gpu_up
            else (
                "device time per call did not rise" if gpu_now is not None else "no device time is measured"
            )
        )

        holds["more_work"] = True
        # The CPU figure the detector compares for this key: the process's CPU per inference for
        # the whole inference, so that the text agrees with a CPU regression's change.
        cpu_change = _fraction(
            self._value(current, "cpu", base, pooled=True), self._reference(base, "cpu", pooled=True)[0]
        )
        why["more_work"] = (
            f"the stage does more per call: CPU per call {cpu_change:+.0%}, "
            "same machine, environment, model and input size"
            if cpu_change is not None
            else "the key takes longer per call with the same machine, environment, model and input size"
        )
        cause = next(c for c in PRECEDENCE if holds[c])
        evidence["why"] = why[cause]
        evidence["candidates"] = {
            c: ("held, but " + f"{cause} comes first" if holds[c] else why[c])
            for c in PRECEDENCE
            if c != cause
        }
        evidence["candidates"]["memory_growth"] = "not a memory figure"
        return cause, {k: v for k, v in evidence.items() if v is not None}

    def _controls(
        self, model: str, stage: str | None, span: Sequence[Window], anchor: Baseline
    ) -> list[tuple[StageBaseline, KeyFigures]]:
        """The other stages of the model, neither above nor below ``stage``, with enough calls in
        ``span``: they ran on the same machine at the same time (the inference's are its stages)."""
        found = []
        for other in anchor.stages.values():
            if other.stage is None or other.stage == stage or other.cpu_per_call is None:
                continue
            if stage is None and "/" in other.stage:
                continue  # the inference's controls are its top-level stages
            if stage is not None and (_is_ancestor(other.stage, stage) or _is_ancestor(stage, other.stage)):
                continue
            figures = self._pool(span, model, other.stage)
            if figures.count >= MIN_WINDOW_CALLS:
                found.append((other, figures))
        return found

    def _inputs_software_or_model_changed(
        self, model: str, span: Sequence[Window], anchor: Baseline, process: ProcessFigures
    ) -> bool:
        thr = self.settings.threshold
        base = anchor.stage(None)
        now = self._pool(span, model, None)
        if (
            base is not None
            and base.size_per_call
            and now.size_per_call
            and now.size_per_call >= (1 + thr) * base.size_per_call
        ):
            return True
        fingerprint = process.fingerprints[-1] if process.fingerprints else None
        if anchor.fingerprint and fingerprint and fingerprint != anchor.fingerprint:
            return True
        versions = {k.version for w in span for k in w.keys if k.model == model and k.version is not None}
        return bool(anchor.versions) and not versions <= set(anchor.versions)

    def _own_work_grew(
        self,
        model: str,
        stage: str | None,
        span: Sequence[Window],
        anchor: Baseline,
        base: StageBaseline,
        current: KeyFigures,
    ) -> str | None:
        """Why the stage's own work grew beyond what contention explains, or None.

        Contention raises the CPU time of every stage a little (caches, SMT siblings) and that of
        stages whose helper threads spin a lot, but then their waiting grows faster still. A stage
        whose CPU per call grew ``1 + threshold`` times more than the other stages' (the median),
        without its off-CPU time outgrowing its CPU time, does more work of its own.
        """
        thr = self.settings.threshold
        if stage is None or not base.cpu_per_call or current.cpu_per_call is None:
            return None
        own = current.cpu_per_call / base.cpu_per_call
        off_then, off_now = base.off_cpu_per_call, current.off_cpu_per_call
        process = ProcessFigures.pool([(w.process, w.seconds) for w in span])
        if (
            off_then
            and off_now is not None
            and off_now / off_then >= OFF_CPU_OUTGROWS * own
            # A stage that does more work on a busy machine also waits more for a core: with other
            # software, another model or larger inputs, its waiting says nothing of spinning helpers.
            and not self._inputs_software_or_model_changed(model, span, anchor, process)
        ):
            return None  # spinning helpers: their waiting outgrew their CPU
        controls = []
        for other in anchor.stages.values():
            if other.stage is None or other.stage == stage or not other.cpu_per_call:
                continue
            if _is_ancestor(other.stage, stage) or _is_ancestor(stage, other.stage):
                continue
            now = self._pool(span, model, other.stage)
            if now.count >= MIN_WINDOW_CALLS and now.cpu_per_call is not None:
                controls.append(now.cpu_per_call / other.cpu_per_call)
        if not controls:
            return None
        control = statistics.median(controls)
        if own >= 1 + thr and own >= (1 + thr) * control:
            return (
                f"its CPU per call grew {own:.1f}x while the other stages' grew {control:.1f}x on the same "
                "machine: its own work grew"
            )
        return None

    @staticmethod
    def _rate(anchor: Baseline) -> float | None:
        inference = anchor.stage(None)
        return inference.calls_per_second if inference is not None else None

    def _queueing(self, model: str, stage: str | None, span: Sequence[Window], anchor: Baseline) -> bool:
        """Whether the key is (or its rise comes from) a queueing stage: one named ``queue`` or that
        waited most of its time in the anchor."""

        def is_queue(path: str | None) -> bool:
            if path is None:
                return False
            base = anchor.stage(path)
            return path.rsplit("/", 1)[-1] == "queue" or (
                base is not None and base.cpu_ratio is not None and base.cpu_ratio < 0.2
            )

        if stage is not None:
            return is_queue(stage)
        total = self._mean_delta(span, model, None, "wall", anchor)
        if not total or total <= 0:
            return False
        grown = sum(
            max(0.0, self._mean_delta(span, model, s, "wall", anchor) or 0.0)
            for s in anchor.stages
            if is_queue(s) and "/" not in (s or "")
        )
        return grown >= _EXPLAINED_SHARE * total

    def _changed_software(self, anchor: Baseline, fingerprint_now: str) -> list[str]:
        """The packages, BLAS, driver and Python that differ from the anchor's environment."""
        from .system.fingerprint import diff

        then = anchor.environment
        if then is None and anchor.fingerprint:
            then = self._stored("environment", anchor.fingerprint)
        now = self._stored("environment", fingerprint_now)
        if now is None:
            now = self._current_environment()
        if now is None or then is None or now.get("fingerprint") != fingerprint_now:
            return []
        names = []
        pools_then, pools_now = _thread_pools(then), _thread_pools(now)
        if pools_then != pools_now:
            # One line for the thread pools (a BLAS swapped for another reads as one change).
            names.append(
                f"thread pools {', '.join(pools_then) or '(none)'} -> {', '.join(pools_now) or '(none)'}"
            )
        for change in diff(then, now):
            path = change.path
            if not path.startswith(
                (
                    "packages.",
                    "python.version",
                    "gpu.",
                    "threads_env.",
                    "inferscope.",
                    "os.release",
                    "torch.",
                )
            ):
                continue
            label = path.removeprefix("packages.")
            old = "(none)" if change.old is None else change.old
            new = "(none)" if change.new is None else change.new
            names.append(f"{label} {old} -> {new}")
        return names

    # --- memory ------------------------------------------------------------------------------

    def _evaluate_memory(self, window: Window) -> None:
        models = sorted(self._anchors)
        if not models:
            return
        # The process's memory is charged to the model that served the most calls in its anchor.
        busiest = max(models, key=lambda m: getattr(self._anchors[m].stage(None), "count", 0))
        anchor = self._anchors[busiest]
        for metric, attribute in (("rss", "rss_bytes"), ("py_heap", "py_heap_bytes")):
            ref = getattr(anchor.process, attribute)
            now = getattr(window.process, attribute)
            if ref is None or now is None or ref <= 0:
                continue
            self._evaluate_memory_metric(busiest, metric, attribute, ref, now, window, anchor)

    def _memory_slope(self, attribute: str, start: float, end: float) -> tuple[float | None, list[Window]]:
        span = [w for w in self._span(start, end) if getattr(w.process, attribute) is not None]
        slope = theil_sen_slope([w.end_unix for w in span], [getattr(w.process, attribute) for w in span])
        return slope, span

    def _evaluate_memory_metric(
        self,
        model: str,
        metric: str,
        attribute: str,
        ref: float,
        now: float,
        window: Window,
        anchor: Baseline,
    ) -> None:
        thr = self.settings.threshold
        sustain = max(self.settings.sustain_seconds, 3 * self.settings.window_seconds)
        track = self._tracks.setdefault((model, None, metric), _Track())
        slope, span = self._memory_slope(attribute, window.end_unix - sustain, window.end_unix)
        # Growing: the fitted rise over one sustain period is at least a quarter of the threshold.
        growing = slope is not None and slope * sustain >= thr / 4 * ref
        if track.opened is not None:
            regression = track.opened.regression
            regression = replace(
                regression,
                current_value=now if growing else regression.current_value,
                change=(now if growing else regression.current_value) / regression.baseline_value - 1.0,
                evidence={
                    **regression.evidence,
                    "slope_mb_per_hour_now": _round((slope or 0.0) * _HOUR / _MB, 3),
                },
            )
            track.opened.regression = regression
            if growing:
                track.opened.clear_since = None
            elif track.opened.clear_since is None:
                track.opened.clear_since = window.start_unix
            elif window.end_unix - track.opened.clear_since + 1e-6 >= sustain:
                self._close(track, replace(regression, active=False))
                return
            self._stored("save_regression", self._service, regression)
            return
        if not (now > ref * (1 + thr) and now - ref >= MIN_MEMORY_GROWTH_BYTES and growing):
            track.since = None
            return
        if track.since is None:
            # The rise began with the first window of the span past a quarter of the threshold.
            track.since = next(
                (w.start_unix for w in span if getattr(w.process, attribute) > ref * (1 + thr / 4)),
                window.start_unix,
            )
        if window.end_unix - track.since + 1e-6 < self.settings.sustain_seconds:
            return
        stage, heap_share = (None, None)
        if metric == "py_heap":
            stage, heap_share = self._heap_stage(model, span, now - ref)
        evidence: dict[str, Any] = {
            "slope_mb_per_hour": _round((slope or 0.0) * _HOUR / _MB, 3),
            f"{metric}_mb": [_round(ref / _MB, 3), _round(now / _MB, 3)],
            "windows": len(span),
            "reference": "anchor",
            "why": (
                f"{'RSS' if metric == 'rss' else 'the Python heap'} grows "
                f"{(slope or 0.0) * _HOUR / _MB:.1f} MB per hour"
                + (
                    f"; stage {stage} allocated {heap_share:.0%} of it"
                    if stage and heap_share is not None
                    else ""
                )
            ),
            "candidates": {c: "memory figures are charged to memory_growth" for c in PRECEDENCE},
        }
        if metric == "rss":
            evidence["charged_to"] = (
                "the process (RSS cannot be charged to a stage: the allocator touches pages in "
                "whichever stage allocates next)"
            )
        regression = Regression(
            model=model,
            version=self._version(span, model),
            stage=stage,
            cause="memory_growth",
            metric=metric,
            baseline_value=ref,
            current_value=now,
            change=now / ref - 1.0,
            since=track.since,
            shape="trend",
            evidence=evidence,
            active=True,
        )
        track.opened = _Open(regression)
        self._stored("save_regression", self._service, regression)
        _log_regression(regression, opened=True)

    def _heap_stage(
        self, model: str, span: Sequence[Window], growth: float
    ) -> tuple[str | None, float | None]:
        per_stage: dict[str, float] = {}
        for w in span:
            for k in w.keys:
                if k.model == model and k.stage is not None:
                    per_stage[k.stage] = per_stage.get(k.stage, 0.0) + float(
                        k.counters.get("py_heap_change_bytes", 0.0)
                    )
        leaves = {s: v for s, v in per_stage.items() if not any(_is_ancestor(s, o) for o in per_stage)}
        if not leaves:
            return None, None
        stage, grown = max(leaves.items(), key=lambda item: item[1])
        total = sum(max(0.0, v) for v in leaves.values())
        if grown <= 0 or total <= 0 or grown < _EXPLAINED_SHARE * total:
            return None, None
        return stage, grown / total

    # --- waits for a core --------------------------------------------------------------------

    def _wait_exceeds(self, anchor: Baseline, wait: float | None, level: float, noise_units: float) -> bool:
        """Whether the canary's wait for a core per wake-up ``wait`` is above the anchor's by
        ``level`` and ``noise_units`` of its noise, and material: a request waits at least once for
        a core (the wake-up that starts it), so the rise counts when it adds ``level`` of the
        inference's own latency in the anchor."""
        ref = anchor.process.canary_wait_seconds
        inference = anchor.stage(None)
        latency = inference.quantiles.get("q") if inference is not None else None
        if wait is None or ref is None or not latency:
            return False
        rise = wait - ref
        return (
            wait >= SWITCHES_RATIO * ref
            and rise >= max(CANARY_WAIT_RISE, noise_units * anchor.process.canary_wait_noise)
            and rise >= level * latency
        )

    def _evaluate_wait(self, model: str, window: Window) -> None:
        """Contention that delays the calls without slowing them: each thread that wakes waits
        longer for a core before it runs, so a request starts later (and a saturated service
        serves fewer), while the time inside the tracked call stays flat. Raised on the process's
        figures, per model, as ``cpu_wait`` (the canary's wait for a core per wake-up)."""
        anchor = self._anchors[model]
        if anchor.process.canary_wait_seconds is None:
            return
        key = (model, None, "cpu_wait")
        track = self._tracks.get(key)
        served = any(k.model == model for k in window.keys)
        if track is None and not served:
            return
        track = self._tracks.setdefault(key, _Track())
        thr = self.settings.threshold
        wait = window.process.canary_wait_seconds
        sustain = max(self.settings.sustain_seconds, 2 * self.settings.window_seconds)
        if track.opened is not None:
            opened = track.opened
            if wait is not None:
                if self._wait_exceeds(anchor, wait, thr / 2, NOISE_UNITS):
                    opened.clear_since = None
                elif opened.clear_since is None:
                    opened.clear_since = window.start_unix
            if opened.clear_since is None:
                level = self._wait_level(self._span(window.end_unix - sustain, window.end_unix))
                if level is not None:
                    opened.regression = replace(
                        opened.regression,
                        current_value=level,
                        change=level / opened.regression.baseline_value - 1.0,
                    )
            elif window.end_unix - opened.clear_since + 1e-6 >= sustain:
                self._close(track, replace(opened.regression, active=False))
                return
            self._stored("save_regression", self._service, opened.regression)
            return
        if wait is None or not served:
            return
        exceeds = self._wait_exceeds(anchor, wait, thr, NOISE_UNITS)
        if not self._vote(track, exceeds, window.start_unix, window, f"{model} cpu_wait"):
            return
        assert track.since is not None
        span = self._span(track.since, window.end_unix)
        level = self._wait_level(span)
        if level is None or not self._wait_exceeds(anchor, level, thr, LEVEL_NOISE_UNITS):
            return
        self._open_wait(track, model, span, anchor, level)

    @staticmethod
    def _wait_level(span: Sequence[Window]) -> float | None:
        waits = [w.process.canary_wait_seconds for w in span if w.process.canary_wait_seconds is not None]
        return statistics.median(waits) if waits else None

    def _open_wait(
        self, track: _Track, model: str, span: Sequence[Window], anchor: Baseline, level: float
    ) -> None:
        assert track.since is not None
        pb = anchor.process
        ref = pb.canary_wait_seconds
        assert ref is not None
        process = ProcessFigures.pool([(w.process, w.seconds) for w in span])
        inference_base = anchor.stage(None)
        inference = self._pool(span, model, None)
        latency_then = inference_base.quantiles.get("q") if inference_base is not None else None
        latency_now = inference.quantile(self.settings.quantile)
        evidence: dict[str, Any] = {
            "canary_wait_ms": [_ms(ref), _ms(level)],
            "metric_ms": [_ms(latency_then), _ms(latency_now)],
            "calls_per_second": [
                _round(self._rate(anchor), 3),
                _round(inference.calls_per_second, 3),
            ],
        }
        signals = machine_signals(pb, process, evidence)
        moved = _machine_moved(pb, process)
        cause = "machine_change" if moved else "contention"
        rise = level - ref
        share = rise / latency_then if latency_then else None
        why = (
            f"a thread that wakes waits {level * 1e3:.2f} ms for a core (anchor {ref * 1e3:.2f} ms): "
            f"+{rise * 1e3:.2f} ms before each request runs"
            + (f", {share:.0%} of the inference's {self.settings.metric_name}" if share is not None else "")
        )
        if (
            latency_then
            and latency_now is not None
            and latency_now <= (1 + self.settings.threshold) * latency_then
        ):
            why += " (the calls themselves are not slower: the wait falls before them)"
        if moved:
            evidence["machine"] = moved
            why = "; ".join(moved) + "; " + why
        evidence["contention"] = signals
        others = [s for s in signals if not s.startswith("the canary's wait")]
        if others:
            why += "; " + "; ".join(others)
        evidence["why"] = why
        evidence["reference"] = "anchor"
        evidence["calls"] = inference.count
        evidence["windows"] = len(span)
        evidence["candidates"] = {
            c: "a wait for a core is the machine's, not the code's" for c in PRECEDENCE if c != cause
        }
        if moved:
            evidence["candidates"]["contention"] = "held, but machine_change comes first"
        else:
            evidence["candidates"]["machine_change"] = "same CPU model, CPU count and quota as the anchor"
        evidence["candidates"]["memory_growth"] = "not a memory figure"
        first = self._wait_level(span[: max(1, len(span) // 3)])
        shape = "step" if first is not None and first - ref >= 0.5 * rise else "trend"
        regression = Regression(
            model=model,
            version=self._version(span, model),
            stage=None,
            cause=cause,
            metric="cpu_wait",
            baseline_value=ref,
            current_value=level,
            change=level / ref - 1.0,
            since=track.since,
            shape=shape,
            evidence={k: v for k, v in evidence.items() if v is not None},
            active=True,
        )
        track.opened = _Open(regression)
        self._stored("save_regression", self._service, regression)
        _log_regression(regression, opened=True)

    # --- outputs -----------------------------------------------------------------------------

    def _publish(self) -> None:
        active = [t.opened.regression for t in self._tracks.values() if t.opened is not None]
        active.sort(key=lambda r: (r.model, r.stage or "", r.metric))
        self._published = (*active, *self._closed)
        self._tax = tuple(self._compute_tax())

    def _compute_tax(self) -> Iterable[TaxPoint]:
        if not self._history:
            return
        end = self._history[-1].end_unix
        span = self._span(end - max(self.settings.sustain_seconds, self.settings.window_seconds), end)
        for _, anchor in sorted(self._anchors.items()):
            point = tax_of(anchor, span)
            if point is not None:
                yield point

    def metric_points(self) -> dict[str, list[tuple[float, dict[str, str]]]]:
        """The points of ``inferscope.regression.active``, ``inferscope.tax.latency`` (attribute
        ``inferscope.quantile``: 0.5 or 0.95) and ``inferscope.tax.cpu`` (cores), for the exporters."""
        active: list[tuple[float, dict[str, str]]] = []
        for r in self._published:
            if r.active:
                active.append(
                    (1.0, _attributes(r.model, r.version, r.stage) | {"inferscope.regression.cause": r.cause})
                )
        latency: list[tuple[float, dict[str, str]]] = []
        cpu: list[tuple[float, dict[str, str]]] = []
        for point in self._tax:
            attributes = _attributes(point.model, point.version, None)
            for q, value in (("0.5", point.latency_p50_seconds), ("0.95", point.latency_p95_seconds)):
                if value is not None and math.isfinite(value):
                    latency.append((value, attributes | {"inferscope.quantile": q}))
            if point.cpu_cores is not None and math.isfinite(point.cpu_cores):
                cpu.append((point.cpu_cores, attributes))
        return {
            "inferscope.regression.active": active,
            "inferscope.tax.latency": latency,
            "inferscope.tax.cpu": cpu,
        }


def _thread_pools(environment: Mapping[str, Any]) -> list[str]:
    """The environment's native thread pools, one phrase each: ``blas openblas 0.3.31 (2 threads,
    pthreads, SkylakeX)``, sorted."""
    libraries = (environment.get("threadpools") or {}).get("libraries") or {}
    phrases = []
    for found in libraries.values():
        if not isinstance(found, Mapping):
            continue
        details = [f"{found['num_threads']} threads" if found.get("num_threads") is not None else None]
        details += [found.get("threading_layer"), found.get("architecture")]
        named = " ".join(str(found[k]) for k in ("user_api", "internal_api", "version") if found.get(k))
        shown = ", ".join(str(d) for d in details if d)
        phrases.append(f"{named} ({shown})" if shown else named)
    return sorted(phrases)


def _machine_moved(pb: ProcessBaseline, process: ProcessFigures) -> list[str]:
    """How where the process runs differs from the anchor's: CPU model, usable CPUs, CPU quota."""
    moved = []
    if pb.cpu_model and process.cpu_model and pb.cpu_model != process.cpu_model:
        moved.append(f"CPU model {pb.cpu_model} -> {process.cpu_model}")
    for label, then, now in (
        ("usable CPUs", pb.cpu_count, process.cpu_count),
        ("CPU quota (cores)", pb.cpu_quota_cores, process.cpu_quota_cores),
    ):
        if then is not None and now is not None and abs(now - then) > 0.01 * max(then, 1e-9):
            moved.append(f"{label} {then:g} -> {now:g}")
        elif (then is None) != (now is None) and label.startswith("CPU quota") and pb.cpu_model:
            moved.append(f"{label} {then} -> {now}")
    return moved


def machine_signals(pb: ProcessBaseline, process: ProcessFigures, evidence: dict[str, Any]) -> list[str]:
    """The process-wide signs that the machine gives the process less than in the anchor (waits
    for a core, CPU pressure, steal, throttling), each beyond its own noise; their figures go to
    ``evidence``. The performance gate asks the same of a run against its baseline."""
    signals: list[str] = []
    # Waits for a core that the scheduler counted (schedstat): the process's run-queue delay
    # per CPU second it ran, and the canary thread's wait per wake-up. Neither includes the GIL.
    # Each signal must rise beyond its own noise in the anchor, as the figures of a key must.
    for key, label, then, now, floor in (
        (
            "run_queue_per_cpu",
            "run-queue wait per CPU second",
            pb.run_queue_per_cpu,
            process.run_queue_per_cpu,
            max(RUN_QUEUE_RISE, NOISE_UNITS * pb.run_queue_per_cpu_noise),
        ),
        (
            "canary_wait_seconds",
            "the canary's wait for a core",
            pb.canary_wait_seconds,
            process.canary_wait_seconds,
            max(CANARY_WAIT_RISE, NOISE_UNITS * pb.canary_wait_noise),
        ),
    ):
        if now is None or then is None:
            continue
        evidence[key] = [_round(then, 6), _round(now, 6)]
        if now >= SWITCHES_RATIO * then and now - then >= floor:
            signals.append(f"{label} {then:.3g} -> {now:.3g}")
    for label, then, now, rise in (
        (
            "CPU pressure",
            pb.cpu_pressure,
            process.cpu_pressure,
            max(PRESSURE_RISE, NOISE_UNITS * pb.cpu_pressure_noise),
        ),
        (
            "CPU steal",
            pb.steal_fraction,
            process.steal_fraction,
            max(STEAL_RISE, NOISE_UNITS * pb.steal_fraction_noise),
        ),
        (
            "CFS throttling",
            pb.throttled_fraction,
            process.throttled_fraction,
            max(THROTTLED_RISE, NOISE_UNITS * pb.throttled_fraction_noise),
        ),
    ):
        if now is None:
            continue
        evidence[label.lower().replace(" ", "_")] = [_round(then, 4), _round(now, 4)]
        if now - (then or 0.0) >= rise and now >= 1.5 * (then or 0.0):
            signals.append(f"{label} {(then or 0.0):.0%} -> {now:.0%} of the time")
    return signals


def _waits_more(base: StageBaseline, current: KeyFigures, threshold: float) -> bool:
    """Whether the calling thread spends most of a key's rise off the CPU, its waiting grown
    ``OFF_CPU_OUTGROWS`` times faster than its CPU time: it waited for a core (or the GIL), where
    more of the same work makes both grow alike (BLAS helpers included)."""
    off_then, off_now = base.off_cpu_per_call, current.off_cpu_per_call
    cpu_then, cpu_now = base.cpu_per_call, current.cpu_per_call
    mean_then, mean_now = base.mean_seconds, current.mean_seconds
    if not off_then or off_now is None or not cpu_then or cpu_now is None or not mean_then or not mean_now:
        return False
    if mean_now <= mean_then:
        return False
    off_growth, cpu_growth = off_now / off_then, cpu_now / cpu_then
    return (
        off_growth >= 1 + threshold
        and off_growth >= OFF_CPU_OUTGROWS * cpu_growth
        and off_now - off_then >= 0.5 * (mean_now - mean_then)
    )


def tax_of(anchor: Baseline, windows: Sequence[Window]) -> TaxPoint | None:
    """What the anchor's model pays over ``windows`` against its anchor (None under
    ``MIN_WINDOW_CALLS`` calls). The rate is the calls over the time the windows span, so that the
    windows of several worker processes add up."""
    model = anchor.model
    base = anchor.stage(None)
    current = KeyFigures.pool(
        (k, w.seconds) for w in windows for k in w.keys if k.model == model and k.stage is None
    )
    if base is None or current.count < MIN_WINDOW_CALLS:
        return None

    def extra(q: float, name: str) -> float | None:
        then = base.quantiles.get(name)
        return None if then is None else current.duration.quantile(q) - then

    cpu_then: float | None
    cpu_now: float | None
    if base.process_cpu_per_call is not None and current.process_cpu_per_call is not None:
        cpu_then, cpu_now = base.process_cpu_per_call, current.process_cpu_per_call
    else:
        cpu_then, cpu_now = base.cpu_per_call, current.cpu_per_call
    mine = [w for w in windows if any(k.model == model for k in w.keys)]
    elapsed = max(w.end_unix for w in mine) - min(w.start_unix for w in mine)
    rate = current.count / elapsed if elapsed > 0 else None
    cores = None if cpu_then is None or cpu_now is None or rate is None else (cpu_now - cpu_then) * rate
    version = next(
        (k.version for w in reversed(mine) for k in w.keys if k.model == model and k.stage is None), None
    )
    return TaxPoint(model, version, extra(0.5, "p50"), extra(0.95, "p95"), cores, rate)


def _attributes(model: str, version: str | None, stage: str | None) -> dict[str, str]:
    from ._keys import MODEL_NAME, MODEL_VERSION, STAGE_NAME

    attributes = {MODEL_NAME: model}
    if version is not None:
        attributes[MODEL_VERSION] = version
    if stage is not None:
        attributes[STAGE_NAME] = stage
    return attributes


def _flatten_evidence(evidence: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Evidence as flat log-record attributes (OTel log attributes are primitives or lists of them)."""
    flat: dict[str, Any] = {}
    for key, value in evidence.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_evidence(value, name))
        elif isinstance(value, list | tuple):
            items = [v for v in value if v is not None]
            if items and all(isinstance(v, str) for v in items):
                flat[name] = [str(v) for v in items]
            elif items and all(isinstance(v, int | float) and not isinstance(v, bool) for v in items):
                flat[name] = [float(v) for v in value if v is not None]
            else:
                flat[name] = str(list(value))
        elif value is not None:
            flat[name] = value
    return flat


def describe(r: Regression) -> str:
    """One line: where, what, how much, the shape, the cause and why (the log records' message)."""
    where = f"{r.model}/{r.stage}" if r.stage else r.model
    if r.metric in ("rss", "py_heap"):
        figures = f"{r.baseline_value / _MB:.1f} MB -> {r.current_value / _MB:.1f} MB"
    else:
        figures = f"{r.baseline_value * 1e3:.3f} ms -> {r.current_value * 1e3:.3f} ms"
    why = r.evidence.get("why", "")
    return f"{where} {r.metric} {r.change:+.0%} ({figures}), {r.shape}, cause {r.cause}: {why}"


def _log_regression(r: Regression, *, opened: bool) -> None:
    extra = {
        "inferscope.regression.state": "open" if opened else "closed",
        "inferscope.model.name": r.model,
        "inferscope.regression.cause": r.cause,
        "inferscope.regression.metric": r.metric,
        "inferscope.regression.baseline_value": r.baseline_value,
        "inferscope.regression.current_value": r.current_value,
        "inferscope.regression.change": r.change,
        "inferscope.regression.since": r.since,
        "inferscope.regression.shape": r.shape,
        **_flatten_evidence(r.evidence, "inferscope.evidence"),
    }
    if r.version is not None:
        extra["inferscope.model.version"] = r.version
    if r.stage is not None:
        extra["inferscope.stage.name"] = r.stage
    if opened:
        _logger.warning("inferscope: regression opened: %s", describe(r), extra=extra)
    else:
        _logger.info("inferscope: regression closed: %s", describe(r), extra=extra)


# --- the process's detector --------------------------------------------------------------------

_DETECTOR: Detector | None = None


def set_detector(new: Detector | None) -> None:
    """Install the process's detector (the pipeline does, at configure time)."""
    global _DETECTOR
    _DETECTOR = new


def detector() -> Detector | None:
    """The process's detector, None while inferscope is not configured with windows."""
    return _DETECTOR


_PROVIDED = ("inferscope.regression.active", "inferscope.tax.latency", "inferscope.tax.cpu")


def _points(name: str) -> list[tuple[float, dict[str, str]]]:
    current = _DETECTOR
    return current.metric_points()[name] if current is not None else []


def install(settings: Any) -> Detector:
    """Run the process's detector on the windows with ``settings`` (an ``inferscope.Settings``); the
    pipeline calls it from ``configure()``. A detector with other settings is replaced, keeping the
    anchors it had; with the same settings it stays as it is."""
    global _DETECTOR
    from .export import spec
    from .history import HistoryStore
    from .system.fingerprint import cached_environment as environment
    from .windows import WINDOWS, add_window_listener, remove_window_listener

    wanted = DetectorSettings.of(settings)
    old = _DETECTOR
    if old is not None and old.settings == wanted:
        add_window_listener(old.on_window)
        return old
    new = Detector(wanted, store=HistoryStore(WINDOWS.recorder), environment=environment)
    if old is not None:
        remove_window_listener(old.on_window)
        if old.settings.quantile == wanted.quantile:
            new._anchors.update(old._anchors)
            new._anchor_loaded.update(old._anchor_loaded)
    _DETECTOR = new
    add_window_listener(new.on_window)
    for name in _PROVIDED:
        spec.register_provider(name, functools.partial(_points, name))
    return new


def _after_fork_in_child() -> None:
    if _DETECTOR is not None:
        _DETECTOR.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def regressions() -> list[Regression]:
    """The open regressions of this process, then the recently closed ones (newest first).

    >>> import inferscope
    >>> [r.cause for r in inferscope.regressions() if r.active]
    []
    """
    current = _DETECTOR
    return current.regressions() if current is not None else []
