"""The one switch between the C backend and the pure-Python backend.

The choice is made once, at import. ``INFERSCOPE_NO_EXTENSION=1`` forces pure Python; otherwise the
C extension is used when it was built (it is optional, so installing on a machine without a compiler
still works) and the pure-Python backend when it was not, with a warning that says so.
"""

from __future__ import annotations

import logging
import os

from ._contract import Backend

_logger = logging.getLogger("inferscope")


def _select() -> tuple[Backend, str, str]:
    if os.environ.get("INFERSCOPE_NO_EXTENSION", "").strip() not in ("", "0"):
        from . import _purepy

        return _purepy, "python", "INFERSCOPE_NO_EXTENSION is set"
    try:
        from . import _native
    except ImportError as exc:
        from . import _purepy

        _logger.warning(
            "inferscope: the C extension is not available (%s); using the pure-Python backend", exc
        )
        return _purepy, "python", f"the C extension is not available: {exc}"
    return _native, "c", "the C extension is built and enabled"


# Annotated with the contract, so that mypy checks both backend modules against it.
impl, BACKEND, BACKEND_REASON = _select()

Ring = impl.Ring
Runtime = impl.Runtime
monotonic_ns = impl.monotonic_ns
thread_cpu_ns = impl.thread_cpu_ns


def backend() -> str:
    """Which backend records calls: ``"c"`` or ``"python"``.

    >>> import inferscope
    >>> inferscope.backend() in ("c", "python")
    True
    """
    return BACKEND
