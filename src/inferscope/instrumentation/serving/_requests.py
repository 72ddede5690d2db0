"""What the ASGI and WSGI sides share: the stage keys of a route, and the timer of one request.

A request is timed with clock reads at a few instants (it arrived, the endpoint started, the
response started, its last byte was handed over) and recorded once, when it is over, with
``Runtime.record``: one record per stage, under keys chosen at that moment. Nothing is pushed on the
runtime's stack of open entries, so stages and inferences that run inside the handler are keyed
exactly as they are without a serving instrumentor (a user's ``stage("preprocess")`` stays
``preprocess``, never ``handler/preprocess``). That also means nothing can be left open when a
request is abandoned between two ``await``s, or when a server never closes a response.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any, NamedTuple

from ..._backend import monotonic_ns, thread_cpu_ns
from ..._records import NO_MODEL_KEY
from ..._runtime import REGISTRY, RUNTIME
from .. import InferscopeInstrumentor, InstrumentOptions, ModelIdentity, report_internal_error

#: The conventional stage names (docs/metrics.md): time before the endpoint runs, the endpoint
#: until its response starts, and the response from its start to its last byte.
QUEUE = "queue"
HANDLER = "handler"
RESPONSE = "response"
SERVING_STAGES = (QUEUE, HANDLER, RESPONSE)

#: Routes whose keys are remembered. Past this, keys are looked up per request (a dictionary
#: lookup in the registry): raw paths of unmatched requests must not grow a cache without bound.
MAX_CACHED_ROUTES = 1024

#: The default of ``InstrumentOptions.identity``: told apart by identity, never by value.
_UNNAMED = ModelIdentity("\0inferscope: no model")

#: ``(monotonic ns, thread CPU ns or -1, thread id)`` of one instant of a request.
Instant = tuple[int, int, int]


class StageKeys(NamedTuple):
    queue: int
    handler: int
    response: int


class Serving:
    """The options of one serving instrumentor or middleware, and the stage keys of each route.

    A route is the template of the matched route when the framework gives one (``/predict/{name}``
    for Starlette and FastAPI, ``/predict/<name>`` for Flask), else the request path. Routes that
    ``model_names`` names (by a mapping keyed by route, or a callable of the route) record their
    stages under that model's key, next to its inferences; every other request records them with no
    model, as stages outside any inference do.
    """

    __slots__ = ("_keys", "active", "options")

    def __init__(self, options: InstrumentOptions) -> None:
        self.options = options
        self.active = True
        self._keys: dict[str | None, StageKeys] = {}

    def stage_keys(self, route: str | None) -> StageKeys:
        found = self._keys.get(route)
        if found is None:
            found = self._resolve(route)
            if len(self._keys) < MAX_CACHED_ROUTES:
                self._keys[route] = found
        return found

    def _resolve(self, route: str | None) -> StageKeys:
        parent = NO_MODEL_KEY
        if route is not None:
            identity = self.options.identity(route, _UNNAMED, (route,))
            if identity is not _UNNAMED:
                parent = REGISTRY.inference_key(identity.name, identity.version, self.options.attributes)
        return StageKeys(*(REGISTRY.stage_key(parent, name) for name in SERVING_STAGES))


def serving_options(
    model_names: object = None, attributes: object = None, *, where: str = "the middleware"
) -> InstrumentOptions:
    """The options of a hand-added middleware, checked as ``instrument()`` checks them."""
    try:
        return InstrumentOptions(model_names=model_names, attributes=attributes)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None


class ServingInstrumentor(InferscopeInstrumentor):
    """The base of the ASGI and WSGI instrumentors: they time every request, so ``models=`` has
    no meaning for them and is refused."""

    def _parse_options(self, kwargs: dict[str, Any]) -> tuple[InstrumentOptions, dict[str, Any]]:
        if kwargs.get("models") is not None:
            raise TypeError(
                f"{type(self).__name__}.instrument() takes no models= option: every request is "
                "timed; name the routes that serve a model with model_names={route: name}"
            )
        parsed: tuple[InstrumentOptions, dict[str, Any]] = super()._parse_options(kwargs)
        return parsed


#: The request being timed in this context, if any. An application called inside another one's
#: request (a mounted app, a middleware added by hand under an active instrumentor) is not timed a
#: second time, and the Flask instrumentor marks the start of the view on it.
CURRENT_REQUEST: ContextVar[RequestTimer | None] = ContextVar("inferscope_serving_request", default=None)


class RequestTimer:
    """The instants of one request, and what failed; recorded once by :meth:`finish`.

    Stages, from the instants:

    - ``queue``: arrival -> ``handler_start``, only when the start of the endpoint is known;
    - ``handler``: ``handler_start`` (or arrival) -> ``response_start`` (or the end);
    - ``response``: ``response_start`` -> ``response_end`` (or the end), when a response started.

    An exception is counted on the stage it interrupted: on ``handler`` until the response starts,
    on ``response`` while it is sent. One the endpoint raised (``handler_error``) is counted on
    ``handler`` even when the framework turned it into an error response.
    """

    __slots__ = (
        "finished",
        "handler_error",
        "handler_start",
        "measure_cpu",
        "response_end",
        "response_start",
        "route",
        "serving",
        "start",
        "status",
    )

    def __init__(self, serving: Serving, measure_cpu: bool) -> None:
        self.serving = serving
        self.measure_cpu = measure_cpu
        self.route: str | None = None
        self.handler_start: Instant | None = None
        self.handler_error: type[BaseException] | None = None
        self.response_start: Instant | None = None
        self.response_end: Instant | None = None
        self.status = 0
        self.finished = False
        self.start = self.now()

    def now(self) -> Instant:
        if self.measure_cpu:
            return monotonic_ns(), thread_cpu_ns(), threading.get_ident()
        return monotonic_ns(), -1, 0

    def finish(self, escaped: type[BaseException] | None, end: Instant | None = None) -> None:
        """Record the stages of the request; ``escaped`` is the exception that ended it, if any,
        and ``end`` the instant it ended (now, by default). Runs once; never raises."""
        if self.finished:
            return
        self.finished = True
        try:
            if end is None:
                end = self.now()
            start, handler_start = self.start, self.handler_start
            response_start, response_end = self.response_start, self.response_end
            handler_error = self.handler_error
            response_error: type[BaseException] | None = None
            if escaped is not None:
                if response_start is not None and response_end is None:
                    response_error = escaped  # the response was being sent (a stream that failed)
                elif handler_error is None and (response_start is None or self.status >= 500):
                    # Before any response, or the error response made for it (Starlette's
                    # ServerErrorMiddleware sends a 500, then re-raises). After a complete response
                    # that is not an error (a background task failed), it is no stage's failure.
                    handler_error = escaped
            keys = self.serving.stage_keys(self.route)
            if handler_start is not None:
                _record(keys.queue, start, handler_start, None)
            _record(
                keys.handler,
                start if handler_start is None else handler_start,
                end if response_start is None else response_start,
                handler_error,
            )
            if response_start is not None:
                _record(
                    keys.response,
                    response_start,
                    end if response_end is None else response_end,
                    response_error,
                )
        except Exception:
            report_internal_error("inferscope: a request's serving stages could not be recorded")


def _record(key: int, start: Instant, end: Instant, error: type[BaseException] | None) -> None:
    wall_ns = max(0, end[0] - start[0])
    # CPU time only when both ends were read on the same thread (not across threads or greenlets).
    same_thread = start[1] >= 0 and end[1] >= 0 and start[2] == end[2]
    cpu_ns = max(0, end[1] - start[1]) if same_thread else -1
    RUNTIME.record(key, error, 0, start[0], wall_ns, cpu_ns)
