"""Counter sets: which clocks and counters are read around every inference and stage.

A counter set is a bitmask of the counters that the hot path reads (``COUNTER_*`` in
``_records.py``; the C side is ``_native/counters.h``). Each counter costs system calls per stage,
so the named sets trade detail for overhead:

- ``minimal``: the monotonic clock only.
- ``default``: plus the thread CPU clock (two clock reads per stage).
- ``full``: plus the thread's rusage (context switches, page faults) and the process RSS (on one
  entry in 16), and, where a PMU is exposed, the thread's hardware perf event group (its
  task-clock then gives the CPU time, so no separate clock read). Without a PMU, perf's software
  events would repeat what rusage says at twice its cost, so ``full`` reads the CPU clock instead;
  ask for ``perf`` by name to get them.

  ``full`` also reads torch's CUDA allocator around every inference (``cuda_memory``), which costs
  nothing measurable while torch has not initialized CUDA (see ``cuda.py``).

A comma-separated list picks counters by name, e.g. ``"thread_cpu,rusage"``. ``python_heap``
(tracemalloc) is never part of a named set: it is costly, so it must be asked for by name.
"""

from __future__ import annotations

import errno as errno_module
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._records import (
    COUNTER_CUDA_MEMORY,
    COUNTER_PERF,
    COUNTER_PY_HEAP,
    COUNTER_RSS,
    COUNTER_RUSAGE,
    COUNTER_THREAD_CPU,
    SLOT_CUDA_ALLOCATED_DELTA,
    SLOT_CUDA_PEAK,
    SLOT_INVOLUNTARY_SWITCHES,
    SLOT_MAJOR_FAULTS,
    SLOT_MINOR_FAULTS,
    SLOT_PERF,
    SLOT_PY_HEAP_DELTA,
    SLOT_RSS_DELTA,
    SLOT_RSS_SAMPLES,
    SLOT_VOLUNTARY_SWITCHES,
)

#: Named counter sets. ``full`` is resolved against what this machine supports (see ``counter_mask``).
COUNTER_SETS: dict[str, int] = {
    "minimal": 0,
    "default": COUNTER_THREAD_CPU,
    "full": COUNTER_RUSAGE | COUNTER_PERF | COUNTER_RSS | COUNTER_CUDA_MEMORY,
}

#: Individual counters that may be listed by name, e.g. ``counters="thread_cpu,rusage"``.
COUNTERS: dict[str, int] = {
    "thread_cpu": COUNTER_THREAD_CPU,
    "rusage": COUNTER_RUSAGE,
    "perf": COUNTER_PERF,
    "rss": COUNTER_RSS,
    "python_heap": COUNTER_PY_HEAP,
    "cuda_memory": COUNTER_CUDA_MEMORY,
}


