"""The web-framework versions the serving instrumentors support. The same specifiers are in the
``instruments-any`` extra of the inferscope distribution."""

#: ``AsgiInstrumentor``: Starlette applications, and so FastAPI ones (FastAPI subclasses Starlette).
ASGI_INSTRUMENTS: tuple[str, ...] = ("starlette >= 0.27",)
#: ``WsgiInstrumentor``: Flask applications.
WSGI_INSTRUMENTS: tuple[str, ...] = ("flask >= 2.2",)

# For the distribution-wide check of opentelemetry-instrument: either framework enables the
# serving instrumentors; each then checks its own (above).
_instruments: tuple[str, ...] = ()
_instruments_any: tuple[str, ...] = (*ASGI_INSTRUMENTS, *WSGI_INSTRUMENTS)
