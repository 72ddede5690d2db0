"""Settings: ``configure()`` arguments and environment variables, validated into one frozen ``Settings``.

Precedence, highest first: a ``configure()`` argument, an ``INFERSCOPE_*`` variable, the standard
``OTEL_*`` variable that means the same thing, the default. An argument of ``None`` counts as not
given, and so does an empty environment variable (the OTel convention).

``SETTINGS`` is the one table of what each setting accepts: validation messages quote it and
docs/configuration.md is checked against it by the test suite, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._keys import DEFAULT_MAX_KEYS, MAX_KEYS_LIMIT
from ._records import RECORD_DTYPE
from ._selflog import redact
from .counters import COUNTER_SETS, CounterUnavailable, accepted_counter_values, counter_mask

__all__ = [
    "DEFAULT_HISTOGRAM_BOUNDARIES",
    "SETTINGS",
    "ConfigError",
    "SettingSpec",
    "Settings",
    "default_recorder_path",
    "load_settings",
]

#: The ``source`` of a value passed to ``configure()``.
CONFIGURE_ARGUMENT = "configure argument"
#: The ``source`` of a value passed to ``Settings(...)`` directly.
SETTINGS_FIELD = "Settings field"


class ConfigError(ValueError):
    """An invalid setting. The message names the setting, the value it got, and what is accepted.

    ``source`` is the environment variable the value came from, or ``"configure argument"``; ``note``
    says more where the accepted text alone would leave the user guessing. For example,
    ``INFERSCOPE_RING_CAPACITY=1000`` gives (on one line)::

        ring_capacity (from INFERSCOPE_RING_CAPACITY): got '1000';
        accepted: a power of two from 1024 to 16777216
    """

    def __init__(
        self,
        setting: str,
        value: object,
        accepted: str,
        source: str = CONFIGURE_ARGUMENT,
        note: str | None = None,
        *,
        message: str | None = None,
    ) -> None:
        self.setting = setting
        self.value = value
        self.accepted = accepted
        self.source = source
        self.note = note
        if message is None:
            where = source if source in (CONFIGURE_ARGUMENT, SETTINGS_FIELD) else f"from {source}"
            detail = f" ({note})" if note else ""
            message = f"{setting} ({where}): got {value!r}{detail}; accepted: {accepted}"
        # An endpoint may carry a password (https://user:secret@host): never repeat it.
        super().__init__(redact(message))

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduce would call ConfigError(message) and fail; keep every attribute instead.
        return (
            _rebuild_config_error,
            (self.setting, self.value, self.accepted, self.source, self.note, str(self)),
        )


def _rebuild_config_error(
    setting: str, value: object, accepted: str, source: str, note: str | None, message: str
) -> ConfigError:
    return ConfigError(setting, value, accepted, source, note, message=message)


class _Invalid(Exception):
    """Raised by the converters below; turned into a ``ConfigError`` that names setting and source."""

    def __init__(self, note: str | None = None) -> None:
        super().__init__(note)
        self.note = note


#: Explicit histogram boundaries in seconds: 0.5 ms to 10 s, the OTel default shape scaled to seconds.
DEFAULT_HISTOGRAM_BOUNDARIES: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)

MIN_RING_CAPACITY = 1024
MAX_RING_CAPACITY = 16_777_216
RECORD_BYTES = RECORD_DTYPE.itemsize
_DEFAULT_RING_CAPACITY = 65536

_EXPORTERS = ("otlp", "console", "prometheus")
_TRACE_EXPORTERS = ("otlp", "console")
#: OTEL_TRACES_SAMPLER values -> (parent-based, the ratio of roots kept at entry; None: trace_ratio).
TRACE_SAMPLERS: dict[str, tuple[bool, float | None]] = {
    "parentbased_traceidratio": (True, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "traceidratio": (False, None),
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
}
#: trace_slow_ms values besides a number of milliseconds.
TRACE_SLOW_WORDS = ("p90", "p95", "p99", "p999", "off")
_PROTOCOLS = {"grpc": "grpc", "http/protobuf": "http/protobuf"}
_HISTOGRAM_AGGREGATIONS = {
    "exponential": "exponential",
    "explicit": "explicit",
    "base2_exponential_bucket_histogram": "exponential",
    "explicit_bucket_histogram": "explicit",
}
_TRUE_TEXT = frozenset({"true", "1", "yes", "on"})
_FALSE_TEXT = frozenset({"false", "0", "no", "off"})

_OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
_OTLP_TRACES_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


# --- converters: text from an environment variable -> Python value --------------------------------


def _text(text: str) -> object:
    return text


def _bool_text(text: str) -> object:
    lowered = text.lower()
    if lowered in _TRUE_TEXT:
        return True
    if lowered in _FALSE_TEXT:
        return False
    raise _Invalid


def _int_text(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        raise _Invalid from None


def _list_text(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


def _float_list_text(text: str) -> object:
    numbers_: list[float] = []
    for part in text.split(","):
        try:
            numbers_.append(float(part))
        except ValueError:
            raise _Invalid(f"{part.strip()!r} is not a number") from None
    return tuple(numbers_)


# --- checks: Python value -> normalized value (idempotent) ----------------------------------------


def _check_bool(value: object) -> object:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _int_check(
    minimum: int, maximum: int | None = None, *, power_of_two: bool = False
) -> Callable[[object], object]:
    def check(value: object) -> object:
        # bool is an int to Python, but configure(ring_capacity=True) is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Invalid
        number = int(value)
        if number < minimum or (maximum is not None and number > maximum):
            raise _Invalid
        if power_of_two and number & (number - 1):
            raise _Invalid
        return number

    return check


def _optional_name(value: object) -> object:
    if value is None:
        return None
    return _name(value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid
    return value.strip()


#: A DNS name: dot-separated labels of letters, digits and hyphens (underscores are tolerated, as
#: resolvers do), none starting or ending with a hyphen.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    """Whether ``host`` is an IP address (IPv6 with or without brackets) or a DNS name."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(literal)
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _host(value: object) -> object:
    host = _name(value)
    if not _is_host(host):
        raise _Invalid
    return host


