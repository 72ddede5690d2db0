"""cgroup v1 and v2: where this process's cgroup lives, its CPU and memory limits, and its throttling.

Everything here is a pure reader of files under a root path, so tests feed recorded layouts from
``tests/fixtures/cgroup``. Nothing raises: a missing or unreadable file reads as "unknown" (``None``).

Layouts handled:

- **v2** (unified): ``<root>/cgroup.controllers`` exists; the process's cgroup is the ``0::/path`` line
  of ``/proc/self/cgroup``. Limits are ``cpu.max`` and ``memory.max``; throttling is in ``cpu.stat``
  (``nr_periods``, ``nr_throttled``, ``throttled_usec``); pressure is in ``cpu.pressure`` and friends.
- **v1** (and the v1 "hybrid" layout, where a v2 hierarchy without controllers is mounted at
  ``<root>/unified``): one mount per controller (``cpu``, ``cpu,cpuacct``, ``memory``); the path comes
  from the controller's own line. Limits are ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and
  ``memory.limit_in_bytes``; throttling is in ``cpu.stat`` (``throttled_time`` in ns).

A container without its own cgroup namespace sees its host-side path (``/docker/<id>``) in
``/proc/self/cgroup`` while its cgroup is mounted at the root; the resolver then strips leading path
components until a directory exists, and falls back to the mount root.

The effective limit is the tightest one on the way from the process's cgroup up to the mount root,
because a parent's limit binds its children.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CgroupInfo",
    "CgroupPaths",
    "CpuThrottling",
    "cpu_limit_source_exists",
    "memory_limit_source_exists",
    "read_cgroup",
    "read_cpu_limit",
    "read_memory_limit",
    "read_throttling",
    "resolve_cgroup",
]

DEFAULT_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_SELF_CGROUP = Path("/proc/self/cgroup")

# v1 writes PAGE_COUNTER_MAX * page size (9223372036854771712 with 4 KiB pages) for "no limit"; any
# value this large cannot be a real limit on today's machines.
_UNLIMITED_MEMORY_BYTES = 1 << 62


@dataclass(frozen=True)
class CgroupPaths:
    """Where to read this process's cgroup files; resolved once, read many times."""

    version: int | None  #: 2, 1, or None when no cgroup filesystem was found
    hybrid: bool  #: v1 controllers with a v2 hierarchy (without controllers) beside them
    cpu_dir: Path | None  #: the process's cgroup in the CPU controller
    cpu_mount: Path | None  #: the top of the CPU hierarchy, where the walk for limits stops
    memory_dir: Path | None
    memory_mount: Path | None
    pressure_dir: Path | None  #: a v2 cgroup with its own ``*.pressure`` files, else None


@dataclass(frozen=True)
class CpuThrottling:
    """Cumulative CFS bandwidth counters of the cgroup (they only grow)."""

    nr_periods: int  #: enforcement periods that elapsed while the cgroup had runnable tasks
    nr_throttled: int  #: periods in which the cgroup ran out of quota
    throttled_time_ns: int  #: total time its tasks were held back


