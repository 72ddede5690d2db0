"""inferscope's spans in a real Arize Phoenix: structure, timestamps, attributes, errors and sampling.

Phoenix's gRPC server binds ``[::]:4317`` whatever its configuration says, so the whole scenario
(Phoenix, the tracked calls and the read-back) runs in a private network namespace: see
phoenix_scenario.py. It runs once per module, on the backend this test run selected, and every test
here checks one aspect of the spans it read back from Phoenix's query API.

Phoenix lives in its own virtual environment: ``INFERSCOPE_TEST_PHOENIX_PYTHON`` names its python
(default /work/phoenix-venv/bin/python). Without it, or where ``unshare -n`` is not permitted, the
tests skip with the reason; under CI (``CI`` set) with the variable set, they fail instead.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import inferscope

# Expensive: Phoenix is an 850 MB install that takes 10-180 s to start; CI runs these once.
pytestmark = [pytest.mark.integration, pytest.mark.expensive]

PHOENIX_PYTHON_VARIABLE = "INFERSCOPE_TEST_PHOENIX_PYTHON"
#: Where README.md and .ci/run put Phoenix's virtual environment.
DEFAULT_PHOENIX_PYTHON = str(Path(__file__).resolve().parents[2] / ".venv-phoenix" / "bin" / "python")
SCENARIO = Path(__file__).with_name("phoenix_scenario.py")
#: Phoenix takes 10-20 s to start, up to 180 s on a cold machine; the scenario waits that long.
SCENARIO_TIMEOUT_S = 420.0
EXIT_PHOENIX_DID_NOT_START = 3  # phoenix_scenario.py

#: Phoenix stores timestamps in microseconds (rounded), so each end may move by half a microsecond.
ROUNDING_US = 2
#: The SDK stamps the application's spans with the wall clock as they happen; inferscope maps its
#: monotonic stamps to wall time when it drains them. Between the two moments the wall clock may
#: slew, so comparisons across the two kinds of span allow this much.
CROSS_CLOCK_US = 1_000
#: How far the number of fast calls kept by the ratio may stray from its mean, in standard deviations.
BINOMIAL_SIGMAS = 5

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _unavailable(reason: str) -> None:
    """Skip, except under CI with Phoenix named: then CI means to run these, and it is a failure."""
    if os.environ.get("CI") and os.environ.get(PHOENIX_PYTHON_VARIABLE):
        pytest.fail(f"{reason} (CI is set and {PHOENIX_PYTHON_VARIABLE} names a Phoenix)", pytrace=False)
    pytest.skip(reason)


def _phoenix_python() -> str:
    configured = os.environ.get(PHOENIX_PYTHON_VARIABLE)
    python = configured or DEFAULT_PHOENIX_PYTHON
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        if configured:
            _unavailable(f"{PHOENIX_PYTHON_VARIABLE}={configured} is not an executable file")
        _unavailable(
            f"Arize Phoenix not found: {PHOENIX_PYTHON_VARIABLE} is unset and {DEFAULT_PHOENIX_PYTHON} "
            f"does not exist; set it to the python of a virtual environment with `pip install arize-phoenix`"
        )
    found = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('arize-phoenix'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if found.returncode != 0:
        _unavailable(f"{python} has no arize-phoenix installed: {found.stderr.strip()[-500:]}")
    return python


def _check_private_network() -> None:
    try:
        made = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=30
        )
    except FileNotFoundError:
        _unavailable("`unshare` is not installed (util-linux); Phoenix needs a private network namespace")
        return
    if made.returncode != 0:
        _unavailable(
            "cannot make a private network namespace for Phoenix "
            f"(`unshare -n sh -c 'ip link set lo up'` exited {made.returncode}: {made.stderr.strip()})"
        )


def _microseconds(iso: str) -> int:
    return (datetime.fromisoformat(iso) - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class Span:
    """One span as Phoenix's query API returned it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start_us: int
    end_us: int
    status_code: str
    status_message: str
    attributes: dict[str, Any]
    events: list[dict[str, Any]]

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Span:
        return cls(
            name=raw["name"],
            trace_id=raw["context"]["trace_id"],
            span_id=raw["context"]["span_id"],
            parent_id=raw.get("parent_id"),
            start_us=_microseconds(raw["start_time"]),
            end_us=_microseconds(raw["end_time"]),
            status_code=raw["status_code"],
            status_message=raw.get("status_message") or "",
            attributes=dict(raw.get("attributes") or {}),
            events=list(raw.get("events") or []),
        )

    @property
    def duration_us(self) -> int:
        return self.end_us - self.start_us

    @property
    def kept(self) -> str | None:
        return self.attributes.get("inferscope.trace.kept")


