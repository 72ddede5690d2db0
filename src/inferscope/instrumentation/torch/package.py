"""The torch versions this instrumentation supports.

2.3 is the first release with ``torch.compiler.is_compiling()``, which the wrapper asks first so that
``torch.compile`` and ``torch.export`` trace straight through it."""

_instruments: tuple[str, ...] = ("torch >= 2.3",)
_instruments_any: tuple[str, ...] = ()
