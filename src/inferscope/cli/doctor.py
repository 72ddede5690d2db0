"""``inferscope doctor``: which counters and signals work on this machine, why not, and what each
counter set costs per call here."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .._backend import BACKEND, BACKEND_REASON
from ..tracking import stage, track_inference
from ._command import Command, bounded

__all__ = ["COMMAND", "doctor"]


def _stage_cost_ns(counters: str, calls: int) -> tuple[float, float]:
    """(tracked call overhead, stage enter+exit) in ns per call under a counter set, best of 5."""
    import timeit

    from .. import _pipeline

    _pipeline.configure(counters=counters, metrics_exporters=())

    def noop() -> None:
        pass

    tracked = track_inference(model="doctor")(noop)
    entered = stage("doctor")

    @track_inference(model="doctor-stage")
    def with_stage() -> None:
        with entered:
            pass

    def best(func: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            times.append(timeit.timeit(func, number=calls) / calls * 1e9)
            _pipeline.DRAINER.drain()  # outside the timed loop: the ring never fills
        return min(times)

    bare, one, two = best(noop), best(tracked), best(with_stage)
    return one - bare, two - one


def doctor(calls: int) -> int:
    """``inferscope doctor``: which counters and signals work here, why not, and what each set costs."""
    from ..counters import COUNTER_SETS, counter_mask, counter_names, counters_status
    from ..system import nvml_status, read_cgroup, read_psi, read_steal

    print(f"backend: {BACKEND} ({BACKEND_REASON})\n")
    print("per-stage counters")
    for name, (state, reason) in counters_status(probe_torch=True).items():
        print(f"  {name:<12} {state:<10} {reason}")
    print("\nhost and container signals")
    cgroup = read_cgroup()
    limit = f"{cgroup.cpu_limit:g} CPUs" if cgroup.cpu_limit is not None else "no CPU quota"
    memory = (
        f"{cgroup.memory_limit_bytes} bytes" if cgroup.memory_limit_bytes is not None else "no memory limit"
    )
    throttling = "readable" if cgroup.throttling is not None else "not found"
    print(f"  cgroup       v{cgroup.version or '?'}{' (hybrid)' if cgroup.hybrid else ''}: {limit}, {memory}")
    print(f"  throttling   {throttling}")
    print(f"  PSI          {'available' if read_psi() else 'not available (no /proc/pressure)'}")
    print(f"  steal        {'available' if read_steal() is not None else 'not available'}")
    ok, reason = nvml_status()
    print(f"  GPU (NVML)   {'available' if ok else 'none'}: {reason}")
    print(f"\ncost per call here (ns, best of 5 x {calls:,} calls; stage = enter + exit)")
    print(f"  {'counter set':<12} {'reads':<36} {'tracked call':>12} {'stage':>8}")
    for name in COUNTER_SETS:
        tracked_ns, stage_ns = _stage_cost_ns(name, calls)
        reads = ",".join(counter_names(counter_mask(name))) or "clock only"
        print(f"  {name:<12} {reads:<36} {tracked_ns:>12.0f} {stage_ns:>8.0f}")
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calls",
        type=bounded(int, 100, 10_000_000),
        default=20_000,
        help="calls per timing loop, 100 to 10000000 (default 20000)",
    )


COMMAND = Command(
    name="doctor",
    help="show which counters work on this machine, why not, and what each set costs",
    description="Show which per-stage counters and host signals (cgroup throttling, PSI, steal, GPU) "
    "work on this machine and why not, then time a tracked call and a stage under each counter set.",
    add_arguments=_add_arguments,
    run=lambda args: doctor(args.calls),
)