@dataclass
class Run:
    """What one scenario run sent and measured, and the spans Phoenix returned."""

    raw: dict[str, Any]
    spans: list[Span]

    def __post_init__(self) -> None:
        self.by_id = {span.span_id: span for span in self.spans}

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]

    def children(self, parent: Span) -> list[Span]:
        return [span for span in self.spans if span.parent_id == parent.span_id]


@pytest.fixture(scope="module")
def phoenix_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Run phoenix_scenario.py once in a private network namespace and parse what it printed."""
    python = _phoenix_python()
    try:
        __import__("phoenix.client")
    except ImportError as error:
        _unavailable(
            f"phoenix.client is missing ({error}); install arize-phoenix-client (dependency group 'test')"
        )
    _check_private_network()

    workdir = tmp_path_factory.mktemp("phoenix")
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env.update(
        {
            PHOENIX_PYTHON_VARIABLE: python,
            "OTEL_RESOURCE_ATTRIBUTES": f"openinference.project.name=inferscope-{uuid.uuid4().hex[:12]}",
            "OTEL_SERVICE_NAME": "inferscope-phoenix-test",
        }
    )
    argv = [
        "unshare",
        "-n",
        "sh",
        "-c",
        'ip link set lo up && exec "$0" "$@"',
        sys.executable,
        str(SCENARIO),
        str(workdir),
    ]
    # Its own session: on a timeout the whole group goes (Phoenix also dies with the scenario).
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"the Phoenix scenario ran past {SCENARIO_TIMEOUT_S:.0f} s\n--- stderr ---\n{stderr[-20_000:]}"
            f"\n--- Phoenix output ---\n{_phoenix_output(workdir)}",
            pytrace=False,
        )
    if process.returncode == EXIT_PHOENIX_DID_NOT_START:
        _unavailable(f"Arize Phoenix did not start:\n{stderr[-4_000:]}")
    if process.returncode != 0:
        pytest.fail(
            f"the Phoenix scenario exited with {process.returncode}\n--- stderr ---\n{stderr[-20_000:]}"
            f"\n--- Phoenix output ---\n{_phoenix_output(workdir)}",
            pytrace=False,
        )
    lines = stdout.strip().splitlines()
    if not lines:
        pytest.fail(
            f"the Phoenix scenario printed nothing\n--- stderr ---\n{stderr[-20_000:]}", pytrace=False
        )
    raw = json.loads(lines[-1])  # one line of JSON, last
    return Run(raw, [Span.parse(span) for span in raw["spans"]])


def _phoenix_output(workdir: Path) -> str:
    path = workdir / "phoenix-output.txt"
    return path.read_text(errors="replace")[-20_000:] if path.exists() else "(none)"


def _contains(parent: Span, child: Span, tolerance_us: int = 0) -> bool:
    return parent.start_us - tolerance_us <= child.start_us and child.end_us <= parent.end_us + tolerance_us


def _head_sampled(ratio: float, trace_id: str) -> bool:
    """Whether a root with this trace id is kept at ``ratio`` when it opens, by OTel's own sampler."""
    result = TraceIdRatioBased(ratio).should_sample(None, int(trace_id, 16), "inference")
    return bool(result.decision.is_sampled())


# --- the tests ------------------------------------------------------------------------------------


def test_every_span_sent_arrives_once_on_the_selected_backend(phoenix_run: Run) -> None:
    # INFERSCOPE_NO_EXTENSION reached the scenario: it ran on the backend this test run selected.
    assert phoenix_run.raw["backend"] == inferscope.backend()
    ids = [span.span_id for span in phoenix_run.spans]
    duplicates = [span_id for span_id, n in Counter(ids).items() if n > 1]
    assert not duplicates, f"spans stored more than once: {duplicates}"
    # What inferscope and the application handed to their exporters, and nothing else, is in the
    # project named by OTEL_RESOURCE_ATTRIBUTES.
    sent: dict[str, str] = phoenix_run.raw["sent"]
    missing = Counter(name for span_id, name in sent.items() if span_id not in phoenix_run.by_id)
    assert not missing, f"{sum(missing.values())} of {len(sent)} spans sent never arrived: {dict(missing)}"
    unexpected = Counter(span.name for span in phoenix_run.spans if span.span_id not in sent)
    assert not unexpected, f"spans that nobody sent: {dict(unexpected)}"


