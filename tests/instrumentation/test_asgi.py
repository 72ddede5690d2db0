"""ASGI serving stages with real Starlette and FastAPI applications, driven through httpx's
ASGITransport, and raw ASGI calls where a test needs to control each message's timing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import inferscope
from inferscope import _pipeline
from inferscope._runtime import RUNTIME
from tests.instrumentation import instrumenting, require, sorted_rows

fastapi = require("fastapi")
httpx = require("httpx")
require("starlette")

from fastapi import BackgroundTasks, FastAPI, HTTPException  # noqa: E402
from fastapi.responses import StreamingResponse  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402

from inferscope.instrumentation.serving import (  # noqa: E402
    AsgiInstrumentor,
    InferscopeASGIMiddleware,
    _requests,
    asgi,
)

SLEEP_S = 0.05
#: Quantiles come from exponential histograms: within 0.55% of the recorded value.
QUANTILE_ERROR = 0.99


@pytest.fixture
def instrument() -> Iterator[Callable[..., Any]]:
    """``instrument(**options)`` instruments Starlette; teardown always uninstruments."""
    yield from instrumenting(AsgiInstrumentor)


def send_requests(
    app: Any, *requests: tuple[str, str, dict[str, Any]], raise_app_exceptions: bool = True
) -> list[Any]:
    """Send ``(method, url, httpx keyword arguments)`` requests, one after the other."""

    async def run() -> list[Any]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.request(method, url, **kwargs) for method, url, kwargs in requests]

    return asyncio.run(run())


def get(url: str) -> tuple[str, str, dict[str, Any]]:
    return ("GET", url, {})


def post(url: str, body: Any) -> tuple[str, str, dict[str, Any]]:
    return ("POST", url, {"json": body})


def row(model: str | None, stage: str | None) -> Any:
    return inferscope.snapshot().row(model, stage)


def scoring_app() -> Any:
    """A FastAPI service: an async POST endpoint with a body, a sync GET, a stream."""
    app = FastAPI()

    @inferscope.track_inference(model="scorer", version="2")
    def score(values: list[float]) -> float:
        with inferscope.stage("infer"):
            return sum(values)

    @app.post("/predict/{name}")
    async def predict(name: str, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(SLEEP_S)
        with inferscope.stage("featurize"):  # outside any inference: a root stage of its own
            values = [float(v) for v in body["values"]]
        return {"name": name, "score": score(values)}

    @app.get("/healthz")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> Any:
        async def chunks() -> Any:
            for i in range(3):
                await asyncio.sleep(SLEEP_S)
                yield f"{i}\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    return app


# --- what is recorded --------------------------------------------------------------------------------


def test_a_request_with_a_body_records_queue_handler_and_response(instrument):
    app = scoring_app()
    instrument()
    responses = send_requests(app, *[post("/predict/a", {"values": [1, 2]})] * 3)
    assert [r.json() for r in responses] == [{"name": "a", "score": 3.0}] * 3
    queue, handler, response = row(None, "queue"), row(None, "handler"), row(None, "response")
    assert (queue.count, handler.count, response.count) == (3, 3, 3)
    assert handler.p50 >= SLEEP_S * QUANTILE_ERROR
    assert queue.max < SLEEP_S and response.max < SLEEP_S
    assert (queue.errors, handler.errors, response.errors) == (0, 0, 0)
    # Coroutines interleave: their thread CPU time would be other requests' too.
    assert handler.cpu_seconds is None


def test_a_request_without_a_body_has_no_queue_stage(instrument):
    app = scoring_app()
    instrument()
    send_requests(app, get("/healthz"), get("/healthz"))
    assert [(m, s, n) for m, s, n in sorted_rows()] == [(None, "handler", 2), (None, "response", 2)]


def test_inferences_in_the_handler_keep_their_own_keys(instrument):
    app = scoring_app()
    send_requests(app, post("/predict/a", {"values": [1]}))
    without = sorted_rows()
    _pipeline.reset_aggregates()
    instrument()
    send_requests(app, post("/predict/a", {"values": [1]}))
    with_serving = sorted_rows()
    # The serving stages are added; nothing that ran in the handler is renamed or nested under them.
    assert without == [(None, "featurize", 1), ("scorer", None, 1), ("scorer", "infer", 1)]
    assert with_serving == [
        (None, "featurize", 1),
        (None, "handler", 1),
        (None, "queue", 1),
        (None, "response", 1),
        ("scorer", None, 1),
        ("scorer", "infer", 1),
    ]


def test_a_streaming_response_is_timed_until_its_last_chunk(instrument):
    app = scoring_app()
    instrument()
    [response] = send_requests(app, get("/stream"))
    assert response.text == "0\n1\n2\n"
    assert row(None, "response").p50 >= 3 * SLEEP_S
    assert row(None, "handler").p50 < SLEEP_S


def test_raw_asgi_stages_follow_the_messages():
    """queue ends with the last body message, handler with http.response.start, response with
    the last body message sent."""
    body_delay_s, handler_s, chunk_delay_s = 0.04, 0.05, 0.03
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await asyncio.sleep(handler_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await asyncio.sleep(chunk_delay_s)
        await send({"type": "http.response.body", "body": b"b"})
        seen["after_response"] = True

    messages = [
        {"type": "http.request", "body": b"x", "more_body": True},
        {"type": "http.request", "body": b"y", "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(body_delay_s / 2)
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = InferscopeASGIMiddleware(app)
    asyncio.run(middleware(http_scope("/raw"), receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert seen == {"after_response": True}
    queue, handler, response = row(None, "queue"), row(None, "handler"), row(None, "response")
    assert body_delay_s <= queue.p50 < body_delay_s + handler_s
    assert handler_s <= handler.p50 < handler_s + chunk_delay_s
    assert chunk_delay_s <= response.p50 < handler_s + chunk_delay_s


def http_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }


def test_model_names_put_a_routes_stages_under_its_model(instrument):
    app = scoring_app()
    instrument(model_names={"/predict/{name}": ("scorer", "2")})
    send_requests(
        app, post("/predict/a", {"values": [1]}), post("/predict/b", {"values": [2]}), get("/healthz")
    )
    assert sorted_rows() == [
        (None, "featurize", 2),
        (None, "handler", 1),  # /healthz is not named
        (None, "response", 1),
        ("scorer", None, 2),  # the inference
        ("scorer", "handler", 2),  # the requests around it, by route template (not the path)
        ("scorer", "infer", 2),
        ("scorer", "queue", 2),
        ("scorer", "response", 2),
    ]
    assert row("scorer", "handler").version == "2"


def test_model_names_as_a_callable_of_the_route():
    app = scoring_app()
    routes: list[str] = []

    def name(route: str) -> str | None:
        routes.append(route)
        return "health" if route == "/healthz" else None

    app.add_middleware(InferscopeASGIMiddleware, model_names=name)
    send_requests(app, get("/healthz"), get("/healthz"), get("/missing"))
    assert row("health", "handler").count == 2
    assert row(None, "handler").count == 1  # a 404: no route matched, the path was asked about
    assert routes == ["/healthz", "/missing"]  # resolved once per route


# --- errors -----------------------------------------------------------------------------------------


class ModelFailed(Exception):
    pass


def failing_app() -> Any:
    app = FastAPI()

    @app.get("/fail")
    async def fail() -> None:
        raise ModelFailed("no model today")

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404)

    @app.get("/broken-stream")
    async def broken_stream() -> Any:
        async def chunks() -> Any:
            yield "first\n"
            raise ModelFailed("mid-stream")

        return StreamingResponse(chunks())

    @app.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        def fail_later() -> None:
            raise ModelFailed("after the response")

        tasks.add_task(fail_later)
        return {"ok": True}

    return app


@pytest.mark.parametrize("how", ["instrumentor", "middleware"])
def test_an_endpoint_exception_passes_through_and_is_counted_once_on_handler(how, instrument):
    app = failing_app()
    if how == "instrumentor":
        instrument()  # outside Starlette's ServerErrorMiddleware: it sees the 500 page, then the error
    else:
        app.add_middleware(InferscopeASGIMiddleware)  # inside it: the error comes first
    with pytest.raises(ModelFailed, match="no model today"):
        send_requests(app, get("/fail"))
    [response] = send_requests(app, get("/fail"), raise_app_exceptions=False)
    assert response.status_code == 500
    handler = row(None, "handler")
    assert (handler.count, handler.errors, dict(handler.error_types)) == (2, 2, {_error_name(ModelFailed): 2})
    if how == "instrumentor":
        assert row(None, "response").errors == 0  # the 500 page was sent in full


def _error_name(exc_type: type[BaseException]) -> str:
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


def test_the_exception_object_is_the_applications_own(instrument):
    raised = ModelFailed("this one")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise raised

    instrument()
    with pytest.raises(ModelFailed) as info:
        asyncio.run(InferscopeASGIMiddleware(app)(http_scope("/x"), _no_body, _discard))
    assert info.value is raised


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _discard(message: dict[str, Any]) -> None:
    pass


def test_an_http_exception_is_a_response_not_an_error(instrument):
    instrument()
    [response] = send_requests(failing_app(), get("/missing"))
    assert response.status_code == 404
    assert row(None, "handler").errors == 0


def test_a_stream_that_fails_is_counted_on_response(instrument):
    instrument()
    with pytest.raises(ModelFailed, match="mid-stream"):
        send_requests(failing_app(), get("/broken-stream"))
    assert row(None, "handler").errors == 0
    response = row(None, "response")
    assert (response.count, dict(response.error_types)) == (1, {_error_name(ModelFailed): 1})


def test_a_background_task_that_fails_after_the_response_is_no_stages_error(instrument):
    instrument()
    with pytest.raises(ModelFailed, match="after the response"):
        send_requests(failing_app(), get("/background"))
    assert [r.errors for r in inferscope.snapshot().rows] == [0, 0]


def test_a_cancelled_request_is_recorded_with_its_error_type(instrument):
    started = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        started.set()
        await asyncio.sleep(10)  # a stream the client went away from

    async def run() -> None:
        task = asyncio.ensure_future(InferscopeASGIMiddleware(app)(http_scope("/x"), _no_body, _discard))
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert dict(row(None, "response").error_types) == {"asyncio.exceptions.CancelledError": 1}
    assert row(None, "handler").errors == 0


# --- composition ------------------------------------------------------------------------------------


def test_each_request_is_recorded_once_by_the_outermost(instrument):
    inner = Starlette(routes=[Route("/ping", lambda request: PlainTextResponse("pong"))])
    app = Starlette(routes=[Mount("/sub", app=inner)])
    app.add_middleware(InferscopeASGIMiddleware, model_names={"/ping": "hand-added"})
    instrument(model_names={"/ping": "instrumented"})
    [response] = send_requests(app, get("/sub/ping"))
    assert response.text == "pong"
    assert sorted_rows() == [("instrumented", "handler", 1), ("instrumented", "response", 1)]


@pytest.fixture
def spans() -> Iterator[Any]:
    """A tracer provider whose finished spans are kept in memory."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.exporter = exporter  # type: ignore[attr-defined]
    yield provider
    provider.shutdown()