class CounterUnavailable(Exception):
    """A counter asked for by name cannot be read on this machine; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


def perf_status() -> tuple[str, str]:
    """(mode, reason): ``"hardware"``, ``"software"`` or ``"none"``, and why not hardware.

    >>> perf_status()[0] in ("hardware", "software", "none")
    True
    """
    from .._backend import BACKEND, impl

    mode, err, kernel_counted = impl.perf_status()
    if BACKEND != "c":
        return "none", "perf events are read by the C extension, and the pure-Python backend is in use"
    if mode == "hardware":
        return mode, "hardware events are available" + ("" if kernel_counted else " (user space only)")
    why = _perf_errno_reason(err)
    if mode == "software":
        return mode, f"hardware perf events: {why}; software events are used instead"
    return mode, f"perf events: {why}"


def _perf_errno_reason(err: int) -> str:
    if err == errno_module.ENOENT:
        return "no PMU exposed (ENOENT)"
    if err in (errno_module.EACCES, errno_module.EPERM):
        try:
            with open("/proc/sys/kernel/perf_event_paranoid") as f:
                level = f.read().strip()
        except OSError:
            level = "unknown"
        return f"not permitted ({errno_module.errorcode.get(err, err)}), perf_event_paranoid={level}"
    if err == errno_module.ENOSYS:
        return "perf_event_open is not available (ENOSYS)"
    return f"perf_event_open failed ({errno_module.errorcode.get(err, str(err))})"


def unavailable_reason(bit: int, probe_torch: bool = False) -> str | None:
    """Why the counter ``bit`` cannot be read here, or None when it can. ``probe_torch`` imports
    torch to tell whether it has CUDA (seconds); otherwise only an imported torch is asked."""
    if bit == COUNTER_PERF:
        mode, reason = perf_status()
        return None if mode != "none" else reason
    if bit == COUNTER_RSS and not os.path.exists("/proc/self/statm"):
        return "/proc/self/statm does not exist (not Linux?)"
    if bit == COUNTER_CUDA_MEMORY:
        from .cuda import cuda_unavailable_reason

        return cuda_unavailable_reason(probe_torch)
    return None


def counter_mask(value: str) -> int:
    """The bitmask for a counter-set name or a comma-separated list of counter names.

    Raises ``KeyError`` naming the first unknown entry, and ``CounterUnavailable`` for a counter
    named explicitly that this machine cannot read; ``config`` turns both into ``ConfigError``.
    A named set never fails: ``full`` reads the thread CPU clock instead of perf events where no PMU
    is exposed.

    >>> counter_mask("minimal")
    0
    """
    if value in COUNTER_SETS:
        mask = COUNTER_SETS[value]
        if mask & COUNTER_PERF and perf_status()[0] != "hardware":
            mask = (mask & ~COUNTER_PERF) | COUNTER_THREAD_CPU
        return mask
    mask = 0
    for name in (part.strip() for part in value.split(",")):
        if name not in COUNTERS:
            raise KeyError(name)
        reason = unavailable_reason(COUNTERS[name])
        if reason is not None:
            raise CounterUnavailable(name, reason)
        mask |= COUNTERS[name]
    return mask


def accepted_counter_values() -> str:
    """Human-readable list of what ``counters`` accepts, for error messages and docs."""
    sets = ", ".join(repr(name) for name in COUNTER_SETS)
    names = ", ".join(repr(name) for name in COUNTERS)
    return f"one of {sets}, or a comma-separated list of {names}"


@dataclass(frozen=True)
class CounterMetric:
    """How one counter slot is exported: metric suffix, unit, and an attribute when one is needed."""

    slot: int
    suffix: str  # e.g. "context_switches": exported as inferscope.stage.context_switches
    unit: str
    attributes: tuple[tuple[str, str], ...] = ()
    description: str = ""
    monotonic: bool = True
    #: Read around inferences only (``cuda_memory``): stages do not export it.
    inference_only: bool = False


_SWITCHES = "context_switches"
_FAULTS = "page_faults"

#: Exported counters per counter bit; perf slots depend on the mode (see ``counter_metrics``).
_FIXED: dict[int, tuple[CounterMetric, ...]] = {
    COUNTER_RUSAGE: (
        CounterMetric(
            SLOT_VOLUNTARY_SWITCHES, _SWITCHES, "{switch}", (("type", "voluntary"),), "Context switches."
        ),
        CounterMetric(
            SLOT_INVOLUNTARY_SWITCHES, _SWITCHES, "{switch}", (("type", "involuntary"),), "Context switches."
        ),
        CounterMetric(SLOT_MINOR_FAULTS, _FAULTS, "{fault}", (("type", "minor"),), "Page faults."),
        CounterMetric(SLOT_MAJOR_FAULTS, _FAULTS, "{fault}", (("type", "major"),), "Page faults."),
    ),
    COUNTER_RSS: (
        CounterMetric(
            SLOT_RSS_DELTA,
            "memory.rss.change",
            "By",
            (),
            "Change of the process RSS over sampled calls, scaled to all calls.",
            monotonic=False,
        ),
    ),
    COUNTER_PY_HEAP: (
        CounterMetric(
            SLOT_PY_HEAP_DELTA,
            "memory.python_heap.change",
            "By",
            (),
            "Change of the bytes traced by tracemalloc.",
            monotonic=False,
        ),
    ),
    COUNTER_CUDA_MEMORY: (
        CounterMetric(
            SLOT_CUDA_ALLOCATED_DELTA,
            "memory.cuda.change",
            "By",
            (),
            "Change of the bytes allocated by torch's CUDA caching allocator over inferences.",
            monotonic=False,
            inference_only=True,
        ),
        CounterMetric(
            SLOT_CUDA_PEAK,
            "memory.cuda.peak",
            "By",
            (),
            "Sum over inferences of each one's peak CUDA allocation above its allocation at start; "
            "divided by the inference count, the mean extra memory an inference needs.",
            inference_only=True,
        ),
    ),
}

_PERF_HARDWARE = (
    CounterMetric(SLOT_PERF + 0, "instructions", "{instruction}", (), "Instructions retired (user space)."),
    CounterMetric(SLOT_PERF + 1, "cycles", "{cycle}", (), "CPU cycles."),
    CounterMetric(SLOT_PERF + 2, "cache_misses", "{miss}", (("type", "llc"),), "Last-level cache misses."),
    CounterMetric(SLOT_PERF + 3, "branch_misses", "{miss}", (), "Mispredicted branches."),
)
_PERF_SOFTWARE = (
    CounterMetric(SLOT_PERF + 0, "cpu_migrations", "{migration}", (), "Moves of the thread to another CPU."),
    CounterMetric(SLOT_PERF + 1, "perf.page_faults", "{fault}", (), "Page faults (perf software event)."),
    CounterMetric(
        SLOT_PERF + 2, "perf.context_switches", "{switch}", (), "Context switches (perf software event)."
    ),
)


def counter_metrics(mask: int) -> tuple[CounterMetric, ...]:
    """The exported counters of a mask, in slot order."""
    metrics: list[CounterMetric] = []
    for bit, fixed in _FIXED.items():
        if mask & bit:
            metrics.extend(fixed)
    if mask & COUNTER_PERF:
        mode, _ = perf_status()
        metrics.extend(_PERF_HARDWARE if mode == "hardware" else _PERF_SOFTWARE if mode == "software" else ())
    return tuple(sorted(metrics, key=lambda m: m.slot))


def counters_of(metrics: Sequence[CounterMetric], kind: str) -> list[CounterMetric]:
    """The counters a series of ``kind`` (``"inference"`` or ``"stage"``) exports."""
    return [m for m in metrics if kind == "inference" or not m.inference_only]


def counter_value(metric: CounterMetric, counters: Sequence[int] | np.ndarray, count: int) -> int:
    """The total of one exported counter for a series (or row) with slot sums ``counters`` over
    ``count`` calls. The RSS change is measured on sampled calls only and is scaled to all calls."""
    value = int(counters[metric.slot])
    if metric.slot == SLOT_RSS_DELTA:
        samples = int(counters[SLOT_RSS_SAMPLES])
        return round(value * count / samples) if samples else 0
    return value


def counter_label(metric: CounterMetric) -> str:
    """The key of a counter in ``snapshot()`` rows, e.g. ``context_switches.voluntary``."""
    return ".".join([metric.suffix, *(value for _, value in metric.attributes)])


def counters_status(probe_torch: bool = False) -> dict[str, tuple[str, str]]:
    """Whether each counter works here: name -> (state, reason). For ``inferscope doctor``, which
    lets ``probe_torch`` import torch to find out whether it has CUDA.

    >>> sorted(counters_status())
    ['cuda_memory', 'perf', 'python_heap', 'rss', 'rusage', 'thread_cpu']
    """
    status = {name: ("available", "") for name in COUNTERS}
    status["perf"] = perf_status()
    for name in ("rss", "cuda_memory"):
        reason = unavailable_reason(COUNTERS[name], probe_torch)
        if reason is not None:
            status[name] = ("none", reason)
    if status["cuda_memory"][0] == "available":
        status["cuda_memory"] = ("available", "read once torch initializes CUDA; so is stage(device='cuda')")
    return status


def counter_names(mask: int) -> list[str]:
    """Names of the counters in a mask, for messages and ``inferscope doctor``."""
    return [name for name, bit in COUNTERS.items() if mask & bit]
