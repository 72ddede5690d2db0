"""torch: calls of top-level ``nn.Module``s become tracked inferences, and their submodules (to a
chosen depth) become stages.

>>> from inferscope.instrumentation.torch import TorchInstrumentor
>>> TorchInstrumentor().instrument(model_names={model: ("fraud-mlp", "3")}, stage_depth=1)  # doctest: +SKIP
>>> with torch.no_grad():  # doctest: +SKIP
...     model(x)  # one "fraud-mlp" inference; stages "layers.0", "layers.1", "head"

What counts:

- A call of a module (``module(x)``, not ``module.forward(x)``) made while no other module call
  of a model is running in this context: one inference. With ``models=``, only the chosen modules
  are models, and one of them counts when it is called outside another chosen module (inside an
  unchosen wrapper, say); otherwise every module called from outside another module is a model.
- Not while training: a call is an inference when ``not torch.is_grad_enabled() or not
  module.training`` (under ``torch.no_grad()`` or ``torch.inference_mode()``, or after
  ``model.eval()``). A training call (grad enabled and the module in training mode) passes through
  unrecorded, with everything inside it, unless ``track_training=True``.
- Not while torch traces the module: ``torch.compile`` and ``torch.export`` (including the
  non-strict export behind ``torch.onnx.export``), ``torch.jit.trace`` and ``torch.fx`` symbolic
  tracing pass straight through.
- ``stage_depth=n``: the submodules that a module's ``forward`` calls become stages, named after the
  module path of the submodule relative to the caller (``named_modules()`` names, so containers
  are part of the name: ``layers.0``, ``head``), nested to ``n`` levels (``layers.0/attn``).
- Inside an inference that is already open (your ``@track_inference``, or another instrumented
  framework call), a module call is not a second inference; with ``stage_depth`` its submodules
  become stages under the open entry (``infer/layers.0``).

How it works, and why this way: ``instrument()`` replaces ``torch.nn.Module.__call__`` (torch's
``_wrapped_call_impl``) by a wrapper that every module call goes through, and ``uninstrument()``
puts the original function back (checked by identity). torch's global forward hooks
(``register_module_forward_pre_hook`` / ``register_module_forward_hook``) would be removable too,
but they were not chosen: they move every module call onto ``_call_impl``'s slow path, do not run
when ``forward`` raises ``BaseException`` (``always_call`` covers ``Exception`` only) and never see
the exception's type, pair a pre-hook with its post-hook only through a stack of our own, and make
``torch.compile(module)`` warn and fire them twice. The wrapper gives a ``try``/``finally`` exit
path around the original, so an entry is closed once on every path, with the exception's type,
and the exception passes through unchanged. Its first test is
``torch.compiler.is_dynamo_compiling()``, which TorchDynamo folds to ``True``, so compiled graphs
contain the original call only, with no guard of ours.

Per module call the wrapper costs a function call, that test, a context-variable read and an
attribute read. Where it only passes a call through, it runs the body of torch's own
``_wrapped_call_impl`` itself instead of calling it (when ``Module.__call__`` was that function), so
a submodule call costs about 0.1 µs more than without instrumentation (CPython 3.11, CPU time; a
Python wrapper that does nothing costs about 0.17 µs, torch's global hooks about 1.2 µs even when
they do nothing). An outermost call adds one identity-cache lookup (the model, its stage tree and
its device probe are resolved once per module object and held weakly), the inference and tracing
tests, a context-variable set and reset, and what ``@track_inference`` costs: about 1.1 µs in all
with ``counters="minimal"``. A stage adds a context-variable set and reset and what
``inferscope.stage`` costs: about 0.7 µs with ``counters="minimal"``. The scope is set once per
stage rather than kept on a mutable stack per inference: a context copied into worker threads
(``inferscope.bind``) then sees the scope it was copied with, never one that another thread moves.
"""

from __future__ import annotations

