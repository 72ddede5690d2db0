"""CUDA through torch: the allocator's memory around inferences, and device time of stages.

A GPU cannot exist on these machines, so most tests replace the outermost boundary only:
- the hot path's mechanics are driven through ``Runtime.cuda_reader`` on fresh runtimes of both
  backends (no torch needed);
- the torch side replaces the functions of ``torch.cuda`` that inferscope calls with a simulated
  device: a stream whose work runs on a virtual clock, events that complete when the simulated
  device gets to them, and a caching allocator's counters.
The tests at the end run on a real CUDA device and skip without one.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

import inferscope
from inferscope import _pipeline
from inferscope._keys import KeyRegistry
from inferscope._records import (
    COUNTER_CUDA_MEMORY,
    COUNTER_PY_HEAP,
    COUNTER_THREAD_CPU,
    DROP_GPU_TIMING_BACKLOG,
    SLOT_CUDA_ALLOCATED_DELTA,
    SLOT_CUDA_PEAK,
    empty_records,
)
from inferscope.counters.cuda import DEVICE_TIMER, DeviceTimer, cuda_memory
from inferscope.export.points import STAGE_GPU_TIME, PointBuilder
from inferscope.export.prometheus import PrometheusCollector

from .conftest import BACKENDS, run_python

# -- the hot path: cuda_reader around inferences, on both backends ---------------------------------


class Allocator:
    """What a CUDA caching allocator reports: bytes allocated now, and the peak since a reset."""

    def __init__(self) -> None:
        self.allocated = 0
        self.peak = 0
        self.calls: list[bool] = []
        self.active = True

    def malloc(self, size: int) -> None:
        self.allocated += size
        self.peak = max(self.peak, self.allocated)

    def free(self, size: int) -> None:
        self.allocated -= size

    def reader(self, start: bool) -> tuple[int, int] | None:
        self.calls.append(start)
        if not self.active:
            return None
        if start:
            self.peak = self.allocated
        return self.allocated, self.peak


@pytest.fixture(params=BACKENDS)
def runtime(request):
    impl = request.param
    registry = KeyRegistry(max_keys=100)
    rt = impl.Runtime(impl.Ring(1024), registry)
    rt.counters = COUNTER_THREAD_CPU | COUNTER_CUDA_MEMORY
    return rt, registry


def drained(rt) -> np.ndarray:
    buf = empty_records(64)
    return buf[: rt.ring.drain(buf)]


def test_an_inference_records_its_cuda_allocation_change_and_peak(runtime):
    rt, registry = runtime
    memory = Allocator()
    memory.malloc(1000)  # weights, allocated before the call
    rt.cuda_reader = memory.reader
    key = registry.inference_key("model")

    def infer():
        with rt.stage("infer"):
            memory.malloc(500)  # activations...
            memory.malloc(300)
            memory.free(500)  # ...freed; the 300 of the result stays
        return "result"

    assert rt.track(infer, key)() == "result"
    records = drained(rt)
    inference = records[records["key"] == key][0]
    stage = records[records["key"] != key][0]
    assert inference["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 300
    assert inference["counters"][SLOT_CUDA_PEAK] == 800  # 1800 at the peak, 1000 at the start
    # Stages never read the allocator: a reset there would cut the inference's peak short.
    assert stage["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 0
    assert stage["counters"][SLOT_CUDA_PEAK] == 0
    assert memory.calls == [True, False]


def test_enter_and_exit_read_it_like_a_tracked_call(runtime):
    # The path of the framework instrumentors (torch, onnxruntime, ...).
    rt, registry = runtime
    memory = Allocator()
    rt.cuda_reader = memory.reader
    key = registry.inference_key("model")
    owner = object()
    rt.enter(owner, key)
    memory.malloc(4096)
    rt.exit(owner, None)
    (record,) = drained(rt)
    assert record["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 4096
    assert record["counters"][SLOT_CUDA_PEAK] == 4096


def test_only_the_outermost_inference_reads_the_allocator(runtime):
    # An ensemble's members are inferences too; a reset of the peak inside them would cut the
    # ensemble's peak short. So they record no CUDA memory of their own.
    rt, registry = runtime
    memory = Allocator()
    rt.cuda_reader = memory.reader
    ensemble_key = registry.inference_key("ensemble")
    member_key = registry.inference_key("member")

    def member():
        memory.malloc(100)
        memory.free(100)

    tracked_member = rt.track(member, member_key)

    def ensemble():
        memory.malloc(500)
        memory.free(500)
        tracked_member()
        owner = object()  # the path of instrumentors and of stage-like entries
        rt.enter(owner, member_key)
        member()
        rt.exit(owner, None)

    rt.track(ensemble, ensemble_key)()
    records = drained(rt)
    by_key = {int(r["key"]): r for r in records}
    assert by_key[ensemble_key]["counters"][SLOT_CUDA_PEAK] == 500
    members = records[records["key"] == member_key]
    assert len(members) == 2 and not members["counters"][:, SLOT_CUDA_PEAK].any()
    assert memory.calls == [True, False]


def test_a_failing_inference_keeps_its_exception_and_records_its_memory(runtime):
    # The reader is Python code, called after the call raised: the exception must survive it.
    rt, registry = runtime
    memory = Allocator()
    rt.cuda_reader = memory.reader
    rt.heap_reader = lambda: 7
    rt.counters |= COUNTER_PY_HEAP
    key = registry.inference_key("model")
    failure = ValueError("bad input")

    def fail():
        memory.malloc(10)
        raise failure

    with pytest.raises(ValueError) as raised:
        rt.track(fail, key)()
    assert raised.value is failure
    (record,) = drained(rt)
    assert record["error"] == registry.error_id(ValueError)
    assert record["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 10
    assert rt.internal_errors == 0


def test_an_inference_that_starts_before_cuda_is_in_use_records_nothing(runtime):
    rt, registry = runtime
    memory = Allocator()
    memory.active = False  # torch has not initialized CUDA yet
    rt.cuda_reader = memory.reader
    key = registry.inference_key("model")

    def first_call():
        memory.active = True  # the model's first call initializes CUDA
        memory.malloc(1 << 20)

    rt.track(first_call, key)()
    (record,) = drained(rt)
    assert record["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 0
    assert record["counters"][SLOT_CUDA_PEAK] == 0
    assert memory.calls == [True]  # no end read for an entry with nothing to subtract


@pytest.mark.parametrize("answer", [ZeroDivisionError, "garbage", (1, "x")])
def test_a_failing_reader_is_counted_and_never_reaches_the_caller(runtime, answer):
    rt, registry = runtime

    def reader(start: bool) -> Any:
        if answer is ZeroDivisionError:
            raise ZeroDivisionError("boom")
        return answer

    rt.cuda_reader = reader
    key = registry.inference_key("model")
    assert rt.track(lambda: 42, key)() == 42
    (record,) = drained(rt)
    assert record["counters"][SLOT_CUDA_ALLOCATED_DELTA] == 0
    assert rt.internal_errors >= 1


def test_stage_device_is_handed_to_the_device_stage_hook(runtime):
    rt, _ = runtime
    plain = rt.stage("infer")
    assert rt.stage("infer", device=None) is plain
    with pytest.raises(TypeError, match="not available"):
        rt.stage("infer", device="cuda")
    rt.device_stage = lambda stage, device: ("timed", stage, device)
    assert rt.stage("infer", device="cuda:1") == ("timed", plain, "cuda:1")
    with pytest.raises(TypeError):
        rt.stage("infer", colour="red")


# -- the torch side, on a simulated device ---------------------------------------------------------


class Device:
    """A simulated GPU: one stream whose work runs on a virtual clock (ms), completed up to
    ``done``; events record the stream's position and complete when the device gets there."""

    def __init__(self) -> None:
        self.queued_ms = 0.0  # when the work queued so far will have finished
        self.done_ms = 0.0  # how far the device has got
        self.memory = Allocator()
        self.lock = threading.Lock()
        self.capturing = False  # a CUDA graph capture is under way on the current stream

    def launch(self, ms: float) -> None:
        with self.lock:
            self.queued_ms += ms

    def synchronize(self) -> None:
        with self.lock:
            self.done_ms = self.queued_ms


