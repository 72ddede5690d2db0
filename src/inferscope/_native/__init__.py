"""The C backend. Importing this package fails when the extension was not built."""

from ._ringbuf import (
    MAX_STACK_DEPTH,
    RECORD_SIZE,
    Collector,
    Frame,
    Ring,
    Runtime,
    Stage,
    Tracked,
    fold_records,
    monotonic_ns,
    perf_status,
    read_counters,
    thread_cpu_ns,
)

__all__ = [
    "MAX_STACK_DEPTH",
    "RECORD_SIZE",
    "Collector",
    "Frame",
    "Ring",
    "Runtime",
    "Stage",
    "Tracked",
    "fold_records",
    "monotonic_ns",
    "perf_status",
    "read_counters",
    "thread_cpu_ns",
]
