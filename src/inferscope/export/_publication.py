"""What one worker of a pre-fork server publishes, and how publications merge (export/multiworker.py).

A :class:`Publication` is a worker's aggregates at one moment: per series, the exponential
histograms (duration, CPU time, GPU time), the per-call counters, abandoned generators and a few
exemplars; the drop and error counts; and the worker's own gauges. Series are identified by what
their key stands for, not by the key's number, which differs between workers. Encoded, it is a
small binary header, a JSON header, then the histograms as the flight recorder's blobs.

>>> total = Publication()
>>> total.merge(Publication.decode(Publication.of_view(aggregator.view()).encode()))  # doctest: +SKIP
>>> total.view().series  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from opentelemetry.sdk.metrics import Exemplar

from .._keys import KeyInfo
from .._records import COUNTER_SLOTS
from ..aggregator import AggregateView, Series
from ..histogram import Histogram
from .traces import ExemplarStore

__all__ = ["Publication", "SeriesIdentity"]

_MAGIC = b"ISMW"
_FORMAT = 1
_HEADER = struct.Struct("<4sBI")  # magic, format, length of the JSON header
#: The newest exemplars kept per series in a publication.
_EXEMPLARS_PER_SERIES = 8


#: What identifies a series across workers, whose key numbers differ: everything its key stands
#: for, and its error type.
SeriesIdentity = tuple[
    str, "str | None", "str | None", "str | None", tuple[tuple[str, str], ...], bool, "str | None"
]


@dataclass
class _SeriesData:
    duration: Histogram
    cpu: Histogram | None
    gpu: Histogram | None
    abandoned: int
    counters: np.ndarray
    cpu_wall_seconds: float
    exemplars: list[Exemplar]

    def merge(self, other: _SeriesData) -> None:
        self.duration.merge(other.duration)
        self.cpu = _merged_optional(self.cpu, other.cpu)
        self.gpu = _merged_optional(self.gpu, other.gpu)
        self.abandoned += other.abandoned
        self.counters = self.counters + other.counters
        self.cpu_wall_seconds += other.cpu_wall_seconds
        if other.exemplars:
            newest = sorted([*self.exemplars, *other.exemplars], key=lambda e: e.time_unix_nano)
            self.exemplars = newest[-_EXEMPLARS_PER_SERIES:]


def _merged_optional(mine: Histogram | None, other: Histogram | None) -> Histogram | None:
    if other is None:
        return mine
    if mine is None:
        return other.copy()
    mine.merge(other)
    return mine


@dataclass
class Publication:
    """What one worker published (or, merged, what several did): counts that only grow, and the
    worker's current gauges."""

    generation: str = ""
    slot: int = -1
    pid: int = 0
    written_unix_nano: int = 0
    start_time_unix_nano: int = 0
    series: dict[SeriesIdentity, _SeriesData] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    spans_dropped: dict[str, int] = field(default_factory=dict)
    keys_overflowed: int = 0
    internal_errors: int = 0
    #: Per metric name, (value, attributes) of the signals sampled in the worker (its gauges).
    signals: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    #: In ``retired.data``: per slot, the generations already folded into it, newest last.
    folded: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def of_view(
        cls,
        view: AggregateView,
        *,
        exemplars: ExemplarStore | None = None,
        signals: Mapping[str, list[tuple[float, dict[str, Any]]]] | None = None,
        slot: int = -1,
        generation: str = "",
    ) -> Publication:
        """A worker's aggregates as it publishes them."""
        publication = cls(
            generation=generation,
            slot=slot,
            pid=os.getpid(),
            written_unix_nano=time.time_ns(),
            start_time_unix_nano=view.start_time_unix_nano,
            dropped={reason: int(n) for reason, n in view.dropped.items()},
            spans_dropped={reason: int(n) for reason, n in view.spans_dropped.items()},
            keys_overflowed=int(view.keys_overflowed),
            internal_errors=int(view.internal_errors),
            signals=dict(signals or {}),
        )
        for series in view.series:
            data = _SeriesData(
                series.duration,
                series.cpu,
                series.gpu,
                int(series.abandoned),
                series.counters,
                float(series.cpu_wall_seconds),
                exemplars.since(series.info.key, 0)[-_EXEMPLARS_PER_SERIES:]
                if exemplars is not None and series.error_id == 0
                else [],
            )
            publication._add(_identity(series.info, series.error_type), data)
        return publication

    def _add(self, identity: SeriesIdentity, data: _SeriesData) -> None:
        found = self.series.get(identity)
        if found is None:
            self.series[identity] = data
        else:
            found.merge(data)

    def merge(self, other: Publication, *, consume: bool = False) -> None:
        """Add ``other``'s counts to this one, in place. ``other`` is left as it was, unless
        ``consume`` says that it is not used again (its histograms are then taken, not copied)."""
        for identity, data in other.series.items():
            self._add(identity, data if consume else _copy_series(data))
        for mine, theirs in ((self.dropped, other.dropped), (self.spans_dropped, other.spans_dropped)):
            for reason, n in theirs.items():
                mine[reason] = mine.get(reason, 0) + n
        self.keys_overflowed += other.keys_overflowed
        self.internal_errors += other.internal_errors
        if other.start_time_unix_nano and (
            not self.start_time_unix_nano or other.start_time_unix_nano < self.start_time_unix_nano
        ):
            self.start_time_unix_nano = other.start_time_unix_nano

    def view(self, exemplars: ExemplarStore | None = None) -> AggregateView:
        """The merged counts as the exporters read them. Each series gets a key of its own numbered
        from 0 (``exemplars``, cleared first, receives the series' exemplars under those keys)."""
        if exemplars is not None:
            exemplars.clear()
        series: list[Series] = []
        for key, (identity, data) in enumerate(sorted(self.series.items(), key=_sort_key)):
            kind, model, version, stage, attributes, overflow, error_type = identity
            info = KeyInfo(key, kind, model, version, stage, attributes, overflow)
            series.append(
                Series(
                    info,
                    0 if error_type is None else 1,
                    error_type,
                    data.duration,
                    data.cpu,
                    data.abandoned,
                    data.counters,
                    data.cpu_wall_seconds,
                    data.gpu,
                )
            )
            if exemplars is not None:
                for exemplar in data.exemplars:
                    exemplars.add(key, exemplar)
        return AggregateView(
            tuple(series),
            dict(self.dropped),
            self.keys_overflowed,
            self.internal_errors,
            self.start_time_unix_nano or time.time_ns(),
            dict(self.spans_dropped),
        )

    def encode(self) -> bytes:
        """The publication as bytes: a small binary header, a JSON header, then the histograms as
        the flight recorder's blobs."""
        from ..recorder import histogram_to_blob

        blobs: list[bytes] = []

        def blob(hist: Histogram | None) -> int:
            if hist is None:
                return -1
            blobs.append(histogram_to_blob(hist))
            return len(blobs) - 1

        rows = []
        for identity, data in self.series.items():
            kind, model, version, stage, attributes, overflow, error_type = identity
            rows.append(
                [
                    kind,
                    model,
                    version,
                    stage,
                    [list(pair) for pair in attributes],
                    overflow,
                    error_type,
                    data.abandoned,
                    [int(c) for c in data.counters],
                    data.cpu_wall_seconds,
                    blob(data.duration),
                    blob(data.cpu),
                    blob(data.gpu),
                    [[e.trace_id, e.span_id, e.value, e.time_unix_nano] for e in data.exemplars],
                ]
            )
        header = {
            "generation": self.generation,
            "slot": self.slot,
            "pid": self.pid,
            "written_unix_nano": self.written_unix_nano,
            "start_time_unix_nano": self.start_time_unix_nano,
            "dropped": self.dropped,
            "spans_dropped": self.spans_dropped,
            "keys_overflowed": self.keys_overflowed,
            "internal_errors": self.internal_errors,
            "signals": self.signals,
            "folded": {str(slot): generations for slot, generations in self.folded.items()},
            "series": rows,
            "blobs": [len(b) for b in blobs],
        }
        text = json.dumps(header, separators=(",", ":"), default=_json_number).encode()
        return b"".join([_HEADER.pack(_MAGIC, _FORMAT, len(text)), text, *blobs])

    @classmethod
    def decode(cls, data: bytes) -> Publication:
        """The publication that ``encode`` wrote; ValueError for anything else."""
        from ..recorder import histogram_from_blob

        magic, form, length = _HEADER.unpack_from(data)
        if magic != _MAGIC or form != _FORMAT:
            raise ValueError(f"not an inferscope publication of format {_FORMAT}")
        start = _HEADER.size
        header = json.loads(data[start : start + length])
        position = start + length
        histograms: list[Histogram] = []
        for size in header["blobs"]:
            histograms.append(histogram_from_blob(data[position : position + size]))
            position += size

        def hist(index: int) -> Histogram | None:
            return None if index < 0 else histograms[index]

        publication = cls(
            generation=header["generation"],
            slot=int(header["slot"]),
            pid=int(header["pid"]),
            written_unix_nano=int(header["written_unix_nano"]),
            start_time_unix_nano=int(header["start_time_unix_nano"]),
            dropped={k: int(v) for k, v in header["dropped"].items()},
            spans_dropped={k: int(v) for k, v in header["spans_dropped"].items()},
            keys_overflowed=int(header["keys_overflowed"]),
            internal_errors=int(header["internal_errors"]),
            signals={
                name: [(float(value), dict(attrs)) for value, attrs in points]
                for name, points in header["signals"].items()
            },
            folded={int(slot): list(gens) for slot, gens in header["folded"].items()},
        )
        for row in header["series"]:
            (kind, model, version, stage, attributes, overflow, error_type) = row[:7]
            abandoned, counters, cpu_wall, duration, cpu, gpu, exemplars = row[7:]
            identity: SeriesIdentity = (
                kind,
                model,
                version,
                stage,
                tuple((str(k), str(v)) for k, v in attributes),
                bool(overflow),
                error_type,
            )
            counts = np.zeros(COUNTER_SLOTS, np.int64)
            counts[: len(counters)] = counters[:COUNTER_SLOTS]
            duration_histogram = hist(duration)
            if duration_histogram is None:
                continue
            publication._add(
                identity,
                _SeriesData(
                    duration_histogram,
                    hist(cpu),
                    hist(gpu),
                    int(abandoned),
                    counts,
                    float(cpu_wall),
                    [
                        Exemplar({}, float(value), int(at), int(span_id), int(trace_id))
                        for trace_id, span_id, value, at in exemplars
                    ],
                ),
            )
        return publication


def _json_number(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _identity(info: KeyInfo, error_type: str | None) -> SeriesIdentity:
    return (info.kind, info.model, info.version, info.stage, info.attributes, info.overflow, error_type)


def _sort_key(item: tuple[SeriesIdentity, _SeriesData]) -> tuple[str, ...]:
    return tuple("" if part is None else str(part) for part in item[0])


def _copy_series(data: _SeriesData) -> _SeriesData:
    return _SeriesData(
        data.duration.copy(),
        None if data.cpu is None else data.cpu.copy(),
        None if data.gpu is None else data.gpu.copy(),
        data.abandoned,
        data.counters.copy(),
        data.cpu_wall_seconds,
        list(data.exemplars),
    )