def test_inference_under_an_application_span_nests_its_stages(phoenix_run: Run) -> None:
    structure = phoenix_run.raw["structure"]
    trace = [span for span in phoenix_run.spans if span.trace_id == structure["trace_id"]]
    spans = {span.name: span for span in trace}
    assert len(spans) == len(trace), f"span names repeat in {sorted(s.name for s in trace)}"
    assert set(spans) == {
        "request",
        "inference m",
        "stage preprocess",
        "stage infer",
        "stage infer/encoder",
        "app.inside",
    }
    request = spans["request"]
    assert request.span_id == structure["parent_span_id"]
    assert request.parent_id is None
    assert spans["inference m"].parent_id == request.span_id
    assert spans["stage preprocess"].parent_id == spans["inference m"].span_id
    assert spans["stage infer"].parent_id == spans["inference m"].span_id
    assert spans["stage infer/encoder"].parent_id == spans["stage infer"].span_id
    # A span the application opens inside a stage is that stage's child.
    assert spans["app.inside"].parent_id == spans["stage infer"].span_id


def test_timestamps_agree_with_measured_durations(phoenix_run: Run) -> None:
    structure = phoenix_run.raw["structure"]
    measured_us = {name: seconds * 1e6 for name, seconds in structure["measured_s"].items()}
    constants = phoenix_run.raw["constants"]
    spans = {span.name: span for span in phoenix_run.spans if span.trace_id == structure["trace_id"]}
    inference, preprocess, infer, encoder = (
        spans["inference m"],
        spans["stage preprocess"],
        spans["stage infer"],
        spans["stage infer/encoder"],
    )

    # Each span lasts at least what ran inside it, and at most what the scenario measured around it.
    assert preprocess.duration_us >= constants["PREPROCESS_SLEEP_S"] * 1e6 - ROUNDING_US
    assert preprocess.duration_us <= measured_us["preprocess"] + ROUNDING_US
    assert encoder.duration_us <= measured_us["infer/encoder"] + ROUNDING_US
    assert inference.duration_us <= measured_us["inference"] + ROUNDING_US
    assert inference.duration_us >= preprocess.duration_us + infer.duration_us - 2 * ROUNDING_US

    # Children inside their parents, in the order they ran. inferscope's spans share one clock, and
    # rounding to microseconds keeps their order.
    assert _contains(inference, preprocess)
    assert _contains(inference, infer)
    assert _contains(infer, encoder)
    assert preprocess.end_us <= infer.start_us
    assert _contains(infer, spans["app.inside"], CROSS_CLOCK_US)
    assert encoder.end_us <= spans["app.inside"].start_us + CROSS_CLOCK_US
    # The application's span opened PARENT_MARGIN_S before the inference and closed as long after.
    request = spans["request"]
    assert _contains(request, inference, CROSS_CLOCK_US)
    margin_us = constants["PARENT_MARGIN_S"] * 1e6
    assert request.duration_us >= inference.duration_us + 2 * margin_us - CROSS_CLOCK_US

    # Slow calls: at least their sleep, at most what was measured around them.
    calls = {call["span_id"]: call for call in phoenix_run.raw["calls"]}
    for span in phoenix_run.named("inference batch"):
        call = calls[span.span_id]
        assert span.duration_us <= call["measured_s"] * 1e6 + ROUNDING_US
        if call["slow"]:
            assert span.duration_us >= constants["SLOW_CALL_SLEEP_S"] * 1e6 - ROUNDING_US
        [child] = phoenix_run.children(span)
        assert _contains(span, child)


def test_attributes_name_model_stage_and_time_on_cpu(phoenix_run: Run) -> None:
    structure = phoenix_run.raw["structure"]
    constants = phoenix_run.raw["constants"]
    spans = {span.name: span for span in phoenix_run.spans if span.trace_id == structure["trace_id"]}

    for name in ("inference m", "stage preprocess", "stage infer", "stage infer/encoder"):
        attributes = spans[name].attributes
        assert attributes["inferscope.model.name"] == "m", name
        assert attributes["inferscope.model.version"] == "1", name
        cpu_s, off_cpu_s = attributes["inferscope.cpu.time"], attributes["inferscope.off_cpu.time"]
        assert cpu_s >= 0 and off_cpu_s >= 0, name
        # Off-CPU time is the rest of the span's wall time.
        if off_cpu_s > 0:
            assert (cpu_s + off_cpu_s) * 1e6 == pytest.approx(spans[name].duration_us, abs=ROUNDING_US), name
        assert "error.type" not in attributes, name
        assert spans[name].status_code == "UNSET", name
    for name in ("stage preprocess", "stage infer", "stage infer/encoder"):
        assert spans[name].attributes["inferscope.stage.name"] == name.removeprefix("stage "), name
        # Only the root of a trace says why it was kept.
        assert "inferscope.trace.kept" not in spans[name].attributes, name
    assert "inferscope.stage.name" not in spans["inference m"].attributes
    # Under a sampled application span, the inference is kept when it starts.
    assert spans["inference m"].kept == "sampled"

    # A stage that sleeps is off the CPU; one that spins is on it.
    preprocess = spans["stage preprocess"].attributes
    assert preprocess["inferscope.cpu.time"] < constants["PREPROCESS_SLEEP_S"] / 2
    assert preprocess["inferscope.off_cpu.time"] >= constants["PREPROCESS_SLEEP_S"] / 2
    encoder = spans["stage infer/encoder"].attributes
    assert encoder["inferscope.cpu.time"] >= constants["ENCODER_CPU_S"] - 0.0005
    assert spans["stage infer"].attributes["inferscope.cpu.time"] >= encoder["inferscope.cpu.time"]
    # The application's spans carry none of inferscope's attributes.
    assert not any(key.startswith("inferscope.") for key in spans["request"].attributes)
    assert not any(key.startswith("inferscope.") for key in spans["app.inside"].attributes)


