"""inferscope: what each inference costs, per model and per stage, exported through OpenTelemetry.

>>> import inferscope
>>> @inferscope.track_inference(model="demo")
... def predict(x):
...     with inferscope.stage("infer"):
...         return x * 2
>>> predict(21)
42
"""

from ._backend import BACKEND_REASON, backend
from ._keys import KeyInfo
from ._pipeline import configure, current_settings, prometheus_port, shutdown, snapshot
from ._version import __version__
from .config import ConfigError, Settings
from .counters import counters_status
from .detector import Regression, regressions
from .export.apps import make_asgi_app, make_wsgi_app
from .snapshots import Snapshot, StatsRow
from .system import environment
from .tracking import bind, stage, track_inference
from .windows import add_window_listener, recent_windows, remove_window_listener, set_input_size

__all__ = [
    "BACKEND_REASON",
    "ConfigError",
    "KeyInfo",
    "Regression",
    "Settings",
    "Snapshot",
    "StatsRow",
    "__version__",
    "add_window_listener",
    "backend",
    "bind",
    "configure",
    "counters_status",
    "current_settings",
    "environment",
    "make_asgi_app",
    "make_wsgi_app",
    "prometheus_port",
    "recent_windows",
    "regressions",
    "remove_window_listener",
    "set_input_size",
    "shutdown",
    "snapshot",
    "stage",
    "track_inference",
]

from ._pipeline import autoconfigure as _autoconfigure

_autoconfigure()