class Event:
    created = 0

    def __init__(self, device: Device, enable_timing: bool = False) -> None:
        assert enable_timing, "device time needs timing events"
        Event.created += 1
        self.device = device
        self.at_ms: float | None = None

    def record(self, stream: Any) -> None:
        assert stream == "stream-0"
        self.at_ms = self.device.queued_ms

    def query(self) -> bool:
        assert self.at_ms is not None
        return self.device.done_ms >= self.at_ms

    def elapsed_time(self, end: Event) -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time on an event that has not completed")
        assert end.at_ms is not None and self.at_ms is not None
        return end.at_ms - self.at_ms


@pytest.fixture
def gpu(monkeypatch):
    """torch.cuda as inferscope sees it once torch has initialized CUDA, on a simulated device."""
    torch = pytest.importorskip("torch")
    device = Device()
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "current_stream", lambda index=None: f"stream-{index or 0}")
    monkeypatch.setattr(cuda, "is_current_stream_capturing", lambda: device.capturing)
    monkeypatch.setattr(cuda, "Event", lambda enable_timing=False: Event(device, enable_timing))

    def reset_peak_memory_stats(device_index: Any = None) -> None:
        device.memory.peak = device.memory.allocated

    def memory_stats_as_nested_dict(device_index: Any = None) -> dict:
        memory = device.memory
        return {"allocated_bytes": {"all": {"current": memory.allocated, "peak": memory.peak}}}

    monkeypatch.setattr(cuda, "reset_peak_memory_stats", reset_peak_memory_stats)
    monkeypatch.setattr(cuda, "memory_stats_as_nested_dict", memory_stats_as_nested_dict)
    monkeypatch.setattr(DEVICE_TIMER, "_free", {})  # pooled events of an earlier simulated device
    yield device
    device.synchronize()
    _pipeline.DRAINER.drain()


