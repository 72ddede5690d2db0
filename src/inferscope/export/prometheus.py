"""Aggregates → Prometheus metric families, and the ``/metrics`` HTTP endpoint that serves them.

Prometheus scrapes a :class:`PrometheusCollector` registered on a private ``CollectorRegistry``
(:func:`start_prometheus_server`); each scrape reads the aggregates afresh, with explicit buckets,
exemplars of kept spans on OpenMetrics scrapes, sampled signals and ``target_info``. The metric
names and the per-series helpers come from ``export/points.py``; labels follow the standard
OTel-to-Prometheus conversion (:func:`prometheus_label_name`).

>>> collector = PrometheusCollector(aggregator.view, [0.1, 1.0])  # doctest: +SKIP
>>> server = start_prometheus_server(collector, port=0)  # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric as PrometheusMetric
from prometheus_client.samples import Exemplar as PrometheusExemplar
from prometheus_client.utils import floatToGoString

from .._process_cpu import OWN_THREADS
from .._selflog import RateLimitedLog
from ..counters import CounterMetric
from . import spec as _spec
from .points import (
    _HISTOGRAMS,
    DROP_REASON,
    INFERENCE_ABANDONED,
    INFERENCE_CPU_TIME,
    INFERENCE_DURATION,
    KEYS_OVERFLOWED,
    RECORDS_DROPPED,
    SDK_ERRORS,
    SPANS_DROPPED,
    STAGE_CPU_TIME,
    STAGE_DURATION,
    STAGE_GPU_TIME,
    _check_boundaries,
    _merged,
    _provided_signals,
    _series_attributes,
    series_counters,
)
from .traces import EXEMPLARS, ExemplarStore

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from ..aggregator import AggregateView
    from ..histogram import Histogram

__all__ = [
    "METRICS_PATHS",
    "PrometheusCollector",
    "PrometheusServer",
    "prometheus_label_name",
    "start_prometheus_server",
    "target_info",
]

_logger = logging.getLogger("inferscope")

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_label_name(attribute: str) -> str:
    """The Prometheus label for an OTel attribute name, as the standard conversion spells it."""
    name = _INVALID_LABEL_CHARS.sub("_", attribute)
    if name[:1].isdigit():
        name = "key_" + name
    return name


def _label_value(value: str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _labels(attrs: Mapping[str, str | bool]) -> dict[str, str]:
    labels: dict[str, str] = {}
    # Two attributes that sanitize to the same label are joined with ";" (sorted by attribute name).
    for key in sorted(attrs):
        label = prometheus_label_name(key)
        value = _label_value(attrs[key])
        labels[label] = f"{labels[label]};{value}" if label in labels else value
    return labels


class PrometheusCollector:
    """A ``prometheus_client`` custom collector over the aggregates, with explicit buckets.

    Each scrape also samples ``signals``: by default the process, host, container and GPU signals
    of this machine (``system/host.py``) and the provider metrics of the specification (the tax
    meter's). With a ``resource``, its attributes are served as ``target_info``, as the OTel
    Prometheus conversion does, so that a query can join on service and environment fingerprint.

    >>> registry = CollectorRegistry()
    >>> registry.register(PrometheusCollector(aggregator.view, boundaries=[0.01, 0.1, 1.0]))  # doctest: +SKIP
    """

    def __init__(
        self,
        source: Callable[[], AggregateView],
        boundaries: Sequence[float],
        extra_counts: Callable[[], Mapping[str, int]] | None = None,
        counters: Sequence[CounterMetric] = (),
        exemplars: ExemplarStore | None = EXEMPLARS,
        *,
        signals: Sequence[_spec.Signal] | None = None,
        resource: Resource | None = None,
    ) -> None:
        if signals is None:
            from ..system.host import system_signals

            signals = [*system_signals(), *_provided_signals()]
        #: What each scrape samples besides the aggregates.
        self.signals = tuple(signal for signal in signals if signal.spec.prometheus)
        self.resource = resource
        self._source = source
        self.counters = tuple(counters)
        #: The kept spans whose exemplars the duration buckets carry (OpenMetrics scrapes only).
        self.exemplars = exemplars
        self.boundaries = _check_boundaries(boundaries)
        self._le = [floatToGoString(b) for b in self.boundaries]  # type: ignore[no-untyped-call]
        self._extra_counts = extra_counts
        self._log = RateLimitedLog(_logger, per_message=False)

    def describe(self) -> list[PrometheusMetric]:
        # Returning nothing keeps registration from calling collect() (which drains the ring).
        return []

    def collect(self) -> Iterable[PrometheusMetric]:
        try:
            return self._collect()
        except Exception:
            self._log.warning("inferscope: collecting Prometheus metrics failed", exc_info=True)
            return []

    def _collect(self) -> list[PrometheusMetric]:
        view = self._source()
        histograms: dict[str, list[tuple[dict[str, str], Histogram, list[Exemplar]]]] = {
            name: [] for name in _HISTOGRAMS
        }
        abandoned: list[tuple[dict[str, str], int]] = []
        per_series: dict[str, tuple[CounterMetric, list[tuple[dict[str, str], int]]]] = {}
        for series in view.series:
            labels = _labels(_series_attributes(series))
            is_stage = series.info.kind == "stage"
            if series.duration.count > 0:
                exemplars = (
                    self.exemplars.since(series.info.key, 0)
                    if self.exemplars is not None and series.error_id == 0
                    else []
                )
                histograms[STAGE_DURATION if is_stage else INFERENCE_DURATION].append(
                    (labels, series.duration, exemplars)
                )
            if series.cpu is not None and series.cpu.count > 0:
                histograms[STAGE_CPU_TIME if is_stage else INFERENCE_CPU_TIME].append(
                    (labels, series.cpu, [])
                )
            if series.gpu is not None and series.gpu.count > 0 and is_stage:
                histograms[STAGE_GPU_TIME].append((labels, series.gpu, []))
            if not is_stage and series.abandoned > 0:
                abandoned.append((labels, int(series.abandoned)))
            for name, attrs, total, described in series_counters(series, self.counters):
                per_series.setdefault(name, (described, []))[1].append((_labels(attrs), total))

        families: list[PrometheusMetric] = []
        for name, (described, totals) in per_series.items():
            families.append(self._counter_family(name, totals, described))
        for name, rows in histograms.items():
            if rows:
                families.append(self._histogram_family(name, rows))
        if abandoned:
            families.append(self._counter_family(INFERENCE_ABANDONED, abandoned))
        families.append(
            self._counter_family(
                RECORDS_DROPPED, [({DROP_REASON: r}, int(n)) for r, n in view.dropped.items()]
            )
        )
        if view.spans_dropped:
            families.append(
                self._counter_family(
                    SPANS_DROPPED, [({DROP_REASON: r}, int(n)) for r, n in view.spans_dropped.items()]
                )
            )
        families.append(self._counter_family(KEYS_OVERFLOWED, [({}, int(view.keys_overflowed))]))
        families.append(self._counter_family(SDK_ERRORS, [({}, int(view.internal_errors))]))
        if self._extra_counts is not None:
            for name, total in self._extra_counts().items():
                families.append(self._counter_family(name, [({}, int(total))]))
        families += self._signal_families()
        if self.resource is not None:
            families.append(target_info(self.resource))
        return families

    def _signal_families(self) -> list[PrometheusMetric]:
        families: list[PrometheusMetric] = []
        for signal in self.signals:
            observations = signal.observe()  # guarded: never raises
            if not observations:
                continue
            entry = signal.spec
            rows = [(_prometheus_labels(o.attributes or {}), float(o.value)) for o in observations]
            label_names = sorted({label for labels, _ in rows for label in labels})
            family: CounterMetricFamily | GaugeMetricFamily
            if entry.kind == "counter":
                family = CounterMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
            else:
                family = GaugeMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
            for labels, value in rows:
                family.add_metric([labels.get(n, "") for n in label_names], value)
            families.append(family)
        return families

    def _histogram_family(
        self, name: str, rows: list[tuple[dict[str, str], Histogram, list[Exemplar]]]
    ) -> PrometheusMetric:
        label_names = sorted({label for labels, _, _ in rows for label in labels})
        grouped: dict[tuple[str, ...], tuple[list[Histogram], list[Exemplar]]] = {}
        for labels, histogram, exemplars in rows:
            # Every sample of a family carries the same label names; absent ones are "".
            group, found = grouped.setdefault(tuple(labels.get(n, "") for n in label_names), ([], []))
            group.append(histogram)
            found.extend(exemplars)
        entry = _spec.get(name)
        family = HistogramMetricFamily(
            entry.prometheus_name, entry.description, labels=label_names, unit=_PROMETHEUS_SECONDS
        )
        for values, (group, exemplars) in grouped.items():
            histogram = _merged(group)
            cumulative = list(accumulate(int(c) for c in histogram.explicit_bucket_counts(self.boundaries)))
            counts = [*cumulative[:-1], int(histogram.count)]
            newest = self._bucket_exemplars(exemplars)
            buckets: list[Any] = []
            for i, (le, n) in enumerate(zip([*self._le, "+Inf"], counts, strict=True)):
                exemplar = newest.get(i)
                buckets.append((le, float(n)) if exemplar is None else (le, float(n), exemplar))
            family.add_metric(list(values), buckets, float(histogram.sum))
        return family

    def _bucket_exemplars(self, exemplars: Sequence[Exemplar]) -> dict[int, PrometheusExemplar]:
        """Per bucket index, the newest exemplar whose value falls in it, as OpenMetrics carries it:
        the trace and span id as hex labels, the value in seconds, the time in seconds."""
        newest: dict[int, Exemplar] = {}
        for exemplar in exemplars:
            index = bisect.bisect_left(self.boundaries, exemplar.value)  # a bucket's le is inclusive
            found = newest.get(index)
            if found is None or exemplar.time_unix_nano > found.time_unix_nano:
                newest[index] = exemplar
        return {
            index: PrometheusExemplar(
                {"trace_id": f"{e.trace_id:032x}", "span_id": f"{e.span_id:016x}"},
                float(e.value),
                e.time_unix_nano / 1e9,
            )
            for index, e in newest.items()
            if e.trace_id and e.span_id
        }

    def _counter_family(
        self, name: str, rows: list[tuple[dict[str, str], int]], described: CounterMetric | None = None
    ) -> PrometheusMetric:
        label_names = sorted({label for labels, _ in rows for label in labels})
        totals: dict[tuple[str, ...], int] = {}
        for labels, total in rows:
            values = tuple(labels.get(n, "") for n in label_names)
            totals[values] = totals.get(values, 0) + total
        entry = _spec.get(name)
        family: CounterMetricFamily | GaugeMetricFamily
        if entry.kind == "counter":
            family = CounterMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
        else:
            # A change that can go either way (memory) is a gauge of the running total in Prometheus.
            family = GaugeMetricFamily(entry.prometheus_name, entry.description, labels=label_names)
        for values, total in totals.items():
            family.add_metric(list(values), float(total))
        return family


_PROMETHEUS_SECONDS = "seconds"
#: The paths the endpoint answers; any other is a 404.
METRICS_PATHS = frozenset({"/metrics", "/metrics/"})


def target_info(resource: Resource) -> PrometheusMetric:
    """The resource as Prometheus's ``target_info`` (value 1, one label per resource attribute),
    as the OTel-to-Prometheus conversion spells it."""
    return InfoMetricFamily("target", "Target metadata", value=_prometheus_labels(resource.attributes))


def _prometheus_labels(attributes: Mapping[str, Any]) -> dict[str, str]:
    return _labels({key: _resource_value(value) for key, value in attributes.items()})


def _resource_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _metrics_only(app: WSGIApplication) -> WSGIApplication:
    """``app`` on ``/metrics``; 404 on every other path."""

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in METRICS_PATHS:
            served: Iterable[bytes] = app(environ, start_response)
            return served
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"Not Found: inferscope serves metrics on /metrics\n"]

    return serve


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for each scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class PrometheusServer:
    """A running ``/metrics`` endpoint; ``port`` is the bound port (useful with port 0)."""

    port: int
    host: str
    registry: CollectorRegistry
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def socket_close_in_child(self) -> None:
        """In a forked child: close this process's copy of the listening socket (the parent's stays open)."""
        self._server.socket.close()

    def shutdown(self, timeout_millis: float = 5_000) -> None:
        """Stop serving and close the socket. Idempotent."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout_millis / 1e3)


def start_prometheus_server(
    collector: PrometheusCollector, host: str = "127.0.0.1", port: int = 9464
) -> PrometheusServer:
    """Serve ``collector`` on ``http://host:port/metrics`` from a daemon thread; other paths get 404.

    It uses its own ``CollectorRegistry``, never prometheus_client's global one. Raises OSError
    when the address cannot be resolved or bound.

    >>> collector = PrometheusCollector(aggregator.view, [0.1, 1.0])  # doctest: +SKIP
    >>> server = start_prometheus_server(collector, port=0)  # doctest: +SKIP
    >>> server.shutdown()  # doctest: +SKIP
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # The address family of the host (an IPv6 literal, say), as prometheus_client picks it.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingWSGIServer):
        address_family = family

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            # A scrape's CPU is inferscope's own, not the inferences' (_process_cpu.OWN_THREADS).
            with OWN_THREADS.running():
                super().process_request_thread(request, client_address)

    server = make_server(
        str(sockaddr[0]), port, _metrics_only(make_wsgi_app(registry)), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="inferscope-prometheus", daemon=True)
    thread.start()
    return PrometheusServer(
        port=int(server.server_port), host=host, registry=registry, _server=server, _thread=thread
    )
