"""One run of inferscope against a real Arize Phoenix; test_phoenix.py starts it and checks what it prints.

Phoenix's gRPC server binds ``[::]:4317`` whatever its configuration says, so this script runs in a
private network namespace, where that port and Phoenix's HTTP port are its own::

    unshare -n sh -c 'ip link set lo up && exec "$0" "$@"' python phoenix_scenario.py WORKDIR

It starts Phoenix (the interpreter named by ``INFERSCOPE_TEST_PHOENIX_PYTHON``) on 127.0.0.1:6006
with WORKDIR as its working directory, runs tracked calls with inferscope exporting OTLP/HTTP to it,
flushes, reads the spans back with ``phoenix.client``, stops Phoenix and prints one JSON document on
stdout. The project is the ``openinference.project.name`` of ``OTEL_RESOURCE_ATTRIBUTES``.

The workloads, all in that one project:

- ``structure``: a span of the application's own SDK TracerProvider (also exporting to Phoenix)
  around ``inference m``, whose stages sleep and spin for known times, one of them nested
  (``infer/encoder``), with an application span opened inside a stage.
- ``errors``: calls of model ``bad`` that raise inside a stage, without a parent.
- ``calls``: many fast and a few slow calls of model ``batch``, without a parent, each with the
  ids inferscope gave it (read through OTel's current span) and its duration measured around it.

Exit status 3 means that Phoenix did not start; its output is then on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

PHOENIX_PORT = 6006
PHOENIX_URL = f"http://127.0.0.1:{PHOENIX_PORT}"
READY_TIMEOUT_S = 180.0
ARRIVAL_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
EXIT_PHOENIX_DID_NOT_START = 3

TRACE_RATIO = 0.25
TRACE_SLOW_MS = 20.0
FAST_CALLS = 400
SLOW_CALLS = 10
SLOW_CALL_SLEEP_S = 0.03
ERROR_CALLS = 3
PREPROCESS_SLEEP_S = 0.05
ENCODER_CPU_S = 0.02
#: Around the inference inside the application's span, so that its containment does not hinge on
#: the microseconds between the SDK's wall clock and inferscope's monotonic one.
PARENT_MARGIN_S = 0.005


def _die_with_parent() -> None:
    """In the Phoenix child: SIGTERM when this script dies, so that no server outlives a killed test."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_phoenix(python: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        PHOENIX_WORKING_DIR=str(workdir / "phoenix"),
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_PORT=str(PHOENIX_PORT),
        PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_LOG_MIGRATIONS="false",
        NO_COLOR="1",
    )
    # Phoenix's own SDK settings must not come from the scenario's.
    for name in list(env):
        if name.startswith("OTEL_"):
            del env[name]
    log = open(workdir / "phoenix-output.txt", "wb")  # noqa: SIM115  (the child holds it)
    return subprocess.Popen(
        [python, "-m", "phoenix.server.main", "serve"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env,
        preexec_fn=_die_with_parent,
    )


def wait_until_ready(phoenix: subprocess.Popen[bytes], workdir: Path) -> float:
    """Seconds until /readyz answered; exits with EXIT_PHOENIX_DID_NOT_START if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S and phoenix.poll() is None:
        try:
            with urllib.request.urlopen(f"{PHOENIX_URL}/readyz", timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    if phoenix.poll() is not None:
        why = f"exited with {phoenix.returncode} before answering /readyz"
    else:
        why = f"did not answer /readyz within {READY_TIMEOUT_S:.0f} s"
    stop_phoenix(phoenix)
    output = (workdir / "phoenix-output.txt").read_text(errors="replace")[-20_000:]
    print(f"Phoenix {why}\n--- Phoenix output ---\n{output}", file=sys.stderr)
    sys.exit(EXIT_PHOENIX_DID_NOT_START)


def stop_phoenix(phoenix: subprocess.Popen[bytes]) -> None:
    if phoenix.poll() is None:
        phoenix.send_signal(signal.SIGTERM)
        try:
            phoenix.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            phoenix.kill()
            phoenix.wait(STOP_TIMEOUT_S)


def _ids() -> dict[str, str]:
    """The trace and span id of the innermost open inferscope entry, as OTel sees the current span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _spin(cpu_seconds: float) -> None:
    begin = time.thread_time()
    while time.thread_time() - begin < cpu_seconds:
        pass


def run_workloads(tracer: Any) -> dict[str, Any]:
    import inferscope

    measured: dict[str, float] = {}

    @inferscope.track_inference(model="m", version="1")
    def predict(x: int) -> int:
        begin = time.perf_counter()
        with inferscope.stage("preprocess"):
            time.sleep(PREPROCESS_SLEEP_S)
        measured["preprocess"] = time.perf_counter() - begin
        with inferscope.stage("infer"):
            begin = time.perf_counter()
            with inferscope.stage("encoder"):
                _spin(ENCODER_CPU_S)
            measured["infer/encoder"] = time.perf_counter() - begin
            with tracer.start_as_current_span("app.inside"):
                pass
        return x

    with tracer.start_as_current_span("request") as request:
        time.sleep(PARENT_MARGIN_S)
        begin = time.perf_counter()
        predict(1)
        measured["inference"] = time.perf_counter() - begin
        time.sleep(PARENT_MARGIN_S)
    parent = request.get_span_context()
    structure = {
        "trace_id": f"{parent.trace_id:032x}",
        "parent_span_id": f"{parent.span_id:016x}",
        "measured_s": measured,
    }

    errors: list[dict[str, str]] = []

    @inferscope.track_inference(model="bad", version="1")
    def reject() -> None:
        errors.append(_ids())
        with inferscope.stage("validate"):
            raise ValueError("rejected")

    for _ in range(ERROR_CALLS):
        with contextlib.suppress(ValueError):
            reject()

    calls: list[dict[str, Any]] = []

    @inferscope.track_inference(model="batch", version="1")
    def score(sleep_s: float) -> dict[str, str]:
        with inferscope.stage("score"):
            if sleep_s:
                time.sleep(sleep_s)
        return _ids()

    slow_every = FAST_CALLS // SLOW_CALLS
    for i in range(FAST_CALLS + SLOW_CALLS):
        slow = i % (slow_every + 1) == slow_every
        begin = time.perf_counter()
        ids = score(SLOW_CALL_SLEEP_S if slow else 0.0)
        calls.append({**ids, "slow": slow, "measured_s": time.perf_counter() - begin})
    return {"structure": structure, "errors": errors, "calls": calls}


def read_back(project: str, expected_span_ids: set[str]) -> list[dict[str, Any]]:
    """Every span of ``project`` once all of ``expected_span_ids`` are in (Phoenix inserts in batches)."""
    import httpx
    from phoenix.client import Client

    client = Client(base_url=PHOENIX_URL)
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    spans: list[dict[str, Any]] = []
    while True:
        try:
            spans = [dict(s) for s in client.spans.get_spans(project_identifier=project, limit=100_000)]
        except httpx.HTTPStatusError as error:
            if error.response.status_code != 404:  # 404: the project does not exist yet
                raise
        if expected_span_ids <= {s["context"]["span_id"] for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.25)


def run_scenario() -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    import inferscope

    resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, as inferscope's
    project = str(resource.attributes["openinference.project.name"])

    # The application's own tracing, exporting to Phoenix on its own.
    app_memory = InMemorySpanExporter()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{PHOENIX_URL}/v1/traces")))
    provider.add_span_processor(SimpleSpanProcessor(app_memory))

    # What inferscope hands to its exporters, to know when Phoenix has all of it.
    ours_memory = InMemorySpanExporter()
    inferscope.configure(
        traces_exporters=["otlp"],
        otlp_protocol="http/protobuf",
        otlp_endpoint=PHOENIX_URL,
        metrics_exporters=["none"],  # Phoenix rejects OTLP metrics
        trace_ratio=TRACE_RATIO,
        trace_slow_ms=TRACE_SLOW_MS,
        # The cap is tested elsewhere; here every kept call must arrive.
        trace_max_spans_per_second=1_000_000,
        span_exporters=[ours_memory],
    )
    result = run_workloads(provider.get_tracer("phoenix-scenario"))
    inferscope.shutdown()
    provider.shutdown()

    sent = list(ours_memory.get_finished_spans()) + list(app_memory.get_finished_spans())
    sent_names = {f"{span.context.span_id:016x}": span.name for span in sent}
    result.update(
        backend=inferscope.backend(),
        project=project,
        trace_ratio=TRACE_RATIO,
        trace_slow_ms=TRACE_SLOW_MS,
        sent=sent_names,
        spans=read_back(project, set(sent_names)),
        constants={
            "PREPROCESS_SLEEP_S": PREPROCESS_SLEEP_S,
            "ENCODER_CPU_S": ENCODER_CPU_S,
            "SLOW_CALL_SLEEP_S": SLOW_CALL_SLEEP_S,
            "FAST_CALLS": FAST_CALLS,
            "SLOW_CALLS": SLOW_CALLS,
            "ERROR_CALLS": ERROR_CALLS,
            "PARENT_MARGIN_S": PARENT_MARGIN_S,
        },
    )
    return result


def main() -> None:
    workdir = Path(sys.argv[1])
    python = os.environ.get("INFERSCOPE_TEST_PHOENIX_PYTHON", "/work/phoenix-venv/bin/python")
    phoenix = start_phoenix(python, workdir)
    try:
        ready_s = wait_until_ready(phoenix, workdir)
        result = run_scenario()
        result["phoenix_ready_s"] = ready_s
    finally:
        stop_phoenix(phoenix)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
