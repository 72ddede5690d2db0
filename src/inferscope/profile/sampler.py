"""When the detector opens a regression, sample the stacks of the threads inside the regressed stage
for a short while and store the top functions with it.

Not cProfile: from Python 3.12 it is process-wide and exclusive (a second profiler raises, and it
records every thread), and its cost is proportional to the calls made. A sampler thread reads
``sys._current_frames()`` instead, ``SAMPLE_HZ`` times a second for ``WINDOW_SECONDS``, at most once
per (service, model, version, stage) per ``PER_KEY_SECONDS`` (the flight recorder is asked too, so
that the workers of one service sample a stage once between them). It keeps its own CPU time under
``MAX_OVERHEAD`` of the time it runs by sleeping longer after a costly tick: while it samples, the
service loses at most that share of its GIL (benchmarks/profile_sampler.py measures it).

Which threads are inside the stage: the open stage of a thread lives in its contextvars (pure
Python) or in the C runtime's frame of its Context, which no other thread can read. The stacks say
it instead, read the way the code opened the stage:

- a ``with`` block whose item is ``stage("name")`` or ``inferscope.stage("name")`` (any call named
  ``stage`` with a literal name), or a name or attribute (``PRE``, ``self.encoder_stage``, a local
  ``stage``) that holds a stage when sampled; the frame's current line must be inside the block;
- a function decorated with ``@stage(...)`` (its wrapper frame holds the stage);
- the tracked function: the pure-Python backend's wrapper frame holds its key; with the C backend
  the decorated function is looked up by its qualified name in its module (module-level functions
  and methods; on Python 3.10, module-level functions only). Its model resets the stage path.

Stages opened without a ``with`` block (framework hooks: a torch module's forward pre-hook) or by a
name built at run time (``stage(f"step{i}")``) are not seen. A sample whose thread is inside the
regressed model but not visibly inside the stage is kept apart; when no sample saw the stage, the
stored profile is that of the model's threads, and says so (``attribution``). See docs/profile.md.
"""

from __future__ import annotations

import ast
import atexit
import inspect
import logging
import os
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..detector import Regression

__all__ = ["SAMPLER", "StackSampler", "regression_opened"]

_logger = logging.getLogger("inferscope")

#: How long one regression's stage is sampled, and how often a second.
WINDOW_SECONDS = 10.0
SAMPLE_HZ = 100.0
#: The sampler's CPU time stays under this share of the time it runs.
MAX_OVERHEAD = 0.01
#: One sampling per key in this many seconds, whatever regressions open meanwhile.
PER_KEY_SECONDS = 3600.0
#: Functions stored per profile, and frames read per stack.
TOP_FUNCTIONS = 15
MAX_DEPTH = 256
#: Fewer samples than this inside the stage itself: the model's samples are stored instead.
MIN_STAGE_SAMPLES = 5
#: Code objects whose analysis is kept.
_CODE_CACHE_LIMIT = 8192

_TRACKING_FILES = frozenset(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
    for name in ("tracking.py", "_purepy.py")
)
_NOTHING: Any = object()


@dataclass(frozen=True)
class _Block:
    """A ``with`` block that may open stages: its body's lines and, per item, a literal name or the
    dotted name of what holds the stage."""

    first: int
    last: int
    items: tuple[str | tuple[str, ...], ...]


@dataclass(frozen=True)
class _CodeInfo:
    blocks: tuple[_Block, ...] = ()
    #: The wrapper of ``@stage(...)`` (the stage is its ``stage_obj``), or of a tracked function in
    #: the pure-Python backend or a coroutine or generator (its ``key``).
    wrapper: str | None = None
    #: The model this code is the tracked function of (C backend), once looked up.
    model: str | None = None


