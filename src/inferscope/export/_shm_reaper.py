"""Removes a pre-fork server's shared directory once the server is gone (export/multiworker.py).

Run as its own small interpreter (``python -I -S _shm_reaper.py DIR PID START``) by the worker that
created the directory, in a session of its own, so that it outlives every worker: it polls the
server process (the workers' parent) twice a second and, once that process is gone and no worker
still holds a slot, deletes the directory. It also deletes it once no worker at all has held a
slot for a minute, whatever the parent does. It imports nothing from inferscope (and, with ``-S``,
nothing from site-packages), so it costs a few MB of memory for the server's lifetime.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time

_POLL_SECONDS = 0.5
#: After the server process is gone, how long workers that outlive it may keep their slots.
_WORKERS_GRACE_SECONDS = 60.0
#: How long a server may have no worker at all before it counts as stopped: longer than any
#: master takes to replace its workers.
_NO_WORKER_SECONDS = 60.0


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None when it does not run
    (a zombie counts as gone). Together with the pid it names a process for good: a pid is reused,
    the pair is not."""
    if not os.path.exists("/proc/self/stat"):  # no procfs (macOS): the pid alone, start 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def lock_held(path: str) -> bool:
    """Whether a live process holds the ``flock`` of ``path`` (this one included)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock taken just now, if it was
    return False


def slot_held(directory: str) -> bool:
    """Whether a live worker holds one of the directory's slots (its lock file is locked)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(
        lock_held(os.path.join(directory, name))
        for name in names
        if name.startswith("slot-") and name.endswith(".lock")
    )


def remove(directory: str) -> None:
    """Delete the directory, then its parent (the user's root) if that is empty now."""
    shutil.rmtree(directory, ignore_errors=True)
    # Fails while other servers' directories are in it, or when another reaper removed it.
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(directory))


#: Held by the directory's reaper while it runs: a worker that finds it free starts another.
REAPER_LOCK = "reaper.lock"


def main(argv: list[str]) -> int:
    directory, pid, start = argv[0], int(argv[1]), int(argv[2])
    try:
        lock = os.open(os.path.join(directory, REAPER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another reaper watches the directory, or it is gone already
    idle_since: float | None = None
    while os.path.isdir(directory) and process_start(pid) == start:
        # A server whose workers have all been gone for a while has stopped too, even when the
        # process that started them goes on (a shell that ran a single-process server).
        if slot_held(directory):
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > _NO_WORKER_SECONDS:
            break
        time.sleep(_POLL_SECONDS)
    deadline = time.monotonic() + _WORKERS_GRACE_SECONDS
    while os.path.isdir(directory) and slot_held(directory) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    remove(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
