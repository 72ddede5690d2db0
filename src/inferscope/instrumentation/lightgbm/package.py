"""The lightgbm versions this instrumentation supports."""

_instruments: tuple[str, ...] = ("lightgbm >= 4.0",)
_instruments_any: tuple[str, ...] = ()
