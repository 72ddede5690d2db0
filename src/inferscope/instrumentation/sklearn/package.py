"""The scikit-learn versions this instrumentation supports. The same specifier is in the
``instruments-any`` extra of the inferscope distribution."""

_instruments: tuple[str, ...] = ("scikit-learn >= 1.3",)
_instruments_any: tuple[str, ...] = ()
