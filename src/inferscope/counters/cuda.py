"""CUDA through torch: the allocator's memory around inferences, and device time of stages.

Both read ``torch.cuda`` only after torch itself has initialized CUDA. inferscope never imports
torch and never initializes CUDA. A process that never imports torch pays nothing (the reader is
installed when torch is imported), one that imports torch without using CUDA pays two short calls
per inference, and a forked child, where CUDA cannot be used, reads nothing.

- ``cuda_memory`` (a counter; part of ``full``): around each inference, the change of the bytes
  allocated by torch's caching allocator, and the inference's peak allocation above the
  allocation at its start. The peak comes from ``torch.cuda.reset_peak_memory_stats()`` at the
  start of the inference and ``allocated_bytes.all.peak`` at its end, on the current device.
- ``stage(name, device="cuda")``: the stage also records a CUDA event on the current stream when
  it opens and another when it closes. The device time between them is read later, by the
  drainer, once the work has finished (``Event.query()``): the hot path never waits for the GPU.
  It is exported as ``inferscope.stage.gpu.time``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal

__all__ = [
    "DEVICE_TIMER",
    "DeviceStage",
    "DeviceTimer",
    "cuda_memory",
    "cuda_unavailable_reason",
    "device_stage_factory",
    "install_cuda_reader",
]


def _cuda() -> Any:
    """``torch.cuda`` once torch has initialized CUDA in this process, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return None
    return cuda


def cuda_memory(start: bool) -> tuple[int, int] | None:
    """(allocated, peak) bytes of torch's CUDA allocator on the current device; at the start of
    an inference the peak is reset first. None while CUDA is not in use.

    This is ``Runtime.cuda_reader``: the hot path calls it around inferences when the
    ``cuda_memory`` counter is on.
    """
    cuda = _cuda()
    if cuda is None:
        return None
    if start:
        cuda.reset_peak_memory_stats()
    allocated = cuda.memory_stats_as_nested_dict().get("allocated_bytes", {}).get("all", {})
    return int(allocated.get("current", 0)), int(allocated.get("peak", 0))


#: Whether the settings in force ask for ``cuda_memory`` (read by the torch import hook).
_reader_wanted = False
_hook_installed = False


def install_cuda_reader(runtime: Any, wanted: bool) -> None:
    """Set ``runtime.cuda_reader`` while ``cuda_memory`` is on, from the moment torch is imported.

    Before torch is imported there is nothing to read, so the hot path does not even call the
    reader: a process that never imports torch pays nothing for ``cuda_memory`` (it is in
    ``full``). A wrapt post-import hook installs the reader when torch arrives.
    """
    global _reader_wanted, _hook_installed
    _reader_wanted = wanted
    if wanted and "torch" in sys.modules:
        runtime.cuda_reader = cuda_memory
        return
    runtime.cuda_reader = None
    if wanted and not _hook_installed:
        import wrapt

        _hook_installed = True
        wrapt.register_post_import_hook(lambda _torch: _torch_imported(runtime), "torch")


def _torch_imported(runtime: Any) -> None:
    if _reader_wanted:
        runtime.cuda_reader = cuda_memory


def cuda_unavailable_reason(import_torch: bool = False) -> str | None:
    """Why ``cuda_memory`` cannot be read here, or None when it can (or may, once torch starts
    CUDA). torch is imported to find out only with ``import_torch``: that alone takes seconds."""
    torch = sys.modules.get("torch")
    if torch is None:
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        if not import_torch:
            return None
        try:
            torch = importlib.import_module("torch")
        except Exception as exc:
            return f"torch cannot be imported ({type(exc).__name__}: {exc})"
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available():
        return "torch has no usable CUDA device here (torch.cuda.is_available() is False)"
    return None


#: A stage's open timing: (key, span id or 0, device index, start event); None when not timed.
_Opened = tuple[int, int, int, Any]
#: The device stages open in this context, innermost last.
_OPEN: ContextVar[tuple[_Opened | None, ...]] = ContextVar("inferscope_device_stages", default=())


