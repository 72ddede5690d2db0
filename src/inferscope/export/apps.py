"""``/metrics`` apps to mount in the application's own ASGI or WSGI app, as
``prometheus_client.make_asgi_app`` does.

They serve what the Prometheus endpoint serves: with ``multiprocess=True``, one merged view of
every worker of the server, whichever worker answers the request; otherwise this process's
aggregates. The exposition format is negotiated from the ``Accept`` header as prometheus_client
does it: the Prometheus text format by default, OpenMetrics (with exemplars of the spans inferscope
kept) when the scraper asks for ``application/openmetrics-text``, gzip when it accepts it.

Example (FastAPI)::

    app = FastAPI()
    app.mount("/metrics", inferscope.make_asgi_app())
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric as PrometheusMetric

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from ..config import Settings
    from .prometheus import PrometheusCollector

__all__ = ["make_asgi_app", "make_wsgi_app"]


class _CurrentCollector:
    """Collects with the settings in force at each scrape: a ``configure()`` after mounting the app
    (or the workers' own configuration after fork) is followed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: tuple[Settings, PrometheusCollector] | None = None

    def describe(self) -> list[PrometheusMetric]:
        return []  # registration must not collect (which drains the ring)

    def collect(self) -> Iterable[PrometheusMetric]:
        collector = self._collector()
        return [] if collector is None else collector.collect()

    def _collector(self) -> PrometheusCollector | None:
        from .. import _pipeline
        from ..config import load_settings

        _pipeline._start_deferred()
        settings = _pipeline.current_settings()
        if settings is None:
            settings = load_settings({})
        with self._lock:
            if self._built is not None and self._built[0] is settings:
                return self._built[1]
            collector = _build(settings, _pipeline)
            self._built = (settings, collector)
            return collector


def _build(settings: Settings, pipeline: Any) -> PrometheusCollector:
    from ..counters import counter_metrics
    from .multiworker import merged_collector
    from .prometheus import PrometheusCollector

    exports = pipeline._exports
    resource = exports.resource if exports is not None else None
    if settings.multiprocess:
        return merged_collector(settings, resource)
    return PrometheusCollector(
        pipeline.collect_view,
        settings.histogram_boundaries,
        counters=counter_metrics(settings.counter_mask),
        resource=resource,
    )


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_CurrentCollector())  # type: ignore[arg-type]
    return registry


def make_asgi_app() -> Any:
    """An ASGI app that serves inferscope's metrics, to mount in your own app.

    >>> app.mount("/metrics", inferscope.make_asgi_app())  # doctest: +SKIP
    """
    return prometheus_client.make_asgi_app(_registry())


def make_wsgi_app() -> WSGIApplication:
    """A WSGI app that serves inferscope's metrics, to mount in your own app (Flask, Django).

    >>> from werkzeug.middleware.dispatcher import DispatcherMiddleware  # doctest: +SKIP
    >>> metrics = {"/metrics": inferscope.make_wsgi_app()}  # doctest: +SKIP
    >>> app.wsgi_app = DispatcherMiddleware(app.wsgi_app, metrics)  # doctest: +SKIP
    """
    app: WSGIApplication = prometheus_client.make_wsgi_app(_registry())
    return app
