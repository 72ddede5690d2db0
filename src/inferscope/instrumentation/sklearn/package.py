"""The scikit-learn versions this instrumentation supports."""

_instruments: tuple[str, ...] = ("scikit-learn >= 1.3",)
_instruments_any: tuple[str, ...] = ()
