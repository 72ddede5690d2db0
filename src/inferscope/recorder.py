"""The flight recorder: windows, environment fingerprints, baselines and regressions, in one SQLite file.

It is the embedded default store (the standard library's ``sqlite3``, WAL mode). The drainer
writes each window as it closes, off the hot path, so the history of a model continues across
restarts and deploys. Several worker processes may write one file: every write is one short
``BEGIN IMMEDIATE`` transaction, and a writer waits at most ``busy_timeout_seconds`` for another.

Rows are keyed by names (service, model, version, stage path), never by the process's interned
integers. A model's whole inference has the stage ``None``; in the tables, a missing version or
stage is stored as ``''`` so that keys compare as equal (SQL ``NULL`` never equals itself).

Per-minute windows are kept for ``window_retention_seconds`` (7 days by default); older ones are
folded into hourly rollups (per service, model, version and stage, all processes together; the
process windows per service and hour), kept for ``rollup_retention_seconds`` (90 days). Past
``max_bytes``, the oldest windows go first, then the oldest rollups.

Failures never reach the caller: a full disk, a read-only directory or a file locked for longer
than the busy timeout are counted in ``failures`` by kind and logged once per kind. A locked file
is tried again on the next write; any other failure a minute later. The writer of windows
(``windows.WindowBuilder``) keeps the windows it could not write and writes them with the next
one. The file is created 0600 in a directory created 0700.

>>> import tempfile, os
>>> recorder = FlightRecorder(os.path.join(tempfile.mkdtemp(), "recorder.sqlite"))
>>> recorder.save_baseline("svc", "fraud", "anchor", {"p95": 0.012})
True
>>> recorder.load_baseline("svc", "fraud", "anchor")["payload"]
{'p95': 0.012}
>>> recorder.close()
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .histogram import Histogram
from .windows import RECORDER_SCHEMA_VERSION, KeyWindow, ProcessWindow, Window

__all__ = [
    "FlightRecorder",
    "RecordedKeyWindow",
    "RecordedProcessWindow",
    "histogram_from_blob",
    "histogram_from_json",
    "histogram_to_blob",
    "histogram_to_json",
]

_logger = logging.getLogger("inferscope")

#: How long a writer waits for another process's transaction before giving up on this write.
DEFAULT_BUSY_TIMEOUT_SECONDS = 3.0
#: Retention and the size bound are enforced at most this often.
_MAINTENANCE_SECONDS = 600.0
#: Window rows inserted by one statement (19 values each; SQLite allows 32,766 per statement).
_ROWS_PER_INSERT = 1000
_HOUR = 3600.0
#: Sampled profiles kept, newest first (one per key and hour at most is stored).
_MAX_PROFILES = 1000

_ANY: Any = object()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL,
    start_unix REAL NOT NULL, end_unix REAL NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL, fingerprint TEXT,
    count INTEGER NOT NULL, errors INTEGER NOT NULL,
    wall_seconds REAL NOT NULL, cpu_seconds REAL, cpu_wall_seconds REAL NOT NULL,
    process_cpu_seconds REAL, size_sum REAL NOT NULL, size_count INTEGER NOT NULL,
    duration TEXT NOT NULL, counters TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_by_key ON windows (service, model, version, stage, end_unix);
CREATE INDEX IF NOT EXISTS windows_by_time ON windows (end_unix);
-- A model's history read without its service (the detector's day-ago hour, where it begins).
CREATE INDEX IF NOT EXISTS windows_by_model ON windows (model, end_unix);
CREATE TABLE IF NOT EXISTS process_windows (
    id INTEGER PRIMARY KEY,
    service TEXT NOT NULL, start_unix REAL NOT NULL, end_unix REAL NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL, fingerprint TEXT, figures TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS process_windows_by_time ON process_windows (service, end_unix);
CREATE TABLE IF NOT EXISTS rollups (
    service TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL,
    hour_unix REAL NOT NULL, fingerprint TEXT,
    count INTEGER NOT NULL, errors INTEGER NOT NULL,
    wall_seconds REAL NOT NULL, cpu_seconds REAL, cpu_wall_seconds REAL NOT NULL,
    process_cpu_seconds REAL, size_sum REAL NOT NULL, size_count INTEGER NOT NULL,
    duration TEXT NOT NULL, counters TEXT NOT NULL,
    PRIMARY KEY (service, model, version, stage, hour_unix)
);
-- The process windows of an hour, all processes together (_fold_processes). A new table leaves the
-- file readable by an inferscope that predates it.
CREATE TABLE IF NOT EXISTS process_rollups (
    service TEXT NOT NULL, hour_unix REAL NOT NULL, windows INTEGER NOT NULL, figures TEXT NOT NULL,
    PRIMARY KEY (service, hour_unix)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    fingerprint TEXT PRIMARY KEY,
    first_seen_unix REAL NOT NULL, last_seen_unix REAL NOT NULL, environment TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS baselines (
    service TEXT NOT NULL, model TEXT NOT NULL, name TEXT NOT NULL,
    saved_unix REAL NOT NULL, fingerprint TEXT, payload TEXT NOT NULL,
    PRIMARY KEY (service, model, name)
);
CREATE TABLE IF NOT EXISTS regressions (
    service TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL,
    metric TEXT NOT NULL, since_unix REAL NOT NULL,
    cause TEXT NOT NULL, active INTEGER NOT NULL, updated_unix REAL NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (service, model, version, stage, metric, since_unix)
);
CREATE INDEX IF NOT EXISTS regressions_by_time ON regressions (updated_unix);
-- The top functions of a regressed stage's sampled stacks (profile/sampler.py). A new table leaves
-- the file readable by an inferscope that predates it, so the file's schema version stays.
CREATE TABLE IF NOT EXISTS profiles (
    service TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL,
    metric TEXT NOT NULL, since_unix REAL NOT NULL, started_unix REAL NOT NULL, ended_unix REAL NOT NULL,
    host TEXT NOT NULL, pid INTEGER NOT NULL, payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS profiles_by_key ON profiles (service, model, started_unix);
"""

