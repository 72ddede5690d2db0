"""``track_inference``, ``stage`` and ``bind``: what serving code writes.

Sync callables get the backend's tracked-call type (in C: vectorcall, clocks read in C). Coroutine
functions, generators and async generators get a Python wrapper that still pushes through the ring.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, overload

from ._backend import monotonic_ns
from ._contract import RuntimeContract
from ._keys import ERROR_TYPE, MODEL_NAME, MODEL_VERSION, OVERFLOW_ATTRIBUTE, STAGE_NAME
from ._records import FLAG_ABANDONED
from ._runtime import REGISTRY, RUNTIME
from .counters.cuda import DEVICE_TIMER, device_stage_factory
from .windows import WINDOWS, check_size

__all__ = ["bind", "stage", "track_inference"]

F = TypeVar("F", bound=Callable[..., Any])

_RESERVED_ATTRIBUTES = {MODEL_NAME, MODEL_VERSION, STAGE_NAME, ERROR_TYPE, OVERFLOW_ATTRIBUTE}

#: ``stage(name)`` returns the shared Stage object for ``name``: a context manager and a decorator.
#: ``stage(name, device="cuda")`` also measures the device time of the work the stage queues on
#: CUDA (see ``counters/cuda.py``); ``device="cpu"`` is the plain stage.
#:
#: >>> with stage("preprocess"):
#: ...     pass
stage = RUNTIME.stage


@overload
def track_inference(func: F, /) -> F: ...
@overload
def track_inference(
    model: str | None = None,
    /,
    *,
    version: str | int | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    size: Callable[..., float] | None = None,
) -> Callable[[F], F]: ...
@overload
def track_inference(
    *,
    model: str | None = None,
    version: str | int | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    size: Callable[..., float] | None = None,
) -> Callable[[F], F]: ...


def track_inference(
    func: Any = None,
    /,
    *,
    model: str | None = None,
    version: str | int | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    size: Callable[..., float] | None = None,
) -> Any:
    """Track every call of a model: latency, CPU time, errors, and the stages inside it.

    Works bare or with arguments, on functions, methods, staticmethods, classmethods,
    ``async def`` functions, generators and async generators::

        @inferscope.track_inference(model="fraud", version="3")
        def predict(batch):
            with inferscope.stage("preprocess"):
                x = featurize(batch)
            with inferscope.stage("infer"):
                return clf.predict(x)

    ``model`` defaults to the function's qualified name. ``attributes`` are static: never put
    request data or user ids in them. The caller's exceptions pass through unchanged and are
    counted with ``error.type``.

    ``size`` takes the call's arguments (``self`` too, for a method) and returns its input size:
    items in the batch, tokens, bytes. Sizes are summed per window (``KeyWindow.size_sum``), so
    that cost per item tells more data from more work. A size known only inside the call is given
    with ``inferscope.set_input_size(n)``. A size function that raises is counted, never raised::

        @inferscope.track_inference(model="fraud", size=lambda batch: len(batch))
        def predict(batch): ...
    """
    if isinstance(func, str):
        if model is not None:
            raise TypeError("track_inference() got the model name twice (positionally and as model=)")
        model, func = func, None
    model = _check_model(model)
    version_text = _check_version(version)
    attrs = _check_attributes(attributes)
    if size is not None and not callable(size):
        raise TypeError(f"track_inference(size=...) must be a callable of the call's arguments, got {size!r}")
    if func is None:
        return lambda f: _wrap(f, model, version_text, attrs, size)
    return _wrap(func, model, version_text, attrs, size)


def _check_model(model: object) -> str | None:
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise TypeError(f"track_inference(model=...) must be a non-empty str, got {model!r}")
    return model


def _check_version(version: object) -> str | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, (str, int)) or version == "":
        raise TypeError(f"track_inference(version=...) must be a non-empty str or an int, got {version!r}")
    return str(version)


def _check_attributes(attributes: object) -> dict[str, str]:
    if attributes is None:
        return {}
    if not isinstance(attributes, Mapping):
        raise TypeError(f"track_inference(attributes=...) must map str to scalars, got {attributes!r}")
    checked: dict[str, str] = {}
    for key, value in attributes.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"attribute names must be non-empty str, got {key!r}")
        if key in _RESERVED_ATTRIBUTES:
            raise ValueError(f"attribute {key!r} is set by inferscope itself; choose another name")
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"attribute {key!r} must be a str, int, float or bool, got {value!r}")
        checked[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return checked


def _wrap(
    func: Any,
    model: str | None,
    version: str | None,
    attributes: dict[str, str],
    size: Callable[..., float] | None = None,
) -> Any:
    if isinstance(func, staticmethod):
        return staticmethod(_wrap(func.__func__, model, version, attributes, size))
    if isinstance(func, classmethod):
        return classmethod(_wrap(func.__func__, model, version, attributes, size))
    if isinstance(func, type):
        # Wrapping the class itself would replace it with a function: isinstance() and
        # subclassing would break for every user of the class.
        raise TypeError(
            f"track_inference() decorates functions and methods, not the class {func.__qualname__}: "
            f"decorate the method that runs the model instead (e.g. {func.__qualname__}.predict "
            "or __call__)"
        )
    if not callable(func):
        raise TypeError(f"track_inference() decorates a callable, got {func!r}")
    name = (
        model
        or getattr(func, "__qualname__", None)
        or getattr(func, "__name__", None)
        or type(func).__qualname__
    )
    key = REGISTRY.inference_key(name, version, attributes)
    if inspect.isasyncgenfunction(func):
        wrapper = _track_async_generator(func, key)
    elif inspect.isgeneratorfunction(func):
        wrapper = _track_generator(func, key)
    elif inspect.iscoroutinefunction(func):
        wrapper = _track_coroutine(func, key)
    else:
        wrapper = RUNTIME.track(func, key)
    if size is not None:
        wrapper = _sized(wrapper, func, key, size)
    # A callable object without a writable __dict__ is tracked all the same.
    with contextlib.suppress(AttributeError):
        functools.update_wrapper(wrapper, func)
    if getattr(wrapper, "inferscope_key", None) != key:
        # The generator, coroutine and size= wrappers are plain functions: they carry the key too,
        # so that `inferscope profile` and the stack sampler know them as tracked, and their model.
        with contextlib.suppress(AttributeError):
            wrapper.inferscope_key = key  # type: ignore[attr-defined]
    return wrapper


def _sized(tracked: Any, func: Any, key: int, size: Callable[..., float]) -> Any:
    """``tracked`` that first adds ``size(*args, **kwargs)`` to the inference's input size. Only
    models tracked with ``size=`` pay for it; the others keep the bare tracked call."""
    if inspect.iscoroutinefunction(func):

        async def sized_coroutine(*args: Any, **kwargs: Any) -> Any:
            _add_size(key, size, args, kwargs)
            return await tracked(*args, **kwargs)

        return sized_coroutine

    def sized(*args: Any, **kwargs: Any) -> Any:
        _add_size(key, size, args, kwargs)
        return tracked(*args, **kwargs)

    return sized


def _add_size(key: int, size: Callable[..., float], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not RUNTIME.enabled:
        return
    try:
        WINDOWS.sizes.add(key, check_size(size(*args, **kwargs)))
    except Exception:
        WINDOWS.size_failed()


def _track_coroutine(
    func: Callable[..., Any], key: int, runtime: RuntimeContract = RUNTIME
) -> Callable[..., Any]:
    enter, exit_ = runtime.enter, runtime.exit

    async def tracked(*args: Any, **kwargs: Any) -> Any:
        # The entry lives in the frame of the awaiting task, so it spans every await of this call.
        enter(tracked, key)
        try:
            result = await func(*args, **kwargs)
        except BaseException as exc:
            exit_(tracked, type(exc))
            raise
        exit_(tracked, None)
        return result

    return tracked


class _Segments:
    """Accumulates the resumptions of a generator: wall time from the first resume to the end,
    CPU time only while the generator body ran (not while the consumer did)."""

    __slots__ = ("cpu_ns", "start_ns", "stash", "trace")

    def __init__(self) -> None:
        self.start_ns: int | None = None
        self.cpu_ns = 0
        #: The stages the generator was inside when it yielded; reopened when it resumes.
        self.stash: Any = None
        #: The generator's span while tracing is on: one span from the first resume to the end.
        self.trace: Any = None

    def add(self, segment: tuple[int, int, int, Any, Any] | None) -> None:
        if segment is None:
            self.stash = None
            return
        start_ns, _wall_ns, cpu_ns, self.stash, trace = segment
        if self.start_ns is None:
            self.start_ns = start_ns
            self.trace = trace
        if cpu_ns < 0 or self.cpu_ns < 0:
            self.cpu_ns = -1
        else:
            self.cpu_ns += cpu_ns

    def record(
        self, runtime: RuntimeContract, key: int, exc_type: type[BaseException] | None, flags: int
    ) -> None:
        if self.start_ns is not None:
            wall_ns = monotonic_ns() - self.start_ns
            runtime.record(key, exc_type, flags, self.start_ns, wall_ns, self.cpu_ns, self.trace)


def _track_generator(
    func: Callable[..., Any], key: int, runtime: RuntimeContract = RUNTIME
) -> Callable[..., Any]:
    enter, exit_segment = runtime.enter, runtime.exit_segment

    def tracked(*args: Any, **kwargs: Any) -> Any:
        gen = func(*args, **kwargs)
        segments = _Segments()
        exc_type: type[BaseException] | None = None
        flags = 0
        to_send: Any = None
        to_throw: BaseException | None = None
        try:
            while True:
                # Each resumption is an entry of its own, so stages inside the body nest under this
                # inference and the consumer's own stages between items do not.
                enter(tracked, key, segments.stash, segments.trace)
                try:
                    if to_throw is not None:
                        item, to_throw = gen.throw(to_throw), None
                    else:
                        item = gen.send(to_send)
                except StopIteration as stop:
                    return stop.value
                except BaseException as exc:
                    exc_type = type(exc)
                    raise
                finally:
                    segments.add(exit_segment(tracked))
                try:
                    to_send = yield item
                except GeneratorExit:
                    flags = FLAG_ABANDONED
                    # The body closes inside its entry, with the stages it yielded inside
                    # reopened, so that they are recorded (as abandoned) instead of lost.
                    enter(tracked, key, segments.stash, segments.trace)
                    try:
                        gen.close()
                    finally:
                        segments.add(exit_segment(tracked))
                    raise
                except BaseException as exc:
                    to_throw, to_send = exc, None
        finally:
            segments.record(runtime, key, exc_type, flags)

    return tracked


def _track_async_generator(
    func: Callable[..., Any], key: int, runtime: RuntimeContract = RUNTIME
) -> Callable[..., Any]:
    enter, exit_segment = runtime.enter, runtime.exit_segment

    async def tracked(*args: Any, **kwargs: Any) -> Any:
        agen = func(*args, **kwargs)
        segments = _Segments()
        exc_type: type[BaseException] | None = None
        flags = 0
        to_send: Any = None
        to_throw: BaseException | None = None
        try:
            while True:
                enter(tracked, key, segments.stash, segments.trace)
                try:
                    if to_throw is not None:
                        item, to_throw = await agen.athrow(to_throw), None
                    else:
                        item = await agen.asend(to_send)
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    exc_type = type(exc)
                    raise
                finally:
                    segments.add(exit_segment(tracked))
                try:
                    to_send = yield item
                except GeneratorExit:
                    flags = FLAG_ABANDONED
                    enter(tracked, key, segments.stash, segments.trace)
                    try:
                        await agen.aclose()
                    finally:
                        segments.add(exit_segment(tracked))
                    raise
                except BaseException as exc:
                    to_throw, to_send = exc, None
        finally:
            segments.record(runtime, key, exc_type, flags)

    return tracked


def _decorate_stage(stage_obj: Any, func: Any = None, *extra: Any, **kwargs: Any) -> Any:
    """``@stage("x")``: run every call of ``func`` inside the stage."""
    if extra or kwargs or func is None:
        raise TypeError(
            f'@stage("{stage_obj.name}") decorates one function: use it as @stage("{stage_obj.name}")'
        )
    if not callable(func):
        raise TypeError(f'@stage("{stage_obj.name}") decorates a callable, got {func!r}')
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f'@stage("{stage_obj.name}") cannot decorate the generator function {func.__qualname__}: '
            f'write `with inferscope.stage("{stage_obj.name}"):` inside it instead'
        )
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def async_staged(*args: Any, **kw: Any) -> Any:
            with stage_obj:
                return await func(*args, **kw)

        return async_staged

    @functools.wraps(func)
    def staged(*args: Any, **kw: Any) -> Any:
        with stage_obj:
            return func(*args, **kw)

    return staged


RUNTIME.decorate = _decorate_stage
RUNTIME.device_stage = device_stage_factory(DEVICE_TIMER, RUNTIME)


def bind(func: F) -> F:
    """Carry the current inference and stage into another thread.

    Threads do not inherit context variables, so work submitted to a pool would otherwise be
    recorded outside any inference. ``bind`` captures the context now (including the current
    OpenTelemetry context) and runs ``func`` in a copy of it on every call::

        with inferscope.stage("infer"):
            futures = [pool.submit(inferscope.bind(score), shard) for shard in shards]
    """
    return _bind(RUNTIME, func)


def _bind(runtime: RuntimeContract, func: F) -> F:
    root = runtime.current_key()
    trace = runtime.current_trace()
    captured = contextvars.copy_context()

    def run_in_frame(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        runtime.use_frame(root, trace)
        return func(*args, **kwargs)

    @functools.wraps(func)
    def bound(*args: Any, **kwargs: Any) -> Any:
        # One copy per call: a Context can be entered by one thread at a time.
        return captured.copy().run(run_in_frame, args, kwargs)

    return bound  # type: ignore[return-value]
