"""WSGI: a middleware for any WSGI application, and an instrumentor for Flask.

The stages:

- ``queue``: from the call until the view function starts (Flask's request context, URL matching
  and ``before_request`` hooks). Only the instrumentor knows when the view starts, so the plain
  middleware does not record it.
- ``handler``: from there (or from the call) until the application calls ``start_response``: the
  view, and making its response (``after_request`` hooks, serializing a returned dict).
- ``response``: from ``start_response`` until the server closes the response iterable, after its
  last chunk; for a streaming response, producing and sending the stream.

A WSGI request runs on one thread, so each stage also gets its thread CPU time (when the counter
set reads the CPU clock, as the default one does), unless its two ends ran on different threads or
greenlets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..._records import COUNTER_THREAD_CPU
from ..._runtime import RUNTIME
from .. import InstrumentOptions, Patches, defining_class, report_internal_error
from ._requests import CURRENT_REQUEST, RequestTimer, Serving, ServingInstrumentor, serving_options
from .package import WSGI_INSTRUMENTS

__all__ = ["InferscopeWSGIMiddleware", "WsgiInstrumentor", "serve_wsgi"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class _WsgiTimer(RequestTimer):
    __slots__ = ("body_error",)

    def __init__(self, serving: Serving, measure_cpu: bool) -> None:
        super().__init__(serving, measure_cpu)
        self.body_error: type[BaseException] | None = None

    def response_started(self, status: object) -> None:
        if self.response_start is None:
            self.response_start = self.now()
            code = str(status)[:3]
            self.status = int(code) if code.isdigit() else 0

    def closed(self, failed: type[BaseException] | None) -> None:
        escaped = self.body_error or failed
        end = self.now()
        if escaped is None and self.response_start is not None:
            self.response_end = end
        self.finish(escaped, end)


class _TimedBody:
    """The response iterable, passed through; the request is recorded when the server closes it.

    PEP 3333 makes servers call ``close()`` when they are done (after the last chunk, or on an
    error or a client that went away), so ``close`` is where the response ends.
    """

    __slots__ = ("_iterable", "_iterator", "_timer")

    def __init__(self, iterable: Iterable[bytes], timer: _WsgiTimer) -> None:
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._timer = timer

    def __iter__(self) -> _TimedBody:
        return self

    def __next__(self) -> bytes:
        iterator = self._iterator
        if iterator is None:
            iterator = self._iterator = iter(self._iterable)
        try:
            return next(iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            if self._timer.body_error is None:
                self._timer.body_error = type(exc)
            raise

    def close(self) -> None:
        failed: type[BaseException] | None = None
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        except BaseException as exc:
            failed = type(exc)
            raise
        finally:
            try:
                self._timer.closed(failed)
            except Exception:
                report_internal_error("inferscope: WSGI instrumentation failed to finish a request")


def serve_wsgi(serving: Serving, app: WSGIApp, environ: Environ, start_response: StartResponse) -> Any:
    """Run ``app`` for one WSGI request, recording its serving stages."""
    if not serving.active or not RUNTIME.enabled or CURRENT_REQUEST.get() is not None:
        return app(environ, start_response)
    try:
        timer = _WsgiTimer(serving, measure_cpu=bool(RUNTIME.counters & COUNTER_THREAD_CPU))
        path = environ.get("PATH_INFO")
        timer.route = path if isinstance(path, str) else None  # the Flask instrumentor sets the rule
        token = CURRENT_REQUEST.set(timer)
    except Exception:
        report_internal_error("inferscope: WSGI instrumentation failed; the request is not recorded")
        return app(environ, start_response)

    def timed_start_response(status: str, headers: Any, *exc_info: Any) -> Any:
        try:
            timer.response_started(status)
        except Exception:
            report_internal_error("inferscope: WSGI instrumentation failed to time start_response")
        return start_response(status, headers, *exc_info)

    try:
        iterable = app(environ, timed_start_response)
    except BaseException as exc:
        _reset(token)
        timer.finish(type(exc))
        raise
    _reset(token)
    try:
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(iterable, file_wrapper):
            # A file for the server to send (Flask's send_file): wrapped, it would no longer be
            # the server's own type, and the server would copy it instead of using sendfile().
            # Recorded now; its response stage ends when it is handed to the server.
            timer.closed(None)
            return iterable
        return _TimedBody(iterable, timer)
    except Exception:
        report_internal_error("inferscope: WSGI instrumentation failed; the request is not recorded")
        return iterable


def _reset(token: Any) -> None:
    try:
        CURRENT_REQUEST.reset(token)
    except Exception:
        report_internal_error("inferscope: WSGI instrumentation failed to finish a request")


class InferscopeWSGIMiddleware:
    """Records the serving stages (``handler``, ``response``) of every request to a WSGI application.

    Wrap the application, or Flask's ``wsgi_app`` (so that ``app`` stays the Flask object)::

        app.wsgi_app = InferscopeWSGIMiddleware(app.wsgi_app)  # Flask
        application = InferscopeWSGIMiddleware(application)  # any WSGI application

    ``model_names`` maps routes to a model name or ``(name, version)``, or is a callable of the
    route; a route is the request path here (the Flask instrumentor knows the URL rule). Those
    routes' stages are recorded under that model. ``attributes`` are added to those models'
    series. Under an active :class:`WsgiInstrumentor`, or inside another instance, it passes
    requests through: each request is recorded once, by the outermost.
    """

    def __init__(self, app: WSGIApp, *, model_names: Any = None, attributes: Any = None) -> None:
        self.app = app
        self._serving = Serving(serving_options(model_names, attributes, where="InferscopeWSGIMiddleware"))

    def __call__(self, environ: Environ, start_response: StartResponse) -> Any:
        return serve_wsgi(self._serving, self.app, environ, start_response)


def _flask_call(serving: Serving, original: Any) -> Any:
    @functools.wraps(original)
    def __call__(self: Any, environ: Environ, start_response: StartResponse) -> Any:
        if not serving.active:
            return original(self, environ, start_response)
        return serve_wsgi(serving, original.__get__(self), environ, start_response)

    __call__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __call__


def _flask_dispatch(serving: Serving, original: Any, request: Any, http_exception: type) -> Any:
    """``Flask.dispatch_request``, which calls the view: marks where ``handler`` starts and takes the
    URL rule as the route. An exception of the view is recorded on ``handler``, even when Flask
    turns it into an error page, except an HTTP exception (``abort(404)``): that is a response, as
    Starlette's ``HTTPException`` is. A request that matched no rule is not marked: Flask raises
    its 404 or 405 here, and no view ran."""

    @functools.wraps(original)
    def dispatch_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        timer = CURRENT_REQUEST.get()
        marked = False
        if timer is not None and serving.active:
            try:
                if (
                    timer.handler_start is None
                    and timer.response_start is None
                    and request.routing_exception is None
                ):
                    rule = request.url_rule
                    if rule is not None:
                        timer.route = str(rule.rule)
                    timer.handler_start = timer.now()
                    marked = True
            except Exception:
                report_internal_error("inferscope: Flask instrumentation failed to mark the view")
        if not marked:
            return original(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        except BaseException as exc:
            assert timer is not None
            if timer.handler_error is None and not isinstance(exc, http_exception):
                timer.handler_error = type(exc)
            raise

    dispatch_request.__inferscope_original__ = original  # type: ignore[attr-defined]
    return dispatch_request


class WsgiInstrumentor(ServingInstrumentor):
    """Records the serving stages of every request to a Flask application.

    It wraps ``Flask.__call__``, which the server calls for every request, so applications created
    before ``instrument()`` are covered, and so are ``wsgi_app`` middlewares (OpenTelemetry's
    included), which run inside it. It also wraps ``Flask.dispatch_request`` to see when the view
    starts. Options of ``instrument()``:

    - ``model_names``: ``{url rule: name or (name, version)}`` (``"/predict/<name>"``) or a
      callable ``f(rule) -> name | (name, version) | None``: record those routes' stages under
      that model;
    - ``attributes``: static attributes of those models' series.
    """

    _instruments = WSGI_INSTRUMENTS
    _module = "flask"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> Serving:
        from flask import Flask, request
        from werkzeug.exceptions import HTTPException

        serving = Serving(options)
        call_owner, dispatch_owner = _owner(Flask, "__call__"), _owner(Flask, "dispatch_request")
        patches.replace(call_owner, "__call__", _flask_call(serving, call_owner.__dict__["__call__"]))
        patches.replace(
            dispatch_owner,
            "dispatch_request",
            _flask_dispatch(serving, dispatch_owner.__dict__["dispatch_request"], request, HTTPException),
        )
        return serving


def _owner(cls: type, name: str) -> type:
    owner = defining_class(cls, name)
    if owner is None:
        raise TypeError(f"{cls.__qualname__} defines no {name}: this Flask version is not supported")
    return owner
