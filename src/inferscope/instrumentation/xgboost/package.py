"""The xgboost versions this instrumentation supports, in either of its distributions (``xgboost``,
or ``xgboost-cpu``, which has no CUDA libraries; both provide the ``xgboost`` module)."""

_instruments_xgboost = "xgboost >= 2.0"
_instruments_xgboost_cpu = "xgboost-cpu >= 2.1"

_instruments: tuple[str, ...] = ()
_instruments_any: tuple[str, ...] = (_instruments_xgboost, _instruments_xgboost_cpu)