@dataclass
class _Target:
    service: str
    model: str
    version: str | None
    stage: str | None
    metric: str
    since: float
    started_unix: float = 0.0
    ends_at: float = 0.0
    checked: bool = False
    cpu_start: float = 0.0
    stage_samples: int = 0
    model_samples: int = 0
    inclusive: dict[str, list[int]] = field(default_factory=dict)  # label -> [stage, model] counts
    own: dict[str, list[int]] = field(default_factory=dict)

    def add(self, frames: list[FrameType], level: int) -> None:
        if level == 0:
            self.stage_samples += 1
        else:
            self.model_samples += 1
        seen = set()
        for frame in frames:
            label = _label(frame.f_code)
            if label not in seen:
                seen.add(label)
                self.inclusive.setdefault(label, [0, 0])[level] += 1
        if frames:
            self.own.setdefault(_label(frames[-1].f_code), [0, 0])[level] += 1


@dataclass(frozen=True)
class SampledProfile:
    """What one sampling found: stored in the flight recorder with the regression's key."""

    service: str
    model: str
    version: str | None
    stage: str | None
    metric: str
    since: float
    started_unix: float
    ended_unix: float
    payload: Mapping[str, Any]


def _label(code: CodeType) -> str:
    name = getattr(code, "co_qualname", code.co_name)
    return f"{name} ({_short(code.co_filename)}:{code.co_firstlineno})"


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep, "lib" + os.sep + "python"):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at + len(marker) :].lstrip(os.sep)
    return filename


def _stage_types() -> tuple[type, ...]:
    from .._backend import impl
    from ..counters.cuda import DeviceStage

    backend: Any = impl  # the contract's Protocol leaves the types out; both modules define Stage
    return (backend.Stage, DeviceStage)


