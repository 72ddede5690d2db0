"""A model's history read back from the flight recorder: windows, baselines and regressions.

The recorder (recorder.py) stores rows; the detector and ``inferscope status`` want whole
:class:`~inferscope.windows.Window` objects, :class:`~inferscope.baseline.Baseline` objects and
:class:`~inferscope.detector.Regression` objects. This module turns one into the other, so that the
history of a model continues across restarts: its anchor is the first ``baseline_seconds`` the
recorder holds of it, whichever process wrote them.

Example::

    store = HistoryStore(FlightRecorder(path))
    anchor = store.load_anchor("fraud-service", "fraud")
    recent = store.windows("fraud-service", "fraud", since_unix=time.time() - 3600)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .baseline import Baseline, BaselineFormatError
from .windows import SCHEMA_VERSION, KeyWindow, ProcessWindow, Window

if TYPE_CHECKING:
    from .detector import Regression
    from .recorder import FlightRecorder

__all__ = ["ANCHOR", "HistoryStore", "regression_from_json", "regression_to_json"]

_logger = logging.getLogger("inferscope")

#: The name under which the recorder keeps a model's anchor baseline.
ANCHOR = "anchor"


def regression_to_json(regression: Regression) -> dict[str, Any]:
    """A regression as a JSON-ready dict (what the recorder's ``payload`` holds)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model": regression.model,
        "version": regression.version,
        "stage": regression.stage,
        "cause": regression.cause,
        "metric": regression.metric,
        "baseline_value": regression.baseline_value,
        "current_value": regression.current_value,
        "change": regression.change,
        "since": regression.since,
        "shape": regression.shape,
        "evidence": dict(regression.evidence),
        "active": regression.active,
    }


def regression_from_json(data: Mapping[str, Any]) -> Regression:
    """The regression of a ``regression_to_json`` dict."""
    from .detector import Regression

    return Regression(
        model=str(data["model"]),
        version=data.get("version"),
        stage=data.get("stage"),
        cause=str(data["cause"]),
        metric=str(data["metric"]),
        baseline_value=float(data["baseline_value"]),
        current_value=float(data["current_value"]),
        change=float(data["change"]),
        since=float(data["since"]),
        shape=str(data["shape"]),
        evidence=dict(data.get("evidence") or {}),
        active=bool(data["active"]),
    )


