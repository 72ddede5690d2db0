"""End to end: what a FastAPI model service pays for each way of observing it, under real load.

Each variant is the same service (uvicorn, one worker) answering ``POST /predict`` with 16 rows of
8 features: a 3-step scikit-learn Pipeline (StandardScaler, PCA, LogisticRegression) or a small
torch MLP (one thread, no grad). The variants:

- ``bare``: no instrumentation.
- ``prometheus``: prometheus_client, a labelled Histogram and Counter observed in a Starlette
  ``@app.middleware("http")``, the classic hand-made approach.
- ``otel``: ``opentelemetry-instrument`` with the stock distro: OTel's FastAPI instrumentation,
  spans and metrics exported over OTLP gRPC to a real collector (rotel, discarding what it receives),
  inferscope off.
- ``api``: inferscope's API: its scikit-learn or torch instrumentor called in the code, and its
  Prometheus endpoint, no OTel SDK.
- ``zero-code``: ``opentelemetry-instrument`` as ``otel``, with inferscope installed: its
  instrumentors and metrics on the SDK's pipeline, and its default sampling of spans.
- ``zero-code-all-spans``: the same with ``INFERSCOPE_TRACE_SAMPLER=parentbased_always_on``:
  every sampled request keeps its inference and stages as spans.
- ``zero-code-no-spans``: the same with ``INFERSCOPE_TRACES_EXPORTER=none``.

Every server is started once and stopped (SIGSTOP) while the others are measured, so that an idle
server's threads take nothing from the one under load. Each round drives every variant, in a fresh
random order, first at a fixed load (70% of what ``bare`` sustained in a calibration run, open loop:
latency counts from the time each request was due) and then at saturation (closed loop,
``--connections`` at once). Figures are medians over the rounds; a difference from or ratio to
another variant is the median of the differences or ratios within each round, which takes out most
of the drift in the machine's load between rounds:

- throughput at saturation; CPU per request (the server process's CPU time, summed over its
  threads from ``/proc/PID/task/*/schedstat`` in ns, over the requests it answered) at the fixed
  load and at saturation; p50/p99 latency; RSS after the run;
- the spans inferscope handed to the span processors per request;
- the targets, as ratios in the same run: zero-code's added CPU per request at most half of what
  OTel's FastAPI instrumentation adds over bare; a kept span at most 50 us of CPU (the difference
  between all spans and no spans, per kept span); zero-code's p99 at the fixed load within 10% of
  ``otel``'s.

The client runs in this process (threads, keep-alive connections), so on a 2-core machine it takes
CPU from the server as it would on a shared host; the server's CPU per request is not affected by it.
Run: ``python3 benchmarks/e2e_fastapi.py`` (~4-5 minutes), ``--quick`` (~1.5 minutes, scikit-learn
only), ``--rounds N --seconds S`` for longer runs, ``--models``, ``--variants``. On a busy 2-core
machine, CPU per request moves by tenths of a millisecond between rounds: rerun with more rounds
(``--rounds 10``) before quoting a difference of that size.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

VARIANTS = ("bare", "prometheus", "otel", "api", "zero-code", "zero-code-all-spans", "zero-code-no-spans")
MODELS = ("sklearn", "torch")
ROWS, FEATURES = 16, 8
#: The fixed load, as a share of what bare sustained at saturation in the calibration run.
FIXED_LOAD_SHARE = 0.7
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
#: inferscope's instrumentors, disabled in the ``otel`` variant (the entry points of pyproject.toml).
INFERSCOPE_INSTRUMENTORS = (
    "inferscope_sklearn,inferscope_onnxruntime,inferscope_xgboost,inferscope_lightgbm,inferscope_torch,"
    "inferscope_transformers,inferscope_tensorflow,inferscope_asgi,inferscope_wsgi"
)
BODY = json.dumps(
    {
        "rows": [
            [round(random.Random(i * FEATURES + j).uniform(-2, 2), 4) for j in range(FEATURES)]
            for i in range(ROWS)
        ]
    }
).encode()


# --- the service (run in the server processes) ------------------------------------------------------


class Batch(BaseModel):
    """The request: ``rows`` of features (here, 16 of 8)."""

    rows: list[list[float]]


def build_model(kind: str) -> Any:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, FEATURES))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    if kind == "sklearn":
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        pipeline = Pipeline(
            [("scale", StandardScaler()), ("pca", PCA(n_components=6)), ("clf", LogisticRegression())]
        )
        pipeline.fit(x, y)
        return lambda rows: pipeline.predict_proba(np.asarray(rows))[:, 1].tolist()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).eval()

    def predict(rows: list[list[float]]) -> list[float]:
        with torch.no_grad():
            return net(torch.tensor(rows, dtype=torch.float32)).softmax(-1)[:, 1].tolist()

    return predict


def serve(variant: str, kind: str, port_file: str) -> None:
    import uvicorn
    from fastapi import FastAPI, Request

    if variant == "api":
        import inferscope

        inferscope.configure(
            service_name=f"e2e-{variant}", metrics_exporters=["prometheus"], prometheus_port=0
        )
        if kind == "sklearn":
            from inferscope.instrumentation.sklearn import SklearnInstrumentor

            SklearnInstrumentor().instrument()
        else:
            from inferscope.instrumentation.torch import TorchInstrumentor

            TorchInstrumentor().instrument()
    predict = build_model(kind)  # after the instrumentors: they patch the classes

    app = FastAPI()
    if variant == "prometheus":
        from prometheus_client import Counter, Histogram, start_http_server

        start_http_server(0, addr="127.0.0.1")
        latency = Histogram("http_request_duration_seconds", "Request latency", ["method", "path", "status"])
        requests = Counter("http_requests_total", "Requests", ["method", "path", "status"])

        @app.middleware("http")
        async def observe(request: Request, call_next: Any) -> Any:
            start = time.perf_counter()
            response = await call_next(request)
            labels = (request.method, request.url.path, str(response.status_code))
            latency.labels(*labels).observe(time.perf_counter() - start)
            requests.labels(*labels).inc()
            return response

    @app.post("/predict")
    def predict_route(batch: Batch) -> dict[str, list[float]]:
        return {"scores": predict(batch.rows)}

    @app.get("/stats")
    def stats() -> dict[str, int]:
        """Spans inferscope handed to the span processors so far (0 where it is not tracing)."""
        exports = sys.modules.get("inferscope._pipeline")
        traces = getattr(getattr(exports, "_exports", None), "traces", None)
        return {"spans": int(getattr(traces, "spans_exported", 0))}

    # The socket is bound here, on a port the system picks, and its number handed to the driver: a
    # port picked by the driver could be taken by the time the server binds it.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    Path(port_file).write_text(str(sock.getsockname()[1]), encoding="ascii")
    config = uvicorn.Config(app, workers=1, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


# --- the driver ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rotel_binary() -> str | None:
    spec = importlib.util.find_spec("rotel")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "rotel-agent"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("rotel-agent")


def base_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "INFERSCOPE_"))}
    if "INFERSCOPE_NO_EXTENSION" in os.environ:
        env["INFERSCOPE_NO_EXTENSION"] = os.environ["INFERSCOPE_NO_EXTENSION"]
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


@dataclass
class Server:
    variant: str
    model: str
    port_file: Path
    process: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def cpu_seconds(self) -> float:
        """The process's CPU time, in ns resolution: the sum over its threads' schedstat (the
        process's stat counts clock ticks of 10 ms, too coarse for a phase of a few seconds).
        Threads that ended are not counted; the servers' threads live as long as they do."""
        total = 0
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text(encoding="ascii").split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread ended meanwhile
        return total / 1e9

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def spans(self) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.request("GET", "/stats")
            return int(json.loads(connection.getresponse().read())["spans"])
        finally:
            connection.close()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def start_server(variant: str, model: str, otlp_endpoint: str | None, workdir: Path) -> Server:
    port_file = workdir / f"{model}-{variant}.port"
    env = base_environment()
    argv = [
        sys.executable,
        os.path.abspath(__file__),
        "--serve",
        variant,
        "--model",
        model,
        "--port-file",
        str(port_file),
    ]
    if variant in ("otel",) or variant.startswith("zero-code"):
        instrument = Path(sys.executable).parent / "opentelemetry-instrument"
        argv = [str(instrument) if instrument.is_file() else "opentelemetry-instrument", *argv]
        env.update(
            OTEL_SERVICE_NAME=f"e2e-{variant}",
            OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint or "",
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_LOGS_EXPORTER="none",
        )
        if variant == "otel":
            env.update(
                INFERSCOPE_ENABLED="false", OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=INFERSCOPE_INSTRUMENTORS
            )
        elif variant == "zero-code-all-spans":
            env["INFERSCOPE_TRACE_SAMPLER"] = "parentbased_always_on"
        elif variant == "zero-code-no-spans":
            env["INFERSCOPE_TRACES_EXPORTER"] = "none"
    log = workdir / f"{model}-{variant}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return Server(variant, model, port_file, process, log)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.model}/{server.variant} exited:\n{server.log.read_text(errors='replace')}"
            )
        try:
            server.port = server.port or int(server.port_file.read_text(encoding="ascii"))
            post(http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S))
            return
        except ValueError:  # the file is being written
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{server.model}/{server.variant} did not answer within {READY_TIMEOUT_S:.0f} s")