def test_a_failing_call_is_an_error_span_with_an_exception_event(phoenix_run: Run) -> None:
    ratio = phoenix_run.raw["trace_ratio"]
    sent = {(call["trace_id"], call["span_id"]) for call in phoenix_run.raw["errors"]}
    roots = phoenix_run.named("inference bad")
    # trace_errors keeps every failing call, whatever the ratio picked.
    assert {(span.trace_id, span.span_id) for span in roots} == sent
    assert len(roots) == phoenix_run.raw["constants"]["ERROR_CALLS"]
    for root in roots:
        assert root.parent_id is None
        assert root.kept == ("sampled" if _head_sampled(ratio, root.trace_id) else "error")
        [stage] = phoenix_run.children(root)
        assert stage.name == "stage validate"
        assert stage.trace_id == root.trace_id
        assert stage.attributes["inferscope.stage.name"] == "validate"
        for span in (root, stage):
            assert span.status_code == "ERROR", span
            assert span.status_message == "ValueError", span
            assert span.attributes["error.type"] == "ValueError", span
            assert span.attributes["inferscope.model.name"] == "bad", span
            [event] = span.events
            assert event["name"] == "exception"
            assert event["attributes"]["exception.type"] == "ValueError"
            assert event["attributes"]["exception.escaped"] is True
            assert _microseconds(event["timestamp"]) == span.end_us


def test_slow_calls_are_kept_and_fast_ones_at_the_ratio(phoenix_run: Run) -> None:
    raw = phoenix_run.raw
    ratio, slow_us = raw["trace_ratio"], raw["trace_slow_ms"] * 1e3
    calls = raw["calls"]
    constants = raw["constants"]
    assert sum(call["slow"] for call in calls) == constants["SLOW_CALLS"]
    assert sum(not call["slow"] for call in calls) == constants["FAST_CALLS"]
    roots = {span.span_id: span for span in phoenix_run.named("inference batch")}
    assert all(span.parent_id is None for span in roots.values())

    fast_sampled = 0
    for call in calls:
        head = _head_sampled(ratio, call["trace_id"])
        span = roots.get(call["span_id"])
        where = f"{'slow' if call['slow'] else 'fast'} call {call}"
        if head:
            assert span is not None and span.kept == "sampled", where
            fast_sampled += not call["slow"]
        elif call["slow"]:
            assert span is not None and span.kept == "slow", where
        elif call["measured_s"] * 1e6 < slow_us:
            assert span is None, f"{where}: kept although fast and not picked by the ratio"
        elif span is not None:
            # A fast call that the machine stalled past the threshold is rightly kept as slow.
            assert span.kept == "slow" and span.duration_us > slow_us - ROUNDING_US, where
        if span is not None:
            assert span.trace_id == call["trace_id"], where

    # Every kept call brought its stage, and no stage of a dropped call arrived.
    stages = phoenix_run.named("stage score")
    assert {stage.parent_id for stage in stages} == set(roots)
    assert len(stages) == len(roots)
    assert all(stage.trace_id == roots[stage.parent_id].trace_id for stage in stages)

    # The trace ids are random, so the ratio keeps a binomial share of the fast calls.
    n = constants["FAST_CALLS"]
    mean, sigma = n * ratio, math.sqrt(n * ratio * (1 - ratio))
    assert fast_sampled > 0
    assert abs(fast_sampled - mean) <= BINOMIAL_SIGMAS * sigma, (
        f"{fast_sampled} of {n} fast calls kept at ratio {ratio}: expected {mean:.0f} ± {BINOMIAL_SIGMAS} "
        f"standard deviations of {sigma:.1f}"
    )