class DeviceTimer:
    """CUDA events of stages marked ``device="cuda"``, from when they close until their work is done.

    ``open``/``close`` run on the serving threads and never wait for the device. ``collect`` runs
    in the drainer: it reads the device time of every pair whose end event has completed. At most
    ``max_pending`` pairs wait; past that, a stage's timing is dropped and counted (``dropped``).
    Events are reused from a pool per device.
    """

    def __init__(self, max_pending: int = 8192) -> None:
        self.max_pending = max_pending
        self._pending: deque[tuple[int, int, int, Any, Any]] = deque()
        self._free: dict[int, list[Any]] = {}
        #: Timings dropped because ``max_pending`` pairs were waiting.
        self.dropped = 0
        #: Failures of our own (a CUDA call that raised), counted as internal errors.
        self.errors = 0

    def __len__(self) -> int:
        return len(self._pending)

    def _event(self, cuda: Any, index: int) -> Any:
        free = self._free.get(index)
        if free:
            return free.pop()
        return cuda.Event(enable_timing=True)

    def _recycle(self, index: int, *events: Any) -> None:
        free = self._free.setdefault(index, [])
        if len(free) < 2 * self.max_pending:
            free.extend(events)

    def open(self, key: int, device: int | None, span_id: int = 0) -> _Opened | None:
        """Record the start event of a stage on ``device`` (None: the current device). ``span_id``
        is the stage's span while tracing is on, so that its span gets the device time too."""
        cuda = _cuda()
        # Inside a CUDA graph capture an event would become part of the graph: not ours to touch.
        if cuda is None or cuda.is_current_stream_capturing():
            return None
        index = cuda.current_device() if device is None else device
        start = self._event(cuda, index)
        start.record(cuda.current_stream(index))
        return key, span_id, index, start

    def close(self, opened: _Opened, ok: bool) -> None:
        """Record the end event; keep the pair until the device reaches it. A stage that raised
        is not timed: its events go back to the pool."""
        key, span_id, index, start = opened
        cuda = _cuda()
        if cuda is None or cuda.is_current_stream_capturing():
            self._recycle(index, start)
            return
        end = self._event(cuda, index)
        end.record(cuda.current_stream(index))
        if not ok:
            self._recycle(index, start, end)
        elif len(self._pending) >= self.max_pending:
            self.dropped += 1
            self._recycle(index, start, end)
        else:
            self._pending.append((key, span_id, index, start, end))

    def collect(self) -> tuple[list[int], list[float], list[int]]:
        """(keys, seconds, span ids) of the pairs whose work has finished; the others keep
        waiting. A span id is 0 where tracing was off."""
        keys: list[int] = []
        seconds: list[float] = []
        span_ids: list[int] = []
        waiting = []
        for _ in range(len(self._pending)):
            item = self._pending.popleft()
            key, span_id, index, start, end = item
            try:
                if not end.query():
                    waiting.append(item)
                    continue
                seconds.append(start.elapsed_time(end) / 1e3)  # elapsed_time() is in ms
                keys.append(key)
                span_ids.append(span_id)
            except Exception:
                self.errors += 1
                continue
            self._recycle(index, start, end)
        self._pending.extendleft(reversed(waiting))
        return keys, seconds, span_ids

    def wait(self, timeout_s: float) -> None:
        """Poll until every pending pair has finished, or ``timeout_s`` passed (at shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            try:
                if all(item[-1].query() for item in list(self._pending)):
                    return
            except Exception:
                self.errors += 1
                return
            time.sleep(0.001)

    def after_fork_in_child(self) -> None:
        """The parent's events mean nothing in a child, where CUDA cannot be used."""
        self._pending = deque()
        self._free = {}
        self.dropped = 0
        self.errors = 0


DEVICE_TIMER = DeviceTimer()
os.register_at_fork(after_in_child=DEVICE_TIMER.after_fork_in_child)


class DeviceStage:
    """A stage that also measures the device time of the work it queues on a CUDA device.

    Returned by ``inferscope.stage(name, device="cuda")``; a context manager and a decorator like
    the stage it wraps, and safe to share between threads and tasks. Instrumentation never raises
    into the caller: a failing CUDA call is counted and the stage goes on untimed.
    """

    __slots__ = ("_decorate", "_device", "_runtime", "_stage", "_timer")

    def __init__(self, stage: Any, device: int | None, timer: DeviceTimer, runtime: Any) -> None:
        self._stage = stage
        self._device = device
        self._timer = timer
        self._runtime = runtime
        self._decorate = runtime.decorate

    @property
    def name(self) -> str:
        """The stage name."""
        return str(self._stage.name)

    @property
    def device(self) -> str:
        """``cuda`` (the current device) or ``cuda:N``."""
        return "cuda" if self._device is None else f"cuda:{self._device}"

    def __repr__(self) -> str:
        return f"<inferscope stage {self.name!r} on {self.device}>"

    def __enter__(self) -> DeviceStage:
        self._stage.__enter__()
        opened = None
        runtime = self._runtime
        if runtime.enabled:
            try:
                # The stage is open: the current key and span are its own.
                span = runtime.current_span() if runtime.tracing else None
                opened = self._timer.open(runtime.current_key(), self._device, span[2] if span else 0)
            except Exception:
                self._timer.errors += 1
        _OPEN.set((*_OPEN.get(), opened))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> Literal[False]:
        stack = _OPEN.get()
        if stack:
            _OPEN.set(stack[:-1])
            opened = stack[-1]
            if opened is not None:
                try:
                    self._timer.close(opened, exc_type is None)
                except Exception:
                    self._timer.errors += 1
        self._stage.__exit__(exc_type, exc, tb)
        return False

    def __call__(self, func: Any = None, *extra: Any, **kwargs: Any) -> Any:
        if self._decorate is None:
            raise TypeError("stage objects are not callable here")
        return self._decorate(self, func, *extra, **kwargs)


_ACCEPTED = "None, 'cpu', 'cuda', 'cuda:N' (N >= 0), or a torch.device of type cpu or cuda"


def _device_index(device: object) -> int | Literal["cpu"] | None:
    """``"cpu"``, None (the current CUDA device) or a CUDA device index; ValueError otherwise."""
    kind: object = getattr(device, "type", None)
    index: object = getattr(device, "index", None)
    if isinstance(device, str):
        kind, _, rest = device.partition(":")
        index = int(rest) if rest.isdigit() else (None if rest == "" else -1)
    if kind == "cpu":
        return "cpu"
    if kind == "cuda" and (index is None or (isinstance(index, int) and index >= 0)):
        return index
    raise ValueError(f"stage(device=...) got {device!r}; it accepts {_ACCEPTED}")


def device_stage_factory(timer: DeviceTimer, runtime: Any) -> Callable[[Any, object], Any]:
    """``Runtime.device_stage`` of ``runtime``: what ``stage(name, device=...)`` returns.

    The stage itself on the CPU, a ``DeviceStage`` on CUDA (one per stage and device, reused).
    """
    made: dict[tuple[int, int | None], DeviceStage] = {}

    def device_stage(stage: Any, device: object) -> Any:
        index = _device_index(device)
        if index == "cpu":
            return stage
        found = made.get((id(stage), index))
        if found is not None and found._stage is stage:
            return found
        created = DeviceStage(stage, index, timer, runtime)
        if len(made) < 4096:
            made[(id(stage), index)] = created
        return created

    return device_stage