class StackSampler:
    """The sampler: ``regression_opened`` queues a regression's stage, a daemon thread samples it.

    Every method is safe from any thread and never raises; the thread starts on the first
    regression, stops once nothing is left to sample (or at ``stop()``, ``shutdown()`` or exit),
    and none runs in a forked child.
    """

    def __init__(self) -> None:
        self.window_seconds = WINDOW_SECONDS
        self.sample_hz = SAMPLE_HZ
        self.max_overhead = MAX_OVERHEAD
        self.per_key_seconds = PER_KEY_SECONDS
        #: Samplings started, skipped by the rate limit, stored, and the sampler's failures.
        self.started = 0
        self.skipped = 0
        self.stored = 0
        self.errors = 0
        #: The most recent profiles, newest last (also when the recorder is off).
        self.recent: deque[SampledProfile] = deque(maxlen=20)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[_Target] = []
        self._last: dict[tuple[str, str, str | None, str | None], float] = {}
        self._codes: dict[CodeType, _CodeInfo | None] = {}
        self._types: tuple[type, ...] | None = None

    # --- called by the detector (its thread: return quickly) -------------------------------------

    def regression_opened(self, service: str, regression: Regression) -> bool:
        """Queue ``regression``'s stage for sampling; False when the rate limit or the setting says
        no. Memory regressions have no stack to sample."""
        try:
            if regression.metric in ("rss", "py_heap"):
                return False
            key = (service, regression.model, regression.version, regression.stage)
            now = time.monotonic()
            with self._lock:
                last = self._last.get(key)
                if last is not None and now - last < self.per_key_seconds:
                    self.skipped += 1
                    return False
                self._last[key] = now
                self._pending.append(
                    _Target(
                        service,
                        regression.model,
                        regression.version,
                        regression.stage,
                        regression.metric,
                        regression.since,
                    )
                )
                if self._thread is None or not self._thread.is_alive():
                    self._stop = threading.Event()
                    self._thread = threading.Thread(
                        target=self._run, args=(self._stop,), name="inferscope-stack-sampler", daemon=True
                    )
                    self._thread.start()
            return True
        except Exception:
            self._failed("inferscope: starting the stack sampler failed")
            return False

    def stop(self, timeout_millis: float = 1000.0) -> None:
        """Stop sampling now (what was being sampled is dropped) and wait for the thread."""
        with self._lock:
            thread, self._pending = self._thread, []
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout_millis) / 1e3)

    def after_fork_in_child(self) -> None:
        """The parent's sampler thread does not exist here: nothing is sampled until a regression
        of the child's own opens."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self._pending = []

    # --- the thread --------------------------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        # While it samples, the GIL's switch interval is the drainer's short one: a thread that
        # holds the GIL hands it over within 0.5 ms instead of 5, so that a sample shows where that
        # thread is at the tick, not where it next waits (a 0.3 ms stage between two waits would
        # otherwise never be seen).
        from .._pipeline import _short_switch_interval
        from .._process_cpu import OWN_THREADS

        with OWN_THREADS.running(), _short_switch_interval():
            self._sample_until_done(stop)

    def _sample_until_done(self, stop: threading.Event) -> None:
        from .._runtime import RUNTIME

        targets: list[_Target] = []
        own = threading.get_ident()
        try:
            while not stop.is_set():
                with self._lock:
                    targets.extend(self._pending)
                    self._pending = []
                for target in targets:
                    if not target.checked:
                        self._begin(target)
                targets = [t for t in targets if t.ends_at > 0.0]
                if not targets:
                    with self._lock:
                        if not self._pending:
                            self._thread = None
                            return
                    continue
                if not RUNTIME.enabled:  # shut down: what was sampled is dropped
                    return
                tick_cpu = time.thread_time()
                self._sample(targets, own)
                cost = time.thread_time() - tick_cpu
                now = time.monotonic()
                for target in [t for t in targets if now >= t.ends_at]:
                    targets.remove(target)
                    self._finish(target)
                # At most max_overhead of the time: a tick that cost c sleeps c * (1/share - 1).
                pause = max(1.0 / self.sample_hz, cost * (1.0 / self.max_overhead - 1.0))
                stop.wait(min(pause, 0.25))
        except Exception:
            self._failed("inferscope: the stack sampler failed")
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _begin(self, target: _Target) -> None:
        target.checked = True
        recorder = _recorder()
        if recorder is not None and hasattr(recorder, "profiles"):
            since = time.time() - self.per_key_seconds
            for row in recorder.profiles(service=target.service, model=target.model, since_unix=since):
                if row["version"] == target.version and row["stage"] == target.stage:
                    self.skipped += 1  # another worker of the service sampled it this hour
                    return
        self.started += 1
        target.started_unix = time.time()
        target.ends_at = time.monotonic() + self.window_seconds
        target.cpu_start = time.thread_time()

    def _sample(self, targets: list[_Target], own: int) -> None:
        for ident, top in sys._current_frames().items():
            if ident == own:
                continue
            stack: list[FrameType] = []
            frame: FrameType | None = top
            while frame is not None and len(stack) < MAX_DEPTH:
                stack.append(frame)
                frame = frame.f_back
            stack.reverse()
            model, model_at, path, stage_at = self._where(stack)
            if model is None and not path:
                continue
            for target in targets:
                if model is not None and model != target.model:
                    continue
                if target.stage is None:
                    if model is not None:
                        target.add(stack[model_at:], 0)
                elif "/".join(path) == target.stage:
                    target.add(stack[stage_at:], 0)
                elif model is not None:
                    target.add(stack[model_at:], 1)

    def _where(self, stack: list[FrameType]) -> tuple[str | None, int, list[str], int]:
        """(model, index of its frame, stage path, index of the innermost stage's frame)."""
        model: str | None = None
        model_at = 0
        path: list[str] = []
        stage_at = 0
        for index, frame in enumerate(stack):
            info = self._info(frame)
            if info is None:
                continue
            if info.model is not None:
                model, model_at, path = info.model, index, []
            if info.wrapper is not None:
                value = _local(frame, info.wrapper)
                if info.wrapper == "key":
                    found = _model_of_key(value)
                    if found is not None:
                        model, model_at, path = found, index, []
                else:
                    name = self._stage_name(value)
                    if name is not None:
                        path.append(name)
                        stage_at = index + 1
            line = frame.f_lineno
            for block in info.blocks:
                if block.first <= line <= block.last:
                    for item in block.items:
                        name = item if isinstance(item, str) else self._stage_name(_resolve(frame, item))
                        if name is not None:
                            path.append(name)
                            stage_at = index
        return model, model_at, path, stage_at

    def _stage_name(self, value: object) -> str | None:
        if self._types is None:
            self._types = _stage_types()
        if isinstance(value, self._types):
            return str(value.name)  # type: ignore[attr-defined]
        return None

    def _info(self, frame: FrameType) -> _CodeInfo | None:
        code = frame.f_code
        found = self._codes.get(code, _NOTHING)
        if found is _NOTHING:
            if len(self._codes) >= _CODE_CACHE_LIMIT:
                self._codes.clear()
            found = self._codes[code] = self._analyse(code, frame)
        return found  # type: ignore[no-any-return]

    def _analyse(self, code: CodeType, frame: FrameType) -> _CodeInfo | None:
        namespace = frame.f_globals
        if code.co_filename in _TRACKING_FILES:
            if code.co_name in ("staged", "async_staged"):
                return _CodeInfo(wrapper="stage_obj")
            if code.co_name == "tracked" and "key" in (*code.co_freevars, *code.co_varnames):
                return _CodeInfo(wrapper="key")
            return None
        model = _tracked_model(code, frame)
        blocks = self._blocks(code, namespace) if self._may_open_stages(code, namespace) else ()
        if model is None and not blocks:
            return None
        return _CodeInfo(blocks=blocks, model=model)

    def _may_open_stages(self, code: CodeType, namespace: Mapping[str, Any]) -> bool:
        # `stage(...)`, `inferscope.stage(...)`, and names or attributes that say what they hold
        # (`step_stage`, `self.encoder_stage`); then module-level names bound to a stage.
        names = (*code.co_names, *code.co_varnames, *code.co_cellvars, *code.co_freevars)
        if any("stage" in name.lower() for name in names):
            return True
        return any(self._stage_name(namespace.get(name)) is not None for name in code.co_names)

    def _blocks(self, code: CodeType, namespace: Mapping[str, Any]) -> tuple[_Block, ...]:
        try:
            lines, start = inspect.getsourcelines(code)
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError, ValueError):
            return ()
        offset = max(start, 1) - 1
        top = tree.body[0] if tree.body else None
        if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return ()
        blocks = []
        for node in _own_nodes(top):
            if not isinstance(node, (ast.With, ast.AsyncWith)) or not node.body:
                continue
            items = tuple(
                item for item in (_stage_item(w.context_expr) for w in node.items) if item is not None
            )
            if items:
                last = node.end_lineno if node.end_lineno is not None else node.body[-1].lineno
                # From the `with` line on: a frame inside the body may report that line (the
                # interpreter gives it to the code that leaves the block, a `return` included).
                blocks.append(_Block(node.lineno + offset, last + offset, items))
        return tuple(blocks)

    def _finish(self, target: _Target) -> None:
        cpu = time.thread_time() - target.cpu_start
        level, samples = (0, target.stage_samples)
        attribution = "stage" if target.stage is not None else "inference"
        if target.stage is not None and target.stage_samples < MIN_STAGE_SAMPLES:
            if target.model_samples > target.stage_samples:
                level, samples, attribution = 1, target.model_samples, "model"
            elif not target.stage_samples:
                attribution = "none"
        ranked = sorted(target.inclusive.items(), key=lambda item: (-item[1][level], item[0]))
        top = [
            {
                "function": label,
                "samples": counts[level],
                "share": round(counts[level] / samples, 4),
                "self_share": round(target.own.get(label, [0, 0])[level] / samples, 4),
            }
            for label, counts in ranked[:TOP_FUNCTIONS]
            if counts[level] and samples
        ]
        ended = time.time()
        payload = {
            "attribution": attribution,
            "samples": samples,
            "stage_samples": target.stage_samples,
            "model_samples": target.model_samples,
            "seconds": round(ended - target.started_unix, 3),
            "sample_hz": self.sample_hz,
            "sampler_cpu_seconds": round(cpu, 6),
            "top": top,
            "python": sys.version.split()[0],
        }
        profile = SampledProfile(
            target.service,
            target.model,
            target.version,
            target.stage,
            target.metric,
            target.since,
            target.started_unix,
            ended,
            payload,
        )
        self.recent.append(profile)
        recorder = _recorder()
        if recorder is not None and recorder.save_profile(
            profile.service,
            profile.model,
            profile.version,
            profile.stage,
            profile.metric,
            profile.since,
            profile.started_unix,
            profile.ended_unix,
            dict(payload),
        ):
            self.stored += 1
        where = f"{target.model}/{target.stage}" if target.stage else target.model
        _logger.info(
            "inferscope: sampled the stacks of %s for %.0f s (%d samples, %s): %s",
            where,
            ended - target.started_unix,
            samples,
            attribution,
            ", ".join(f"{t['function']} {t['share']:.0%}" for t in top[:3]) or "nothing seen",
        )

    def _failed(self, message: str) -> None:
        self.errors += 1
        from .._selflog import report_error

        report_error(message)


