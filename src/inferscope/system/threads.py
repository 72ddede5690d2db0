"""Thread-pool oversubscription: more BLAS/OpenMP/torch threads than CPUs this process may really use.

A container limited to 2 CPUs on a 64-core host still sees 64 cores in ``os.cpu_count()``; OpenMP and
torch size their pools from the core count or the affinity mask, never from the CFS quota. Each pool
then runs 64 threads on 2 CPUs' worth of quota, is throttled every period, and every inference pays
for it in latency. This module compares each pool with the usable CPUs, logs a warning once, and
exposes the ratio as the gauge ``inferscope.process.threads.oversubscription``.

Usable CPUs = min(len(sched_getaffinity), ceil(cgroup quota / period)).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from opentelemetry.metrics import Observation

from . import cgroup as _cgroup

__all__ = [
    "OVERSUBSCRIPTION_METRIC",
    "WATCHED_MODULES",
    "OversubscriptionReport",
    "ThreadPool",
    "build_report",
    "check_oversubscription",
    "install_import_hook",
    "oversubscription_observations",
    "thread_pools",
    "threadpoolctl_info",
    "torch_threads",
    "usable_cpus",
]

_logger = logging.getLogger("inferscope.system")

OVERSUBSCRIPTION_METRIC = "inferscope.process.threads.oversubscription"

#: Importing one of these may load a new thread pool (numpy and scipy: OpenBLAS; scikit-learn,
#: xgboost, lightgbm: OpenMP; torch: OpenMP/MKL plus its own pools), so the check runs again after.
WATCHED_MODULES = ("numpy", "scipy", "sklearn", "torch", "onnxruntime", "tensorflow", "xgboost", "lightgbm")


@dataclass(frozen=True)
class ThreadPool:
    """One thread pool of a native library, as threadpoolctl or torch reports it."""

    library: str  #: ``openblas``, ``mkl``, ``blis``, ``flexiblas``, ``openmp`` or ``torch``
    user_api: str  #: ``blas``, ``openmp`` or ``torch``
    num_threads: int
    detail: str  #: e.g. ``libgomp`` or ``libscipy_openblas 0.3.27 (pthreads)``; for messages
    filepath: str | None = None  #: the shared library, when known


@dataclass(frozen=True)
class OversubscriptionReport:
    """The thread pools of this process against the CPUs it may use."""

    usable_cpus: int
    affinity_cpus: int
    cgroup_cpu_limit: float | None  #: quota / period, None when unlimited
    pools: tuple[ThreadPool, ...]

    @property
    def oversubscribed_pools(self) -> tuple[ThreadPool, ...]:
        return tuple(pool for pool in self.pools if pool.num_threads > self.usable_cpus)

    @property
    def oversubscribed(self) -> bool:
        return bool(self.oversubscribed_pools)

    @property
    def ratios(self) -> dict[str, float]:
        """Per library: its largest pool's threads divided by the usable CPUs."""
        ratios: dict[str, float] = {}
        for pool in self.pools:
            ratio = pool.num_threads / self.usable_cpus
            ratios[pool.library] = max(ratio, ratios.get(pool.library, 0.0))
        return ratios

    def message(self) -> str:
        """A warning naming the pools, their threads, the usable CPUs, and how to fix it."""
        pools = ", ".join(
            f"{pool.library} ({pool.detail}) {pool.num_threads} threads" for pool in self.oversubscribed_pools
        )
        quota = "unlimited" if self.cgroup_cpu_limit is None else f"{self.cgroup_cpu_limit:g} CPUs"
        n = self.usable_cpus
        return (
            f"inferscope: thread oversubscription: {pools}, but this process may use {n} CPU(s) "
            f"(affinity {self.affinity_cpus} CPU(s), cgroup quota {quota}). Threads beyond the usable CPUs "
            f"wait for one another and add latency to every inference. Fix: set OMP_NUM_THREADS={n} "
            f"(and OPENBLAS_NUM_THREADS / MKL_NUM_THREADS) before these libraries load, call "
            f"torch.set_num_threads({n}), or limit at run time with threadpoolctl.threadpool_limits({n})."
        )


def usable_cpus(
    cgroup_info: _cgroup.CgroupInfo | None = None, affinity: Iterable[int] | None = None
) -> tuple[int, int, float | None]:
    """(usable CPUs, CPUs in the affinity mask, cgroup CPU limit) for this process."""
    if affinity is None:
        try:
            affinity_count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity_count = os.cpu_count() or 1
    else:
        affinity_count = len(set(affinity))
    info = cgroup_info if cgroup_info is not None else _cgroup.read_cgroup()
    usable = affinity_count
    whole = info.cpu_limit_whole
    if whole is not None:
        usable = min(usable, whole)
    return max(1, usable), affinity_count, info.cpu_limit


