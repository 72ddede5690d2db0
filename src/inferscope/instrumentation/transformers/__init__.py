"""transformers: pipeline calls and ``generate()`` become tracked inferences; a pipeline's steps
become stages, and ``generate()`` records the time to the first token and the time per token.

>>> from inferscope.instrumentation.transformers import TransformersInstrumentor
>>> TransformersInstrumentor().instrument(model_names={classifier: ("sentiment", "3")})  # doctest: +SKIP
>>> classifier("great movie")  # doctest: +SKIP  (one "sentiment" inference; stages "preprocess",
...                            # "infer", "postprocess")

What counts:

- A pipeline call (``pipe(inputs)``, any ``Pipeline`` subclass, yours included): one inference,
  with the pipeline's ``preprocess``, ``forward`` (which runs ``_forward``) and ``postprocess`` as
  the stages ``preprocess``, ``infer`` and ``postprocess``.
- A list input is one inference; its stages count once per item (``infer`` once per batch with
  ``batch_size``). A generator or a ``Dataset`` input makes the call return an iterator: the call
  itself records nothing, and each item that the iterator yields is one inference, timed inside
  the ``next()`` that produced it.
- ``generate()`` (``GenerationMixin.generate``) called from your code: one inference of the model,
  with a ``generate`` stage and, below it, ``first_token`` (from the start of ``generate()`` to
  the first new token: one record per call) and ``next_token`` (each later token: one record per
  token, of the time since the previous one).
- Inside an inference that is already open (your ``@track_inference``, another instrumented call,
  a pipeline running ``generate()``), a call is part of it and adds its stages under the open
  entry (``infer/generate/first_token``). What the model does inside is never a second inference:
  the torch instrumentor, when it is on too, sees an inference open and adds at most its own
  stages (``infer/bert`` with ``stage_depth=1``).

How it works, and why this way. Pipeline subclasses are many, live in modules that transformers
imports lazily, and override ``__call__`` (to parse their arguments, then call the base class's)
and the step methods. ``instrument()`` wraps ``Pipeline.__init__``, and the ``__call__``,
``preprocess``, ``forward`` and ``postprocess`` that each pipeline class defines itself: for every
subclass that exists then, and for any later one when its first instance is created. A call of a
pipeline that is already running (a subclass's ``__call__`` calling the base class's, or a step
calling an overridden one through ``super()``) passes through, so the outermost call is the
inference and each step one stage. A stream is the ``PipelineIterator`` that ``Pipeline.__call__``
returns; ``PipelineIterator.__next__`` is wrapped, and it records the iterators that a call
returned (held weakly), nothing else.

Tokens are timed by a ``StoppingCriteria`` added to the ones ``generate()`` gets (never to the
caller's list, which is copied): transformers calls every criterion once per decoding step, after
the step's tokens are appended, in greedy search, sampling, beam search and assisted decoding, and
the criterion sees the sequences, so it knows how many tokens a step added. It never stops
generation (it returns False). A streamer would see the tokens too, but transformers rejects one
with beam search, and a logits processor runs before the token is chosen. ``uninstrument()``
restores every replaced attribute, checked by identity.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from ..._backend import monotonic_ns, thread_cpu_ns
from ..._records import COUNTER_THREAD_CPU, CPU_NOT_MEASURED
from ..._runtime import REGISTRY, RUNTIME
from .. import (
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentationState,
    InstrumentOptions,
    ModelEntry,
    ModelIdentity,
    Patches,
    TrackedModel,
    class_aliases,
    declared_version,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = [
    "FIRST_TOKEN_STAGE",
    "GENERATE_STAGE",
    "NEXT_TOKEN_STAGE",
    "PIPELINE_STAGES",
    "TransformersInstrumentor",
    "model_identity",
]


#: Pipeline methods -> the stage each call of one becomes (DESIGN's stage names).
PIPELINE_STAGES = {"preprocess": "preprocess", "forward": "infer", "postprocess": "postprocess"}
#: The stage around a ``generate()`` call, and the two below it.
GENERATE_STAGE = "generate"
FIRST_TOKEN_STAGE = "first_token"
NEXT_TOKEN_STAGE = "next_token"

_FAILURE = "inferscope: transformers instrumentation failed; the call is not recorded"


class _Scope:
    """The pipeline whose call is running in this context: its step methods are its stages.
    ``busy`` is set while one of them runs, so that a step calling another (an override calling
    ``super().preprocess``) is one stage. One per call (per stream), so threads never share one."""

    __slots__ = ("busy", "pipeline")

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.busy = False


#: While ``generate()`` runs: a generate called inside it (an assistant model's) passes through.
_IN_GENERATE = _Scope(None)

#: The innermost instrumented pipeline call (or ``generate()``) of this context; None: none.
_SCOPE: ContextVar[_Scope | None] = ContextVar("inferscope_transformers_scope", default=None)


class _Stream:
    """An iterator that a pipeline call returned: each item is an inference of ``model``."""

    __slots__ = ("model", "scope")

    def __init__(self, model: TrackedModel, scope: _Scope) -> None:
        self.model = model
        self.scope = scope


def _short_name(name_or_path: str) -> str:
    """A model's default name from its ``name_or_path``: a Hub id as it is (``org/model``), a local
    directory by its last component (``/srv/models/sentiment-3`` -> ``sentiment-3``)."""
    stripped = name_or_path.rstrip("/" + os.sep)
    if stripped and (os.path.isabs(stripped) or stripped.startswith(".") or os.path.isdir(stripped)):
        return os.path.basename(stripped) or stripped
    return stripped or name_or_path


def model_identity(model: Any) -> tuple[ModelIdentity, tuple[str, ...]]:
    """The default identity of a transformers model and the aliases it is known by.

    The name: the ``name_or_path`` it was loaded from (``config._name_or_path``; a local directory
    by its last component), else its class name. The version: its ``inferscope_version`` attribute,
    else the Hub commit its files came from when transformers recorded one (``config._commit_hash``,
    first 12 hex digits; transformers 5 no longer keeps it), else none. Aliases: the
    ``name_or_path`` as given, the name, the class name and ``module.QualifiedName``.
    """
    cls = type(model)
    config = getattr(model, "config", None)
    name_or_path = getattr(config, "_name_or_path", None)
    aliases: list[str] = []
    name = cls.__name__
    if isinstance(name_or_path, str) and name_or_path:
        name = _short_name(name_or_path)
        aliases.append(name_or_path)
        if name != name_or_path:
            aliases.append(name)
    aliases.extend(class_aliases(cls))
    version = declared_version(model, name)
    if version is None:
        commit = getattr(config, "_commit_hash", None)
        if isinstance(commit, str) and commit:
            version = commit[:12]
    return ModelIdentity(name, version), tuple(dict.fromkeys(aliases))


def _pipeline_aliases(pipeline: Any) -> tuple[str, ...]:
    task = getattr(pipeline, "task", None)
    aliases = class_aliases(type(pipeline))
    return (task, *aliases) if isinstance(task, str) and task else aliases


class _State(InstrumentationState):
    """Shared by every wrapper of one ``instrument()``; inactive once uninstrumented. ``cache``
    holds models (for ``generate()``), ``pipelines`` pipelines, ``streams`` the iterators that
    pipeline calls returned."""

    def __init__(
        self,
        options: InstrumentOptions,
        patches: Patches,
        pipeline_class: type,
        iterator_class: type,
        criteria_list_class: type,
        token_timer_class: type,
    ) -> None:
        super().__init__(options)
        self.patches = patches
        self.pipeline_class = pipeline_class
        self.iterator_class = iterator_class
        self.criteria_list_class = criteria_list_class
        self.token_timer_class = token_timer_class
        self.pipelines: IdentityCache[ModelEntry] = IdentityCache()
        self.streams: IdentityCache[_Stream] = IdentityCache()
        #: Guards class patching (a pipeline's first instance may be created in any thread) against
        #: itself and against ``uninstrument()``.
        self.lock = threading.Lock()
        self.seen: set[type] = set()
        self.generate_stage = RUNTIME.stage(GENERATE_STAGE)
        #: (parent key, stage name) -> stage key, for records made without a Stage object.
        self._stage_keys: dict[tuple[int, str], int] = {}

    # --- identity ---------------------------------------------------------------------------------

    def model(self, model: Any) -> TrackedModel | None:
        return self.cached_model(model, self._resolve_model)

    def pipeline_model(self, pipeline: Any) -> TrackedModel | None:
        found = self.pipelines.get(pipeline)
        if found is None:
            found = self._resolve_pipeline(pipeline)
            self.pipelines.put(pipeline, found)
        return found.model

    def _resolve_model(self, model: Any) -> tuple[ModelEntry, bool]:
        options = self.options
        default, aliases = model_identity(model)
        if not options.selects(model, aliases):
            return ModelEntry(None), True
        identity = _with_version(options.identity(model, default, aliases), default)
        return ModelEntry(TrackedModel(identity, options.attributes)), True

    def _resolve_pipeline(self, pipeline: Any) -> ModelEntry:
        """A pipeline is known by its own entries first (object, callable, task or class name), then
        by its model's; ``models=`` selects it when it lists the pipeline or its model."""
        options = self.options
        aliases = _pipeline_aliases(pipeline)
        model = getattr(pipeline, "model", None)
        if model is None:
            default = ModelIdentity(aliases[0])
            selected = options.selects(pipeline, aliases)
            identity = options.identity(pipeline, default, aliases) if selected else default
        else:
            default, model_aliases = model_identity(model)
            selected = options.selects(pipeline, aliases) or options.selects(model, model_aliases)

            def by_model() -> ModelIdentity:
                return options.identity(model, default, model_aliases)

            identity = options.identity(pipeline, by_model, aliases) if selected else default
        if not selected:
            return ModelEntry(None)
        return ModelEntry(TrackedModel(_with_version(identity, default), options.attributes))

    def stage_key(self, name: str) -> int:
        """The key of stage ``name`` under the innermost open entry of this context."""
        parent = RUNTIME.current_key()
        key = self._stage_keys.get((parent, name))
        if key is None:
            key = self._stage_keys[(parent, name)] = REGISTRY.stage_key(parent, name)
        return key

    # --- patching ---------------------------------------------------------------------------------

    def patch_existing_pipelines(self) -> None:
        stack: list[type] = [self.pipeline_class]
        found: set[type] = set()
        while stack:
            cls = stack.pop()
            if cls not in found:
                found.add(cls)
                stack.extend(type.__subclasses__(cls))
        for cls in found:
            self.patch_class(cls)

    def patch_class(self, cls: type) -> None:
        """Wrap the pipeline methods that ``cls`` and its pipeline bases define themselves."""
        with self.lock:
            if not self.active:
                return
            for klass in cls.__mro__:
                if klass in self.seen or not issubclass(klass, self.pipeline_class):
                    continue
                self.seen.add(klass)
                own = klass.__dict__
                call = own.get("__call__")
                if isinstance(call, types.FunctionType):
                    self.patches.replace(klass, "__call__", _pipeline_call(self, call))
                for name, stage_name in PIPELINE_STAGES.items():
                    method = own.get(name)
                    if isinstance(method, types.FunctionType):
                        self.patches.replace(klass, name, _step_method(self, stage_name, method))

    # --- pipeline calls ---------------------------------------------------------------------------

    def call(self, original: Any, pipeline: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A pipeline called while it is not running in this context.

        The decision is made inside ``try`` and the call outside it: an exception of the pipeline
        itself must pass through once, untouched, never be taken for our own failure. Whether the
        call is an inference is only known from what it returns (an iterator is not: its items
        are), so the entry is opened by hand and closed unrecorded when the call returned a stream.
        """
        model: TrackedModel | None = None
        nested = False
        try:
            model = self.pipeline_model(pipeline)
            nested = model is not None and inference_open()
        except Exception:
            report_internal_error(_FAILURE)
            model = None
        if model is None:
            return original(pipeline, *args, **kwargs)
        scope = _Scope(pipeline)
        token = _SCOPE.set(scope)
        if nested:
            try:
                result = original(pipeline, *args, **kwargs)
            finally:
                _SCOPE.reset(token)
            self._register_stream(result, model, scope)
            return result
        RUNTIME.enter(scope, model.key)
        try:
            result = original(pipeline, *args, **kwargs)
        except BaseException as exc:
            RUNTIME.exit(scope, type(exc))
            raise
        finally:
            _SCOPE.reset(token)
        if self._register_stream(result, model, scope):
            RUNTIME.exit_segment(scope)  # the items are the inferences, not this call
        else:
            RUNTIME.exit(scope, None)
        return result

    def _register_stream(self, result: Any, model: TrackedModel, scope: _Scope) -> bool:
        try:
            if isinstance(result, self.iterator_class):
                self.streams.put(result, _Stream(model, scope))
                return True
        except Exception:
            report_internal_error(_FAILURE)
        return False

    def next_item(self, original: Any, iterator: Any, stream: _Stream) -> Any:
        """The next item of a stream: one inference, unless one is open (then part of it)."""
        scope = stream.scope
        try:
            nested = inference_open()
            key = stream.model.key
        except Exception:
            report_internal_error(_FAILURE)
            return original(iterator)
        token = _SCOPE.set(scope)
        if nested:
            try:
                return original(iterator)
            finally:
                _SCOPE.reset(token)
        RUNTIME.enter(scope, key)
        try:
            item = original(iterator)
        except StopIteration:
            RUNTIME.exit_segment(scope)  # the end of the stream is not an item
            raise
        except BaseException as exc:
            RUNTIME.exit(scope, type(exc))
            raise
        finally:
            _SCOPE.reset(token)
        RUNTIME.exit(scope, None)
        return item

    # --- generate() -------------------------------------------------------------------------------

    def with_token_timer(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``generate()``'s arguments with a token timer added to its stopping criteria (a new
        list: the caller's is never changed). Continuous batching (``cache_implementation="paged"``)
        rejects stopping criteria: there the arguments are left as they are."""
        if kwargs.get("cache_implementation") == "paged":
            return args, kwargs
        positional = len(args) > 3  # generate(inputs, generation_config, logits_processor, stopping_criteria)
        given = args[3] if positional else kwargs.get("stopping_criteria")
        if given is not None and not isinstance(given, (list, tuple)):
            return args, kwargs  # not a list of criteria: transformers reports it, not us
        timer = self.token_timer_class(
            self.stage_key(FIRST_TOKEN_STAGE),
            self.stage_key(NEXT_TOKEN_STAGE),
            bool(RUNTIME.counters & COUNTER_THREAD_CPU),
        )
        criteria = self.criteria_list_class([*(given or ()), timer])
        if positional:
            return (*args[:3], criteria, *args[4:]), kwargs
        return args, {**kwargs, "stopping_criteria": criteria}


def _with_version(identity: ModelIdentity, default: ModelIdentity) -> ModelIdentity:
    """``identity``, with the default version when the chosen name comes without one."""
    if identity.version is None and default.version is not None:
        return ModelIdentity(identity.name, default.version)
    return identity


def _pipeline_call(state: _State, original: Any) -> Any:
    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active:
            scope = _SCOPE.get()
            if scope is None or scope.pipeline is not self:
                return state.call(original, self, args, kwargs)
        return original(self, *args, **kwargs)

    __call__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __call__


def _step_method(state: _State, stage_name: str, original: Any) -> Any:
    """A pipeline step that is a stage while its pipeline's call runs in this context. The model's
    forward pass of a pipeline on CUDA also measures its device time (``stage(device=...)``)."""
    stage = RUNTIME.stage(stage_name)
    on_device = stage_name == PIPELINE_STAGES["forward"]

    if inspect.isgeneratorfunction(original):
        # A ChunkPipeline's preprocess yields one chunk per forward: each chunk is a stage.
        @functools.wraps(original)
        def chunks(self: Any, *args: Any, **kwargs: Any) -> Any:
            if state.active:
                scope = _SCOPE.get()
                if scope is not None and scope.pipeline is self and not scope.busy:
                    return _staged_chunks(state, scope, stage_name, original(self, *args, **kwargs))
            return original(self, *args, **kwargs)

        chunks.__inferscope_original__ = original  # type: ignore[attr-defined]
        return chunks

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active:
            scope = _SCOPE.get()
            if scope is not None and scope.pipeline is self and not scope.busy:
                scope.busy = True
                current = stage
                if on_device:
                    device = getattr(self, "device", None)
                    if getattr(device, "type", None) == "cuda":
                        current = RUNTIME.stage(stage_name, device=device)
                try:
                    with current:
                        return original(self, *args, **kwargs)
                finally:
                    scope.busy = False
        return original(self, *args, **kwargs)

    step.__inferscope_original__ = original  # type: ignore[attr-defined]
    return step


def _staged_chunks(state: _State, scope: _Scope, stage_name: str, chunks: Iterator[Any]) -> Iterator[Any]:
    """``chunks`` with each resumption that yields one a stage record of its own. The resumption
    that finds the generator exhausted is not recorded: it is no chunk."""
    try:
        while True:
            key = state.stage_key(stage_name)
            RUNTIME.enter(chunks, key)
            scope.busy = True
            try:
                chunk = next(chunks)
            except StopIteration:
                RUNTIME.exit_segment(chunks)
                return
            except BaseException as exc:
                RUNTIME.exit(chunks, type(exc))
                raise
            finally:
                scope.busy = False
            RUNTIME.exit(chunks, None)
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _iterator_next(state: _State, original: Any) -> Any:
    streams = state.streams

    @functools.wraps(original)
    def __next__(self: Any) -> Any:
        if state.active:
            stream = streams.get(self)
            if stream is not None:
                return state.next_item(original, self, stream)
        return original(self)

    __next__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __next__


def _generate(state: _State, original: Any) -> Any:
    stage = state.generate_stage

    def run(model: Any, *args: Any, **kwargs: Any) -> Any:
        """One ``generate()`` inside its stage, with the token timer; nothing generated inside it
        (an assistant model's drafts) is recorded apart."""
        token = _SCOPE.set(_IN_GENERATE)
        try:
            with stage:
                try:
                    args, kwargs = state.with_token_timer(args, kwargs)
                except Exception:
                    report_internal_error("inferscope: transformers could not time the tokens of generate()")
                return original(model, *args, **kwargs)
        finally:
            _SCOPE.reset(token)

    @functools.wraps(original)
    def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active:
            call: Callable[..., Any] | None = None
            try:
                scope = _SCOPE.get()
                if scope is not _IN_GENERATE:
                    if inference_open():
                        # Inside a pipeline's call it is that pipeline's model; otherwise it must
                        # be one of ``models=``.
                        if scope is not None or state.model(self) is not None:
                            call = run
                    else:
                        tracked = state.model(self)
                        if tracked is not None:
                            call = tracked.tracked(run)
            except Exception:
                report_internal_error(_FAILURE)
                call = None
            if call is not None:
                return call(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    generate.__inferscope_original__ = original  # type: ignore[attr-defined]
    return generate


def _pipeline_init(state: _State, original: Any) -> Any:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        if state.active and cls not in state.seen:
            try:
                state.patch_class(cls)  # a pipeline class defined (or imported) after instrument()
            except Exception:
                report_internal_error(
                    f"inferscope: could not instrument the pipeline class {cls.__qualname__}"
                )
        original(self, *args, **kwargs)

    __init__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __init__


def _token_timer_class(base: type) -> type:
    """The stopping criterion that times tokens, subclassing transformers' ``StoppingCriteria``."""

    class TokenTimer(base):  # type: ignore[valid-type,misc]
        """Records ``first_token`` at its first call and ``next_token`` at each later one; never
        stops generation. Called on the thread that runs ``generate()``, so the thread CPU clock
        deltas are that thread's work."""

        def __init__(self, first_key: int, next_key: int, measure_cpu: bool) -> None:
            self.first_key = first_key
            self.next_key = next_key
            self.measure_cpu = measure_cpu
            self.length = -1  # the sequences' length at the previous call; -1 before the first
            self.cpu_ns = thread_cpu_ns() if measure_cpu else CPU_NOT_MEASURED
            self.last_ns = monotonic_ns()

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            try:
                now_ns = monotonic_ns()
                cpu_now = thread_cpu_ns() if self.measure_cpu else CPU_NOT_MEASURED
                cpu_ns = cpu_now - self.cpu_ns if self.measure_cpu else CPU_NOT_MEASURED
                length = int(input_ids.shape[-1])
                last_ns = self.last_ns
                if self.length < 0:
                    RUNTIME.record(self.first_key, None, 0, last_ns, now_ns - last_ns, cpu_ns)
                else:
                    # Assisted decoding may accept several tokens in one step: each gets its share.
                    added = max(length - self.length, 1)
                    wall_ns = (now_ns - last_ns) // added
                    if self.measure_cpu:
                        cpu_ns //= added
                    for index in range(added):
                        RUNTIME.record(self.next_key, None, 0, last_ns + index * wall_ns, wall_ns, cpu_ns)
                self.length = length
                self.last_ns = now_ns
                self.cpu_ns = cpu_now
            except Exception:
                report_internal_error("inferscope: transformers could not time a token of generate()")
            return False

    TokenTimer.__qualname__ = TokenTimer.__name__ = "InferscopeTokenTimer"
    TokenTimer.__module__ = __name__
    return TokenTimer


class TransformersInstrumentor(InferscopeInstrumentor):
    """Instruments transformers pipelines and ``generate()``.

    Options of ``instrument()``, all optional:

    - ``models``: pipelines or models (by identity), or aliases (a task such as
      ``"text-classification"``, a pipeline or model class name, a model's ``name_or_path``);
      default: all. A pipeline is selected when it or its model is.
    - ``model_names``: ``{pipeline, model or alias: name or (name, version)}`` or a callable
      ``f(obj) -> name | (name, version) | None``. A pipeline is looked up first by itself (object,
      callable, task and class-name aliases), then by its model. Default name: the model's
      ``name_or_path``, else its class name; the version: the model's ``inferscope_version``
      attribute, else none.
    - ``attributes``: static attributes on every series of these models.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any
    _module = "transformers"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.utils import GenerationMixin
        from transformers.pipelines.base import Pipeline
        from transformers.pipelines.pt_utils import PipelineIterator

        state = _State(
            options,
            patches,
            Pipeline,
            PipelineIterator,
            StoppingCriteriaList,
            _token_timer_class(StoppingCriteria),
        )
        patches.replace(Pipeline, "__init__", _pipeline_init(state, Pipeline.__dict__["__init__"]))
        state.patch_existing_pipelines()
        patches.replace(
            PipelineIterator, "__next__", _iterator_next(state, PipelineIterator.__dict__["__next__"])
        )
        patches.replace(GenerationMixin, "generate", _generate(state, GenerationMixin.__dict__["generate"]))
        return state

    def _uninstrument(self, **kwargs: Any) -> None:
        # Under the state's lock: a pipeline class being patched in another thread right now is
        # either patched before the restore (and restored) or sees the state inactive.
        state = self._state
        with state.lock if isinstance(state, _State) else contextlib.nullcontext():
            super()._uninstrument(**kwargs)
