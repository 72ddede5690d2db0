"""One ``/metrics`` for every worker of a pre-fork server (gunicorn, ``uvicorn --workers N``).

With ``multiprocess=True`` each worker's drainer publishes its aggregates (the exponential
histograms, counts and counters, its drop counts, a few exemplars and its process gauges) every
``multiprocess_publish_millis`` into a directory that the server's workers share, and whichever
process serves ``/metrics`` (any worker, or the master) merges them into one scrape.

The directory is ``<multiprocess_dir>/inferscope-<uid>/<pid>-<start>``, where pid and start (in
clock ticks since boot) name the server: the workers' parent process, so every worker of one
server finds the same directory with no setting, and a reused pid never finds an old one. In it:

- ``slot-N.lock``: a worker holds an exclusive ``flock`` on it for as long as it lives. The kernel
  drops that lock when the process ends however it ends (SIGKILL included), so a slot whose lock
  can be taken belongs to a dead worker, and a new worker takes the lowest such slot. Process
  gauges carry ``worker="N"``: recycling a worker reuses its slot, so the series do not grow.
- ``slot-N.data``: the worker's last publication, replaced atomically (write, then rename), so a
  reader sees the old one or the new one, never a torn one.
- ``retired.data``: what dead workers had counted. A worker that takes a dead worker's slot first
  folds that slot's last publication into it, so counters stay monotonic across recycling
  (``max_requests``). It records which publications it folded, and a reader skips those: a scrape
  that races a fold counts each publication exactly once.

A worker killed with SIGKILL loses what it recorded since its last publication: at most
``multiprocess_publish_millis`` plus ``drain_interval_millis`` of calls. A worker that exits
normally (recycled, or the server stopping) publishes everything before it exits.

Nothing is left behind: the worker that creates the directory starts a small reaper process
(``_shm_reaper.py``) that deletes it once the server process is gone and no worker holds a slot;
a server that crashed with its reaper is cleaned up by the next server of the same user that
starts on the machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Observation

from .._selflog import RateLimitedLog, report_error
from ..aggregator import AggregateView
from . import spec as _spec
from ._publication import Publication
from ._shm_reaper import REAPER_LOCK, lock_held, process_start, slot_held
from .traces import ExemplarStore

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

    from ..config import Settings
    from .prometheus import PrometheusCollector

__all__ = [
    "PUBLISHER",
    "Publication",
    "Publisher",
    "ServerId",
    "WorkersReader",
    "merged_collector",
    "sweep_stale_servers",
]

_logger = logging.getLogger("inferscope")

#: More slots than any server has workers; a worker that finds none free does not publish.
MAX_SLOTS = 4096
#: The generations of a slot that ``retired.data`` remembers as folded.
_FOLDED_REMEMBERED = 8
#: How long a fold waits for another worker's fold to finish.
_FOLD_LOCK_TIMEOUT_S = 2.0
#: An idle worker (nothing aggregated since its last publication) republishes, for its gauges,
#: once in this many publish intervals.
_IDLE_INTERVALS = 10
_REGRESSION_ACTIVE = "inferscope.regression.active"
WORKER_LABEL = "worker"
_RETIRED = "retired.data"


@dataclass(frozen=True)
class ServerId:
    """A process that owns a shared directory: its pid and start time, which no later process has."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ServerId | None:
        start = process_start(pid)
        return None if start is None else cls(pid, start)

    @property
    def name(self) -> str:
        return f"{self.pid}-{self.start}"

    def alive(self) -> bool:
        return process_start(self.pid) == self.start


def user_root(multiprocess_dir: str) -> Path:
    """Where this user's servers keep their directories."""
    return Path(multiprocess_dir) / f"inferscope-{os.getuid()}"