def _choice(choices: Mapping[str, str], notes: Mapping[str, str] | None = None) -> Callable[[object], object]:
    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _Invalid
        key = value.strip().lower()
        if key in choices:
            return choices[key]
        raise _Invalid((notes or {}).get(key))

    return check


def _counters(value: object) -> object:
    if not isinstance(value, str):
        raise _Invalid
    text = value.strip().lower()
    try:
        counter_mask(text)
    except KeyError as exc:
        unknown = exc.args[0]
        raise _Invalid(f"unknown counter {unknown!r}" if unknown != text else None) from None
    except CounterUnavailable as exc:
        raise _Invalid(f"{exc.name} is not available here: {exc.reason}") from None
    if text in COUNTER_SETS:
        return text
    return ",".join(part.strip() for part in text.split(","))


def _items(value: object) -> tuple[object, ...]:
    """Any finite, ordered collection; str, bytes, mappings and sets are refused."""
    if isinstance(value, (str, bytes, bytearray, Mapping, Set)) or not isinstance(value, Iterable):
        raise _Invalid
    return tuple(value)


def _exporter_names(known: tuple[str, ...]) -> Callable[[object], object]:
    def check(value: object) -> object:
        names = _list_text(value) if isinstance(value, str) else _items(value)
        result: list[str] = []
        for item in names:
            if not isinstance(item, str):
                raise _Invalid
            name = item.strip().lower()
            if name == "none":
                if len(names) > 1:
                    raise _Invalid("'none' cannot be combined with other exporters")
                return ()
            if name not in known:
                if not name:
                    raise _Invalid("an entry is empty")
                raise _Invalid(f"unknown exporter {item.strip()!r}" if len(names) > 1 else None)
            if name not in result:
                result.append(name)
        return tuple(result)

    return check


