"""Real backends for integration tests: rotel (an OTLP collector) and Prometheus 2.42.

Each fixture starts its server on 127.0.0.1 with free ports, waits until it is ready, captures its
output into the test's report, and stops it cleanly afterwards. A missing binary skips the test
with the reason, except under CI (``CI`` set), where it is a failure: CI must run these.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PROMETHEUS_BINARY = "/usr/bin/prometheus"


def _missing(what: str, how: str) -> None:
    message = f"{what} not found; {how}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so integration backends are required)", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A port that nothing listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    return free_port()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}", pytrace=False)
        time.sleep(interval_s)


class _Process:
    """A server subprocess whose stdout and stderr go to one log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  (closed in stop())
        env = dict(os.environ, NO_COLOR="1")
        # rotel-agent embeds Python and links libpython; a pyenv or venv interpreter's library
        # directory is not on the loader's path by default.
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            pytest.fail(
                f"{self.name} exited with {code}: {' '.join(self.argv)}\n--- output ---\n{self.output()}",
                pytrace=False,
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        self._log.close()


def _report(request: pytest.FixtureRequest, process: _Process) -> None:
    text = process.output()
    if len(text) > 200_000:
        text = "[... earlier output cut ...]\n" + text[-200_000:]
    request.node.add_report_section("teardown", f"{process.name} output", text)


# --- rotel ------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ATTRIBUTE = re.compile(r"^\s*-> (?P<key>[^:]+): (?P<type>\w+)\((?P<value>.*)\)\s*$")
_DESCRIPTOR = re.compile(
    r"^\s*-> (?P<key>Name|Description|Unit|DataType|IsMonotonic|AggregationTemporality): ?(?P<value>.*)$"
)
_EXP_BUCKET = re.compile(
    r"^Bucket [(\[](?P<low>[-0-9.eE+]+), (?P<high>[-0-9.eE+]+)[)\]], Count: (?P<count>\d+)$"
)
_EXPLICIT_BOUND = re.compile(r"^ExplicitBounds #(?P<i>\d+): (?P<bound>[-0-9.eE+]+)$")
_EXPLICIT_BUCKET = re.compile(r"^Buckets #(?P<i>\d+), Count: (?P<count>\d+)$")
_FIELD = re.compile(
    r"^(?P<key>StartTimestamp|Timestamp|Count|Sum|Min|Max|Value|ZeroCount|Scale): (?P<value>\S+)$"
)


@dataclass
class RotelPoint:
    """One data point as rotel's detailed debug log printed it."""

    resource: dict[str, str]
    scope: str
    metric: str
    unit: str
    data_type: str
    temporality: str
    is_monotonic: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    #: Exponential buckets as printed: (lower, upper, count), only the positive range.
    exponential_buckets: list[tuple[float, float, int]] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    explicit_counts: dict[int, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.fields["Count"])

    @property
    def sum(self) -> float:
        return float(self.fields["Sum"])

    @property
    def value(self) -> float:
        return float(self.fields["Value"])


def parse_rotel_metrics(text: str) -> list[RotelPoint]:
    """Every metric data point in rotel's ``--debug-log metrics --debug-log-verbosity detailed`` output.

    The format (rotel 0.0.1-alpha10) mirrors the OTel collector's debug exporter::

        ResourceMetrics #0
        Resource attributes:
             -> service.name: Str(svc)
        InstrumentationScope inferscope 0.1.0
        Metric #0
        Descriptor:
             -> Name: inferscope.inference.duration
             -> Unit: s
             -> DataType: ExponentialHistogram
        ExponentialHistogramDataPoints #0
        Data point attributes:
             -> inferscope.model.name: Str(fraud)
        Count: 2
        Bucket (0.000997946434232536, 0.0010088133584191684], Count: 1
    """
    points: list[RotelPoint] = []
    resource: dict[str, str] = {}
    scope = ""
    descriptor: dict[str, str] = {}
    point: RotelPoint | None = None
    section = ""
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        stripped = line.strip()
        if stripped.startswith("ResourceMetrics #"):
            resource, section, point = {}, "resource", None
        elif stripped == "Resource attributes:":
            section = "resource"
        elif stripped.startswith("InstrumentationScope"):
            scope = stripped.removeprefix("InstrumentationScope").strip()
            section, point = "", None
        elif stripped.startswith("Metric #"):
            descriptor, section, point = {}, "descriptor", None
        elif re.match(r"^\w*DataPoints #\d+$", stripped):
            point = RotelPoint(
                resource=dict(resource),
                scope=scope,
                metric=descriptor.get("Name", ""),
                unit=descriptor.get("Unit", ""),
                data_type=descriptor.get("DataType", ""),
                temporality=descriptor.get("AggregationTemporality", ""),
                is_monotonic=descriptor.get("IsMonotonic"),
            )
            points.append(point)
            section = "point"
        elif stripped == "Data point attributes:":
            section = "attributes"
        elif (m := _ATTRIBUTE.match(line)) and section in ("resource", "attributes"):
            target = resource if section == "resource" else (point.attributes if point else {})
            target[m["key"].strip()] = m["value"]
        elif (m := _DESCRIPTOR.match(line)) and section == "descriptor":
            descriptor[m["key"]] = m["value"].strip()
        elif point is not None and (m := _FIELD.match(stripped)):
            point.fields[m["key"]] = m["value"]
        elif point is not None and (m := _EXP_BUCKET.match(stripped)):
            low, high = float(m["low"]), float(m["high"])
            if high > 0:  # rotel also prints the (empty) negative range
                point.exponential_buckets.append((low, high, int(m["count"])))
        elif point is not None and (m := _EXPLICIT_BOUND.match(stripped)):
            point.explicit_bounds.append(float(m["bound"]))
        elif point is not None and (m := _EXPLICIT_BUCKET.match(stripped)):
            point.explicit_counts[int(m["i"])] = int(m["count"])
    return points


@dataclass
class Rotel:
    """A running rotel-agent that prints every OTLP metric it receives."""

    grpc_port: int
    http_port: int
    process: _Process

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_metrics_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/metrics"

    def output(self) -> str:
        return self.process.output()

    def points(self) -> list[RotelPoint]:
        return parse_rotel_metrics(self.output())

    def wait_for_points(
        self,
        predicate: Callable[[RotelPoint], bool],
        timeout_s: float = 10.0,
        complete: Callable[[list[RotelPoint]], bool] | None = None,
    ) -> list[RotelPoint]:
        """The printed points matching ``predicate``, once there is at least one and rotel has
        finished printing them: rotel prints an export point by point, so a read in the middle
        would see only its first points. A pause in rotel's printing can pass for the end of it on
        a loaded machine: with ``complete``, the points are returned once it holds of them, or at
        ``timeout_s`` whatever arrived (for the caller to say what is missing)."""
        settled: list[list[RotelPoint]] = []
        deadline = time.monotonic() + timeout_s

        def matching() -> list[RotelPoint] | None:
            self.process.check_alive()
            found = [p for p in self.points() if predicate(p)]
            stable = bool(found) and bool(settled) and len(settled[-1]) == len(found)
            settled.append(found)
            if not stable:
                return None
            if complete is None or complete(found) or time.monotonic() > deadline - 0.5:
                return found
            return None

        found: list[RotelPoint] = wait_until(
            matching, timeout_s, "rotel to print the exported points", interval_s=0.2
        )
        return found


def parse_rotel_spans(text: str) -> list[dict[str, str]]:
    """The spans rotel printed (--debug-log traces), as their "Key : value" header fields."""
    spans: list[dict[str, str]] = []
    for line in text.splitlines():
        if re.match(r"^Span #\d+", line.strip()):
            spans.append({})
            continue
        match = re.match(r"^\s{4}(Trace ID|Parent ID|ID|Name|Status code)\s*: ?(.*)$", line)
        if match and spans:
            spans[-1][match.group(1)] = match.group(2).strip()
    return spans


def _rotel_binary() -> str:
    spec = importlib.util.find_spec("rotel")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "rotel-agent"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("rotel-agent")
    if on_path:
        return on_path
    _missing("rotel-agent", "install it with `pip install rotel` (dependency group 'test')")
    raise AssertionError("unreachable")


@pytest.fixture
def rotel(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rotel]:
    """A fresh rotel-agent on two free ports, printing decoded metrics in detail."""
    binary = _rotel_binary()
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between our probe and rotel's bind
        grpc_port, http_port = free_port(), free_port()
        if grpc_port == http_port:
            continue
        argv = [
            binary,
            "start",
            "--otlp-grpc-endpoint",
            f"127.0.0.1:{grpc_port}",
            "--otlp-http-endpoint",
            f"127.0.0.1:{http_port}",
            "--exporter",
            "blackhole",
            "--debug-log",
            "metrics",
            "--debug-log",
            "traces",
            "--debug-log-verbosity",
            "detailed",
            "--pid-file",
            str(tmp_path / "rotel.pid"),
            "--log-file",
            str(tmp_path / "rotel-agent.log"),
        ]
        process = _Process("rotel", argv, tmp_path / "rotel-output.txt", tmp_path)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and process.popen.poll() is None:
            if _accepts(grpc_port) and _accepts(http_port):
                break
            time.sleep(0.05)
        if process.popen.poll() is None and _accepts(grpc_port) and _accepts(http_port):
            try:
                yield Rotel(grpc_port, http_port, process)
            finally:
                process.stop()
                _report(request, process)
            return
        process.stop()
        last_error = process.output()
    pytest.fail(f"rotel did not become ready:\n{last_error}", pytrace=False)


# --- Prometheus ---------------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A running Prometheus server scraping the given targets every second."""

    port: int
    process: _Process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (``/api/v1/query``)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, expr: str, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """The result of ``expr`` once it is non-empty (i.e. once the data has been scraped)."""

        def ready() -> list[dict[str, Any]]:
            self.process.check_alive()
            return self.query(expr)

        found: list[dict[str, Any]] = wait_until(
            ready, timeout_s, f"Prometheus to return data for {expr!r}", 0.2
        )
        return found

    def exemplars(self, expr: str) -> list[dict[str, Any]]:
        """The exemplars of ``expr`` over the last hour (``/api/v1/query_exemplars``)."""
        now = time.time()
        params = {"query": expr, "start": f"{now - 3600:.3f}", "end": f"{now + 60:.3f}"}
        url = f"{self.url}/api/v1/query_exemplars?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise AssertionError(f"exemplar query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]
        return result


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def start_prometheus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """A factory: ``start_prometheus(["127.0.0.1:PORT"], *flags)`` starts Prometheus scraping those
    targets, with extra command-line flags (``--enable-feature=exemplar-storage``), evaluating the
    rules of ``rule_files=[...]`` every second, keeping its data in ``storage`` (a folder of blocks,
    e.g. backfilled by promtool) or a fresh one."""
    if not (os.path.isfile(PROMETHEUS_BINARY) and os.access(PROMETHEUS_BINARY, os.X_OK)):
        _missing(PROMETHEUS_BINARY, "install it with `apt-get install -y --no-install-recommends prometheus`")
    started: list[_Process] = []

    def start(
        targets: list[str], *flags: str, rule_files: Sequence[Path] = (), storage: Path | None = None
    ) -> Prometheus:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: inferscope\n"
            "    scrape_interval: 1s\n"
            "    scrape_timeout: 900ms\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        if rule_files:
            files = json.dumps([str(path) for path in rule_files])
            config.write_text(config.read_text() + f"rule_files: {files}\n")
        last_output = ""
        for _attempt in range(3):
            port = free_port()
            argv = [
                PROMETHEUS_BINARY,
                f"--config.file={config}",
                f"--storage.tsdb.path={storage or workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                *flags,
            ]
            process = _Process("prometheus", argv, workdir / f"output-{port}.txt", workdir)
            started.append(process)
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and process.popen.poll() is None:
                if _http_ok(f"http://127.0.0.1:{port}/-/ready"):
                    return Prometheus(port, process)
                time.sleep(0.1)
            process.stop()
            last_output = process.output()
        pytest.fail(f"Prometheus did not become ready:\n{last_output}", pytrace=False)

    try:
        yield start
    finally:
        for process in started:
            with contextlib.suppress(Exception):
                process.stop()
            _report(request, process)
