"""Serving: where a request's time goes around the models it calls, for ASGI and WSGI applications.

Three stages per HTTP request, with the conventional names (docs/metrics.md):

- ``queue``: before the endpoint runs (receiving the request body, for ASGI; Flask's request
  set-up and ``before_request`` hooks, for the Flask instrumentor);
- ``handler``: the endpoint, until it starts its response;
- ``response``: from the response start to its last byte handed to the server (a streaming
  response: producing and sending the stream).

They are stages outside any inference: by default they have no model (``inferscope.stage.name``
``handler``, no ``inferscope.model.name``), the same series for every route. The models that the
endpoint calls record their inferences as always, each under its own name; nothing about them
changes when a serving instrumentor is added (a stage entered in the endpoint keeps its name, it
does not become ``handler/...``). To put a route's stages next to the model it serves, name the
route::

    AsgiInstrumentor().instrument(model_names={"/predict/fraud": ("fraud", "3")})

and the model ``fraud`` v3 then has, besides its inference and its own stages, ``queue``,
``handler`` and ``response``: the request around it.

- :class:`AsgiInstrumentor` (Starlette and FastAPI) and :class:`WsgiInstrumentor` (Flask) load
  under ``opentelemetry-instrument`` like every other inferscope instrumentor.
- :class:`InferscopeASGIMiddleware` and :class:`InferscopeWSGIMiddleware` are the same for any
  ASGI or WSGI application, added by hand.

They create no spans and no HTTP metrics, and never touch OpenTelemetry's: they compose with the
OpenTelemetry ASGI, FastAPI, WSGI and Flask instrumentations, which make the server spans and the
``http.server.*`` metrics. A request is recorded once, by the outermost of the instrumentor and the
middlewares. See docs/frameworks.md.
"""

from __future__ import annotations

from ._requests import HANDLER, QUEUE, RESPONSE, SERVING_STAGES
from .asgi import AsgiInstrumentor, InferscopeASGIMiddleware
from .wsgi import InferscopeWSGIMiddleware, WsgiInstrumentor

__all__ = [
    "HANDLER",
    "QUEUE",
    "RESPONSE",
    "SERVING_STAGES",
    "AsgiInstrumentor",
    "InferscopeASGIMiddleware",
    "InferscopeWSGIMiddleware",
    "WsgiInstrumentor",
]