#: Connections left open on purpose in a forked child: closing one there could checkpoint and
#: delete the parent's WAL file, which the parent still uses.
_INHERITED_CONNECTIONS: list[sqlite3.Connection] = []
#: In a forked child: the files whose connection another thread of the parent was using when the
#: process forked. SQLite's per-file lock bookkeeping came along with it, so a new connection of
#: the child's to such a file would find it locked for good: the child leaves them alone.
_IN_USE_AT_FORK: set[str] = set()
#: How long fork() waits for a write to the flight recorder in progress in another thread.
_FORK_WAIT_SECONDS = 10.0


class _InUseAtFork(sqlite3.OperationalError):
    """This process was forked while another thread of its parent was writing to the file."""


def histogram_to_json(hist: Histogram) -> str:
    """A histogram as compact JSON (its OTel exponential layout), for the tables and baseline files."""
    offset, counts = hist._trimmed()
    return json.dumps(
        {
            "scale": hist.scale,
            "zero_count": hist.zero_count,
            "offset": offset,
            "counts": counts.tolist(),
            "count": hist.count,
            "sum": hist.sum,
            "min": hist.min if hist.count else None,
            "max": hist.max if hist.count else None,
        },
        separators=(",", ":"),
    )


def histogram_from_json(text: str | Mapping[str, Any]) -> Histogram:
    """The histogram that ``histogram_to_json`` wrote."""
    data = json.loads(text) if isinstance(text, str) else text
    return Histogram(
        int(data["scale"]),
        int(data["zero_count"]),
        int(data["offset"]),
        np.asarray(data["counts"], dtype=np.int64),
        int(data["count"]),
        float(data["sum"]),
        math.inf if data.get("min") is None else float(data["min"]),
        -math.inf if data.get("max") is None else float(data["max"]),
    )


#: A histogram blob: a format byte, then scale, zero count, bucket offset, count, sum, min and max
#: (little-endian), then the bucket counts as little-endian int64. Decoding it costs a few
#: microseconds where the JSON of the first file format cost tens.
_BLOB_HEADER = struct.Struct("<Biqqqddd")
_BLOB_FORMAT = 1


def histogram_to_blob(hist: Histogram) -> bytes:
    """A histogram as the compact binary blob the recorder's tables hold (see ``_BLOB_HEADER``)."""
    offset, counts = hist._trimmed()
    header = _BLOB_HEADER.pack(
        _BLOB_FORMAT, hist.scale, hist.zero_count, offset, hist.count, hist.sum, hist.min, hist.max
    )
    return header + counts.astype("<i8", copy=False).tobytes()


def histogram_from_blob(blob: bytes) -> Histogram:
    """The histogram that ``histogram_to_blob`` wrote."""
    form, scale, zero_count, offset, count, total, low, high = _BLOB_HEADER.unpack_from(blob)
    if form != _BLOB_FORMAT:
        raise ValueError(f"unknown histogram blob format {form}")
    counts = np.frombuffer(blob, dtype="<i8", offset=_BLOB_HEADER.size).astype(np.int64)
    return Histogram(scale, zero_count, offset, counts, count, total, low, high)


def _histogram(stored: bytes | str) -> Histogram:
    """A histogram column: a blob, or the JSON of files written before blobs."""
    return histogram_from_blob(stored) if isinstance(stored, bytes) else histogram_from_json(stored)


@dataclass(frozen=True)
class RecordedKeyWindow:
    """A key's window as stored: the window and where it came from.

    For an hourly rollup, ``pid`` is 0, ``host`` is ``""`` and the window spans the hour, all
    processes together.
    """

    service: str
    start_unix: float
    end_unix: float
    host: str
    pid: int
    fingerprint: str | None
    window: KeyWindow


@dataclass(frozen=True)
class RecordedProcessWindow:
    """A process window as stored, with the process it came from."""

    service: str
    start_unix: float
    end_unix: float
    host: str
    pid: int
    window: ProcessWindow


def _failure_kind(error: BaseException) -> str:
    """``disk_full``, ``read_only``, ``locked``, ``corrupt``, ``io_error``, ``fork`` or ``other``."""
    if isinstance(error, _InUseAtFork):
        return "fork"
    name = getattr(error, "sqlite_errorname", "") or ""
    text = str(error).lower()
    code = getattr(error, "errno", None)
    if name.startswith("SQLITE_FULL") or code == errno.ENOSPC or "disk is full" in text:
        return "disk_full"
    if (
        name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"))
        or code in (errno.EACCES, errno.EROFS, errno.EPERM)
        or "readonly" in text
        or "read-only" in text
        or "unable to open" in text
    ):
        return "read_only"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text or "busy" in text:
        return "locked"
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
        return "io_error"
    if (
        name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or "malformed" in text
        or "not a database" in text
    ):
        return "corrupt"
    return "other"


def _described(error: BaseException) -> str:
    """The error, with SQLite's extended code where it gives one (``disk I/O error`` says no more)."""
    name = getattr(error, "sqlite_errorname", None)
    return f"{error} [{name}]" if name else str(error)


def _name(value: str | None) -> str:
    return "" if value is None else value


def _none(value: str) -> str | None:
    return None if value == "" else value


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