@dataclass(frozen=True)
class CgroupInfo:
    """This process's cgroup: version, limits and throttling counters. ``None`` means unknown or unlimited."""

    version: int | None
    hybrid: bool
    cpu_dir: Path | None
    memory_dir: Path | None
    cpu_quota_us: int | None  #: None when unlimited
    cpu_period_us: int | None
    memory_limit_bytes: int | None  #: None when unlimited
    throttling: CpuThrottling | None
    pressure_dir: Path | None

    @property
    def cpu_limit(self) -> float | None:
        """The CPU limit in CPUs (quota / period), or None when unlimited."""
        if self.cpu_quota_us is None or not self.cpu_period_us:
            return None
        return self.cpu_quota_us / self.cpu_period_us

    @property
    def cpu_limit_whole(self) -> int | None:
        """The CPU limit rounded up to whole CPUs: how many threads can run at once without throttling."""
        limit = self.cpu_limit
        return None if limit is None else max(1, math.ceil(limit))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _key_values(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def _parse_proc_self_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """{v1 controller: path} and the v2 ``0::`` path from the text of /proc/self/cgroup."""
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, unified


def _locate(mount: Path, cgroup_path: str) -> Path:
    """The directory for ``cgroup_path`` under ``mount``. Without a cgroup namespace the path is the
    host's view (``/docker/<id>``) while the mount shows the container's own cgroup, so leading
    components are dropped until a directory exists; the mount itself is the last resort."""
    parts = [part for part in cgroup_path.split("/") if part and part not in (".", "..")]
    for start in range(len(parts)):
        candidate = mount.joinpath(*parts[start:])
        if candidate.is_dir():
            return candidate
    return mount


def _v1_mount(root: Path, controller: str) -> Path | None:
    names = [controller]
    if controller in ("cpu", "cpuacct"):
        names += ["cpu,cpuacct", "cpuacct,cpu"]
    for name in names:
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def resolve_cgroup(
    root: Path = DEFAULT_ROOT, proc_self_cgroup: Path = DEFAULT_PROC_SELF_CGROUP
) -> CgroupPaths:
    """Find this process's cgroup directories for the CPU and memory controllers, for v1 and v2."""
    text = _read_text(proc_self_cgroup) or ""
    v1, unified = _parse_proc_self_cgroup(text)
    if (root / "cgroup.controllers").is_file():
        directory = _locate(root, unified or "/")
        has_pressure = (directory / "cpu.pressure").is_file()
        return CgroupPaths(2, False, directory, root, directory, root, directory if has_pressure else None)
    cpu_mount = _v1_mount(root, "cpu")
    memory_mount = _v1_mount(root, "memory")
    if cpu_mount is None and memory_mount is None:
        return CgroupPaths(None, False, None, None, None, None, None)
    hybrid = (root / "unified" / "cgroup.controllers").is_file()
    cpu_dir = _locate(cpu_mount, v1.get("cpu", "/")) if cpu_mount else None
    memory_dir = _locate(memory_mount, v1.get("memory", "/")) if memory_mount else None
    return CgroupPaths(1, hybrid, cpu_dir, cpu_mount, memory_dir, memory_mount, None)


def _ancestors(directory: Path, mount: Path) -> list[Path]:
    """``directory`` and its parents up to and including ``mount``."""
    chain = [directory]
    current = directory
    while current != mount and mount in current.parents:
        current = current.parent
        chain.append(current)
    return chain


def _cpu_quota_at(directory: Path, version: int) -> tuple[int, int] | None:
    """(quota_us, period_us) set at one level, or None when that level is unlimited or unreadable."""
    if version == 2:
        text = _read_text(directory / "cpu.max")
        if text is None:
            return None
        parts = text.split()
        if len(parts) != 2 or parts[0] == "max":
            return None
        try:
            quota, period = int(parts[0]), int(parts[1])
        except ValueError:
            return None
    else:
        quota_v1 = _read_int(directory / "cpu.cfs_quota_us")
        period_v1 = _read_int(directory / "cpu.cfs_period_us")
        if quota_v1 is None or period_v1 is None:
            return None
        quota, period = quota_v1, period_v1
    if quota <= 0 or period <= 0:
        return None
    return quota, period


def read_cpu_limit(paths: CgroupPaths) -> tuple[int, int] | None:
    """The tightest (quota_us, period_us) from the process's cgroup up to the root; None when unlimited."""
    if paths.version is None or paths.cpu_dir is None or paths.cpu_mount is None:
        return None
    best: tuple[int, int] | None = None
    for directory in _ancestors(paths.cpu_dir, paths.cpu_mount):
        found = _cpu_quota_at(directory, paths.version)
        if found is not None and (best is None or found[0] / found[1] < best[0] / best[1]):
            best = found
    return best


def cpu_limit_source_exists(paths: CgroupPaths) -> bool:
    """Whether this cgroup has a CPU limit file at all (it may still say "unlimited")."""
    if paths.cpu_dir is None:
        return False
    name = "cpu.max" if paths.version == 2 else "cpu.cfs_quota_us"
    return (paths.cpu_dir / name).is_file()


def _memory_limit_at(directory: Path, version: int) -> int | None:
    if version == 2:
        text = _read_text(directory / "memory.max")
        if text is None or text.strip() == "max":
            return None
        try:
            limit = int(text.strip())
        except ValueError:
            return None
    else:
        limit_v1 = _read_int(directory / "memory.limit_in_bytes")
        if limit_v1 is None:
            return None
        limit = limit_v1
    return limit if 0 < limit < _UNLIMITED_MEMORY_BYTES else None


def read_memory_limit(paths: CgroupPaths) -> int | None:
    """The tightest memory limit in bytes from the process's cgroup up to the root; None when unlimited."""
    if paths.version is None or paths.memory_dir is None or paths.memory_mount is None:
        return None
    limits = [
        limit
        for directory in _ancestors(paths.memory_dir, paths.memory_mount)
        if (limit := _memory_limit_at(directory, paths.version)) is not None
    ]
    return min(limits) if limits else None


def memory_limit_source_exists(paths: CgroupPaths) -> bool:
    """Whether this cgroup has a memory limit file at all (it may still say "unlimited")."""
    if paths.memory_dir is None:
        return False
    name = "memory.max" if paths.version == 2 else "memory.limit_in_bytes"
    return (paths.memory_dir / name).is_file()


def read_throttling(paths: CgroupPaths) -> CpuThrottling | None:
    """The cgroup's CFS throttling counters from ``cpu.stat``; None where the file or fields are missing
    (e.g. the v2 root cgroup, which has no bandwidth control)."""
    if paths.version is None or paths.cpu_dir is None:
        return None
    text = _read_text(paths.cpu_dir / "cpu.stat")
    if text is None:
        return None
    stat = _key_values(text)
    periods = stat.get("nr_periods")
    throttled = stat.get("nr_throttled")
    if periods is None or throttled is None:
        return None
    if "throttled_usec" in stat:
        throttled_ns = stat["throttled_usec"] * 1000
    elif "throttled_time" in stat:
        throttled_ns = stat["throttled_time"]
    else:
        return None
    return CpuThrottling(periods, throttled, throttled_ns)


def read_cgroup(root: Path = DEFAULT_ROOT, proc_self_cgroup: Path = DEFAULT_PROC_SELF_CGROUP) -> CgroupInfo:
    """Read this process's cgroup: version, CPU quota and period, memory limit and throttling counters.

    Example::

        info = read_cgroup()
        info.cpu_limit  # 1.5 in a container limited to 1.5 CPUs; None when unlimited
    """
    paths = resolve_cgroup(root, proc_self_cgroup)
    quota = read_cpu_limit(paths)
    return CgroupInfo(
        version=paths.version,
        hybrid=paths.hybrid,
        cpu_dir=paths.cpu_dir,
        memory_dir=paths.memory_dir,
        cpu_quota_us=quota[0] if quota else None,
        cpu_period_us=quota[1] if quota else _default_period(paths),
        memory_limit_bytes=read_memory_limit(paths),
        throttling=read_throttling(paths),
        pressure_dir=paths.pressure_dir,
    )


def _default_period(paths: CgroupPaths) -> int | None:
    """The period configured on the process's cgroup even when no quota is set (for the record)."""
    if paths.cpu_dir is None:
        return None
    if paths.version == 2:
        text = _read_text(paths.cpu_dir / "cpu.max")
        parts = text.split() if text else []
        return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else None
    return _read_int(paths.cpu_dir / "cpu.cfs_period_us")