def sweep_stale_servers(root: Path) -> int:
    """Delete the directories of servers that are gone and whose workers are all gone (a crashed
    server whose reaper died with it); returns how many were deleted."""
    removed = 0
    try:
        entries = list(root.iterdir())
    except OSError:
        return 0
    for entry in entries:
        pid, _, start = entry.name.partition("-")
        if not (pid.isdigit() and start.isdigit()):
            continue
        if ServerId(int(pid), int(start)).alive() or slot_held(str(entry)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def _read(path: Path) -> Publication | None:
    """The publication in ``path``; None when there is none, or one that this version cannot read
    (written by another version of inferscope): it is skipped, never fatal to a scrape."""
    try:
        return Publication.decode(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, never a torn one."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
    os.replace(temporary, path)


def _slot_is_live(directory: Path, slot: int) -> bool:
    """Whether a live process holds slot ``slot`` (this one included)."""
    return lock_held(str(directory / f"slot-{slot}.lock"))


@contextlib.contextmanager
def _directory_lock(directory: Path, timeout_s: float = _FOLD_LOCK_TIMEOUT_S) -> Any:
    """Exclusive use of ``retired.data`` among the server's workers; TimeoutError past ``timeout_s``.
    A worker killed while holding it releases it with its death (``flock``)."""
    fd = os.open(directory / "retired.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    raise TimeoutError("another worker holds the retired counts' lock") from exc
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)


# --- reading --------------------------------------------------------------------------------------


@dataclass
class WorkersState:
    """One read of a server's directory (or several): everything counted, and each live worker's
    latest publication by slot, for its gauges (its histograms went into ``total``)."""

    total: Publication
    live: dict[int, Publication]


class WorkersReader:
    """Reads and merges the publications in the directories that ``directories()`` names.

    >>> reader = WorkersReader(lambda: [Path("/dev/shm/inferscope-1000/4242-1234")])  # doctest: +SKIP
    >>> reader.read().total.view().series  # doctest: +SKIP
    """

    def __init__(self, directories: Callable[[], Sequence[Path]]) -> None:
        self._directories = directories

    def read(self) -> WorkersState:
        total = Publication()
        live: dict[int, Publication] = {}
        for directory in self._directories():
            self._read_directory(directory, total, live)
        return WorkersState(total, live)

    def _read_directory(self, directory: Path, total: Publication, live: dict[int, Publication]) -> None:
        try:
            names = os.listdir(directory)
        except OSError:
            return
        # The slots first, then what was retired: a fold that happens in between records the
        # generation it folded, so that publication is counted once, from retired.data.
        slots: list[Publication] = []
        for name in names:
            if name.startswith("slot-") and name.endswith(".data"):
                publication = _read(directory / name)
                if publication is not None:
                    slots.append(publication)
        retired = _read(directory / _RETIRED)
        if retired is not None:
            total.merge(retired, consume=True)
        for publication in slots:
            if retired is not None and publication.generation in retired.folded.get(publication.slot, ()):
                continue
            total.merge(publication, consume=True)
            if _slot_is_live(directory, publication.slot):
                live[publication.slot] = publication


def merged_signals(
    state: Callable[[], WorkersState | None], names: Sequence[_spec.MetricSpec]
) -> list[_spec.Signal]:
    """Signals over the live workers' published gauges: each point gets a ``worker`` attribute (the
    slot), except ``inferscope.regression.active``, which is the maximum over the workers."""

    def observe(entry: _spec.MetricSpec) -> list[Observation]:
        current = state()
        if current is None:
            return []
        if entry.name == _REGRESSION_ACTIVE:
            highest: dict[tuple[tuple[str, Any], ...], tuple[float, dict[str, Any]]] = {}
            for publication in current.live.values():
                for value, attrs in publication.signals.get(entry.name, ()):
                    key = tuple(sorted(attrs.items()))
                    if key not in highest or value > highest[key][0]:
                        highest[key] = (value, attrs)
            return [Observation(value, attrs) for value, attrs in highest.values()]
        return [
            Observation(value, {**attrs, WORKER_LABEL: str(slot)})
            for slot, publication in sorted(current.live.items())
            for value, attrs in publication.signals.get(entry.name, ())
        ]

    return [_spec.Signal(entry, lambda entry=entry: observe(entry)) for entry in names]  # type: ignore[misc]


def _published_entries() -> list[_spec.MetricSpec]:
    """The signals each worker samples and publishes: its process's own and the providers'
    (the regression detector's), which differ from worker to worker."""
    return [
        entry
        for entry in _spec.METRICS.values()
        if entry.prometheus and (entry.group == "process" or entry.source == "provider")
    ]


def _published_signals() -> list[_spec.Signal]:
    from ..system.host import system_signals
    from .points import _provided_signals

    names = {entry.name for entry in _published_entries()}
    return [
        signal for signal in [*system_signals(gpu=False), *_provided_signals()] if signal.spec.name in names
    ]


class MergedSource:
    """The source of a merged ``/metrics``: each ``view()`` reads the shared directories once, and
    the signals answer from that same read."""

    def __init__(self, directories: Callable[[], Sequence[Path]]) -> None:
        self.reader = WorkersReader(directories)
        self.exemplars = ExemplarStore()
        self._state: WorkersState | None = None

    def view(self) -> AggregateView:
        state = self.reader.read()
        self._state = state
        return state.total.view(self.exemplars)

    def state(self) -> WorkersState | None:
        return self._state

    def signals(self) -> list[_spec.Signal]:
        return merged_signals(self.state, _published_entries())


def merged_collector(
    settings: Settings,
    resource: Resource | None = None,
    *,
    directories: Callable[[], Sequence[Path]] | None = None,
) -> PrometheusCollector:
    """A Prometheus collector over every worker of this server (``multiprocess=True``): the merged
    counts, each live worker's gauges, and this machine's host, container and GPU signals sampled
    by whichever process serves the scrape."""
    from ..counters import counter_metrics
    from ..system.host import system_signals
    from .prometheus import PrometheusCollector

    published = {entry.name for entry in _published_entries()}
    source = MergedSource(directories or server_directories(settings))
    local = [signal for signal in system_signals() if signal.spec.name not in published]
    served_resource = None
    if resource is not None:
        from opentelemetry.sdk.resources import Resource as _Resource

        # One scrape stands for every worker: the serving process's own identity would mislead.
        attributes = {
            k: v for k, v in resource.attributes.items() if k not in ("process.pid", "service.instance.id")
        }
        served_resource = _Resource(attributes, resource.schema_url)
    return PrometheusCollector(
        source.view,
        settings.histogram_boundaries,
        counters=counter_metrics(settings.counter_mask),
        exemplars=source.exemplars,
        signals=[*local, *source.signals()],
        resource=served_resource,
    )


def server_directories(settings: Settings) -> Callable[[], list[Path]]:
    """The directories a process reads: its own server's (where it publishes) and its children's
    (a master that configured inferscope itself serves its workers)."""
    root = user_root(settings.multiprocess_dir)

    def directories() -> list[Path]:
        found: list[Path] = []
        for server in (PUBLISHER.server, ServerId.of(os.getpid())):
            if server is not None and (root / server.name) not in found:
                found.append(root / server.name)
        return found

    return directories


# --- publishing -----------------------------------------------------------------------------------


class Publisher:
    """Publishes this process's aggregates into its server's directory, from the drainer.

    ``tick()`` publishes when the interval is due; ``close()`` publishes a last time and gives the
    slot up. After ``fork()`` the child forgets the parent's slot (without unlocking it: the lock
    belongs to the parent's open file) and takes one of its own, in the directory of the process
    that forked it. Never raises: a failure is counted and logged at most once a minute.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.enabled = False
        self.interval_s = 1.0
        self.root: Path | None = None
        self.server: ServerId | None = None
        self.slot: int | None = None
        self._slot_fd: int | None = None
        self._generation = ""
        self._next_due = 0.0
        self._refresh_due = 0.0
        self._aggregated_since = 0
        self._source: Callable[[], AggregateView] | None = None
        self._exemplars: ExemplarStore | None = None
        self._signals: list[_spec.Signal] | None = None
        self._log = RateLimitedLog(_logger, per_message=False)
        #: Called before each publication (the pipeline's endpoint takeover); never raises.
        self.on_tick: Callable[[], None] | None = None
        self.failures = 0
        self._orphan_logged = False  # the server gone: said once
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def configure(
        self,
        settings: Settings,
        source: Callable[[], AggregateView],
        exemplars: ExemplarStore | None = None,
    ) -> None:
        """Publish ``source()`` every ``multiprocess_publish_millis`` when ``settings.multiprocess``;
        otherwise stop publishing (what was published stays, counted as a dead worker's)."""
        with self._lock:
            if not settings.multiprocess:
                self._release()
                self.enabled = False
                self.on_tick = None
                return
            root = user_root(settings.multiprocess_dir)
            if root != self.root:
                self._release()
                self.root = root
            if self.server is None:
                self.server = ServerId.of(os.getppid())
            self.interval_s = settings.multiprocess_publish_millis / 1e3
            if self._signals is None:
                try:
                    self._signals = _published_signals()  # built here, not on the drainer thread
                except Exception:  # never fails configure(): the counts are published without gauges
                    self._signals = []
                    report_error("inferscope: reading this worker's gauges for publication failed")
            self._source = source
            self._exemplars = exemplars
            self.enabled = True
            self._next_due = 0.0

    @property
    def directory(self) -> Path | None:
        if self.root is None or self.server is None:
            return None
        return self.root / self.server.name

    def tick(self, aggregated: int = 0) -> None:
        """Publish if the interval is due (the drainer calls it after each drain, with the number
        of records that drain aggregated). A worker that aggregated nothing since its last
        publication only refreshes its gauges, every ``_IDLE_INTERVALS`` intervals."""
        self._aggregated_since += aggregated
        now = time.monotonic()
        if not self.enabled or now < self._next_due:
            return
        hook = self.on_tick
        if hook is not None:
            try:
                hook()
            except Exception:
                self._log.warning(
                    "inferscope: taking over the shared /metrics endpoint failed", exc_info=True
                )
        if not self._aggregated_since and self.slot is not None and now < self._refresh_due:
            self._next_due = now + self.interval_s
            return
        self.publish()

    def publish(self) -> bool:
        """Publish now; True when the publication was written."""
        with self._lock:
            if not self.enabled or self._source is None:
                return False
            self._next_due = time.monotonic() + self.interval_s
            self._refresh_due = self._next_due + (_IDLE_INTERVALS - 1) * self.interval_s
            self._aggregated_since = 0
            try:
                view = self._source()
                if self.slot is None and not view.series and not any(view.dropped.values()):
                    # Nothing counted yet: the process's gauges join a directory that its siblings
                    # made, but no directory is made for a process that never records (a master).
                    directory = self.directory
                    if directory is None or not directory.is_dir():
                        return False
                directory = self._claim()
                if directory is None:
                    return False
                publication = Publication.of_view(
                    view,
                    exemplars=self._exemplars,
                    signals=self._sample_signals(),
                    slot=self.slot if self.slot is not None else -1,
                    generation=self._generation,
                )
                _write_atomically(directory / f"slot-{self.slot}.data", publication.encode())
                return True
            except Exception:
                # Counted in inferscope.sdk.errors; what was recorded goes out with the next publication.
                self.failures += 1
                report_error("inferscope: publishing this worker's metrics failed")
                return False

    def close(self) -> None:
        """Publish a last time and give the slot up (at shutdown and at exit)."""
        if self.enabled:
            self.publish()
        with self._lock:
            self._release()
            self.enabled = False

    def _sample_signals(self) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        if self._signals is None:
            self._signals = _published_signals()
        sampled: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for signal in self._signals:
            points = [(float(o.value), dict(o.attributes or {})) for o in signal.observe()]
            if points:
                sampled[signal.spec.name] = points
        return sampled

    def _claim(self) -> Path | None:
        """This process's slot directory, taking a slot first if it has none. Caller holds the lock."""
        directory = self.directory
        if directory is None:
            return None
        if self.slot is not None and directory.is_dir():
            return directory
        if self.server is not None and not self.server.alive():
            # The server is gone (a master killed, say) and this worker lives on: nobody serves
            # the shared endpoint, and its reaper removes the directory. Making it again would
            # start a reaper per publication, each one finding the server gone at once.
            if not self._orphan_logged:
                self._orphan_logged = True
                self._log.warning(
                    "inferscope: the server process %d is gone; this worker stops publishing to "
                    "the shared /metrics",
                    self.server.pid,
                )
            return None
        self._release()
        self._make_directory(directory)
        for slot in range(MAX_SLOTS):
            fd = os.open(directory / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._slot_fd, self.slot = fd, slot
            self._generation = uuid.uuid4().hex
            self._retire(directory, slot)
            return directory
        self._log.warning("inferscope: every worker slot of %s is taken; not publishing", directory)
        return None

    def _make_directory(self, directory: Path) -> None:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
        else:
            # This worker made the server's directory: clean what crashed servers left first.
            sweep_stale_servers(directory.parent)
        # The reaper deletes the directory after the server is gone. The worker that made it
        # starts one; a worker that finds none (its start failed, or it was killed) starts another.
        assert self.server is not None
        if not lock_held(str(directory / REAPER_LOCK)):
            _start_reaper(directory, self.server)

    def _retire(self, directory: Path, slot: int) -> None:
        """Fold the last publication of the slot's dead owner into ``retired.data``."""
        previous_path = directory / f"slot-{slot}.data"
        previous = _read(previous_path)
        if previous is None:
            return
        with _directory_lock(directory):
            retired = _read(directory / _RETIRED) or Publication()
            if previous.generation not in retired.folded.get(slot, ()):
                retired.merge(previous)
                generations = [*retired.folded.get(slot, []), previous.generation]
                retired.folded[slot] = generations[-_FOLDED_REMEMBERED:]
                retired.signals = {}
                _write_atomically(directory / _RETIRED, retired.encode())
        with contextlib.suppress(FileNotFoundError):
            previous_path.unlink()

    def _release(self) -> None:
        """Give the slot up: what it published stays, for the next owner to retire. Caller holds the lock."""
        fd, self._slot_fd, self.slot = self._slot_fd, None, None
        if fd is not None:
            os.close(fd)  # the kernel drops the flock with the last descriptor of its open file

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        fd, self._slot_fd, self.slot = self._slot_fd, None, None
        if fd is not None:
            # Never flock(LOCK_UN) here: the lock belongs to the open file the parent still holds.
            with contextlib.suppress(OSError):
                os.close(fd)
        # The child's server is the process that forked it: a master that forks its workers.
        self.server = ServerId.of(os.getppid()) if self.enabled else None
        self._signals = None
        self._next_due = self._refresh_due = 0.0
        self._aggregated_since = 0


_reapers: list[subprocess.Popen[bytes]] = []


def _start_reaper(directory: Path, server: ServerId) -> None:
    """Start the process that deletes ``directory`` once ``server`` is gone (``_shm_reaper.py``)."""
    # Those that ended are waited for: never a zombie left per reaper started.
    _reapers[:] = [reaper for reaper in _reapers if reaper.poll() is None]
    script = Path(__file__).with_name("_shm_reaper.py")
    try:
        reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(script), str(directory), str(server.pid), str(server.start)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # not stopped with the worker's process group by a Ctrl-C
            close_fds=True,
        )
    except OSError:
        _logger.warning(
            "inferscope: could not start the process that removes %s after the server stops; "
            "the next server to start removes it",
            directory,
        )
        return
    _reapers.append(reaper)  # kept, so that it is not reported as a subprocess left running


#: The publisher of this process, driven by the drainer (``_pipeline.py``).
PUBLISHER = Publisher()
