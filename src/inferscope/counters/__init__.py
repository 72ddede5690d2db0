"""Counter sets: which clocks and counters are read around every inference and stage.

A counter set is a bitmask of the counters that the hot path reads (``COUNTER_*`` in
``_records.py``). ``minimal`` reads the monotonic clock only; ``default`` adds the thread CPU
clock, two extra reads per stage. New counters register a bit and a name here; the hot path reads
exactly the bits that are set.
"""

from __future__ import annotations

from .._records import COUNTER_THREAD_CPU

#: Named counter sets and the counter bits each one enables.
COUNTER_SETS: dict[str, int] = {
    "minimal": 0,
    "default": COUNTER_THREAD_CPU,
}

#: Individual counters that may be listed by name, e.g. ``counters="thread_cpu"``.
COUNTERS: dict[str, int] = {
    "thread_cpu": COUNTER_THREAD_CPU,
}


def counter_mask(value: str) -> int:
    """The bitmask for a counter-set name or a comma-separated list of counter names.

    Raises ``KeyError`` naming the first unknown entry; ``config`` turns that into a ``ConfigError``.
    """
    if value in COUNTER_SETS:
        return COUNTER_SETS[value]
    mask = 0
    for name in (part.strip() for part in value.split(",")):
        if name not in COUNTERS:
            raise KeyError(name)
        mask |= COUNTERS[name]
    return mask


def accepted_counter_values() -> str:
    """Human-readable list of what ``counters`` accepts, for error messages and docs."""
    sets = ", ".join(repr(name) for name in COUNTER_SETS)
    names = ", ".join(repr(name) for name in COUNTERS)
    return f"one of {sets}, or a comma-separated list of {names}"
