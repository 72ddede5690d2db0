"""ASGI: a middleware for any ASGI application, and an instrumentor for Starlette and FastAPI.

The stages come from the ASGI messages the application exchanges with the server:

- ``queue``: from the call until the application has received the whole request body (the last
  ``http.request`` message). FastAPI reads and parses the body before it calls the endpoint, so this
  is the time to receive it. Recorded only for requests with a body that was read before the
  response started (not for a GET).
- ``handler``: from there (or from the call) until the application starts its response
  (``http.response.start``): the endpoint, with the framework's validation and serialization.
- ``response``: from the response start until the last body message was handed to the server
  (``more_body`` false); for a streaming response, producing and sending the stream.

Only ``http`` requests are timed; ``websocket`` and ``lifespan`` pass through untouched. Wall time
only: a coroutine's thread CPU time between two awaits is other requests' time too.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..._runtime import RUNTIME
from .. import InstrumentOptions, Patches, report_internal_error
from ._requests import CURRENT_REQUEST, RequestTimer, Serving, ServingInstrumentor, serving_options
from .package import ASGI_INSTRUMENTS

__all__ = ["AsgiInstrumentor", "InferscopeASGIMiddleware", "serve_asgi"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_FINAL_SENDS = ("http.response.pathsend",)  # the ASGI extension that sends a file in one message


class _AsgiTimer(RequestTimer):
    __slots__ = ("body_received",)

    def __init__(self, serving: Serving) -> None:
        super().__init__(serving, measure_cpu=False)
        self.body_received = False

    def received(self, message: Message) -> None:
        if self.handler_start is not None or self.response_start is not None:
            return
        if message.get("type") == "http.request":
            # Only a request with a body has a queue stage: the empty body message of a GET is
            # read, if at all, whenever something listens for a disconnect (Starlette's
            # StreamingResponse does, concurrently with the endpoint).
            self.body_received = self.body_received or bool(message.get("body"))
            if self.body_received and not message.get("more_body", False):
                self.handler_start = self.now()

    def sending(self, message: Message) -> None:
        if self.response_start is None and message.get("type") == "http.response.start":
            self.response_start = self.now()
            status = message.get("status")
            self.status = status if isinstance(status, int) else 0

    def sent(self, message: Message) -> None:
        if self.response_end is not None or self.response_start is None:
            return
        kind = message.get("type")
        if (kind == "http.response.body" and not message.get("more_body", False)) or kind in _FINAL_SENDS:
            self.response_end = self.now()


def _route(scope: Scope) -> str | None:
    """The matched route's template (Starlette and FastAPI put the route in the scope), else the path."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    path = scope.get("path")
    return path if isinstance(path, str) else None


async def serve_asgi(serving: Serving, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app`` for one ASGI connection, recording the serving stages of an ``http`` request."""
    if (
        not serving.active
        or not RUNTIME.enabled
        or scope.get("type") != "http"
        or CURRENT_REQUEST.get() is not None
    ):
        await app(scope, receive, send)
        return
    try:
        timer = _AsgiTimer(serving)
        token = CURRENT_REQUEST.set(timer)
    except Exception:
        report_internal_error("inferscope: ASGI instrumentation failed; the request is not recorded")
        await app(scope, receive, send)
        return

    async def timed_receive() -> Message:
        message = await receive()
        try:
            timer.received(message)
        except Exception:
            report_internal_error("inferscope: ASGI instrumentation failed to time a received message")
        return message

    async def timed_send(message: Message) -> None:
        try:
            timer.sending(message)
        except Exception:
            report_internal_error("inferscope: ASGI instrumentation failed to time a sent message")
        await send(message)
        try:
            timer.sent(message)
        except Exception:
            report_internal_error("inferscope: ASGI instrumentation failed to time a sent message")

    escaped: type[BaseException] | None = None
    try:
        await app(scope, timed_receive, timed_send)
    except BaseException as exc:
        escaped = type(exc)
        raise
    finally:
        try:
            CURRENT_REQUEST.reset(token)
            timer.route = _route(scope)
        except Exception:
            report_internal_error("inferscope: ASGI instrumentation failed to finish a request")
        timer.finish(escaped)


class InferscopeASGIMiddleware:
    """Records the serving stages (``queue``, ``handler``, ``response``) of every HTTP request.

    Add it to any ASGI application::

        app.add_middleware(InferscopeASGIMiddleware)  # Starlette, FastAPI
        app = InferscopeASGIMiddleware(app)  # any ASGI application

    ``model_names`` maps routes (``"/predict/{name}"``, as the framework names them, else the
    request path) to a model name or ``(name, version)``, or is a callable of the route; the stages
    of those routes are recorded under that model, next to its inferences. ``attributes`` are
    added to those models' series (match the model's own to share its series). Under an active
    :class:`AsgiInstrumentor`, or inside another instance, it passes requests through: each request
    is recorded once, by the outermost.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        model_names: Any = None,
        attributes: Any = None,
    ) -> None:
        self.app = app
        self._serving = Serving(serving_options(model_names, attributes, where="InferscopeASGIMiddleware"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_asgi(self._serving, self.app, scope, receive, send)


def _starlette_call(serving: Serving, original: Any) -> Any:
    @functools.wraps(original)
    async def __call__(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        if not serving.active:
            await original(self, scope, receive, send)
            return
        await serve_asgi(serving, original.__get__(self), scope, receive, send)

    __call__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __call__


class AsgiInstrumentor(ServingInstrumentor):
    """Records the serving stages of every HTTP request to a Starlette or FastAPI application.

    It wraps ``Starlette.__call__``, which every Starlette and FastAPI application (and a mounted
    one) goes through, so applications created before ``instrument()`` are covered too, and the
    wrapper sits outside every middleware, OpenTelemetry's included. Options of ``instrument()``:

    - ``model_names``: ``{route: name or (name, version)}`` or a callable ``f(route) -> name |
      (name, version) | None``: record those routes' stages under that model;
    - ``attributes``: static attributes of those models' series.
    """

    _instruments = ASGI_INSTRUMENTS
    _module = "starlette"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> Serving:
        from starlette.applications import Starlette

        serving = Serving(options)
        patches.replace(Starlette, "__call__", _starlette_call(serving, Starlette.__dict__["__call__"]))
        return serving
