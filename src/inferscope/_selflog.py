"""inferscope's own failures: counted exactly, logged at most once a minute, never with a secret.

A failure inside inferscope (an exporter that raised, a batch that could not be aggregated, an
instrumentor that could not time a call) must neither raise into the application nor flood its
log: a collector that is down fails every export, forever. So each failure is counted in
``ERRORS`` (exported as ``inferscope.sdk.errors``) and logged only when the same kind of message
was not logged in the last minute.

Whatever inferscope logs or puts into an error message passes through ``redact()``: an endpoint
URL may carry a password (``https://user:secret@collector``) or a token in its query.

>>> redact("export to https://svc:hunter2@otel.example.com:4318/v1/metrics failed")
'export to https://svc:***@otel.example.com:4318/v1/metrics failed'
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator

__all__ = [
    "ERRORS",
    "ErrorCounter",
    "RateLimitedLog",
    "exporter_log",
    "exporting_quietly",
    "install_redaction",
    "quiet_exporter_loggers",
    "redact",
    "report_error",
]

#: The default interval between two log lines of the same kind.
LOG_INTERVAL_SECONDS = 60.0

_logger = logging.getLogger("inferscope")

# scheme://user:password@ -> scheme://user:***@ ; scheme://token@ -> scheme://***@
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s?#]+)@")
# ?token=...&api_key=... in a URL's query, Authorization=Bearer ... in OTLP header lists.
_SECRET_PARAMS = re.compile(
    r"(?P<name>\b(?:[\w-]*(?:token|secret|password|passwd|pwd|api[_-]?key|apikey|auth|signature)[\w-]*))"
    r"(?P<sep>=|:\s*)(?P<value>(?:Bearer\s+|Basic\s+)?[^\s&,;'\"]+)",
    re.IGNORECASE,
)


def _hide_userinfo(match: re.Match[str]) -> str:
    user, has_password, _ = match["userinfo"].partition(":")
    hidden = f"{user}:***" if has_password else "***"
    return f"{match['scheme']}{hidden}@"


# user:password@host without a scheme, as gRPC quotes a target.
_BARE_USERINFO = re.compile(r"(?<![\w/@:.-])(?P<user>[\w.%+-]+):(?P<password>[^\s/@]+)@(?=[\w\[])")


def redact(text: str) -> str:
    """``text`` with the credentials of any URL (``user:password@``, a lone token before ``@``)
    and the values of secret-looking parameters (``token=``, ``api_key=``, ``Authorization=``)
    replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(_hide_userinfo, text)
        text = _BARE_USERINFO.sub(lambda m: f"{m['user']}:***@", text)
    return _SECRET_PARAMS.sub(lambda m: f"{m['name']}{m['sep']}***", text)


class _RedactingFilter(logging.Filter):
    """Redacts a record's message, arguments and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
        except Exception:  # a record that cannot be rendered is the handler's to report
            pass
        return True


_FILTER = _RedactingFilter()


def install_redaction(logger: logging.Logger) -> logging.Logger:
    """Redact everything ``logger`` logs (a filter applies to the logger it is added to only, not
    to its children, so each of inferscope's loggers calls this). Returns the logger."""
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


install_redaction(_logger)

#: Everything here that holds a lock, reset in a forked child.
_AFTER_FORK: weakref.WeakSet[ErrorCounter | RateLimitedLog] = weakref.WeakSet()


class ErrorCounter:
    """An exact count that any thread may increment: ``+=`` on an attribute is a read, an add and
    a write, and two threads interleaving them lose one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0
        _AFTER_FORK.add(self)

    def add(self, count: int = 1) -> None:
        with self._lock:
            self._value += count

    @property
    def value(self) -> int:
        return self._value

    def _after_fork_in_child(self) -> None:
        # The child starts from zero (the parent exports its own) with a lock nobody holds.
        self._lock = threading.Lock()
        self._value = 0


class RateLimitedLog:
    """Logs each kind of message (its ``key``, by default the message itself, or one kind for all
    with ``per_message=False``) at most once per ``interval_seconds``; callers count what is not
    logged.

    >>> log = RateLimitedLog(logging.getLogger("inferscope"))
    >>> log.warning("inferscope: the collector is down")  # doctest: +SKIP
    True
    """

    def __init__(
        self,
        logger: logging.Logger = _logger,
        interval_seconds: float = LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        *,
        per_message: bool = True,
        key: Hashable = None,
        shared_with: RateLimitedLog | None = None,
    ) -> None:
        self.per_message = per_message
        self._key = key
        self._shared_with = shared_with
        self.logger = install_redaction(logger) if logger.name.startswith("inferscope") else logger
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}
        _AFTER_FORK.add(self)

    def due(self, key: Hashable) -> bool:
        """Whether a line of kind ``key`` may be logged now; if so, the next one waits a minute."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_seconds:
                return False
            self._last[key] = now
            return True

    def log(
        self, level: int, message: str, *args: object, key: Hashable = None, exc_info: bool = False
    ) -> bool:
        """Log ``message % args`` unless a line of the same kind was logged within the interval;
        returns whether it was logged."""
        if key is None:
            key = self._key if self._key is not None else message if self.per_message else None
        limiter = self._shared_with if self._shared_with is not None else self
        if not limiter.due(key):
            return False
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, message: str, *args: object, key: Hashable = None, exc_info: bool = False) -> bool:
        return self.log(logging.WARNING, message, *args, key=key, exc_info=exc_info)

    def error(self, message: str, *args: object, key: Hashable = None, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, message, *args, key=key, exc_info=exc_info)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


