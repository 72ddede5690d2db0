"""The contract that both backends implement: ``inferscope._native`` (C) and ``inferscope._purepy``.

Semantics shared by both:
- ``Ring`` is bounded; ``push`` never blocks and returns False (counting a drop) when full.
- ``Runtime`` keeps one frame of open entries per ``contextvars.Context``; ``enter``/``exit`` and
  stages push and pop entries; an exit closes the most recent entry of the same owner.
- Where work runs follows the contextvars meaning: a copied context (an asyncio task, the copy that
  ``asyncio.to_thread`` or ``copy_context().run`` uses) belongs to the innermost entry that was open
  when it was copied, whatever its creator opens or closes afterwards, even after the inference
  returned. A new thread starts with an empty context and belongs to no inference unless
  ``use_frame`` (``bind()``) roots it. A generator's body runs in its consumer's context.
- A Tracked or Stage that the garbage collector cleared raises ValueError when used.
- Nothing on the hot path raises into user code: failures are counted in ``internal_errors``.
- Misuse at definition time (``stage("")``, ``@stage`` without a name) raises TypeError/ValueError.
"""

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

MAX_STACK_DEPTH: int
RECORD_SIZE: int

class Registry(Protocol):
    def stage_key(self, parent: int, name: str) -> int: ...
    def error_id(self, exc_type: type[BaseException] | None) -> int: ...

class Ring:
    def __init__(self, capacity: int) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    #: A non-blocking pipe's write end: one byte is written to it once the ring is half full (-1: none).
    wake_fd: int
    def __len__(self) -> int: ...
    def push(self, key: int, error: int, flags: int, start_ns: int, wall_ns: int, cpu_ns: int, /) -> bool: ...
    def drain(self, out: Any, /) -> int: ...
    def reset(self) -> None: ...

class Stage:
    @property
    def name(self) -> str: ...
    def __enter__(self) -> Stage: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any, /
    ) -> bool: ...
    def __call__(self, func: Callable[..., Any], /) -> Callable[..., Any]: ...

class Tracked:
    inferscope_key: int
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

class Frame:
    """The open entries of one Context (C only); it holds that Context and takes part in GC."""

class Runtime:
    ring: Ring
    registry: Registry
    decorate: Callable[..., Any] | None
    heap_reader: Callable[[], int] | None
    cuda_reader: Callable[[bool], tuple[int, int] | None] | None
    device_stage: Callable[[Stage, object], Any] | None
    counters: int
    enabled: bool
    cpu_sample_every: int  # a stage entry reads the thread CPU clock 1 time in this many
    @property
    def tracing(self) -> bool: ...
    @property
    def depth_dropped(self) -> int: ...
    @property
    def internal_errors(self) -> int: ...
    def __init__(self, ring: Ring, registry: Registry) -> None: ...
    def track(self, func: Callable[..., Any], key: int, /) -> Callable[..., Any]: ...
    def stage(self, name: str, /, *, device: object = None) -> Any: ...
    # `stash` and `trace` are opaque: what exit_segment() returned (bytes in C, lists and tuples in
    # the pure-Python backend).
    def enter(self, owner: object, key: int, stash: Any = None, trace: Any = None, /) -> None: ...
    def exit(self, owner: object, exc_type: type[BaseException] | None, flags: int = 0, /) -> None: ...
    def exit_segment(self, owner: object, /) -> tuple[int, int, int, Any, Any] | None: ...
    def record(
        self,
        key: int,
        exc_type: type[BaseException] | None,
        flags: int,
        start_ns: int,
        wall_ns: int,
        cpu_ns: int,
        trace: Any = None,
        /,
    ) -> None: ...
    def current_key(self) -> int: ...
    # The innermost open span here, opaque, for use_frame() in another thread; None when untraced.
    def current_trace(self) -> Any: ...
    # (trace_hi, trace_lo, span_id, flags, id of the OTel context current when it opened) | None.
    def current_span(self) -> tuple[int, int, int, int, int] | None: ...
    def use_frame(self, root_key: int, trace: Any = None, /) -> None: ...
    # While set, every entry reads `var` (OTel's current-context ContextVar) and gets span ids; a
    # root is sampled at entry when its trace id's low 64 bits are below ratio_bound (2**64 - 1:
    # every root), or, when parent_based, when its parent span is sampled.
    def set_tracing(
        self,
        var: ContextVar[Any] | None,
        span_key: str | None = None,
        ratio_bound: int | None = None,
        parent_based: bool | None = None,
        /,
    ) -> None: ...
    def active_depth(self) -> int: ...
    def reset_cpu_sample(self) -> None: ...
    def after_fork_in_child(self) -> None: ...

def monotonic_ns() -> int: ...
def thread_cpu_ns() -> int: ...
def perf_status() -> tuple[str, int, bool]: ...
def read_counters(mask: int, /) -> tuple[int, tuple[int, ...]]: ...

# C only (the pure-Python backend folds with numpy): Aggregator's fold of a batch, the GIL released.
# Returns bytes, rows ordered by series id: (series_ids, duration, cpu, cpu_wall, abandoned,
# counter_sums), duration and cpu being the 9 fields of aggregator._BatchHistograms; cpu and
# cpu_wall are None when no record measured CPU, abandoned when none was abandoned, counter_sums
# when every counter is 0. See fold.h and mod_fold_records in ringbuf.c.
def fold_records(
    records: Any, scale: int, below: Any, next_start: Any, /
) -> tuple[
    bytes,
    tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes],
    tuple[bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes, bytes] | None,
    bytes | None,
    bytes | None,
    bytes | None,
]: ...
