"""snapshot().table(columns=...): the figures per call that a terminal user asks for beyond latency."""

from __future__ import annotations

import time

import pytest

import inferscope
from inferscope._records import STAGE_CPU_SAMPLE_EVERY
from inferscope._runtime import RUNTIME

LIST_ITEMS = 10_000


@pytest.fixture
def counted():
    inferscope.configure(counters="thread_cpu,rusage,python_heap", metrics_exporters=[])
    # Every stage entry reads the CPU clock: the off-CPU figure of 20 calls is compared with their
    # sleep, which a sample of a few of them (the first one cold) would not match as closely.
    RUNTIME.cpu_sample_every = 1
    yield
    RUNTIME.cpu_sample_every = STAGE_CPU_SAMPLE_EVERY
    inferscope.configure(metrics_exporters=[])


def test_extra_columns_show_waiting_switches_and_heap_per_call(counted):
    @inferscope.track_inference(model="table-model")
    def predict():
        with inferscope.stage("wait"):
            kept = [0] * LIST_ITEMS  # alive until the stage ends: its heap change
            time.sleep(0.002)
        return len(kept)

    for _ in range(20):
        predict()
    snap = inferscope.snapshot()
    lines = snap.table(columns=["off_cpu", "switches", "heap"]).splitlines()
    header = lines[0].split()
    assert header[-4:] == ["ms", "switches", "heap", "KiB"]  # "off-cpu ms", "switches", "heap KiB"
    row = next(line for line in lines if line.split()[:2] == ["table-model", "wait"]).split()
    off_cpu_ms, switches, heap_kib = (float(cell) for cell in row[-3:])
    stage = snap.row("table-model", "wait")
    # A sleeping stage is off the CPU for most of its wall time: at least the sleep itself.
    assert off_cpu_ms >= 2.0 * (1 - 0.05)
    assert off_cpu_ms <= stage.mean * 1e3
    # Sleeping gives up the CPU: at least one switch per call.
    assert switches >= 1.0
    # The list of 10,000 references alone is 78 KiB of heap, allocated inside the stage (the
    # table shows one decimal).
    assert heap_kib >= round(LIST_ITEMS * 8 / 1024, 1) - 0.05


def test_a_counter_that_was_not_read_shows_a_dash():
    inferscope.configure(counters="minimal", metrics_exporters=[])
    try:

        @inferscope.track_inference(model="table-minimal")
        def predict():
            return 1

        predict()
        lines = inferscope.snapshot().table(columns=["switches", "off_cpu"]).splitlines()
        row = next(line for line in lines if line.startswith("table-minimal")).split()
        assert row[-2:] == ["-", "-"]
    finally:
        inferscope.configure(metrics_exporters=[])


def test_an_unknown_column_names_what_is_accepted():
    with pytest.raises(ValueError, match=r"unknown column 'latency'; accepted: off_cpu, switches"):
        inferscope.snapshot().table(columns=["latency"])