def _ratio(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise _Invalid
    return number


def _number_or_word_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _float_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        raise _Invalid from None


def _trace_slow(value: object) -> object:
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRACE_SLOW_WORDS:
            return word
        raise _Invalid
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise _Invalid
    return number


def _sdk_instance(module: str, name: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        if value is None:
            return None
        cls = getattr(__import__(module, fromlist=[name]), name)  # imported only when one is given
        if not isinstance(value, cls):
            raise _Invalid
        return value

    return check


def _sdk_instances(module: str, name: str) -> Callable[[object], object]:
    def check(value: object) -> object:
        items = _items(value)
        if not items:
            return ()
        cls = getattr(__import__(module, fromlist=[name]), name)
        if not all(isinstance(item, cls) for item in items):
            raise _Invalid
        return items

    return check


def _endpoint(value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid
    url = value.strip()
    if any(char.isspace() or not char.isprintable() for char in url):
        raise _Invalid("it contains a space or a control character")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or out of range
    except ValueError:
        raise _Invalid from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Invalid
    if not _is_host(parts.hostname):
        raise _Invalid(f"{parts.hostname!r} is not a host name or address")
    return url


def _boundaries(value: object) -> object:
    items = _items(value)
    if not items:
        raise _Invalid("no boundaries given")
    result: list[float] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise _Invalid(f"{item!r} is not a number")
        number = float(item)
        if not math.isfinite(number) or number <= 0:
            raise _Invalid(f"{item!r} is not a finite number above 0")
        if result and number <= result[-1]:
            raise _Invalid(f"{item!r} does not follow {result[-1]!r}")
        result.append(number)
    return tuple(result)


def _number_check(
    minimum: float, maximum: float | None = None, *, above: bool = False
) -> Callable[[object], object]:
    """A finite number from ``minimum`` (excluded when ``above``) to ``maximum``."""

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Invalid
        number = float(value)
        if not math.isfinite(number) or number < minimum or (above and number == minimum):
            raise _Invalid
        if maximum is not None and number > maximum:
            raise _Invalid
        return number

    return check


def _open_fraction(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Invalid
    number = float(value)
    if not 0.0 < number < 1.0:
        raise _Invalid
    return number


#: ``recorder`` values besides a path.
RECORDER_OFF = "off"
RECORDER_DEFAULT = "default"


def default_recorder_path(environ: Mapping[str, str] | None = None) -> str:
    """The per-user state path of the flight recorder: ``$XDG_STATE_HOME/inferscope/recorder.sqlite``,
    else ``~/.local/state/inferscope/recorder.sqlite`` (the XDG base directory default)."""
    environ = os.environ if environ is None else environ
    state = (environ.get("XDG_STATE_HOME") or "").strip()
    if not state or not os.path.isabs(state):  # the XDG spec ignores a relative XDG_STATE_HOME
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "inferscope", "recorder.sqlite")


def _recorder(value: object) -> object:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid
    text = value.strip()
    if text.lower() == RECORDER_OFF:
        return RECORDER_OFF
    if text.lower() == RECORDER_DEFAULT:
        return default_recorder_path()
    path = os.path.abspath(os.path.expanduser(text))
    if os.path.isdir(path):
        raise _Invalid("that is a directory; name the database file in it")
    return path


def default_multiprocess_dir() -> str:
    """``/dev/shm`` where it exists (memory, never disk), else the system's temporary directory."""
    import tempfile

    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _directory(value: object) -> object:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise _Invalid
    if value.strip().lower() == "default":
        return default_multiprocess_dir()
    path = os.path.abspath(os.path.expanduser(value.strip()))
    if not os.path.isdir(path):
        raise _Invalid("no such directory")
    return path


_meter_provider = _sdk_instance("opentelemetry.sdk.metrics", "MeterProvider")
_metric_exporters = _sdk_instances("opentelemetry.sdk.metrics.export", "MetricExporter")


# --- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingSpec:
    """One setting: where it is read from, its default and what it accepts, as shown to users.

    ``env`` lists the environment variables in precedence order; it is empty for the settings that
    only ``configure()`` can set (Python objects).
    """

    name: str
    env: tuple[str, ...]
    default: str
    accepted: str
    description: str
    check: Callable[[object], object] = field(repr=False, compare=False)
    from_text: Callable[[str], object] = field(default=_text, repr=False, compare=False)

    @property
    def configure_only(self) -> bool:
        return not self.env


def _defaults_text(boundaries: Sequence[float]) -> str:
    return ",".join(f"{b:g}" for b in boundaries)


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "enabled",
        ("INFERSCOPE_ENABLED", "OTEL_SDK_DISABLED"),
        "true",
        "True or False (in INFERSCOPE_ENABLED: true/false, 1/0, yes/no or on/off, in any case)",
        "Whether inferscope measures and exports anything. OTEL_SDK_DISABLED=true (in any case) turns it off "
        "as it does the OTel SDK; other values of OTEL_SDK_DISABLED are ignored. INFERSCOPE_ENABLED wins "
        "when both are set.",
        _check_bool,
        _bool_text,
    ),
    SettingSpec(
        "service_name",
        ("INFERSCOPE_SERVICE_NAME", "OTEL_SERVICE_NAME"),
        "unset",
        "a non-empty string",
        "The service.name resource attribute. Unset leaves it to the OTel Resource "
        "(OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES).",
        _optional_name,
    ),
    SettingSpec(
        "counters",
        ("INFERSCOPE_COUNTERS",),
        "default",
        accepted_counter_values(),
        "What is read around every inference and stage. minimal reads the monotonic clock only; "
        "default adds the thread CPU clock; full adds rusage, the RSS, perf events where a PMU is "
        "exposed, and torch's CUDA memory around inferences. See docs/counters.md.",
        _counters,
    ),
    SettingSpec(
        "ring_capacity",
        ("INFERSCOPE_RING_CAPACITY",),
        str(_DEFAULT_RING_CAPACITY),
        f"a power of two from {MIN_RING_CAPACITY} to {MAX_RING_CAPACITY}",
        f"Records the ring buffer holds between drains ({RECORD_BYTES} bytes each, so the default takes "
        f"{_DEFAULT_RING_CAPACITY * RECORD_BYTES / 2**20:g} MiB). "
        "When it is full, new records are dropped and counted in inferscope.sdk.records.dropped.",
        _int_check(MIN_RING_CAPACITY, MAX_RING_CAPACITY, power_of_two=True),
        _int_text,
    ),
    SettingSpec(
        "drain_interval_millis",
        ("INFERSCOPE_DRAIN_INTERVAL_MILLIS",),
        "100",
        "an integer from 1 to 60000",
        "How often the drainer moves records from the ring into the aggregates; it drains sooner "
        "when the ring is half full (on the C backend, a native thread that folds without the GIL), "
        "and before every read.",
        _int_check(1, 60_000),
        _int_text,
    ),
    SettingSpec(
        "max_keys",
        ("INFERSCOPE_MAX_KEYS",),
        str(DEFAULT_MAX_KEYS),
        f"an integer from 10 to {MAX_KEYS_LIMIT}",
        "Cap on distinct (model, version, stage path, attributes) keys. Past it, new keys fold into "
        "one overflow series marked otel.metric.overflow=true. Each key that records keeps about "
        "6 KiB for the life of the process (docs/metrics.md, Cardinality).",
        _int_check(10, MAX_KEYS_LIMIT),
        _int_text,
    ),
    SettingSpec(
        "metrics_exporters",
        ("INFERSCOPE_METRICS_EXPORTER", "OTEL_METRICS_EXPORTER"),
        "none; otlp when an OTLP endpoint is set",
        "'otlp', 'console', 'prometheus', comma-separated (or a list in configure()), or 'none' alone",
        "Where metrics are pushed or served; duplicates are dropped. Unlike the OTel SDK, the default "
        "sends nothing unless an OTLP endpoint is named (otlp_endpoint, OTEL_EXPORTER_OTLP_ENDPOINT or "
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT): inferscope never sends data to a backend you did not "
        "name, and snapshot() and the CLI work with no exporter.",
        _exporter_names(_EXPORTERS),
        _list_text,
    ),
    SettingSpec(
        "otlp_protocol",
        ("INFERSCOPE_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        "grpc",
        "'grpc' or 'http/protobuf'",
        "Transport of the otlp exporter.",
        _choice(
            _PROTOCOLS,
            {"http/json": "the Python OTLP exporters support grpc and http/protobuf, not http/json"},
        ),
    ),
    SettingSpec(
        "otlp_endpoint",
        ("INFERSCOPE_OTLP_ENDPOINT",),
        "unset",
        "an http:// or https:// URL whose host is a host name or an IP address, without spaces",
        "Where the otlp exporter sends metrics. Unset leaves it to the exporter, which reads "
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT itself (default "
        "localhost:4317 for grpc, localhost:4318/v1/metrics for http/protobuf).",
        _endpoint,
    ),
    SettingSpec(
        "export_interval_millis",
        ("INFERSCOPE_EXPORT_INTERVAL_MILLIS", "OTEL_METRIC_EXPORT_INTERVAL"),
        "60000",
        "an integer of at least 100",
        "Time between two pushes to the metric exporters.",
        _int_check(100),
        _int_text,
    ),
    SettingSpec(
        "export_timeout_millis",
        ("INFERSCOPE_EXPORT_TIMEOUT_MILLIS", "OTEL_METRIC_EXPORT_TIMEOUT"),
        "30000",
        "an integer of at least 1",
        "How long one push may take before it is abandoned.",
        _int_check(1),
        _int_text,
    ),
    SettingSpec(
        "shutdown_timeout_millis",
        ("INFERSCOPE_SHUTDOWN_TIMEOUT_MILLIS",),
        "5000",
        "an integer from 0 to 600000",
        "The most that shutdown() and exit wait for the last metrics and spans to be exported, all "
        "exporters together, and what configure() waits for the pipeline it replaces. A collector that "
        "is down or never answers costs at most this; what is not exported by then is dropped.",
        _int_check(0, 600_000),
        _int_text,
    ),
    SettingSpec(
        "histogram_aggregation",
        ("INFERSCOPE_HISTOGRAM_AGGREGATION", "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"),
        "exponential",
        "'exponential' (or 'base2_exponential_bucket_histogram') or 'explicit' "
        "(or 'explicit_bucket_histogram')",
        "How duration histograms are exported: base-2 exponential buckets, or the fixed "
        "histogram_boundaries.",
        _choice(_HISTOGRAM_AGGREGATIONS),
    ),
    SettingSpec(
        "histogram_boundaries",
        ("INFERSCOPE_HISTOGRAM_BOUNDARIES",),
        _defaults_text(DEFAULT_HISTOGRAM_BOUNDARIES),
        "strictly increasing finite numbers of seconds above 0, at least one (comma-separated in the "
        "environment, a sequence of numbers in configure())",
        "Bucket boundaries in seconds when histogram_aggregation is explicit.",
        _boundaries,
        _float_list_text,
    ),
    SettingSpec(
        "histogram_max_buckets",
        ("INFERSCOPE_HISTOGRAM_MAX_BUCKETS",),
        "320",
        "an integer from 2 to 16384",
        "Largest number of buckets in an exported exponential histogram; one with more is downscaled "
        "(merged into coarser buckets) on export.",
        _int_check(2, 16_384),
        _int_text,
    ),
    SettingSpec(
        "prometheus_host",
        ("INFERSCOPE_PROMETHEUS_HOST", "OTEL_EXPORTER_PROMETHEUS_HOST"),
        "127.0.0.1",
        "a host name or an IP address",
        "Address the Prometheus endpoint listens on. The default serves this machine only; use 0.0.0.0 "
        "to let a Prometheus server elsewhere scrape it.",
        _host,
    ),
    SettingSpec(
        "prometheus_port",
        ("INFERSCOPE_PROMETHEUS_PORT", "OTEL_EXPORTER_PROMETHEUS_PORT"),
        "9464",
        "an integer from 0 to 65535 (0 picks a free port)",
        "Port of the Prometheus endpoint. Used only when prometheus is one of metrics_exporters.",
        _int_check(0, 65_535),
        _int_text,
    ),
    SettingSpec(
        "multiprocess",
        ("INFERSCOPE_MULTIPROCESS",),
        "false",
        "True or False (in INFERSCOPE_MULTIPROCESS: true/false, 1/0, yes/no or on/off, in any case)",
        "For pre-fork servers (gunicorn, uvicorn --workers): each worker publishes its aggregates to "
        "memory that the server's workers share, and the Prometheus endpoint (any worker's, or the "
        "master's) and the mounted /metrics apps serve one merged view of every worker, counting what "
        "recycled and killed workers had published. A worker that finds the port taken by a sibling "
        "waits, silently, to take it over. See docs/multiprocess.md.",
        _check_bool,
        _bool_text,
    ),
    SettingSpec(
        "multiprocess_publish_millis",
        ("INFERSCOPE_MULTIPROCESS_PUBLISH_MILLIS",),
        "1000",
        "an integer from 10 to 60000",
        "How often a worker publishes its aggregates when multiprocess is on. A worker killed with "
        "SIGKILL loses what it recorded since its last publication: at most this plus "
        "drain_interval_millis; one that exits normally loses nothing.",
        _int_check(10, 60_000),
        _int_text,
    ),
    SettingSpec(
        "multiprocess_dir",
        ("INFERSCOPE_MULTIPROCESS_DIR",),
        "default",
        "an existing directory, or 'default' (/dev/shm, or the temporary directory where there is none)",
        "Where the workers of a server share their aggregates when multiprocess is on, in "
        "inferscope-<uid>/<server pid>-<start time>/; removed when the server stops.",
        _directory,
    ),
    SettingSpec(
        "meter_provider",
        (),
        "unset",
        "an opentelemetry.sdk.metrics.MeterProvider instance",
        "A MeterProvider that your application already set up; inferscope's metrics ride along with its "
        "readers and Resource.",
        _meter_provider,
    ),
    SettingSpec(
        "metric_exporters",
        (),
        "none",
        "a sequence of opentelemetry.sdk.metrics.export.MetricExporter instances",
        "Extra exporters to push to, next to metrics_exporters (for example an in-memory exporter in tests).",
        _metric_exporters,
    ),
    SettingSpec(
        "traces_exporters",
        ("INFERSCOPE_TRACES_EXPORTER", "OTEL_TRACES_EXPORTER"),
        "none; otlp when an OTLP endpoint is set",
        "'otlp', 'console', comma-separated (or a list in configure()), or 'none' alone",
        "Where spans go (docs/tracing.md). Tracing is on when this names an exporter, or when "
        "tracer_provider or span_exporters is given; otherwise the hot path pays nothing for it. As for "
        "metrics, the default sends nothing unless an OTLP endpoint is named (otlp_endpoint, "
        "OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). The otlp exporter uses "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL when set, else otlp_protocol.",
        _exporter_names(_TRACE_EXPORTERS),
        _list_text,
    ),
    SettingSpec(
        "trace_sampler",
        ("INFERSCOPE_TRACE_SAMPLER", "OTEL_TRACES_SAMPLER"),
        "parentbased_traceidratio",
        ", ".join(f"'{name}'" for name in TRACE_SAMPLERS),
        "Which calls are kept when they start, as OTEL_TRACES_SAMPLER means it: parentbased_* keep a "
        "call whose parent span is sampled and drop one whose parent is not; a call without a parent is "
        "kept at trace_ratio (traceidratio), always or never. Slow calls and errors are kept on top, "
        "after they end. An OTEL_TRACES_SAMPLER value that inferscope cannot follow (e.g. jaeger_remote) "
        "is ignored. Under opentelemetry-instrument, with neither variable set, it is traceidratio: "
        "every server span is sampled there, and inferscope keeps only trace_ratio of the inferences "
        "under them, besides slow and failed ones.",
        _choice({name: name for name in TRACE_SAMPLERS}),
    ),
    SettingSpec(
        "trace_ratio",
        ("INFERSCOPE_TRACE_RATIO",),
        "0.01",
        "a number from 0 to 1",
        "The share of calls without a sampled parent that are kept whatever their duration, chosen by "
        "trace id as OTel's TraceIdRatioBased does. Unset, OTEL_TRACES_SAMPLER_ARG gives it when "
        "trace_sampler is one of the traceidratio samplers.",
        _ratio,
        _float_text,
    ),
    SettingSpec(
        "trace_slow_ms",
        ("INFERSCOPE_TRACE_SLOW_MS",),
        "p99",
        "a number of milliseconds above 0, 'p90', 'p95', 'p99' or 'p999' (slower than that quantile of "
        "the same model or stage so far), or 'off'",
        "Calls slower than this are kept. A quantile applies to a model or stage once it has "
        "100 successful calls.",
        _trace_slow,
        _number_or_word_text,
    ),
    SettingSpec(
        "trace_errors",
        ("INFERSCOPE_TRACE_ERRORS",),
        "true",
        "True or False (in INFERSCOPE_TRACE_ERRORS: true/false, 1/0, yes/no or on/off, in any case)",
        "Whether every call that raised is kept.",
        _check_bool,
        _bool_text,
    ),
    SettingSpec(
        "trace_max_spans_per_second",
        ("INFERSCOPE_TRACE_MAX_SPANS_PER_SECOND",),
        "1000",
        "an integer from 1 to 1000000",
        "Spans per second that calls kept for being slow or failing may add; past it they are dropped "
        "and counted in inferscope.sdk.spans.dropped (reason rate_limit). Calls kept when they started "
        "are never dropped, so that no trace is broken.",
        _int_check(1, 1_000_000),
        _int_text,
    ),
    SettingSpec(
        "tracer_provider",
        (),
        "unset",
        "an opentelemetry.sdk.trace.TracerProvider instance",
        "A TracerProvider that your application already set up; inferscope's spans go through its span "
        "processors, with its Resource.",
        _sdk_instance("opentelemetry.sdk.trace", "TracerProvider"),
    ),
    SettingSpec(
        "span_exporters",
        (),
        "none",
        "a sequence of opentelemetry.sdk.trace.export.SpanExporter instances",
        "Extra span exporters, next to traces_exporters (for example an InMemorySpanExporter in tests).",
        _sdk_instances("opentelemetry.sdk.trace.export", "SpanExporter"),
    ),
    SettingSpec(
        "window_seconds",
        ("INFERSCOPE_WINDOW_SECONDS",),
        "60",
        "a number of seconds from 0.1 to 86400",
        "Length of a window: every window_seconds the drainer closes one per model and stage (counts, "
        "duration histogram, CPU, counters, input size) and one for the process and its host "
        "(docs/regressions.md). The flight recorder stores them and the regression detector reads them.",
        _number_check(0.1, 86_400.0),
        _float_text,
    ),
    SettingSpec(
        "baseline_seconds",
        ("INFERSCOPE_BASELINE_SECONDS",),
        "3600",
        "a number of seconds above 0",
        "How much of a model's first recorded history makes its anchor baseline.",
        _number_check(0.0, above=True),
        _float_text,
    ),
    SettingSpec(
        "regression_threshold",
        ("INFERSCOPE_REGRESSION_THRESHOLD",),
        "0.2",
        "a number above 0 (a fraction: 0.2 is +20%)",
        "How much a figure (a quantile of the duration, CPU per call) must rise over its baseline to "
        "count as a regression.",
        _number_check(0.0, above=True),
        _float_text,
    ),
    SettingSpec(
        "regression_sustain_seconds",
        ("INFERSCOPE_REGRESSION_SUSTAIN_SECONDS",),
        "3600",
        "a number of seconds from 0",
        "How long a rise must last before it is reported; one that goes away sooner is dropped.",
        _number_check(0.0),
        _float_text,
    ),
    SettingSpec(
        "regression_quantile",
        ("INFERSCOPE_REGRESSION_QUANTILE",),
        "0.95",
        "a number above 0 and below 1",
        "The quantile of the duration that the regression detector compares with the baseline.",
        _open_fraction,
        _float_text,
    ),
    SettingSpec(
        "recorder",
        ("INFERSCOPE_RECORDER",),
        RECORDER_DEFAULT,
        "a file path, 'default' ($XDG_STATE_HOME/inferscope/recorder.sqlite, else "
        "~/.local/state/inferscope/recorder.sqlite) or 'off'",
        "Where the flight recorder keeps windows, environment fingerprints, baselines and regressions "
        "(SQLite; several processes may share one file). 'off' keeps them in memory only.",
        _recorder,
    ),
    SettingSpec(
        "recorder_max_bytes",
        ("INFERSCOPE_RECORDER_MAX_BYTES",),
        "268435456",
        "an integer from 1048576",
        "Size bound of the flight recorder's file: past it the oldest windows are deleted first.",
        _int_check(1_048_576),
        _int_text,
    ),
    SettingSpec(
        "recorder_window_retention_days",
        ("INFERSCOPE_RECORDER_WINDOW_RETENTION_DAYS",),
        "7",
        "a number of days above 0",
        "How long the flight recorder keeps every window; older ones survive as hourly rollups.",
        _number_check(0.0, above=True),
        _float_text,
    ),
    SettingSpec(
        "recorder_rollup_retention_days",
        ("INFERSCOPE_RECORDER_ROLLUP_RETENTION_DAYS",),
        "90",
        "a number of days above 0",
        "How long the flight recorder keeps hourly rollups of the windows.",
        _number_check(0.0, above=True),
        _float_text,
    ),
    SettingSpec(
        "canary",
        ("INFERSCOPE_CANARY",),
        "true",
        "True or False (in INFERSCOPE_CANARY: true/false, 1/0, yes/no or on/off, in any case)",
        "Whether the drainer runs the machine canary, a fixed unit of work (hashing 64 KiB) timed twice "
        "a second, under 0.01% of a core: when it takes longer the machine changed, not the code.",
        _check_bool,
        _bool_text,
    ),
    SettingSpec(
        "profile_on_regression",
        ("INFERSCOPE_PROFILE_ON_REGRESSION",),
        "true",
        "True or False (in INFERSCOPE_PROFILE_ON_REGRESSION: true/false, 1/0, yes/no or on/off, in any case)",
        "Whether a regression of latency or CPU, as it opens, has the stacks of the threads inside its "
        "stage sampled for 10 s (at most once per stage an hour, under 1% of a core) and the top "
        "functions stored with it (docs/profile.md).",
        _check_bool,
        _bool_text,
    ),
)

_SPECS: dict[str, SettingSpec] = {spec.name: spec for spec in SETTINGS}


def _convert(spec: SettingSpec, value: object, source: str, *, text: str | None = None) -> object:
    """Check ``value`` (already converted from ``text`` when it came from the environment)."""
    try:
        if text is not None:
            value = spec.from_text(text.strip())
        return spec.check(value)
    except _Invalid as exc:
        raise ConfigError(
            spec.name, value if text is None else text, spec.accepted, source, exc.note
        ) from None


@dataclass(frozen=True)
class Settings:
    """Validated, normalized settings; build them with ``load_settings()``.

    Constructing ``Settings(...)`` directly validates every field the same way, so an instance is
    always valid::

        >>> Settings(ring_capacity=1024, counters="minimal").counter_mask
        0
    """

    enabled: bool = True
    service_name: str | None = None
    counters: str = "default"
    counter_mask: int = field(init=False)
    ring_capacity: int = _DEFAULT_RING_CAPACITY
    drain_interval_millis: int = 100
    max_keys: int = DEFAULT_MAX_KEYS
    metrics_exporters: tuple[str, ...] = ()
    otlp_protocol: str = "grpc"
    otlp_endpoint: str | None = None
    export_interval_millis: int = 60000
    export_timeout_millis: int = 30000
    shutdown_timeout_millis: int = 5000
    histogram_aggregation: str = "exponential"
    histogram_boundaries: tuple[float, ...] = DEFAULT_HISTOGRAM_BOUNDARIES
    histogram_max_buckets: int = 320
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464
    multiprocess: bool = False
    multiprocess_publish_millis: int = 1000
    multiprocess_dir: str = field(default_factory=default_multiprocess_dir)
    meter_provider: object | None = None
    metric_exporters: tuple[object, ...] = ()
    traces_exporters: tuple[str, ...] = ()
    trace_sampler: str = "parentbased_traceidratio"
    trace_ratio: float = 0.01
    trace_slow_ms: float | str = "p99"
    trace_errors: bool = True
    trace_max_spans_per_second: int = 1000
    tracer_provider: object | None = None
    span_exporters: tuple[object, ...] = ()
    window_seconds: float = 60.0
    baseline_seconds: float = 3600.0
    regression_threshold: float = 0.2
    regression_sustain_seconds: float = 3600.0
    regression_quantile: float = 0.95
    recorder: str = field(default_factory=default_recorder_path)
    recorder_max_bytes: int = 268_435_456
    recorder_window_retention_days: float = 7.0
    recorder_rollup_retention_days: float = 90.0
    canary: bool = True
    profile_on_regression: bool = True

    def __post_init__(self) -> None:
        for spec in SETTINGS:
            normalized = _convert(spec, getattr(self, spec.name), SETTINGS_FIELD)
            object.__setattr__(self, spec.name, normalized)
        object.__setattr__(self, "counter_mask", counter_mask(self.counters))

    @property
    def tracing(self) -> bool:
        """Whether spans are recorded: an exporter, a TracerProvider or span exporters are given."""
        return self.enabled and bool(self.traces_exporters or self.tracer_provider or self.span_exporters)


def _unknown_setting(name: str, value: object) -> ConfigError:
    known = ", ".join(_SPECS)
    close = difflib.get_close_matches(name, _SPECS, n=1)
    note = f"did you mean {close[0]!r}?" if close else None
    hint = f"; {note} Accepted" if note else "; accepted"
    return ConfigError(
        name,
        value,
        f"one of {known}",
        CONFIGURE_ARGUMENT,
        note,
        message=f"unknown setting {name!r} (configure argument){hint}: one of {known}",
    )


def _from_environment(spec: SettingSpec, environ: Mapping[str, str]) -> tuple[bool, object]:
    """``(True, value)`` from the first variable of ``spec.env`` that is set, else ``(False, None)``."""
    for variable in spec.env:
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        if variable == "OTEL_SDK_DISABLED":
            # OTel semantics: only "true" disables; any other value is ignored rather than an error.
            if raw.strip().lower() == "true":
                return True, False
            continue
        if variable == "OTEL_TRACES_SAMPLER" and raw.strip().lower() not in TRACE_SAMPLERS:
            continue  # a sampler of another system (jaeger_remote, xray): not ours to refuse
        return True, _convert(spec, None, variable, text=raw)
    return False, None


def load_settings(
    overrides: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Validated settings from ``configure()`` arguments over environment variables over defaults.

    ``environ`` defaults to ``os.environ``. Raises ``ConfigError`` for an unknown argument and for any
    invalid value, naming where the value came from::

        >>> load_settings({"counters": "minimal"}, environ={"INFERSCOPE_MAX_KEYS": "500"}).max_keys
        500
    """
    environ = os.environ if environ is None else environ
    given = dict(overrides or {})
    for name, value in given.items():
        if name not in _SPECS:
            raise _unknown_setting(name, value)

    values: dict[str, Any] = {}
    for spec in SETTINGS:
        value = given.get(spec.name)
        if value is not None:
            values[spec.name] = _convert(spec, value, CONFIGURE_ARGUMENT)
            continue
        found, value = _from_environment(spec, environ)
        if found:
            values[spec.name] = value

    if "metrics_exporters" not in values and (
        values.get("otlp_endpoint") is not None
        or any((environ.get(variable) or "").strip() for variable in _OTLP_ENDPOINT_VARIABLES)
    ):
        # Naming an OTLP endpoint is naming a backend: export to it without also asking for "otlp".
        values["metrics_exporters"] = ("otlp",)
    if "traces_exporters" not in values and (
        values.get("otlp_endpoint") is not None
        or any((environ.get(variable) or "").strip() for variable in _OTLP_TRACES_ENDPOINT_VARIABLES)
    ):
        values["traces_exporters"] = ("otlp",)
    if "trace_ratio" not in values and values.get("trace_sampler", "").endswith("traceidratio"):
        # OTel semantics: the sampler's argument is its ratio; one that is not a ratio is ignored.
        with contextlib.suppress(ValueError):
            ratio = float((environ.get("OTEL_TRACES_SAMPLER_ARG") or "").strip())
            if 0.0 <= ratio <= 1.0:
                values["trace_ratio"] = ratio
    return Settings(**values)


def _markdown_table() -> str:
    """The settings table of docs/configuration.md, generated from ``SETTINGS``."""
    rows = [
        "| argument | environment variables | default | accepted | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in SETTINGS:
        env = "<br>".join(f"`{name}`" for name in spec.env) if spec.env else "configure() only"
        cells = (f"`{spec.name}`", env, spec.default, spec.accepted, spec.description)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
