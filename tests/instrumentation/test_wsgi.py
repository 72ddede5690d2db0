"""WSGI serving stages with real Flask applications (through Flask's test client, which calls the
application as a WSGI server does), and raw WSGI calls where a test controls each step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import inferscope
from inferscope import _pipeline
from inferscope._records import COUNTER_THREAD_CPU
from inferscope._runtime import RUNTIME
from tests.instrumentation import instrumenting, require, sorted_rows

require("flask")

from flask import Flask, Response, abort, request  # noqa: E402

from inferscope.instrumentation.serving import InferscopeWSGIMiddleware, WsgiInstrumentor, _requests, wsgi  # noqa: E402

SLEEP_S = 0.05
#: Quantiles come from exponential histograms: within 0.55% of the recorded value.
QUANTILE_ERROR = 0.99


class ModelFailed(Exception):
    pass


@pytest.fixture
def instrument() -> Iterator[Callable[..., Any]]:
    """``instrument(**options)`` instruments Flask; teardown always uninstruments."""
    yield from instrumenting(WsgiInstrumentor)


def scoring_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @inferscope.track_inference(model="scorer", version="2")
    def score(values: list[float]) -> float:
        with inferscope.stage("infer"):
            return sum(values)

    @app.before_request
    def slow_setup() -> None:
        if request.path == "/slow-setup":
            time.sleep(SLEEP_S)

    @app.post("/predict/<name>")
    def predict(name: str) -> dict[str, Any]:
        time.sleep(SLEEP_S)
        with inferscope.stage("featurize"):  # outside any inference: a root stage of its own
            values = [float(v) for v in request.get_json()["values"]]
        return {"name": name, "score": score(values)}

    @app.get("/healthz")
    @app.get("/slow-setup")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            for i in range(3):
                time.sleep(SLEEP_S)
                yield f"{i}\n"

        return Response(chunks(), mimetype="text/plain")

    @app.get("/fail")
    def fail() -> None:
        raise ModelFailed("no model today")

    @app.get("/broken-stream")
    def broken_stream() -> Response:
        def chunks() -> Iterator[str]:
            yield "first\n"
            raise ModelFailed("mid-stream")

        return Response(chunks())

    return app


def send(app: Any, method: str, url: str, **kwargs: Any) -> Any:
    """One request; ``buffered`` makes the test client read and close the response, as a server does."""
    return app.test_client().open(url, method=method, buffered=True, **kwargs)


def predict(app: Any, name: str = "a", values: list[float] | None = None) -> Any:
    return send(app, "POST", f"/predict/{name}", json={"values": values or [1.0, 2.0]})


def row(model: str | None, stage: str | None) -> Any:
    return inferscope.snapshot().row(model, stage)


def cpu_measured() -> bool:
    return bool(RUNTIME.counters & COUNTER_THREAD_CPU)


def _error_name(exc_type: type[BaseException]) -> str:
    return f"{exc_type.__module__}.{exc_type.__qualname__}"


# --- what is recorded --------------------------------------------------------------------------------


def test_a_request_records_queue_handler_and_response(instrument):
    app = scoring_app()
    instrument()
    responses = [predict(app) for _ in range(3)]
    assert [r.get_json() for r in responses] == [{"name": "a", "score": 3.0}] * 3
    queue, handler, response = row(None, "queue"), row(None, "handler"), row(None, "response")
    assert (queue.count, handler.count, response.count) == (3, 3, 3)
    assert handler.p50 >= SLEEP_S * QUANTILE_ERROR
    assert queue.max < SLEEP_S and response.max < SLEEP_S
    if cpu_measured():  # one thread per request: the CPU time of each stage is its own
        assert handler.cpu_seconds is not None and handler.cpu_ratio is not None
        assert handler.cpu_ratio < 0.5  # the view sleeps


def test_queue_is_the_time_before_the_view(instrument):
    app = scoring_app()
    instrument()
    assert send(app, "GET", "/slow-setup").get_json() == {"ok": True}
    assert row(None, "queue").p50 >= SLEEP_S  # the before_request hook
    assert row(None, "handler").p50 < SLEEP_S


def test_the_plain_middleware_records_handler_and_response():
    app = scoring_app()
    app.wsgi_app = InferscopeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    predict(app)
    predict(app)
    # It cannot see where the view starts: no queue stage; handler is everything before the response.
    assert [(m, s, n) for m, s, n in sorted_rows() if m is None and s != "featurize"] == [
        (None, "handler", 2),
        (None, "response", 2),
    ]
    assert row(None, "handler").p50 >= SLEEP_S * QUANTILE_ERROR


def test_inferences_in_the_view_keep_their_own_keys(instrument):
    app = scoring_app()
    predict(app)
    without = sorted_rows()
    _pipeline.reset_aggregates()
    instrument()
    predict(app)
    assert without == [(None, "featurize", 1), ("scorer", None, 1), ("scorer", "infer", 1)]
    assert sorted_rows() == [
        (None, "featurize", 1),
        (None, "handler", 1),
        (None, "queue", 1),
        (None, "response", 1),
        ("scorer", None, 1),
        ("scorer", "infer", 1),
    ]


def test_a_streaming_response_is_timed_until_it_is_closed(instrument):
    app = scoring_app()
    instrument()
    assert send(app, "GET", "/stream").data == b"0\n1\n2\n"
    assert row(None, "response").p50 >= 3 * SLEEP_S
    assert row(None, "handler").p50 < SLEEP_S


def test_raw_wsgi_stages_end_at_start_response_and_close():
    handler_s, chunk_delay_s = 0.04, 0.03
    statuses: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        # A generator application: its work before start_response runs during the first next().
        time.sleep(handler_s)
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"a"
        time.sleep(chunk_delay_s)
        yield b"b"

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        statuses.append(status)
        return lambda data: None

    body = InferscopeWSGIMiddleware(app)({"PATH_INFO": "/raw"}, start_response)
    assert b"".join(body) == b"ab"
    assert inferscope.snapshot().rows == ()  # not closed yet: the server may still be sending
    body.close()
    assert statuses == ["200 OK"]
    handler, response = row(None, "handler"), row(None, "response")
    assert handler_s <= handler.p50 < handler_s + chunk_delay_s
    assert chunk_delay_s <= response.p50 < handler_s + chunk_delay_s


def test_a_file_for_the_servers_file_wrapper_is_handed_over_unwrapped():
    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Iterator[bytes]:
            yield self.data

    sent = FileWrapper(b"file contents")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return sent

    environ = {"PATH_INFO": "/file", "wsgi.file_wrapper": FileWrapper}
    result = InferscopeWSGIMiddleware(app)(environ, lambda status, headers: None)
    assert result is sent  # the server can still recognize it and use sendfile()
    assert [(m, s, n) for m, s, n in sorted_rows()] == [(None, "handler", 1), (None, "response", 1)]


def test_model_names_by_url_rule(instrument):
    app = scoring_app()
    instrument(model_names={"/predict/<name>": ("scorer", "2")})
    predict(app, "a")
    predict(app, "b")
    send(app, "GET", "/healthz")
    assert sorted_rows() == [
        (None, "featurize", 2),
        (None, "handler", 1),  # /healthz is not named
        (None, "queue", 1),
        (None, "response", 1),
        ("scorer", None, 2),
        ("scorer", "handler", 2),  # by the URL rule, not the path
        ("scorer", "infer", 2),
        ("scorer", "queue", 2),
        ("scorer", "response", 2),
    ]


def test_the_middleware_names_routes_by_path():
    app = scoring_app()
    routes: list[str] = []

    def name(route: str) -> str | None:
        routes.append(route)
        return "health" if route == "/healthz" else None

    app.wsgi_app = InferscopeWSGIMiddleware(app.wsgi_app, model_names=name)  # type: ignore[method-assign]
    for _ in range(2):
        send(app, "GET", "/healthz")
    assert row("health", "handler").count == 2
    assert routes == ["/healthz"]  # resolved once per route


# --- errors -----------------------------------------------------------------------------------------


def test_a_view_exception_turned_into_a_500_page_is_counted_on_handler(instrument):
    app = scoring_app()
    instrument()
    assert send(app, "GET", "/fail").status_code == 500
    handler = row(None, "handler")
    assert (handler.count, dict(handler.error_types)) == (1, {_error_name(ModelFailed): 1})
    assert row(None, "response").errors == 0  # the 500 page went out


@pytest.mark.parametrize("how", ["instrumentor", "middleware"])
def test_a_propagated_exception_passes_through_unchanged_and_is_counted_once(how, instrument, monkeypatch):
    raised = ModelFailed("this one")
    app = scoring_app(PROPAGATE_EXCEPTIONS=True)

    @app.get("/raise")
    def raise_it() -> None:
        raise raised

    if how == "instrumentor":
        instrument()
    else:
        app.wsgi_app = InferscopeWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    with pytest.raises(ModelFailed) as info:
        send(app, "GET", "/raise")
    assert info.value is raised
    handler = row(None, "handler")
    assert (handler.count, dict(handler.error_types)) == (1, {_error_name(ModelFailed): 1})
    assert [r.stage for r in inferscope.snapshot().rows] == (
        ["handler", "queue"] if how == "instrumentor" else ["handler"]
    )


def test_a_stream_that_fails_is_counted_on_response(instrument):
    app = scoring_app()
    instrument()
    with pytest.raises(ModelFailed, match="mid-stream"):
        send(app, "GET", "/broken-stream")
    assert row(None, "handler").errors == 0
    response = row(None, "response")
    assert (response.count, dict(response.error_types)) == (1, {_error_name(ModelFailed): 1})


def test_an_http_exception_of_the_view_is_a_response_not_an_error(instrument):
    app = scoring_app()

    @app.get("/gone")
    def gone() -> None:
        abort(410)

    instrument()
    assert send(app, "GET", "/gone").status_code == 410
    assert [(r.stage, r.errors) for r in inferscope.snapshot().rows] == [
        ("handler", 0),
        ("queue", 0),
        ("response", 0),
    ]


def test_an_unknown_url_has_no_queue_and_no_error(instrument):
    app = scoring_app()
    instrument()
    assert send(app, "GET", "/nowhere").status_code == 404
    assert sorted_rows() == [(None, "handler", 1), (None, "response", 1)]
    assert row(None, "handler").errors == 0


# --- composition ------------------------------------------------------------------------------------


def test_each_request_is_recorded_once_by_the_outermost(instrument):
    app = scoring_app()
    app.wsgi_app = InferscopeWSGIMiddleware(app.wsgi_app, model_names={"/healthz": "hand-added"})  # type: ignore[method-assign]
    instrument(model_names={"/healthz": "instrumented"})
    send(app, "GET", "/healthz")
    assert sorted_rows() == [
        ("instrumented", "handler", 1),
        ("instrumented", "queue", 1),
        ("instrumented", "response", 1),
    ]


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


def test_opentelemetry_flask_instrumentation_keeps_its_spans_and_inferscope_adds_none(spans, instrument):
    otel_flask = pytest.importorskip("opentelemetry.instrumentation.flask")
    app = scoring_app()
    otel_flask.FlaskInstrumentor.instrument_app(app, tracer_provider=spans)
    try:
        predict(app)
        send(app, "GET", "/stream")
        alone = span_summary(spans)
        instrument()
        predict(app)
        send(app, "GET", "/stream")
        together = span_summary(spans)
    finally:
        otel_flask.FlaskInstrumentor.uninstrument_app(app)
    assert [name for name, kind, _ in together if kind == "SERVER"] == ["GET /stream", "POST /predict/<name>"]
    assert together == alone
    assert not [s for s in together if s[2].startswith("inferscope")]
    assert (row(None, "queue").count, row(None, "handler").count, row(None, "response").count) == (2, 2, 2)


@pytest.mark.parametrize("outermost", ["opentelemetry", "inferscope"])
def test_opentelemetry_wsgi_middleware_composes_in_either_order(outermost, spans):
    otel_wsgi = pytest.importorskip("opentelemetry.instrumentation.wsgi")
    app = scoring_app()

    def otel(inner: Any) -> Any:
        return otel_wsgi.OpenTelemetryMiddleware(inner, tracer_provider=spans)

    if outermost == "opentelemetry":
        app.wsgi_app = otel(InferscopeWSGIMiddleware(app.wsgi_app))  # type: ignore[method-assign]
    else:
        app.wsgi_app = InferscopeWSGIMiddleware(otel(app.wsgi_app))  # type: ignore[method-assign]
    assert send(app, "GET", "/stream").data == b"0\n1\n2\n"
    found = span_summary(spans)
    assert [(kind, scope) for _, kind, scope in found if kind == "SERVER"] == [
        ("SERVER", "opentelemetry.instrumentation.wsgi")
    ]
    assert not [s for s in found if s[2].startswith("inferscope")]
    assert row(None, "response").p50 >= 3 * SLEEP_S


# --- the instrumentor's contract ---------------------------------------------------------------------


def test_instrument_is_idempotent_and_uninstrument_restores_by_identity():
    originals = {name: Flask.__dict__[name] for name in ("__call__", "dispatch_request")}
    instrumentor = WsgiInstrumentor()
    instrumentor.instrument()
    try:
        wrappers = {name: Flask.__dict__[name] for name in originals}
        for name, wrapper in wrappers.items():
            assert wrapper is not originals[name] and wrapper.__inferscope_original__ is originals[name]
        instrumentor.instrument()  # a second call changes nothing
        assert {name: Flask.__dict__[name] for name in originals} == wrappers
        assert sorted(instrumentor.patched, key=lambda p: p[1]) == [
            (Flask, "__call__", originals["__call__"]),
            (Flask, "dispatch_request", originals["dispatch_request"]),
        ]
    finally:
        instrumentor.uninstrument()
    for name, original in originals.items():
        assert Flask.__dict__[name] is original
    instrumentor.uninstrument()
    for name, original in originals.items():
        assert Flask.__dict__[name] is original
    send(scoring_app(), "GET", "/healthz")
    assert inferscope.snapshot().rows == ()


def test_options_are_checked():
    with pytest.raises(TypeError, match="takes no models= option"):
        WsgiInstrumentor().instrument(models=["Pipeline"])
    with pytest.raises(
        TypeError, match="InferscopeWSGIMiddleware: model_names must be a mapping or a callable"
    ):
        InferscopeWSGIMiddleware(scoring_app(), model_names=42)
    assert not WsgiInstrumentor().active


@pytest.mark.parametrize("where", ["stage_keys", "now", "response_started", "closed"])
def test_its_own_failures_never_reach_the_application(where, monkeypatch, instrument):
    def broken(*args: Any) -> Any:
        raise RuntimeError("bookkeeping")

    owner = {
        "stage_keys": _requests.Serving,
        "now": _requests.RequestTimer,
        "response_started": wsgi._WsgiTimer,
        "closed": wsgi._WsgiTimer,
    }[where]
    errors_before = _pipeline.DRAINER.errors
    app = scoring_app()
    instrument()
    monkeypatch.setattr(owner, where, broken)
    try:
        response = predict(app, values=[2, 2])
        stream = send(app, "GET", "/stream")
    finally:
        monkeypatch.undo()
    assert response.get_json()["score"] == 4.0 and stream.data == b"0\n1\n2\n"
    assert _pipeline.DRAINER.errors > errors_before
    assert {("scorer", None), ("scorer", "infer")} <= {(m, s) for m, s, _ in sorted_rows()}


def test_nothing_is_recorded_while_inferscope_is_disabled(monkeypatch, instrument):
    instrument()
    monkeypatch.setattr(RUNTIME, "enabled", False)
    assert send(scoring_app(), "GET", "/healthz").get_json() == {"ok": True}
    monkeypatch.undo()
    assert inferscope.snapshot().rows == ()
