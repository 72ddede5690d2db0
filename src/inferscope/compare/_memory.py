"""The process's resident memory and its peak, from ``/proc/self`` (Linux).

The peak (``VmHWM``) is the highest RSS since the process started, or since it was reset by
writing ``5`` to ``/proc/self/clear_refs`` (Linux 4.0+). ``compare`` resets it before a few calls
of each variant, so the peak it reads is that variant's. Elsewhere, or where the file cannot be
written, the peak is not measured (None), and nothing else changes.
"""

from __future__ import annotations

__all__ = ["peak_rss_since_reset", "reset_peak_rss", "rss_bytes"]


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int | None:
    """The process's resident set size now."""
    return _status_kib("VmRSS")


def peak_rss_since_reset() -> int | None:
    """The highest RSS since :func:`reset_peak_rss` (or since the process started)."""
    return _status_kib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as file:
            file.write("5")
    except OSError:
        return False
    return True