class FlightRecorder:
    """One SQLite file of windows, fingerprints, baselines and regressions; see the module doc.

    Every method is thread-safe and never raises for a storage failure: writers return False and
    readers return what they could read (nothing). ``failures`` counts the failures by kind.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 2**20,
        window_retention_seconds: float = 7 * 86400.0,
        rollup_retention_seconds: float = 90 * 86400.0,
        busy_timeout_seconds: float = DEFAULT_BUSY_TIMEOUT_SECONDS,
        retry_seconds: float = 60.0,
        create: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.window_retention_seconds = window_retention_seconds
        self.rollup_retention_seconds = rollup_retention_seconds
        self.busy_timeout_seconds = busy_timeout_seconds
        self.retry_seconds = retry_seconds
        self.create = create
        self.host = socket.gethostname()
        self.failures: dict[str, int] = {}
        #: Queries run and rows they returned: what reading the history costs (benchmarks, tests).
        self.queries = 0
        self.rows_read = 0
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        #: Set while fork() waits for this recorder: a writer with more to write lets it go first.
        self.fork_waiting = False
        self._connection: sqlite3.Connection | None = None
        self._retry_at = 0.0
        self._maintenance_at = time.monotonic() + _MAINTENANCE_SECONDS
        self._announced = False

    # --- connection ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        # Caller holds the lock.
        if self._connection is not None:
            return self._connection
        if time.monotonic() < self._retry_at:
            return None
        try:
            if self.path in _IN_USE_AT_FORK:
                raise _InUseAtFork(
                    "this process was forked while its parent was writing to the file, so SQLite's "
                    "locks on it cannot be taken here"
                )
            connection = self._open()
        except (sqlite3.Error, OSError) as error:
            self._failed(error, "opening")
            return None
        self._connection = connection
        if not self._announced:
            self._announced = True
            _logger.info(
                "inferscope: the flight recorder writes to %s (set INFERSCOPE_RECORDER=off or "
                "configure(recorder='off') to stop it)",
                self.path,
            )
        return connection

    def _open(self) -> sqlite3.Connection:
        directory = os.path.dirname(self.path) or "."
        if self.create:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            # Created here, not by SQLite, so that it is private from the start; SQLite gives the
            # -wal and -shm files the same permissions as the database.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        elif not os.path.exists(self.path):
            raise FileNotFoundError(errno.ENOENT, "no flight recorder file", self.path)
        connection = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_seconds,
            isolation_level=None,  # explicit, short transactions
            check_same_thread=False,  # one lock serialises every use
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_seconds * 1000)}")
            if connection.execute("PRAGMA page_count").fetchone()[0] == 0:
                # Only before the first table: lets deleted pages be handed back to the file system.
                connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL mode here (got {mode})")
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute(f"PRAGMA journal_size_limit = {min(self.max_bytes // 4, 64 * 2**20)}")
            if not _schema_current(connection):
                self._create_schema(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    @staticmethod
    def _create_schema(connection: sqlite3.Connection) -> None:
        """The tables, and the schema version (an older file is marked; a newer one refused)."""
        with _transaction(connection):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            found = connection.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            if found is None or int(found[0]) < RECORDER_SCHEMA_VERSION:
                # An older file is read as it is (its rows keep their JSON histograms) and
                # marked, so that the inferscope that wrote it leaves the new rows alone.
                connection.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?)",
                    (str(RECORDER_SCHEMA_VERSION),),
                )
            elif int(found[0]) > RECORDER_SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    "the file was written by a newer inferscope "
                    f"(schema {found[0]} > {RECORDER_SCHEMA_VERSION})"
                )

    def _failed(self, error: BaseException, doing: str) -> None:
        # Caller holds the lock.
        kind = _failure_kind(error)
        self.failures[kind] = self.failures.get(kind, 0) + 1
        # A file that another writer held past the wait is free again soon, and an I/O error may
        # be a moment's (one was met once, by a forked child beside its parent's writes): the next
        # use tries it. Any other failure (a full disk, a read-only directory...) waits retry_seconds.
        transient = kind in ("locked", "io_error")
        self._retry_at = 0.0 if transient else time.monotonic() + self.retry_seconds
        if kind == "io_error":
            then = "the file is tried again on the next write"
        elif transient:
            then = "another process held it past the wait, and the file is tried again on the next write"
        elif kind == "fork":
            then = "windows are kept in memory only in this process"
        else:
            then = "the file is tried again every minute"
        connection, self._connection = self._connection, None
        if connection is not None:
            with suppress(sqlite3.Error):
                connection.close()
        if kind not in self._logged:
            self._logged.add(kind)
            _logger.warning(
                "inferscope: the flight recorder cannot use %s (%s while %s: %s); %s. Logged once; "
                "counted in FlightRecorder.failures[%r].",
                self.path,
                kind.replace("_", " "),
                doing,
                _described(error),
                then,
                kind,
            )

    @contextmanager
    def _use(self, doing: str) -> Iterator[sqlite3.Connection | None]:
        """The connection under the lock, or None; a storage failure is counted, never raised."""
        with self._lock:
            connection = self._connect()
            try:
                yield connection
            except (sqlite3.Error, OSError) as error:
                self._failed(error, doing)

    def _write(self, doing: str, sql: str, params: Sequence[Any]) -> bool:
        """Run one statement in its own short transaction; True when it was stored."""
        with self._use(doing) as connection:
            if connection is None:
                return False
            with _transaction(connection):
                connection.execute(sql, params)
            return True
        return False

    def _rows(self, doing: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query; none when the file cannot be read."""
        with self._use(doing) as connection:
            if connection is None:
                return []
            rows = connection.execute(sql, params).fetchall()
            self.queries += 1
            self.rows_read += len(rows)
            return rows
        return []

    @property
    def available(self) -> bool:
        """Whether the file could be opened (now, or at the last try)."""
        with self._lock:
            return self._connect() is not None

    def close(self) -> None:
        """Close the connection; a later use opens it again."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                with suppress(sqlite3.Error):
                    connection.close()

    def before_fork(self) -> None:
        """Before fork(): wait (at most ``_FORK_WAIT_SECONDS``, or the busy timeout and a second
        if longer) until no thread is inside SQLite through this recorder, so that the child never
        inherits one of SQLite's mutexes held by a thread it does not have, and close the
        connection (the next use reopens it). A child that inherits an open connection shares
        SQLite's per-file lock bookkeeping with it: its own connection to the same file would find
        the file locked, however long it waited. So if a write is still going on when the wait
        ends, the child leaves the file alone (failure kind ``fork``, logged once) and keeps its
        windows in memory. ``after_fork_in_parent`` lets go."""
        self.fork_waiting = True
        try:
            self._held_for_fork = self._lock.acquire(
                timeout=max(_FORK_WAIT_SECONDS, self.busy_timeout_seconds + 1.0)
            )
        finally:
            self.fork_waiting = False
        self._open_at_fork = not self._held_for_fork and self._connection is not None
        if self._held_for_fork and self._connection is not None:
            connection, self._connection = self._connection, None
            with suppress(sqlite3.Error):
                connection.close()

    def after_fork_in_parent(self) -> None:
        if getattr(self, "_held_for_fork", False):
            self._held_for_fork = False
            self._lock.release()

    def after_fork_in_child(self) -> None:
        """In a forked child: leave the parent's connection alone (never close it here) and open a
        new one on next use."""
        self._held_for_fork = False
        self._lock = threading.Lock()
        if getattr(self, "_open_at_fork", False):
            _IN_USE_AT_FORK.add(self.path)
        if self._connection is not None:
            _INHERITED_CONNECTIONS.append(self._connection)
            self._connection = None
        self._retry_at = 0.0

    # --- windows -------------------------------------------------------------------------------

    def save_window(self, window: Window, *, pid: int | None = None) -> bool:
        """Store a closed window: one row per key and one for the process. True when stored."""
        pid = os.getpid() if pid is None else pid
        fingerprint = window.process.fingerprint
        rows = [
            (
                window.service,
                key.model,
                _name(key.version),
                _name(key.stage),
                window.start_unix,
                window.end_unix,
                self.host,
                pid,
                fingerprint,
                key.count,
                key.errors,
                key.wall_seconds,
                key.cpu_seconds,
                key.cpu_wall_seconds,
                key.process_cpu_seconds,
                key.size_sum,
                key.size_count,
                histogram_to_blob(key.duration),
                _dumps(dict(key.counters)),
            )
            for key in window.keys
        ]
        figures = {f.name: getattr(window.process, f.name) for f in fields(ProcessWindow)}
        stored = False
        with self._use("writing a window") as connection:
            if connection is None:
                return False
            with _transaction(connection):
                # One statement per chunk of rows, not one per row: each statement hands the GIL
                # back and forth, and in a busy process every hand-off can take a switch interval,
                # while the write lock is held and other workers wait for it.
                for chunk in range(0, len(rows), _ROWS_PER_INSERT):
                    part = rows[chunk : chunk + _ROWS_PER_INSERT]
                    connection.execute(
                        "INSERT INTO windows (service, model, version, stage, start_unix, end_unix, host, "
                        "pid, fingerprint, count, errors, wall_seconds, cpu_seconds, cpu_wall_seconds, "
                        "process_cpu_seconds, size_sum, size_count, duration, counters) VALUES "
                        + ", ".join(
                            ["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(part)
                        ),
                        [value for row in part for value in row],
                    )
                connection.execute(
                    "INSERT INTO process_windows (service, start_unix, end_unix, host, pid, fingerprint, "
                    "figures) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        window.service,
                        window.start_unix,
                        window.end_unix,
                        self.host,
                        pid,
                        fingerprint,
                        _dumps(figures),
                    ),
                )
                if fingerprint:
                    connection.execute(
                        "UPDATE fingerprints SET last_seen_unix = max(last_seen_unix, ?) "
                        "WHERE fingerprint = ?",
                        (window.end_unix, fingerprint),
                    )
            stored = True
            if time.monotonic() >= self._maintenance_at:
                self._maintenance_at = time.monotonic() + _MAINTENANCE_SECONDS
                self._maintain(connection, now_unix=window.end_unix)
        return stored

    def key_windows(
        self,
        model: str,
        *,
        service: str | None = None,
        version: str | None = _ANY,
        stage: str | None = _ANY,
        since_unix: float | None = None,
        until_unix: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        hourly: bool = False,
    ) -> list[RecordedKeyWindow]:
        """Stored windows of ``model``, oldest first (``newest_first`` for the reverse).

        ``version`` and ``stage`` filter when given (``stage=None``: the whole inference only);
        ``since_unix``/``until_unix`` bound the windows' ends. ``hourly`` reads the hourly rollups
        instead of the per-minute windows.

        >>> recorder.key_windows("fraud", stage=None, since_unix=time.time() - 3600)  # doctest: +SKIP
        """
        table = "rollups" if hourly else "windows"
        end = f"hour_unix + {_HOUR}" if hourly else "end_unix"
        start = "hour_unix" if hourly else "start_unix"
        origin = "'', 0" if hourly else "host, pid"
        where, args = _where(
            ("model = ?", model),
            ("service = ?", service),
            ("version = ?", None if version is _ANY else _name(version)),
            ("stage = ?", None if stage is _ANY else _name(stage)),
            (f"{end} >= ?", since_unix),
            (f"{end} <= ?", until_unix),
        )
        sql = (
            f"SELECT service, model, version, stage, {start}, {end}, {origin}, fingerprint, count, errors, "
            "wall_seconds, cpu_seconds, cpu_wall_seconds, process_cpu_seconds, size_sum, size_count, "
            f"duration, counters FROM {table} {where} ORDER BY {end} {'DESC' if newest_first else 'ASC'}"
            + _limit(limit, args)
        )
        return [_recorded_key_window(row) for row in self._rows("reading windows", sql, args)]

    def process_windows(
        self,
        *,
        service: str | None = None,
        since_unix: float | None = None,
        until_unix: float | None = None,
        limit: int | None = None,
        newest_first: bool = False,
        hourly: bool = False,
    ) -> list[RecordedProcessWindow]:
        """Stored process windows, oldest first; the same filters as ``key_windows``. ``hourly``
        reads the hourly rollups (host ``""`` and pid 0: all processes together; RSS and the
        Python heap are the mean over the processes of each one's last figure in the hour)."""
        end = f"hour_unix + {_HOUR}" if hourly else "end_unix"
        where, args = _where(
            ("service = ?", service), (f"{end} >= ?", since_unix), (f"{end} <= ?", until_unix)
        )
        columns = (
            f"service, hour_unix, {end}, '', 0, figures"
            if hourly
            else "service, start_unix, end_unix, host, pid, figures"
        )
        sql = (
            f"SELECT {columns} FROM {'process_rollups' if hourly else 'process_windows'} "
            f"{where} ORDER BY {end} {'DESC' if newest_first else 'ASC'}" + _limit(limit, args)
        )
        known = {f.name for f in fields(ProcessWindow)}
        result = []
        for service_, start, end, host, pid, figures in self._rows("reading process windows", sql, args):
            values = {k: v for k, v in json.loads(figures).items() if k in known}
            result.append(RecordedProcessWindow(service_, start, end, host, pid, ProcessWindow(**values)))
        return result

    def models(self) -> list[tuple[str, str, float, float]]:
        """(service, model, first window start, last window end) of every model in the file, the
        hourly rollups included: where a model's history begins, for its anchor."""
        sql = (
            "SELECT service, model, min(first), max(last) FROM ("
            "SELECT service, model, min(start_unix) AS first, max(end_unix) AS last FROM windows "
            "GROUP BY service, model UNION ALL "
            f"SELECT service, model, min(hour_unix), max(hour_unix) + {_HOUR} FROM rollups "
            "GROUP BY service, model"
            ") GROUP BY service, model ORDER BY service, model"
        )
        return self._rows("reading models", sql)  # type: ignore[return-value]

    def first_start(self, model: str, *, service: str | None = None) -> float | None:
        """When the stored history of ``model`` begins (the hourly rollups included), or None."""
        where, args = _where(("model = ?", model), ("service = ?", service))
        sql = (
            f"SELECT min(first) FROM (SELECT min(start_unix) AS first FROM windows {where} "
            f"UNION ALL SELECT min(hour_unix) FROM rollups {where})"
        )
        rows = self._rows("reading where a model begins", sql, args + args)
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    # --- fingerprints --------------------------------------------------------------------------

    def save_fingerprint(
        self, fingerprint: str, environment: Mapping[str, Any], *, seen_unix: float | None = None
    ) -> bool:
        """Store an environment under its fingerprint (kept with the first environment seen)."""
        seen = time.time() if seen_unix is None else seen_unix
        return self._write(
            "writing a fingerprint",
            "INSERT INTO fingerprints (fingerprint, first_seen_unix, last_seen_unix, environment) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (fingerprint) DO UPDATE SET "
            "first_seen_unix = min(first_seen_unix, excluded.first_seen_unix), "
            "last_seen_unix = max(last_seen_unix, excluded.last_seen_unix)",
            (fingerprint, seen, seen, _dumps(dict(environment))),
        )

    def fingerprints(self) -> list[tuple[str, float, float]]:
        """(fingerprint, first seen, last seen) of every environment recorded, oldest first."""
        sql = "SELECT fingerprint, first_seen_unix, last_seen_unix FROM fingerprints ORDER BY first_seen_unix"
        return self._rows("reading fingerprints", sql)  # type: ignore[return-value]

    def environment(self, fingerprint: str) -> dict[str, Any] | None:
        """The full environment recorded under ``fingerprint`` (for ``system.diff``), or None."""
        sql = "SELECT environment FROM fingerprints WHERE fingerprint = ?"
        rows = self._rows("reading a fingerprint", sql, (fingerprint,))
        return dict(json.loads(rows[0][0])) if rows else None

    # --- baselines and regressions (written by the detector) ------------------------------------

    def save_baseline(
        self,
        service: str,
        model: str,
        name: str,
        payload: Mapping[str, Any],
        *,
        fingerprint: str | None = None,
        saved_unix: float | None = None,
    ) -> bool:
        """Store (or replace) baseline ``name`` (e.g. ``"anchor"``) of a model as JSON."""
        saved = time.time() if saved_unix is None else saved_unix
        return self._write(
            "writing a baseline",
            "INSERT OR REPLACE INTO baselines (service, model, name, saved_unix, fingerprint, "
            "payload) VALUES (?, ?, ?, ?, ?, ?)",
            (service, model, name, saved, fingerprint, _dumps(dict(payload))),
        )

    def load_baseline(self, service: str, model: str, name: str) -> dict[str, Any] | None:
        """``{"service", "model", "name", "saved_unix", "fingerprint", "payload"}`` or None."""
        found = self.baselines(service=service, model=model, name=name)
        return found[0] if found else None

    def baselines(
        self, *, service: str | None = None, model: str | None = None, name: str | None = None
    ) -> list[dict[str, Any]]:
        """Every stored baseline matching the filters, as ``load_baseline`` returns them."""
        where, args = _where(("service = ?", service), ("model = ?", model), ("name = ?", name))
        sql = (
            "SELECT service, model, name, saved_unix, fingerprint, payload FROM baselines "
            f"{where} ORDER BY service, model, name"
        )
        columns = ("service", "model", "name", "saved_unix", "fingerprint", "payload")
        found = [dict(zip(columns, row, strict=True)) for row in self._rows("reading baselines", sql, args)]
        for row in found:
            row["payload"] = json.loads(row["payload"])
        return found

    def save_regression(
        self,
        service: str,
        model: str,
        version: str | None,
        stage: str | None,
        metric: str,
        since_unix: float,
        cause: str,
        active: bool,
        payload: Mapping[str, Any],
        *,
        updated_unix: float | None = None,
    ) -> bool:
        """Store a regression, or update it: one is identified by (service, model, version, stage,
        metric, since_unix), so saving it again as it evolves (and closes) replaces the row."""
        updated = time.time() if updated_unix is None else updated_unix
        return self._write(
            "writing a regression",
            "INSERT OR REPLACE INTO regressions (service, model, version, stage, metric, since_unix, "
            "cause, active, updated_unix, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                service,
                model,
                _name(version),
                _name(stage),
                metric,
                since_unix,
                cause,
                int(bool(active)),
                updated,
                _dumps(dict(payload)),
            ),
        )

    def regressions(
        self,
        *,
        service: str | None = None,
        model: str | None = None,
        active: bool | None = None,
        since_unix: float | None = None,
    ) -> list[dict[str, Any]]:
        """Stored regressions, newest update first, each ``{"service", "model", "version", "stage",
        "metric", "since_unix", "cause", "active", "updated_unix", "payload"}``; ``since_unix``
        keeps those updated since then."""
        where, args = _where(
            ("service = ?", service),
            ("model = ?", model),
            ("active = ?", None if active is None else int(active)),
            ("updated_unix >= ?", since_unix),
        )
        sql = (
            "SELECT service, model, version, stage, metric, since_unix, cause, active, updated_unix, payload "
            f"FROM regressions {where} ORDER BY updated_unix DESC"
        )
        columns = ("service", "model", "version", "stage", "metric", "since_unix", "cause", "active")
        found = []
        for row in self._rows("reading regressions", sql, args):
            record = dict(zip((*columns, "updated_unix", "payload"), row, strict=True))
            record.update(
                version=_none(record["version"]),
                stage=_none(record["stage"]),
                active=bool(record["active"]),
                payload=json.loads(record["payload"]),
            )
            found.append(record)
        return found

    # --- sampled stacks (written by profile/sampler.py) -------------------------------------------

    def save_profile(
        self,
        service: str,
        model: str,
        version: str | None,
        stage: str | None,
        metric: str,
        since_unix: float,
        started_unix: float,
        ended_unix: float,
        payload: Mapping[str, Any],
    ) -> bool:
        """Store the top functions of a regressed stage's sampled stacks (``since_unix`` and
        ``metric`` name the regression that started it). Profiles older than the rollups' retention,
        and past the newest ``_MAX_PROFILES``, are dropped as one is stored."""
        with self._use("writing a profile") as connection:
            if connection is None:
                return False
            with _transaction(connection):
                connection.execute(
                    "INSERT INTO profiles (service, model, version, stage, metric, since_unix, started_unix, "
                    "ended_unix, host, pid, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        service,
                        model,
                        _name(version),
                        _name(stage),
                        metric,
                        since_unix,
                        started_unix,
                        ended_unix,
                        self.host,
                        os.getpid(),
                        _dumps(dict(payload)),
                    ),
                )
                connection.execute(
                    "DELETE FROM profiles WHERE started_unix < ? OR rowid NOT IN "
                    "(SELECT rowid FROM profiles ORDER BY started_unix DESC LIMIT ?)",
                    (ended_unix - self.rollup_retention_seconds, _MAX_PROFILES),
                )
            return True
        return False

    def profiles(
        self, *, service: str | None = None, model: str | None = None, since_unix: float | None = None
    ) -> list[dict[str, Any]]:
        """Stored profiles, newest first, each ``{"service", "model", "version", "stage", "metric",
        "since_unix", "started_unix", "ended_unix", "host", "pid", "payload"}``; ``since_unix``
        keeps those started since then."""
        where, args = _where(
            ("service = ?", service), ("model = ?", model), ("started_unix >= ?", since_unix)
        )
        columns = (
            "service", "model", "version", "stage", "metric", "since_unix", "started_unix", "ended_unix",
            "host", "pid", "payload",
        )  # fmt: skip
        sql = f"SELECT {', '.join(columns)} FROM profiles {where} ORDER BY started_unix DESC"
        found = []
        for row in self._rows("reading profiles", sql, args):
            record = dict(zip(columns, row, strict=True))
            record.update(
                version=_none(record["version"]),
                stage=_none(record["stage"]),
                payload=json.loads(record["payload"]),
            )
            found.append(record)
        return found

    # --- retention and the size bound ----------------------------------------------------------

    def maintain(self, now_unix: float | None = None) -> bool:
        """Fold old windows into hourly rollups, drop what is past retention and enforce
        ``max_bytes`` now (the recorder also does it every 10 minutes as it writes)."""
        with self._use("enforcing retention") as connection:
            if connection is None:
                return False
            self._maintain(connection, now_unix=time.time() if now_unix is None else now_unix)
            return True
        return False

    def _maintain(self, connection: sqlite3.Connection, *, now_unix: float) -> None:
        # Caller holds the lock; errors propagate to _use().
        cutoff = now_unix - self.window_retention_seconds
        with _transaction(connection):
            self._roll_up(connection, cutoff)
            connection.execute("DELETE FROM windows WHERE end_unix < ?", (cutoff,))
            connection.execute("DELETE FROM process_windows WHERE end_unix < ?", (cutoff,))
            for table in ("rollups", "process_rollups"):
                connection.execute(
                    f"DELETE FROM {table} WHERE hour_unix < ?", (now_unix - self.rollup_retention_seconds,)
                )
        self._bound_size(connection)

    def _roll_up(self, connection: sqlite3.Connection, cutoff: float) -> None:
        self._roll_up_keys(connection, cutoff)
        self._roll_up_processes(connection, cutoff)

    def _roll_up_processes(self, connection: sqlite3.Connection, cutoff: float) -> None:
        rows = connection.execute(
            "SELECT service, start_unix, end_unix, host, pid, figures FROM process_windows "
            "WHERE end_unix < ? ORDER BY end_unix",
            (cutoff,),
        ).fetchall()
        known = {f.name for f in fields(ProcessWindow)}
        hours: dict[tuple[str, float], list[tuple[str, int, float, ProcessWindow]]] = {}
        for service, start, end, host, pid, figures in rows:
            hour = math.floor((end - 1e-6) / _HOUR) * _HOUR
            window = ProcessWindow(**{k: v for k, v in json.loads(figures).items() if k in known})
            hours.setdefault((service, hour), []).append((f"{host}:{pid}", 1, end - start, window))
        folded = []
        for ident, windows in hours.items():
            existing = connection.execute(
                "SELECT windows, figures FROM process_rollups WHERE service = ? AND hour_unix = ?", ident
            ).fetchone()
            if existing is not None:
                # Folded by an earlier pass: it stands for its windows, before these ones, and each
                # process's last memory figures stand for that process.
                stored = json.loads(existing[1])
                values = {k: v for k, v in stored.items() if k in known and k not in _PER_PROCESS}
                earlier = [
                    (process, 0, 0.0, ProcessWindow(**{name: stored["by_process"][name].get(process)}))
                    for name in _PER_PROCESS
                    for process in stored.get("by_process", {}).get(name, {})
                ]
                windows[:0] = [("", int(existing[0]), float(existing[0]), ProcessWindow(**values)), *earlier]
            figures, by_process = _fold_processes(windows)
            count = sum(n for _, n, _, _ in windows)
            folded.append((*ident, count, _dumps(asdict(figures) | {"by_process": by_process})))
        connection.executemany(
            "INSERT OR REPLACE INTO process_rollups (service, hour_unix, windows, figures) "
            "VALUES (?, ?, ?, ?)",
            folded,
        )

    def _roll_up_keys(self, connection: sqlite3.Connection, cutoff: float) -> None:
        rows = connection.execute(
            "SELECT service, model, version, stage, end_unix, fingerprint, count, errors, wall_seconds, "
            "cpu_seconds, cpu_wall_seconds, process_cpu_seconds, size_sum, size_count, duration, counters "
            "FROM windows WHERE end_unix < ? ORDER BY end_unix",
            (cutoff,),
        ).fetchall()
        hours: dict[tuple[str, str, str, str, float], list[Any]] = {}
        for row in rows:
            hour = math.floor((row[4] - 1e-6) / _HOUR) * _HOUR
            ident = (row[0], row[1], row[2], row[3], hour)
            entry = hours.get(ident)
            if entry is None:
                existing = connection.execute(
                    "SELECT fingerprint, count, errors, wall_seconds, cpu_seconds, cpu_wall_seconds, "
                    "process_cpu_seconds, size_sum, size_count, duration, counters FROM rollups "
                    "WHERE service = ? AND model = ? AND version = ? AND stage = ? AND hour_unix = ?",
                    ident,
                ).fetchone()
                entry = hours[ident] = (
                    list(existing)
                    if existing is not None
                    else [None, 0, 0, 0.0, None, 0.0, None, 0.0, 0, None, "{}"]
                )
                entry[9] = _histogram(entry[9]) if entry[9] else Histogram.empty()
                entry[10] = json.loads(entry[10])
            entry[0] = row[5] or entry[0]  # the hour's last fingerprint
            entry[1] += row[6]
            entry[2] += row[7]
            entry[3] += row[8]
            entry[4] = _add_optional(entry[4], row[9])
            entry[5] += row[10]
            entry[6] = _add_optional(entry[6], row[11])
            entry[7] += row[12]
            entry[8] += row[13]
            entry[9].merge(_histogram(row[14]))
            for name, value in json.loads(row[15]).items():
                entry[10][name] = entry[10].get(name, 0.0) + value
        connection.executemany(
            "INSERT OR REPLACE INTO rollups (service, model, version, stage, hour_unix, fingerprint, count, "
            "errors, wall_seconds, cpu_seconds, cpu_wall_seconds, process_cpu_seconds, size_sum, size_count, "
            "duration, counters) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (*ident, *entry[:9], histogram_to_blob(entry[9]), _dumps(entry[10]))
                for ident, entry in hours.items()
            ],
        )

    def used_bytes(self) -> int:
        """Bytes the file holds in live pages (the file may keep freed pages for reuse)."""
        with self._use("reading the size") as connection:
            if connection is None:
                return 0
            return _used_bytes(connection)
        return 0

    def _bound_size(self, connection: sqlite3.Connection) -> None:
        for table, column in (
            ("windows", "end_unix"),
            ("process_windows", "end_unix"),
            ("rollups", "hour_unix"),
            ("process_rollups", "hour_unix"),
        ):
            while _used_bytes(connection) > self.max_bytes:
                with _transaction(connection):
                    total = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    if not total:
                        break
                    # The oldest tenth (at least one row) per round: few rounds, little lost.
                    connection.execute(
                        f"DELETE FROM {table} WHERE rowid IN "
                        f"(SELECT rowid FROM {table} ORDER BY {column} LIMIT ?)",
                        (max(total // 10, 1),),
                    )
        # executescript runs it to completion; execute() would free one page per call.
        connection.executescript("PRAGMA incremental_vacuum;")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


#: The figures of a process's own memory, folded per process (its last figure in the hour).
_PER_PROCESS = ("rss_bytes", "py_heap_bytes")


def _fold_processes(
    windows: Sequence[tuple[str, int, float, ProcessWindow]],
) -> tuple[ProcessWindow, dict[str, dict[str, float]]]:
    """One hour's process windows as one: (process, windows it stands for, seconds, figures), in
    time order. Times and counts add up; RSS and the Python heap are the mean over the processes
    of each one's last figure (returned too, per process); the canary's figures are medians, the
    host's fractions means over time, and where it ran is the last window's."""

    def total(name: str) -> float | None:
        values = [getattr(w, name) for _, _, _, w in windows if getattr(w, name) is not None]
        return sum(values) if values else None

    def median(name: str) -> float | None:
        weighted = sorted((getattr(w, name), n) for _, n, _, w in windows if getattr(w, name) is not None)
        half, seen = sum(n for _, n in weighted) / 2.0, 0
        for value, n in weighted:
            seen += n
            if seen >= half:
                return float(value)
        return None

    def mean(name: str) -> float | None:
        timed = [(getattr(w, name), t) for _, _, t, w in windows if getattr(w, name) is not None]
        seconds = sum(t for _, t in timed)
        return sum(v * t for v, t in timed) / seconds if timed and seconds > 0 else None

    by_process = {
        name: {process: getattr(w, name) for process, _, _, w in windows if getattr(w, name) is not None}
        for name in _PER_PROCESS
    }

    def per_process_last(name: str) -> float | None:
        last = by_process[name]
        return sum(last.values()) / len(last) if last else None

    def latest(name: str) -> Any:
        return next(
            (getattr(w, name) for _, _, _, w in reversed(windows) if getattr(w, name) is not None), None
        )

    folded = ProcessWindow(
        rss_bytes=per_process_last("rss_bytes"),
        py_heap_bytes=per_process_last("py_heap_bytes"),
        process_cpu_seconds=total("process_cpu_seconds"),
        canary_wall_seconds=median("canary_wall_seconds"),
        canary_cpu_seconds=median("canary_cpu_seconds"),
        canary_runs=int(total("canary_runs") or 0),
        steal_fraction=mean("steal_fraction"),
        throttled_seconds=total("throttled_seconds"),
        cpu_pressure=mean("cpu_pressure"),
        cpu_model=latest("cpu_model"),
        cpu_count=latest("cpu_count"),
        cpu_quota_cores=latest("cpu_quota_cores"),
        fingerprint=latest("fingerprint"),
        records_dropped=int(total("records_dropped") or 0),
        inference_cpu_seconds=total("inference_cpu_seconds"),
        run_queue_seconds=total("run_queue_seconds"),
        canary_wait_seconds=median("canary_wait_seconds"),
    )
    return folded, by_process


def _schema_current(connection: sqlite3.Connection) -> bool:
    """Whether the file already holds every table of this version's schema, read without taking
    the write lock (several processes open the file at once; most find it made)."""
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    wanted = set(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _SCHEMA))
    if not wanted <= tables:
        return False
    found = connection.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return found is not None and int(found[0]) == RECORDER_SCHEMA_VERSION


def _where(*conditions: tuple[str, object]) -> tuple[str, list[Any]]:
    """``WHERE`` and its arguments from (condition with one ``?``, value) pairs; a None value
    leaves its condition out."""
    used = [(condition, value) for condition, value in conditions if value is not None]
    clause = " AND ".join(condition for condition, _ in used) or "1"
    return f"WHERE {clause}", [value for _, value in used]


def _limit(limit: int | None, args: list[Any]) -> str:
    if limit is None:
        return ""
    args.append(int(limit))
    return " LIMIT ?"


def _used_bytes(connection: sqlite3.Connection) -> int:
    page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    free = connection.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def _add_optional(total: float | None, value: float | None) -> float | None:
    if value is None:
        return total
    return value if total is None else total + value


def _recorded_key_window(row: tuple[Any, ...]) -> RecordedKeyWindow:
    (service, model, version, stage, start, end, host, pid, fingerprint, count, errors, wall, cpu, cpu_wall,
     process_cpu, size_sum, size_count, duration, counters) = row  # fmt: skip
    window = KeyWindow(
        model=model,
        version=_none(version),
        stage=_none(stage),
        count=count,
        errors=errors,
        duration=_histogram(duration),
        wall_seconds=wall,
        cpu_seconds=cpu,
        cpu_wall_seconds=cpu_wall,
        process_cpu_seconds=process_cpu,
        counters=json.loads(counters),
        size_sum=size_sum,
        size_count=size_count,
    )
    return RecordedKeyWindow(service, start, end, host, pid, fingerprint, window)


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock at once (``BEGIN IMMEDIATE``), so that two
    processes never deadlock upgrading read locks; rolled back on any error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")