def post(connection: http.client.HTTPConnection) -> None:
    connection.request("POST", "/predict", BODY, {"content-type": "application/json"})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def drive(port: int, seconds: float, connections: int, rate: float | None) -> tuple[int, list[float], float]:
    """Requests for ``seconds``: closed loop (``rate`` None) or open loop at ``rate`` per second.
    Returns (answered, latencies in seconds, elapsed seconds)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    start = time.perf_counter() + 0.05
    end = start + seconds
    due = itertools.count()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        mine: list[float] = []
        try:
            while True:
                if rate is None:
                    begin = time.perf_counter()
                    if begin >= end:
                        break
                else:
                    begin = start + next(due) / rate  # next() on a count is atomic under the GIL
                    if begin >= end:
                        break
                    wait = begin - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                post(connection)
                mine.append(time.perf_counter() - begin)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            connection.close()
            latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 4 * REQUEST_TIMEOUT_S)
    if errors:
        raise RuntimeError(f"the client failed: {errors[0]!r}")
    return len(latencies), latencies, max(time.perf_counter() - start, seconds)


@dataclass
class Phase:
    requests: int
    throughput: float
    cpu_per_request_s: float
    p50_s: float
    p99_s: float
    spans_per_request: float


@dataclass
class Results:
    fixed: list[Phase] = field(default_factory=list)
    saturation: list[Phase] = field(default_factory=list)
    rss_mb: float = 0.0


def measure_phase(server: Server, seconds: float, connections: int, rate: float | None) -> Phase:
    spans0, cpu0 = server.spans(), server.cpu_seconds()
    answered, latencies, elapsed = drive(server.port, seconds, connections, rate)
    cpu = server.cpu_seconds() - cpu0
    spans = server.spans() - spans0
    return Phase(
        answered,
        answered / elapsed,
        cpu / max(answered, 1),
        statistics.median(latencies),
        percentile(latencies, 0.99),
        spans / max(answered, 1),
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from _common import progress

    binary = rotel_binary()
    workdir = Path(tempfile.mkdtemp(prefix="inferscope-e2e-"))
    rotel = None
    variants = list(args.variants)
    otlp_endpoint = None
    if any(v == "otel" or v.startswith("zero-code") for v in variants):
        if binary is None:
            progress("rotel-agent not found (pip install rotel): the OTel variants are skipped")
            variants = [v for v in variants if v != "otel" and not v.startswith("zero-code")]
        else:
            grpc, http_port = free_port(), free_port()
            rotel_env = dict(os.environ)
            libdir = sysconfig.get_config_var("LIBDIR")
            if libdir:  # rotel-agent links libpython
                rotel_env["LD_LIBRARY_PATH"] = os.pathsep.join(
                    p for p in (libdir, rotel_env.get("LD_LIBRARY_PATH")) if p
                )
            argv = [
                binary, "start", "--exporter", "blackhole",
                "--otlp-grpc-endpoint", f"127.0.0.1:{grpc}", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
                "--pid-file", str(workdir / "rotel.pid"), "--log-file", str(workdir / "rotel.log"),
            ]  # fmt: skip
            with open(workdir / "rotel-output.txt", "wb") as out:
                rotel = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=rotel_env, cwd=workdir
                )
            otlp_endpoint = f"http://127.0.0.1:{grpc}"
    servers: dict[tuple[str, str], Server] = {}
    data: dict[str, Any] = {"models": {}, "variants": variants}
    try:
        progress(f"e2e: starting {len(variants) * len(args.models)} servers")
        for model in args.models:
            for variant in variants:
                servers[model, variant] = start_server(variant, model, otlp_endpoint, workdir)
        for server in servers.values():
            wait_ready(server)
            server.pause()
        for model in args.models:
            results = {variant: Results() for variant in variants}
            for variant in variants:  # warm-up: imports, first calls, inferscope's p99 thresholds
                server = servers[model, variant]
                server.resume()
                drive(server.port, args.warmup, args.connections, None)
                server.pause()
            calibration = servers[model, "bare" if "bare" in variants else variants[0]]
            calibration.resume()
            bare_saturation = measure_phase(calibration, args.seconds, args.connections, None).throughput
            calibration.pause()
            rate = args.rate or FIXED_LOAD_SHARE * bare_saturation
            progress(f"e2e {model}: {variants[0] if 'bare' not in variants else 'bare'} saturates at "
                     f"{bare_saturation:.0f} req/s; fixed load {rate:.0f} req/s")  # fmt: skip
            for round_index in range(args.rounds):
                order = random.sample(variants, len(variants))
                for variant in order:
                    server = servers[model, variant]
                    server.resume()
                    results[variant].fixed.append(
                        measure_phase(server, args.seconds, args.connections * 2, rate)
                    )
                    results[variant].saturation.append(
                        measure_phase(server, args.seconds, args.connections, None)
                    )
                    results[variant].rss_mb = server.rss_mb()
                    server.pause()
                progress(f"e2e {model}: round {round_index + 1}/{args.rounds} done")
            data["models"][model] = {
                "fixed_rate": rate,
                "bare_saturation": bare_saturation,
                "variants": results,
            }
    finally:
        for server in servers.values():
            server.stop()
        if rotel is not None:
            rotel.terminate()
            rotel.wait(10)
    return data


# --- the report ------------------------------------------------------------------------------------


def med(phases: Sequence[Phase], name: str) -> float:
    return statistics.median(getattr(phase, name) for phase in phases)


def paired(a: Sequence[Phase], b: Sequence[Phase], name: str, *, ratio: bool = False) -> float:
    """The median over rounds of a's figure minus (or over) b's in the same round: the machine's load
    drifts between rounds, and pairing within a round takes most of that drift out."""
    if ratio:
        return statistics.median(getattr(x, name) / getattr(y, name) for x, y in zip(a, b, strict=True))
    return statistics.median(getattr(x, name) - getattr(y, name) for x, y in zip(a, b, strict=True))


def summarize(data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    from _common import table, verdict

    lines: list[str] = []
    out: dict[str, Any] = {"models": {}}
    for model, found in data["models"].items():
        results: dict[str, Results] = found["variants"]
        bare = results.get("bare")
        figures: dict[str, dict[str, Any]] = {}
        rows = []
        for variant, r in results.items():
            f = figures[variant] = {
                "saturation_rps": med(r.saturation, "throughput"),
                "cpu_fixed_ms": med(r.fixed, "cpu_per_request_s") * 1e3,
                "cpu_saturation_ms": med(r.saturation, "cpu_per_request_s") * 1e3,
                "p50_fixed_ms": med(r.fixed, "p50_s") * 1e3,
                "p99_fixed_ms": med(r.fixed, "p99_s") * 1e3,
                "p99_saturation_ms": med(r.saturation, "p99_s") * 1e3,
                "spans_per_request": med(r.fixed, "spans_per_request"),
                "rss_mb": r.rss_mb,
                "rounds": {
                    "fixed": [vars(p) for p in r.fixed],
                    "saturation": [vars(p) for p in r.saturation],
                },
            }
            peer = bare if bare is not None and variant != "bare" else None
            if peer is not None:
                f["saturation_x_bare"] = paired(r.saturation, peer.saturation, "throughput", ratio=True)
                f["cpu_fixed_ms_over_bare"] = paired(r.fixed, peer.fixed, "cpu_per_request_s") * 1e3
                f["cpu_saturation_ms_over_bare"] = (
                    paired(r.saturation, peer.saturation, "cpu_per_request_s") * 1e3
                )
                f["rss_mb_over_bare"] = r.rss_mb - peer.rss_mb
            rows.append(
                (
                    variant,
                    f"{f['saturation_rps']:.0f}" + (f" (x{f['saturation_x_bare']:.2f})" if peer else ""),
                    f"{f['cpu_fixed_ms']:.2f}" + (f" ({f['cpu_fixed_ms_over_bare']:+.2f})" if peer else ""),
                    f"{f['cpu_saturation_ms']:.2f}"
                    + (f" ({f['cpu_saturation_ms_over_bare']:+.2f})" if peer else ""),
                    f"{f['p50_fixed_ms']:.1f} / {f['p99_fixed_ms']:.1f}",
                    f"{f['p99_saturation_ms']:.0f}",
                    f"{f['spans_per_request']:.2f}",
                    f"{f['rss_mb']:.0f}" + (f" ({f['rss_mb_over_bare']:+.0f})" if peer else ""),
                )
            )
        lines.append(
            f"\n{model}: 16 rows per request; fixed load {found['fixed_rate']:.0f} req/s "
            f"({FIXED_LOAD_SHARE:.0%} of bare's {found['bare_saturation']:.0f} req/s); medians over "
            f"{len(next(iter(results.values())).fixed)} rounds (differences and ratios: paired within rounds)"
        )
        lines.append(
            table(
                (
                    "variant",
                    "max req/s (x bare)",
                    "CPU ms/req at fixed (+bare)",
                    "CPU ms/req saturated (+bare)",
                    "p50 / p99 ms at fixed",
                    "p99 ms saturated",
                    "inferscope spans/req",
                    "RSS MB (+bare)",
                ),
                rows,
            )
        )
        targets: dict[str, Any] = {}
        otel = results.get("otel")
        if bare is not None and otel is not None:
            otel_added = paired(otel.fixed, bare.fixed, "cpu_per_request_s") * 1e3
            for variant in ("zero-code", "zero-code-all-spans", "zero-code-no-spans"):
                if variant in results:
                    added = paired(results[variant].fixed, otel.fixed, "cpu_per_request_s") * 1e3
                    share = added / otel_added if otel_added > 0 else float("nan")
                    targets[f"{variant} added CPU / otel added CPU"] = share
                    lines.append(
                        f"  {variant} adds {added:+.3f} ms CPU/request to otel, which adds "
                        f"{otel_added:+.3f} ms to bare: {share:.2f} (target <= 0.5) {verdict(share <= 0.5)}"
                    )
            for variant in ("zero-code", "zero-code-all-spans"):
                if variant in results:
                    ratio = paired(results[variant].fixed, otel.fixed, "p99_s", ratio=True)
                    targets[f"{variant} p99 at fixed / otel p99"] = ratio
                    lines.append(
                        f"  {variant} p99 at {FIXED_LOAD_SHARE:.0%} of bare's saturation: x{ratio:.2f} of "
                        f"otel's (target <= 1.10) {verdict(ratio <= 1.10)}"
                    )
        all_spans, no_spans = results.get("zero-code-all-spans"), results.get("zero-code-no-spans")
        if all_spans is not None and no_spans is not None and med(all_spans.fixed, "spans_per_request") > 0:
            spans = med(all_spans.fixed, "spans_per_request")
            per_span_us = paired(all_spans.fixed, no_spans.fixed, "cpu_per_request_s") * 1e6 / spans
            targets["kept span CPU us"] = per_span_us
            judged = verdict(per_span_us <= 50) if per_span_us > 0 else "below this run's noise"
            lines.append(
                f"  a kept span: {per_span_us:.1f} us CPU end to end ({spans:.1f} spans/request, all spans "
                f"against none; target <= 50 us) {judged}"
            )
        out["models"][model] = {"fixed_rate": found["fixed_rate"], "figures": figures, "targets": targets}
    return "\n".join(lines), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two rounds of 1 s phases, scikit-learn only")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every variant (default 4)")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each phase (default 1.5)")
    parser.add_argument("--warmup", type=float, default=1.5, help="warm-up per server (default 1.5 s)")
    parser.add_argument("--connections", type=int, default=8, help="connections at saturation (default 8)")
    parser.add_argument("--rate", type=float, help="fixed load in req/s (default: 70%% of bare's saturation)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: sklearn, torch")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--serve", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.model, args.port_file)
        return 0
    args.models = [m for m in args.models.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for name in (*args.models, *args.variants):
        if name not in (*MODELS, *VARIANTS):
            parser.error(f"unknown model or variant {name!r}")
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.models = 2, 1.0, 1.0, ["sklearn"]
    # Here, not at the top: the servers run this file too, and import only what their variant needs.
    from _common import MachineLoad, environment, environment_line, load_line, write_json

    load = MachineLoad()
    env = environment()
    data = run(args)
    text, out = summarize(data)
    out["environment"] = env
    out["machine_load"] = load.summary()
    print(environment_line(env))
    print(text)
    print(load_line(out["machine_load"]))
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
