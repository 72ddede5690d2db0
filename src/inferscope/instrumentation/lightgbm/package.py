"""The lightgbm versions this instrumentation supports. The same specifier is in the
``instruments-any`` extra of the inferscope distribution."""

_instruments: tuple[str, ...] = ("lightgbm >= 4.0",)
_instruments_any: tuple[str, ...] = ()