def _threadpoolctl_pools(info: Sequence[dict[str, Any]]) -> list[ThreadPool]:
    pools = []
    for entry in info:
        threads = entry.get("num_threads")
        if not isinstance(threads, int):
            continue
        details = [str(entry.get("prefix", "?"))]
        if entry.get("version"):
            details.append(str(entry["version"]))
        if entry.get("threading_layer"):
            details.append(f"({entry['threading_layer']})")
        pools.append(
            ThreadPool(
                library=str(entry.get("internal_api", "unknown")),
                user_api=str(entry.get("user_api", "unknown")),
                num_threads=threads,
                detail=" ".join(details),
                filepath=entry.get("filepath"),
            )
        )
    return pools


def threadpoolctl_info() -> list[dict[str, Any]] | None:
    """threadpoolctl's view of the loaded BLAS and OpenMP libraries, or None when it is not installed.

    It only inspects libraries already loaded, so it never imports numpy or torch.
    """
    try:
        import threadpoolctl
    except ImportError:
        return None
    info: list[dict[str, Any]] = threadpoolctl.threadpool_info()
    return info


def torch_threads(torch: ModuleType | None = None) -> tuple[int, int] | None:
    """(intra-op, inter-op) threads of torch when torch is already imported; never imports it."""
    module = torch if torch is not None else sys.modules.get("torch")
    if module is None:
        return None
    # A post-import hook of a module that torch imports runs while torch is half-initialised.
    get_intra = getattr(module, "get_num_threads", None)
    get_inter = getattr(module, "get_num_interop_threads", None)
    if not callable(get_intra) or not callable(get_inter):
        return None
    return int(get_intra()), int(get_inter())


def thread_pools() -> list[ThreadPool]:
    """The thread pools of the libraries loaded now: BLAS and OpenMP (via threadpoolctl) and torch."""
    pools = _threadpoolctl_pools(threadpoolctl_info() or [])
    torch = torch_threads()
    if torch is not None:
        pools.append(ThreadPool("torch", "torch", torch[0], "torch.get_num_threads()"))
    return pools


def build_report(
    pools: Sequence[ThreadPool], usable: int, affinity_cpus: int, cgroup_cpu_limit: float | None
) -> OversubscriptionReport:
    return OversubscriptionReport(max(1, usable), affinity_cpus, cgroup_cpu_limit, tuple(pools))


_warned_lock = threading.Lock()
_warned: set[tuple[str, str]] = set()


def check_oversubscription(*, warn: bool = True) -> OversubscriptionReport:
    """Compare the thread pools loaded now with the CPUs this process may use.

    Logs one WARNING per newly oversubscribed pool (not per call), naming the pools, their threads,
    the usable CPUs and the fix. Never raises: a library that cannot be inspected is left out.

    Example::

        report = check_oversubscription()
        report.oversubscribed, report.usable_cpus, report.ratios  # (True, 2, {'openmp': 32.0})
    """
    usable, affinity_count, limit = usable_cpus()
    try:
        pools = thread_pools()
    except Exception as error:  # threadpoolctl inspecting an unusual library must not reach the caller
        from .host import GUARD

        GUARD.record_error("thread pools", error)
        pools = []
    report = build_report(pools, usable, affinity_count, limit)
    if warn and report.oversubscribed:
        keys = {(pool.library, pool.filepath or pool.detail) for pool in report.oversubscribed_pools}
        with _warned_lock:
            new = keys - _warned
            _warned.update(new)
        if new:
            _logger.warning(report.message())
    return report


def oversubscription_observations() -> list[Observation]:
    """Points for the oversubscription gauge: one per library, threads / usable CPUs."""
    report = check_oversubscription()
    return [Observation(ratio, {"library": library}) for library, ratio in sorted(report.ratios.items())]


_hook_lock = threading.Lock()
_hooked: set[str] = set()


def _after_import(module: ModuleType) -> None:
    try:
        check_oversubscription()
    except Exception as error:  # an import hook must never break the user's import
        from .host import GUARD

        GUARD.record_error("oversubscription import hook", error)


def _after_fork_in_child() -> None:
    # A thread that held one of these locks at fork() does not exist in the child.
    global _warned_lock, _hook_lock
    _warned_lock = threading.Lock()
    _hook_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def install_import_hook(modules: Sequence[str] = WATCHED_MODULES) -> None:
    """Run the oversubscription check again right after any of ``modules`` is imported (once each).

    A module already imported is checked at once. Idempotent.

    Why wrapt's post-import hooks: they are a maintained meta-path finder (wrapt is already a
    dependency) that fires in the importing thread as soon as the import finishes. Polling
    ``sys.modules`` from a metrics callback would notice only at the next collection, and never when
    no metrics reader is configured; a hand-written finder would duplicate wrapt's loader wrapping.
    """
    import wrapt

    with _hook_lock:
        new = [name for name in modules if name not in _hooked]
        _hooked.update(new)
    for name in new:
        wrapt.register_post_import_hook(_after_import, name)