def span_summary(provider: Any) -> list[tuple[str, str, str]]:
    found = provider.exporter.get_finished_spans()
    provider.exporter.clear()
    return sorted((s.name, s.kind.name, s.instrumentation_scope.name) for s in found)


def test_opentelemetry_fastapi_instrumentation_keeps_its_spans_and_inferscope_adds_none(spans, instrument):
    otel_fastapi = require("opentelemetry.instrumentation.fastapi")
    app = scoring_app()
    otel_fastapi.FastAPIInstrumentor.instrument_app(app, tracer_provider=spans)
    try:
        send_requests(app, post("/predict/a", {"values": [1]}), get("/stream"))
        alone = span_summary(spans)
        instrument()
        send_requests(app, post("/predict/a", {"values": [1]}), get("/stream"))
        together = span_summary(spans)
    finally:
        otel_fastapi.FastAPIInstrumentor.uninstrument_app(app)
    server = [s for s in together if s[1] == "SERVER"]
    assert [name for name, _, _ in server] == ["GET /stream", "POST /predict/{name}"]  # once each
    assert together == alone
    assert not [s for s in together if s[2].startswith("inferscope")]
    assert (row(None, "handler").count, row(None, "queue").count, row(None, "response").count) == (2, 1, 2)


@pytest.mark.parametrize("outermost", ["opentelemetry", "inferscope"])
def test_opentelemetry_asgi_middleware_composes_in_either_order(outermost, spans):
    otel_asgi = require("opentelemetry.instrumentation.asgi")
    app = scoring_app()

    def otel(inner: Any) -> Any:
        return otel_asgi.OpenTelemetryMiddleware(inner, tracer_provider=spans)

    stack = (
        otel(InferscopeASGIMiddleware(app))
        if outermost == "opentelemetry"
        else InferscopeASGIMiddleware(otel(app))
    )
    [response] = send_requests(stack, post("/predict/a", {"values": [4]}))
    assert response.json()["score"] == 4.0
    found = span_summary(spans)
    assert [(kind, scope) for _, kind, scope in found if kind == "SERVER"] == [
        ("SERVER", "opentelemetry.instrumentation.asgi")
    ]
    assert not [s for s in found if s[2].startswith("inferscope")]
    assert (row(None, "queue").count, row(None, "handler").count, row(None, "response").count) == (1, 1, 1)