#: inferscope's internal errors on the Python side (the C backend counts its own), published as
#: ``inferscope.sdk.errors``.
ERRORS = ErrorCounter()
_ERROR_LOG = RateLimitedLog(_logger)


# --- the logs of the exporters inferscope builds --------------------------------------------------

_exporting = threading.local()
_suppressed: dict[int, int] = {}
_EXPORTER_LOG = RateLimitedLog(logging.getLogger("opentelemetry.exporter"))


@contextlib.contextmanager
def exporting_quietly(exporter: object) -> Iterator[None]:
    """While ``exporter`` (one inferscope built) exports on this thread, the OTel exporters' own
    log lines are limited to one per exporter per minute: a collector that is down otherwise
    logs a line per retry (5 per export over gRPC), and an application's own exporters keep
    their lines untouched. Call :func:`quiet_exporter_loggers` once the exporter's module is
    imported."""
    previous = getattr(_exporting, "key", None)
    _exporting.key = id(exporter)
    try:
        yield
    finally:
        _exporting.key = previous


class _ExporterLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(_exporting, "key", None)
        if key is None or record.levelno < logging.WARNING:
            return True
        if not _EXPORTER_LOG.due(key):
            with _suppressed_lock:
                _suppressed[key] = _suppressed.get(key, 0) + 1
            return False
        with _suppressed_lock:
            count = _suppressed.pop(key, 0)
        try:
            message = redact(record.getMessage())
            if count:
                message += f" (and {count} more line(s) like it in the last minute, not shown by inferscope)"
            record.msg, record.args = message, None
        except Exception:  # the handler reports a record it cannot render
            pass
        return True


_EXPORTER_FILTER = _ExporterLogFilter()
_suppressed_lock = threading.Lock()


def quiet_exporter_loggers(prefix: str = "opentelemetry.exporter") -> None:
    """Add the filter of :func:`exporting_quietly` to every logger under ``prefix`` that exists
    now (a filter applies to the logger it is added to only, and these are made on import)."""
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        quiet = name.startswith(prefix) and isinstance(logger, logging.Logger)
        if quiet and _EXPORTER_FILTER not in logger.filters:  # type: ignore[union-attr]
            logger.addFilter(_EXPORTER_FILTER)  # type: ignore[union-attr]


def exporter_log(exporter: object, logger: logging.Logger = _logger) -> RateLimitedLog:
    """The once-a-minute log of inferscope's lines about ``exporter``, sharing its minute with the
    exporter library's own lines (:func:`exporting_quietly`): a collector that is down gives one
    line per exporter per minute, whichever of the two writes it."""
    return RateLimitedLog(logger, key=id(exporter), shared_with=_EXPORTER_LOG)


def report_error(message: str, *, logger: logging.Logger | None = None) -> None:
    """Count an internal failure in ``ERRORS`` and log ``message`` with the current exception's
    traceback, at most once a minute per message. Never raises: call it from an ``except`` block."""
    try:
        ERRORS.add()
        log = _ERROR_LOG if logger is None else _logs_by_logger(logger)
        log.error(message, exc_info=True)
    except Exception:  # reporting must never fail the caller
        pass


_by_logger: dict[str, RateLimitedLog] = {}
_by_logger_lock = threading.Lock()


def _logs_by_logger(logger: logging.Logger) -> RateLimitedLog:
    found = _by_logger.get(logger.name)
    if found is None:
        with _by_logger_lock:
            found = _by_logger.setdefault(logger.name, RateLimitedLog(logger))
    return found


def _after_fork_in_child() -> None:
    # Only the forking thread survives fork(): a lock another thread held would stay taken.
    global _by_logger_lock, _suppressed_lock
    _by_logger_lock = threading.Lock()
    _suppressed_lock = threading.Lock()
    for item in list(_AFTER_FORK):
        item._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
