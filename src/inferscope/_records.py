"""The fixed-size record that the hot path writes and the drainer reads.

Both backends produce exactly this layout: the C ring copies its slots into an array of
``RECORD_DTYPE`` and the pure-Python ring builds one from tuples, so everything downstream of the
ring sees the same numpy structured array. ``ringbuf.c`` static-asserts the same size and offsets.
"""

from __future__ import annotations

import numpy as np

#: Extra counter slots per record. Their meaning is given by the active counter set
#: (see ``inferscope.counters``); unused slots hold 0.
COUNTER_SLOTS = 13

RECORD_DTYPE = np.dtype(
    [
        ("key", "<u4"),  # interned key: model/version/stage path (see _keys.py)
        ("error", "<u2"),  # interned error.type; 0 = the call succeeded
        ("flags", "<u2"),  # FLAG_* bits
        ("start_ns", "<i8"),  # CLOCK_MONOTONIC at entry
        ("wall_ns", "<i8"),  # wall-clock duration
        ("cpu_ns", "<i8"),  # thread CPU time spent, or CPU_NOT_MEASURED
        ("counters", "<i8", (COUNTER_SLOTS,)),
        # Trace linkage, set only while tracing is on (FLAG_TRACED); see export/traces.py.
        ("trace_hi", "<u8"),  # trace id, high 64 bits
        ("trace_lo", "<u8"),  # trace id, low 64 bits (the ratio sampler's random part)
        ("span_id", "<u8"),
        ("parent_id", "<u8"),  # 0 for a root span
        ("root_id", "<u8"),  # span id of the outermost traced entry of its frame: the sampling unit
    ]
)
assert RECORD_DTYPE.itemsize == 176

#: The generator or async generator was closed (or collected) before it was exhausted.
FLAG_ABANDONED = 1
#: The record carries trace linkage.
FLAG_TRACED = 2
#: Kept whatever its duration: its parent span was sampled, or the ratio picked its trace at entry.
FLAG_SAMPLED = 4
#: Its parent span came from another process (a propagated context).
FLAG_PARENT_REMOTE = 8

#: ``cpu_ns`` when the active counter set does not read the thread CPU clock.
CPU_NOT_MEASURED = -1

#: Key 0 is the root for stages entered outside any tracked inference.
NO_MODEL_KEY = 0
#: Key 1 collects everything interned past the key cap.
OVERFLOW_KEY = 1

#: Error id 0 means "no error"; id 1 collects error types past the error-type cap.
NO_ERROR = 0
OTHER_ERROR = 1

#: Counter bits (see counters/__init__.py and _native/counters.h).
COUNTER_THREAD_CPU = 1
COUNTER_RUSAGE = 2
COUNTER_PERF = 4
COUNTER_RSS = 8
COUNTER_PY_HEAP = 16
#: torch.cuda's allocator around inferences (not stages); see counters/cuda.py.
COUNTER_CUDA_MEMORY = 32

#: Slots of the ``counters`` field; must match _native/counters.h.
SLOT_VOLUNTARY_SWITCHES = 0
SLOT_INVOLUNTARY_SWITCHES = 1
SLOT_MINOR_FAULTS = 2
SLOT_MAJOR_FAULTS = 3
SLOT_PERF = 4  # four slots, 4..7: the perf events of the mode in force (counters.perf_events())
SLOT_RSS_DELTA = 8  # RSS change over the sampled entries
SLOT_RSS_SAMPLES = 9  # 1 when this entry was one of the sampled ones
SLOT_PY_HEAP_DELTA = 10  # tracemalloc's traced-bytes change
SLOT_CUDA_ALLOCATED_DELTA = 11  # change of the bytes allocated by torch's CUDA allocator
SLOT_CUDA_PEAK = 12  # the inference's peak CUDA allocation above the allocation at its start
PERF_EVENTS = 4
#: One entry in RSS_SAMPLE_EVERY, at random, reads the RSS (a pread of /proc/self/statm).
RSS_SAMPLE_EVERY = 16
#: The stage CPU sample (docs/counters.md): a stage entry reads the thread CPU clock while its key's
#: entries come on average STAGE_CPU_EXACT_GAP_NS apart or more (a moving average over about
#: STAGE_CPU_GAP_WEIGHT entries, each gap counted up to STAGE_CPU_GAP_CAP_NS), else one entry in
#: ``Runtime.cpu_sample_every`` (by default STAGE_CPU_SAMPLE_EVERY), at random. Inferences always
#: read it. Must match ringbuf.c.
STAGE_CPU_SAMPLE_EVERY = 64
STAGE_CPU_EXACT_GAP_NS = 10_000_000
STAGE_CPU_GAP_CAP_NS = 4 * STAGE_CPU_EXACT_GAP_NS
STAGE_CPU_GAP_WEIGHT = 16

#: Why a record was dropped instead of aggregated; exported as the ``reason`` attribute of
#: ``inferscope.sdk.records.dropped``.
DROP_RING_FULL = "ring_full"
DROP_STACK_DEPTH = "stack_depth"
#: A batch the aggregator rejected (an internal error, also counted in inferscope.sdk.errors).
DROP_AGGREGATION_FAILED = "aggregation_failed"
#: The device time of a stage marked device="cuda", when too many were waiting for the GPU.
DROP_GPU_TIMING_BACKLOG = "gpu_timing_backlog"

#: The longest stage name, in characters: a name is kept for the life of the process (in the stage
#: cache and the key registry), so a name built from request data must not grow it without bound.
MAX_STAGE_NAME_LENGTH = 256

#: Stages deeper than this (per inference, per context) are not recorded and are counted as
#: ``stack_depth`` drops.
MAX_STACK_DEPTH = 32


def empty_records(count: int) -> np.ndarray:
    """A zeroed record array, the buffer that ``Ring.drain`` fills."""
    return np.zeros(count, dtype=RECORD_DTYPE)