def _own_nodes(function: ast.AST) -> Any:
    """The nodes of ``function``'s body, not those of the functions and classes defined in it."""
    todo = list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _stage_item(expr: ast.expr) -> str | tuple[str, ...] | None:
    """A literal stage name (``stage("x")``, ``inferscope.stage("x", device=...)``), the dotted name
    that holds a stage (``PRE``, ``self.encoder_stage``), or None."""
    if isinstance(expr, ast.Call):
        func = expr.func
        called = (
            func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        )
        if called == "stage" and expr.args:
            first = expr.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                return first.value
        return None
    dotted: list[str] = []
    while isinstance(expr, ast.Attribute):
        dotted.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name):
        return (expr.id, *reversed(dotted))
    return None


def _local(frame: FrameType, name: str) -> object:
    # A frame's locals are read only from the few frames that hold a stage or a key: our own
    # wrappers, and user code inside a `with <name>:` block.
    try:
        return frame.f_locals.get(name)
    except Exception:
        return None


def _resolve(frame: FrameType, dotted: tuple[str, ...]) -> object:
    code = frame.f_code
    base = dotted[0]
    if base in code.co_varnames or base in code.co_cellvars or base in code.co_freevars:
        value = _local(frame, base)
    else:
        value = frame.f_globals.get(base)
    for attribute in dotted[1:]:
        # getattr_static runs no property: reading a stack never runs user code.
        value = inspect.getattr_static(value, attribute, None)
    return value


