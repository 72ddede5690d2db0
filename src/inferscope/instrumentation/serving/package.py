"""The web-framework versions the serving instrumentors support."""

#: ``AsgiInstrumentor``: Starlette applications, and so FastAPI ones (FastAPI subclasses Starlette).
ASGI_INSTRUMENTS: tuple[str, ...] = ("starlette >= 0.27",)
#: ``WsgiInstrumentor``: Flask applications.
WSGI_INSTRUMENTS: tuple[str, ...] = ("flask >= 2.2",)