def test_cuda_memory_reads_torch_only_once_cuda_is_initialized(gpu, monkeypatch):
    import torch

    gpu.memory.malloc(100)
    assert cuda_memory(True) == (100, 100)
    gpu.memory.malloc(50)
    gpu.memory.free(50)
    assert cuda_memory(False) == (100, 150)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert cuda_memory(True) is None


def test_counters_full_records_cuda_memory_per_inference(gpu):
    inferscope.configure(counters="full", metrics_exporters=[])

    @inferscope.track_inference(model="generator")
    def generate(size: int) -> None:
        with inferscope.stage("infer"):
            gpu.memory.malloc(3 * size)  # scratch...
            gpu.memory.free(2 * size)  # ...mostly freed; a cache of `size` stays

    for size in (1 << 20, 2 << 20, 3 << 20):
        generate(size)
    snap = inferscope.snapshot()
    row = snap.row("generator").counters
    assert row["memory.cuda.change"] == 6 << 20
    assert row["memory.cuda.peak"] == 3 * (6 << 20)
    assert "memory.cuda.change" not in snap.row("generator", "infer").counters


def test_the_reader_is_installed_only_once_torch_is_imported():
    # A process that never imports torch pays nothing for cuda_memory, which is part of full.
    pytest.importorskip("torch")
    result = run_python(
        """
import sys
import inferscope
from inferscope._runtime import RUNTIME
inferscope.configure(counters="full", metrics_exporters=[])
assert "torch" not in sys.modules
print(RUNTIME.cuda_reader)
import torch
print(RUNTIME.cuda_reader.__name__)
inferscope.configure(counters="default", metrics_exporters=[])
print(RUNTIME.cuda_reader)
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "cuda_memory", "None"]


def test_cuda_memory_by_name_needs_a_cuda_device(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        inferscope.ConfigError, match=r"cuda_memory is not available here: torch has no usable"
    ):
        inferscope.configure(counters="thread_cpu,cuda_memory")
    # A named set never fails: full simply has nothing to read here.
    assert inferscope.configure(counters="full", metrics_exporters=[]).counters == "full"


def test_a_cuda_stage_records_device_time_once_the_device_is_done(gpu):
    inferscope.configure(counters="default", metrics_exporters=[])

    @inferscope.track_inference(model="vision")
    def classify() -> str:
        with inferscope.stage("preprocess"):
            pass
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(2.0)
            gpu.launch(3.0)  # kernels queue; the stage returns before they run
        gpu.launch(7.0)  # after the stage: not its time
        return "cat"

    assert [classify() for _ in range(4)] == ["cat"] * 4
    pending = inferscope.snapshot().row("vision", "infer")
    assert pending.count == 4 and pending.gpu_count == 0  # the hot path never waited
    gpu.synchronize()
    snap = inferscope.snapshot()
    row = snap.row("vision", "infer")
    assert row.gpu_count == 4
    assert row.gpu_seconds == pytest.approx(4 * 0.005)
    assert row.gpu_p50 == pytest.approx(0.005, rel=0.05)  # within a histogram bucket
    assert snap.row("vision", "preprocess").gpu_count == 0
    assert snap.row("vision").gpu_count == 0
    assert "gpu p50 ms" in snap.table()
    assert len(DEVICE_TIMER) == 0


def test_device_time_is_exported_over_otlp_and_prometheus(gpu):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    with inferscope.stage("embed", device="cuda:0"):
        gpu.launch(10.0)
    gpu.synchronize()
    view = _pipeline.collect_view()
    metrics = {m.name: m for m in PointBuilder(boundaries=[0.001, 0.01, 0.1]).build(view, time.time_ns())}
    (point,) = metrics[STAGE_GPU_TIME].data.data_points
    assert metrics[STAGE_GPU_TIME].unit == "s"
    assert point.attributes["inferscope.stage.name"] == "embed"
    assert point.count == 1 and point.sum == pytest.approx(0.010)
    families = {
        f.name: f for f in PrometheusCollector(_pipeline.collect_view, boundaries=[0.001, 0.1]).collect()
    }
    samples = {s.name: s for s in families["inferscope_stage_gpu_time_seconds"].samples}
    assert samples["inferscope_stage_gpu_time_seconds_count"].value == 1


def test_the_span_of_a_cuda_stage_carries_its_device_time(gpu):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    inferscope.configure(counters="full", metrics_exporters=[], span_exporters=[exporter], trace_ratio=1.0)
    try:

        @inferscope.track_inference(model="vision")
        def classify() -> None:
            with inferscope.stage("infer", device="cuda"):
                gpu.launch(3.0)
            gpu.memory.malloc(64)
            gpu.synchronize()  # as the torch instrumentor's cuda_sync, or reading the result, does

        classify()
        _pipeline.DRAINER.drain()
        assert _pipeline._exports is not None and _pipeline._exports.traces is not None
        _pipeline._exports.traces.force_flush()
        spans = {span.name: span for span in exporter.get_finished_spans()}
        stage, inference = spans["stage infer"].attributes, spans["inference vision"].attributes
        assert stage["inferscope.gpu.time"] == pytest.approx(0.003)
        assert "inferscope.gpu.time" not in inference
        # The allocator is read around the inference only: its span has the counters, the stage's not.
        assert inference["inferscope.memory.cuda.change"] == 64
        assert "inferscope.memory.cuda.change" not in stage
    finally:
        inferscope.configure()


def test_a_cuda_stage_that_raises_passes_the_error_through_untimed(gpu):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    with pytest.raises(KeyError, match="missing"):
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(1.0)
            raise KeyError("missing")
    gpu.synchronize()
    row = inferscope.snapshot().row(None, "infer")
    assert row.errors == 1 and row.gpu_count == 0


def test_nested_and_decorated_cuda_stages_each_get_their_own_time(gpu):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    encoder = inferscope.stage("encoder", device="cuda")
    assert inferscope.stage("encoder", device="cuda") is encoder  # made once, shared

    @inferscope.stage("decoder", device="cuda")
    def decode() -> int:
        gpu.launch(4.0)
        return 1

    @inferscope.track_inference(model="seq2seq")
    def translate() -> int:
        with inferscope.stage("infer", device="cuda"):
            with encoder:
                gpu.launch(1.0)
            return decode()

    threads = [threading.Thread(target=translate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gpu.synchronize()
    snap = inferscope.snapshot()
    assert snap.row("seq2seq", "infer/encoder").gpu_count == 4
    assert snap.row("seq2seq", "infer/decoder").gpu_count == 4
    assert snap.row("seq2seq", "infer/decoder").gpu_seconds == pytest.approx(4 * 0.004, abs=4 * 0.001 + 1e-9)
    assert snap.row("seq2seq", "infer").gpu_count == 4


def test_device_stage_rejects_unknown_devices_and_passes_cpu_through():
    plain = inferscope.stage("infer")
    assert inferscope.stage("infer", device="cpu") is plain
    for wrong in ("tpu", "cuda:x", "cuda:-1", 3):
        with pytest.raises(ValueError, match=r"stage\(device=\.\.\.\) got .*accepts None, 'cpu', 'cuda'"):
            inferscope.stage("infer", device=wrong)


def test_device_stage_takes_torch_devices():
    torch = pytest.importorskip("torch")
    plain = inferscope.stage("infer")
    assert inferscope.stage("infer", device=torch.device("cpu")) is plain
    assert inferscope.stage("infer", device=torch.device("cuda", 1)).device == "cuda:1"
    assert inferscope.stage("infer", device=torch.device("cuda")).device == "cuda"
    assert inferscope.stage("infer", device="cuda:2").name == "infer"


def test_a_cuda_stage_without_cuda_in_use_is_a_plain_stage(monkeypatch):
    # The same code runs on a CPU-only machine: no torch, or torch without CUDA initialized.
    inferscope.configure(counters="minimal", metrics_exporters=[])
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    with inferscope.stage("infer", device="cuda"):
        pass
    row = inferscope.snapshot().row(None, "infer")
    assert row.count == 1 and row.gpu_count == 0


def test_no_event_is_recorded_inside_a_cuda_graph_capture(gpu):
    # An event recorded while a stream is being captured would become part of the user's graph.
    inferscope.configure(counters="minimal", metrics_exporters=[])
    created = Event.created
    gpu.capturing = True
    with inferscope.stage("infer", device="cuda"):
        gpu.launch(1.0)
    gpu.capturing = False
    assert Event.created == created and len(DEVICE_TIMER) == 0
    row = inferscope.snapshot().row(None, "infer")
    assert row.count == 1 and row.gpu_count == 0


def test_too_many_pending_timings_are_dropped_and_counted(gpu, monkeypatch):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    monkeypatch.setattr(DEVICE_TIMER, "max_pending", 3)
    for _ in range(5):
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(1.0)
    gpu.synchronize()
    snap = inferscope.snapshot()
    assert snap.row(None, "infer").gpu_count == 3
    assert snap.dropped[DROP_GPU_TIMING_BACKLOG] == 2
    monkeypatch.setattr(DEVICE_TIMER, "dropped", 0)


def test_events_are_reused_once_read(gpu):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    for _ in range(3):
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(1.0)
        gpu.synchronize()
        _pipeline.DRAINER.drain()
    before = Event.created
    for _ in range(10):
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(1.0)
        gpu.synchronize()
        _pipeline.DRAINER.drain()
    assert Event.created == before


def test_wait_polls_until_the_device_is_done_or_the_timeout(gpu):
    timer = DeviceTimer()
    opened = timer.open(7, None)
    assert opened is not None
    gpu.launch(5.0)
    timer.close(opened, ok=True)
    started = time.monotonic()
    timer.wait(0.05)  # the device never gets there: wait gives up
    assert time.monotonic() - started >= 0.05
    assert timer.collect() == ([], [], [])
    threading.Timer(0.02, gpu.synchronize).start()
    timer.wait(5.0)
    assert timer.collect() == ([7], [pytest.approx(0.005)], [0])


def test_shutdown_waits_for_the_device_and_records_the_last_stages(gpu):
    inferscope.configure(counters="minimal", metrics_exporters=[])
    with inferscope.stage("infer", device="cuda"):
        gpu.launch(2.0)
    threading.Timer(0.05, gpu.synchronize).start()  # the device finishes after shutdown() began
    inferscope.shutdown()
    try:
        assert inferscope.snapshot().row(None, "infer").gpu_count == 1
        # Stopped: a stage is passed through, and no event is recorded for it.
        with inferscope.stage("infer", device="cuda"):
            gpu.launch(1.0)
        assert len(DEVICE_TIMER) == 0
    finally:
        inferscope.configure()  # running again, for the tests that follow


# -- a real CUDA device (the GPU machine) ----------------------------------------------------------


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")


@needs_cuda
def test_real_gpu_stage_time_matches_cuda_events():
    import torch

    inferscope.configure(counters="full", metrics_exporters=[])
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    ours = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with inferscope.stage("matmul", device="cuda"):
            start.record()
            for _ in range(8):
                x @ x
            end.record()
        torch.cuda.synchronize()
        ours.append(start.elapsed_time(end) / 1e3)
    row = inferscope.snapshot().row(None, "matmul")
    assert row.gpu_count == 10
    # The stage's events bracket ours: its time is at least ours, and close to it.
    assert row.gpu_seconds >= 0.99 * sum(ours)
    assert row.gpu_seconds <= 1.2 * sum(ours) + 0.001


@needs_cuda
def test_real_gpu_inference_memory_change_and_peak():
    import torch

    inferscope.configure(counters="full", metrics_exporters=[])
    kept = []

    @inferscope.track_inference(model="alloc")
    def allocate() -> None:
        scratch = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        kept.append(torch.empty(16 << 20, dtype=torch.uint8, device="cuda"))
        del scratch

    torch.zeros(1, device="cuda")  # CUDA is initialized before the first call
    allocate()
    counters = inferscope.snapshot().row("alloc").counters
    assert counters["memory.cuda.change"] == 16 << 20
    assert counters["memory.cuda.peak"] == 80 << 20