def _model_of_key(key: object) -> str | None:
    from .._runtime import REGISTRY

    if not isinstance(key, int):
        return None
    try:
        info = REGISTRY.info(key)
    except (IndexError, KeyError):
        return None
    return info.model if info.kind == "inference" else None


def _tracked_model(code: CodeType, frame: FrameType) -> str | None:
    """The model of the tracked function whose code is ``code``, found in its module by its
    qualified name (on Python 3.10, which has none, by its name in the module or in the class of
    its ``self`` or ``cls``); None when it is not one (or cannot be found)."""
    qualname = getattr(code, "co_qualname", None)
    if qualname is None:
        candidates = [frame.f_globals.get(code.co_name)]
        if code.co_argcount and code.co_varnames[0] in ("self", "cls"):
            first = _local(frame, code.co_varnames[0])
            owner = first if isinstance(first, type) else type(first)
            candidates += [klass.__dict__.get(code.co_name) for klass in owner.__mro__]
    elif "<" in qualname:
        return None
    else:
        parts = qualname.split(".")
        value = frame.f_globals.get(parts[0])
        for part in parts[1:]:
            value = inspect.getattr_static(value, part, None)
        candidates = [value]
    for candidate in candidates:
        model = _model_of_tracked(candidate, code)
        if model is not None:
            return model
    return None


def _model_of_tracked(value: Any, code: CodeType) -> str | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if value is None or getattr(getattr(value, "__wrapped__", None), "__code__", None) is not code:
        return None
    try:
        key = value.inferscope_key
    except AttributeError:
        return None
    return _model_of_key(key)


def _recorder() -> Any:
    from ..windows import WINDOWS

    try:
        return WINDOWS.recorder()
    except Exception:
        return None


SAMPLER = StackSampler()
os.register_at_fork(after_in_child=SAMPLER.after_fork_in_child)
atexit.register(SAMPLER.stop, 200.0)


def regression_opened(service: str, regression: Regression) -> bool:
    """Sample the stacks of ``regression``'s stage for a short while, when the
    ``profile_on_regression`` setting is on (the detector calls it as a regression opens)."""
    from .._pipeline import current_settings

    settings = current_settings()
    if settings is None or not settings.enabled or not getattr(settings, "profile_on_regression", False):
        return False
    return SAMPLER.regression_opened(service, regression)