import functools
import importlib
import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ..._records import NO_MODEL_KEY
from ..._runtime import RUNTIME
from ...windows import add_batch_size
from .. import (
    VERSION_ATTRIBUTE,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    class_aliases,
    declared_version,
    depth_and_training,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = ["DEVICE_ATTRIBUTE", "VERSION_ATTRIBUTE", "TorchInstrumentor", "module_identity"]


#: The attribute that tells a model's series apart by where its parameters live (``cpu``, ``cuda``).
DEVICE_ATTRIBUTE = "inferscope.device"
#: A module attribute that gives the model's version when ``model_names`` does not.


def _no_module() -> None:
    """The reference of a node or entry that refers to no module: it never matches one."""
    return None


class _Node:
    """A module in the stage tree of one model: the stage its calls open, and the stages of the
    submodules it calls (None when the depth is exhausted).

    ``children`` maps ``id(submodule)`` to its node, built on the first call of this module; a hit
    is confirmed by identity through ``ref`` (the submodule is held weakly, so the cache never
    keeps a model alive through a submodule that refers back to it).
    """

    __slots__ = ("built", "children", "ref", "remaining", "stage")

    def __init__(self, ref: Callable[[], Any], stage: Any, remaining: int) -> None:
        self.ref = ref
        self.stage = stage
        self.remaining = remaining
        self.children: dict[int, _Node] | None = None
        self.built = remaining <= 0

    def build(self, module: Any) -> None:
        """The nodes of ``module``'s submodules, named as ``module.named_modules()`` names them.

        On a model on CUDA, the stages also measure the device time of their kernels with CUDA
        events (``stage(name, device=...)``): their wall time is only the time to launch them.
        """
        children: dict[int, _Node] = {}
        probe = _device_probe(module)
        tensor = None if probe is None else probe()
        device = tensor.device if tensor is not None and tensor.is_cuda else None
        for name, sub in module.named_modules():
            if not name:
                continue
            # "/" separates stage paths; a module name never needs it.
            stage = RUNTIME.stage(name.replace("/", "_"), device=device)
            children[id(sub)] = _Node(weakref.ref(sub), stage, self.remaining - 1)
        self.children = children
        self.built = True


#: Reported (and logged at most once a minute) when the bookkeeping fails; the call goes on.
_FAILURE = "inferscope: torch instrumentation failed; the call is not recorded"

#: The module whose calls of a module are tracing, not inference (``torch.jit.trace``'s check run).
_TRACING_MODULE = "torch.jit._trace"

#: The scope of a module call that records nothing inside it (training, tracing, depth 0).
_PASS = _Node(_no_module, None, 0)

#: The innermost model call of this context, as the node whose ``children`` the next module calls
#: are looked up in. None: no model call is running.
_SCOPE: ContextVar[_Node | None] = ContextVar("inferscope_torch_scope", default=None)


def module_identity(module: Any) -> tuple[Any, ModelIdentity, tuple[str, ...]]:
    """The module that stands for ``module`` (the original of a ``torch.compile`` wrapper), its
    default identity and the aliases it is known by."""
    target = module
    cls = type(module)
    if cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo"):
        target = getattr(module, "_orig_mod", module)
        cls = type(target)
    name = cls.__name__
    aliases: tuple[str, ...] = class_aliases(cls)
    original_name = getattr(target, "original_name", None)  # a TorchScript module's class
    import torch

    if isinstance(target, torch.jit.ScriptModule) and isinstance(original_name, str) and original_name:
        name = original_name
        aliases = (original_name, *aliases)
    version = declared_version(target, name)
    return target, ModelIdentity(name, version), aliases


def _device_probe(target: Any) -> weakref.ref[Any] | None:
    """The first parameter (or buffer) of a model, whose device tells where the model runs; held
    weakly, so that a ``.to()`` that replaces the tensors does not keep the old one's memory."""
    for tensors in (target.parameters(), target.buffers()):
        for tensor in tensors:
            return weakref.ref(tensor)
    return None


class _Entry:
    """What the instrumentor knows about one module called as a model (cached per module)."""

    __slots__ = ("attributes", "calls", "cpu_call", "identity", "probe", "ref", "root", "target")

    def __init__(
        self,
        target: Any,
        identity: ModelIdentity | None,
        attributes: dict[str, str],
        root: _Node,
        probe: weakref.ref[Any] | None,
    ) -> None:
        #: The module this entry is cached for, held weakly (set by :meth:`_State.entry`); the
        #: cache's hit test is ``entry.ref() is module``.
        self.ref: Callable[[], Any] = _no_module
        self.target = target
        #: None: not one of ``models=``; its calls pass through and do not open a scope.
        self.identity = identity
        self.attributes = attributes
        self.root = root
        self.probe = probe
        #: device type -> the tracked original under this model's key for that device
        self.calls: dict[str, Any] = {}
        #: ``calls["cpu"]`` once built: the wrapper takes it without a dict lookup when the probe
        #: tensor is on the CPU, and goes through :meth:`call` on every other path.
        self.cpu_call: Any = None

    def device(self) -> str:
        """Where the model's first parameter is now: ``cpu``, ``cuda`` (or another device type)."""
        ref = self.probe
        if ref is None:
            return "cpu"
        probe = ref()
        if probe is None:  # the tensor was replaced (a .to() that does not move in place): look again
            self.probe = _device_probe(self.target)
            probe = None if self.probe is None else self.probe()
            if probe is None:
                return "cpu"
        if probe.is_cpu:
            return "cpu"
        if probe.is_cuda:
            return "cuda"
        return str(probe.device.type)

    def call(self, original: Any, cuda_sync: bool = True) -> Any:
        """The tracked ``original`` under this model's key for the device the model is on now. On
        CUDA, with ``cuda_sync``, the call ends when the device has finished its work: kernels run
        asynchronously, and the call's wall time would otherwise be the time to launch them."""
        device = self.device()
        found = self.calls.get(device)
        if found is None:
            assert self.identity is not None
            model = TrackedModel(self.identity, {**self.attributes, DEVICE_ATTRIBUTE: device})
            timed = _synchronized(original, self.probe) if device == "cuda" and cuda_sync else original
            found = self.calls[device] = model.tracked(timed)
            if device == "cpu":
                self.cpu_call = found
        return found


def _synchronized(original: Any, probe: weakref.ref[Any] | None) -> Any:
    """``original``, then a wait for the CUDA device of the model's probe tensor."""
    import torch

    synchronize = torch.cuda.synchronize

    def call(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        tensor = None if probe is None else probe()
        synchronize(None if tensor is None else tensor.device)
        return result

    return call


class _State:
    """Shared by the wrapper of one ``instrument()``; inactive once uninstrumented."""

    def __init__(self, options: InstrumentOptions, stage_depth: int, track_training: bool) -> None:
        import torch

        self.active = True
        self.options = options
        self.stage_depth = stage_depth
        self.track_training = track_training
        #: Whether an inference of a model on CUDA waits for its kernels before it ends.
        self.cuda_sync = True
        #: id(module) -> its entry, dropped when the module is collected. The wrapper reads it
        #: directly: a hit is one dict lookup and one weak-reference call, with no method call.
        self.entries: dict[int, _Entry] = {}
        # What torch.jit.is_tracing() returns outside TorchScript, without its extra call.
        self.is_tracing: Callable[[], bool] = torch._C._is_tracing
        # The flags that torch.fx.symbolic_trace and torch.compiler set while they trace, read from
        # their modules' globals (torch.compiler.is_compiling() returns its flag outside
        # TorchScript, at the cost of two calls). A torch without the flag answers through the
        # function.
        self.fx_flag: Callable[[str], object] = vars(importlib.import_module("torch.fx._symbolic_trace")).get
        compiler = vars(torch.compiler)
        if "_is_compiling_flag" in compiler:
            self.compiling_flag: Callable[[str], object] = compiler.get
        else:
            is_compiling = torch.compiler.is_compiling
            self.compiling_flag = lambda _name: is_compiling()
        #: The globals of the modules whose calls of a module are tracing, not inference.
        self.tracing_globals: dict[str, Any] = vars(importlib.import_module(_TRACING_MODULE))

    def entry(self, module: Any) -> _Entry:
        """``module``'s entry, resolved and cached (the wrapper looks in ``entries`` first)."""
        key = id(module)
        entries = self.entries
        found = entries.get(key)
        if found is not None and found.ref() is module:
            return found
        found = self._resolve(module)

        def forget(ref: weakref.ref[Any]) -> None:
            # Only if the id has not been reused by a newer module meanwhile.
            current = entries.get(key)
            if current is not None and current.ref is ref:
                entries.pop(key, None)

        try:
            found.ref = weakref.ref(module, forget)
        except TypeError:  # not weakly referenceable: resolved again at every call
            return found
        entries[key] = found
        return found

    def _resolve(self, module: Any) -> _Entry:
        target, default, aliases = module_identity(module)
        options = self.options
        selected = options.selects(module, aliases) or (
            target is not module and options.selects(target, aliases)
        )
        if not selected:
            return _Entry(target, None, {}, _PASS, None)
        identity = options.identity(target, default, aliases)
        if identity.version is None and default.version is not None:
            identity = ModelIdentity(identity.name, default.version)
        root = _Node(_no_module, None, self.stage_depth)
        if not root.built:
            root.build(target)
        return _Entry(target, identity, options.attributes, root, _device_probe(target))


def _is_wrapped_call_impl(original: Any) -> bool:
    """Whether ``original`` is torch's own ``Module._wrapped_call_impl``, whose whole body is::

        if self._compiled_call_impl is not None:
            return self._compiled_call_impl(*args, **kwargs)
        else:
            return self._call_impl(*args, **kwargs)

    Then the wrapper may run that body itself where it only passes a call through, which saves a
    frame and a copy of the arguments per module call (about half the wrapper's cost on a nested
    call). The names the function reads are checked too, so a torch whose function does something
    else, or a ``__call__`` that another library installed before us, is always called instead.
    """
    import torch

    code = getattr(original, "__code__", None)
    return (
        original is torch.nn.Module.__dict__.get("_wrapped_call_impl")
        and code is not None
        and code.co_names == ("_compiled_call_impl", "_call_impl")
    )


def _module_call(state: _State, original: Any) -> Any:
    """The replacement of ``nn.Module.__call__``.

    Every module call runs it, so it is written for speed: the state it reads is bound to locals
    of this closure, and the outermost call and the stage call are inline rather than in helper
    functions (each helper frame costs a call and a copy of the arguments). A nested call outside
    any stage costs the first test, a context-variable read and an attribute read.
    """
    import torch

    is_dynamo_compiling = torch.compiler.is_dynamo_compiling
    get_scope = _SCOPE.get
    set_scope = _SCOPE.set
    reset_scope = _SCOPE.reset
    entries_get = state.entries.get
    resolve = state.entry
    track_training = state.track_training
    is_grad_enabled = torch.is_grad_enabled
    is_tracing = state.is_tracing
    fx_flag = state.fx_flag
    compiling_flag = state.compiling_flag
    tracing_globals = state.tracing_globals
    current_key = RUNTIME.current_key
    getframe = sys._getframe
    #: Whether a passed-through call may skip ``original`` and run its body (see
    #: :func:`_is_wrapped_call_impl`); the outermost call always goes through ``original``.
    direct = _is_wrapped_call_impl(original)

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        # First, and alone: TorchDynamo folds is_dynamo_compiling() to True, so what it traces of
        # this wrapper (torch.compile, strict torch.export) is the original call and nothing else.
        # Eagerly it returns False at the cost of one call; non-strict export is caught outermost.
        if is_dynamo_compiling() or not state.active:
            return original(self, *args, **kwargs)
        scope = get_scope()
        if scope is None:
            # The outermost module call of this context. The decision is made inside ``try`` and
            # the call outside it: an exception of the module itself must pass through once,
            # untouched, never be taken for our own failure.
            call = original
            try:
                entry = entries_get(id(self))
                if entry is None or entry.ref() is not self:
                    entry = resolve(self)
                if entry.identity is not None:
                    scope = _PASS
                    # Inference, and not tracing (non-strict export, jit or fx): flags are read
                    # before functions are called. ``torch.jit.trace`` runs the module once more,
                    # eagerly, to check the trace (``check_trace=True``); that run is tracing too,
                    # and is told by its caller's frame.
                    if (not entry.target.training or track_training or not is_grad_enabled()) and not (
                        is_tracing()
                        or fx_flag("_is_fx_tracing_flag")  # set by torch.fx.symbolic_trace
                        or getframe(1).f_globals is tracing_globals  # torch.jit.trace's check run
                        or compiling_flag("_is_compiling_flag")  # set by non-strict torch.export
                    ):
                        scope = entry.root
                        if current_key() == NO_MODEL_KEY or not inference_open():
                            probe = entry.probe
                            tensor = None if probe is None else probe()
                            tracked = entry.cpu_call if tensor is not None and tensor.is_cpu else None
                            call = tracked or entry.call(original, state.cuda_sync)
                            add_batch_size(call, args, kwargs)  # the batch dimension: the input size
            except Exception:
                report_internal_error(_FAILURE)
                call, scope = original, _PASS
            if scope is None:  # not one of ``models=``: its submodules may be
                return original(self, *args, **kwargs)
            token = set_scope(scope)
            try:
                return call(self, *args, **kwargs)
            finally:
                reset_scope(token)
        children = scope.children
        if children is not None:
            # A stage of the running model: the submodule is run inside its stage, with its own
            # submodules looked up under it.
            node = children.get(id(self))
            if node is not None and node.ref() is self:
                if not node.built:
                    try:
                        node.build(self)
                    except Exception:
                        report_internal_error(_FAILURE)
                        return original(self, *args, **kwargs)
                with node.stage:
                    token = set_scope(node)
                    try:
                        if direct and self._compiled_call_impl is None:
                            return self._call_impl(*args, **kwargs)
                        return original(self, *args, **kwargs)
                    finally:
                        reset_scope(token)
        if direct and self._compiled_call_impl is None:
            return self._call_impl(*args, **kwargs)
        return original(self, *args, **kwargs)

    __call__.__inferscope_original__ = original  # type: ignore[attr-defined]
    return __call__


class TorchInstrumentor(InferscopeInstrumentor):
    """Instruments ``torch.nn.Module`` calls.

    Options of ``instrument()``, all optional:

    - ``models``: modules (by identity) or class names that count as models; default: every module
      called from outside another module.
    - ``model_names``: ``{module or class name: name or (name, version)}`` or a callable
      ``f(module) -> name | (name, version) | None``. Default name: the module's class name; the
      version, when ``model_names`` gives none: the module's ``inferscope_version`` attribute.
    - ``attributes``: static attributes on every series of these models.
    - ``stage_depth``: how many levels of submodule calls become stages (default 0: none).
    - ``track_training``: also record calls made with grad enabled on a module in training mode.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any
    _extra_options = {"stage_depth": 0, "track_training": False, "cuda_sync": True}
    _module = "torch"

    def _check_options(self, extra: dict[str, Any]) -> None:
        depth_and_training(extra)
        if not isinstance(extra["cuda_sync"], bool):
            raise TypeError(f"cuda_sync must be True or False, got {extra['cuda_sync']!r}")

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import torch

        stage_depth, track_training = depth_and_training(extra)
        state = _State(options, stage_depth, track_training)
        state.cuda_sync = extra["cuda_sync"]
        module = torch.nn.Module
        patches.replace(module, "__call__", _module_call(state, module.__dict__["__call__"]))
        return state