def test_websocket_and_lifespan_pass_through_untouched():
    calls: list[tuple[str, Any, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append((scope["type"], receive, send))

    middleware = InferscopeASGIMiddleware(app)
    for kind in ("websocket", "lifespan"):
        asyncio.run(middleware({"type": kind}, _no_body, _discard))
    assert calls == [("websocket", _no_body, _discard), ("lifespan", _no_body, _discard)]
    assert inferscope.snapshot().rows == ()


# --- the instrumentor's contract ---------------------------------------------------------------------


def test_instrument_is_idempotent_and_uninstrument_restores_by_identity():
    original = Starlette.__dict__["__call__"]
    instrumentor = AsgiInstrumentor()
    instrumentor.instrument()
    try:
        wrapper = Starlette.__dict__["__call__"]
        assert wrapper is not original and wrapper.__inferscope_original__ is original
        instrumentor.instrument()  # a second call changes nothing
        assert Starlette.__dict__["__call__"] is wrapper
        assert instrumentor.patched == [(Starlette, "__call__", original)]
    finally:
        instrumentor.uninstrument()
    assert Starlette.__dict__["__call__"] is original
    instrumentor.uninstrument()  # and so does a second uninstrument
    assert Starlette.__dict__["__call__"] is original
    send_requests(scoring_app(), get("/healthz"))
    assert inferscope.snapshot().rows == ()


def test_a_wrapper_still_held_after_uninstrument_passes_through():
    instrumentor = AsgiInstrumentor()
    instrumentor.instrument()
    wrapper = Starlette.__dict__["__call__"]
    instrumentor.uninstrument()
    app = scoring_app()
    asyncio.run(wrapper(app, {**http_scope("/healthz"), "method": "GET"}, _no_body, _discard))
    assert inferscope.snapshot().rows == ()


def test_options_are_checked():
    with pytest.raises(TypeError, match="takes no models= option"):
        AsgiInstrumentor().instrument(models=["Pipeline"])
    with pytest.raises(
        TypeError, match="InferscopeASGIMiddleware: model_names must be a mapping or a callable"
    ):
        InferscopeASGIMiddleware(scoring_app(), model_names=42)
    with pytest.raises(ValueError, match="set by inferscope itself"):
        InferscopeASGIMiddleware(scoring_app(), attributes={"inferscope.model.name": "x"})
    assert not AsgiInstrumentor().active


@pytest.mark.parametrize("where", ["stage_keys", "now", "sending", "received"])
def test_its_own_failures_never_reach_the_application(where, monkeypatch, instrument):
    def broken(*args: Any) -> Any:
        raise RuntimeError("bookkeeping")

    owner = {
        "stage_keys": _requests.Serving,
        "now": _requests.RequestTimer,
        "sending": asgi._AsgiTimer,
        "received": asgi._AsgiTimer,
    }[where]
    errors_before = _pipeline.DRAINER.errors
    instrument()
    monkeypatch.setattr(owner, where, broken)
    responses = send_requests(scoring_app(), post("/predict/a", {"values": [1, 1]}), get("/stream"))
    monkeypatch.undo()
    assert [r.status_code for r in responses] == [200, 200]
    assert responses[0].json()["score"] == 2.0 and responses[1].text == "0\n1\n2\n"
    assert _pipeline.DRAINER.errors > errors_before
    models = {(m, s) for m, s, _ in sorted_rows()}
    assert {(None, "featurize"), ("scorer", None), ("scorer", "infer")} <= models


def test_nothing_is_recorded_while_inferscope_is_disabled(monkeypatch, instrument):
    instrument()
    monkeypatch.setattr(RUNTIME, "enabled", False)
    [response] = send_requests(scoring_app(), get("/healthz"))
    assert response.json() == {"ok": True}
    monkeypatch.undo()
    assert inferscope.snapshot().rows == ()