class HistoryStore:
    """Windows, baselines and regressions of the flight recorder, as the detector uses them.

    Every method returns what it could read (nothing, when the recorder cannot be read) and never
    raises for a storage failure, as the recorder itself.
    """

    def __init__(self, recorder: FlightRecorder | Callable[[], FlightRecorder | None]) -> None:
        #: The recorder, or a function that returns the one in force (None while it is off).
        self._recorder = recorder
        #: Where each (service, model)'s history begins, once found: it only moves when retention
        #: drops the oldest rollups, long after the anchor that needed it was taken.
        self._first_start: dict[tuple[str, str | None, str], float] = {}

    @property
    def recorder(self) -> FlightRecorder | None:
        """The recorder in force, None while there is none."""
        from .recorder import FlightRecorder

        found = self._recorder
        return found if isinstance(found, FlightRecorder) else found()

    # --- windows -----------------------------------------------------------------------------

    def windows(
        self,
        service: str | None,
        model: str,
        since_unix: float | None = None,
        until_unix: float | None = None,
        *,
        hourly: bool = False,
    ) -> list[Window]:
        """The stored windows of ``model`` whose ends fall in [since, until], oldest first: one
        Window per process and window, with that process's figures (for hourly rollups, one per
        hour with the figures of all processes together)."""
        recorder = self.recorder
        if recorder is None:
            return []
        rows = recorder.key_windows(
            model, service=service, since_unix=since_unix, until_unix=until_unix, hourly=hourly
        )
        if not rows:
            return []
        processes: dict[tuple[str, float, float, str, int], ProcessWindow] = {}
        for p in recorder.process_windows(
            service=service, since_unix=rows[0].end_unix, until_unix=rows[-1].end_unix, hourly=hourly
        ):
            processes[(p.service, p.start_unix, p.end_unix, p.host, p.pid)] = p.window
        grouped: dict[tuple[str, float, float, str, int], list[KeyWindow]] = {}
        for row in rows:
            grouped.setdefault((row.service, row.start_unix, row.end_unix, row.host, row.pid), []).append(
                row.window
            )
        return [
            Window(
                service_,
                start,
                end,
                processes.get((service_, start, end, host, pid), ProcessWindow()),
                tuple(keys),
            )
            for (service_, start, end, host, pid), keys in grouped.items()
        ]

    def first_windows(self, service: str | None, model: str, seconds: float) -> list[Window]:
        """The first ``seconds`` of the model's stored history (every version), oldest first."""
        recorder = self.recorder
        if recorder is None:
            return []
        known = (recorder.path, service, model)
        start = self._first_start.get(known)
        if start is None:
            start = recorder.first_start(model, service=service)
            if start is None:
                return []
            self._first_start[known] = start
        # Window boundaries need not fall on start + seconds: read a little past it, and keep the
        # windows up to the first one that completes the span.
        windows = self.windows(service, model, until_unix=start + 2 * seconds)
        for index, window in enumerate(windows):
            if window.end_unix - start >= seconds - 1e-6:
                return windows[: index + 1]
        return windows

    def environment(self, fingerprint: str) -> dict[str, Any] | None:
        """The environment recorded under ``fingerprint``."""
        recorder = self.recorder
        return None if recorder is None else recorder.environment(fingerprint)

    # --- baselines ---------------------------------------------------------------------------

    def save_baseline(self, baseline: Baseline, name: str = ANCHOR) -> bool:
        """Store ``baseline`` as the model's ``name`` baseline (the anchor by default)."""
        recorder = self.recorder
        return recorder is not None and recorder.save_baseline(
            baseline.service or "",
            baseline.model,
            name,
            baseline.to_json() | {"schema_version": SCHEMA_VERSION},
            fingerprint=baseline.fingerprint,
        )

    def load_anchor(self, service: str | None, model: str, name: str = ANCHOR) -> Baseline | None:
        """The stored ``name`` baseline of the model (of any service when ``service`` is None)."""
        recorder = self.recorder
        if recorder is None:
            return None
        for record in recorder.baselines(service=service, model=model, name=name):
            payload = record["payload"]
            if payload.get("schema_version") != SCHEMA_VERSION:
                _logger.warning(
                    "inferscope: the stored %s baseline of %r has schema version %r (this inferscope "
                    "reads %d): it is taken again",
                    name,
                    model,
                    payload.get("schema_version"),
                    SCHEMA_VERSION,
                )
                continue
            try:
                return Baseline.from_json(payload)
            except BaselineFormatError as error:
                _logger.warning(
                    "inferscope: the stored %s baseline of %r is unreadable: %s", name, model, error
                )
        return None

    def baselines(self, service: str | None = None, name: str = ANCHOR) -> list[Baseline]:
        """Every stored ``name`` baseline, of one service or of all."""
        recorder = self.recorder
        if recorder is None:
            return []
        found = []
        for record in recorder.baselines(service=service, name=name):
            payload = record["payload"]
            if payload.get("schema_version") == SCHEMA_VERSION:
                try:
                    found.append(Baseline.from_json(payload))
                except BaselineFormatError:
                    continue
        return found

    # --- regressions -------------------------------------------------------------------------

    def save_regression(self, service: str, regression: Regression) -> bool:
        """Store a regression, or update it as it evolves and closes."""
        recorder = self.recorder
        return recorder is not None and recorder.save_regression(
            service,
            regression.model,
            regression.version,
            regression.stage,
            regression.metric,
            regression.since,
            regression.cause,
            regression.active,
            regression_to_json(regression),
        )

    def regressions(
        self, service: str | None = None, model: str | None = None, *, since_unix: float | None = None
    ) -> list[Regression]:
        """Stored regressions, newest update first."""
        recorder = self.recorder
        if recorder is None:
            return []
        found = []
        for record in recorder.regressions(service=service, model=model, since_unix=since_unix):
            try:
                found.append(regression_from_json(record["payload"]))
            except (KeyError, TypeError, ValueError):
                continue
        return found


def models_of(windows: Sequence[Window]) -> list[str]:
    """The models that have calls in ``windows``, sorted."""
    return sorted({k.model for w in windows for k in w.keys})
