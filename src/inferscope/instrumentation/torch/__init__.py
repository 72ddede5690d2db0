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

Per module call the wrapper costs a function call, that test and a context-variable read (about
0.3 µs with CPython 3.11; torch's global hooks cost about 1.2 µs per module call even when they do
nothing). An outermost call adds one identity-cache lookup (the model, its stage tree and its
device probe are resolved once per module object and held weakly) and what ``@track_inference``
costs; a stage costs what ``inferscope.stage`` costs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
import types
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ..._records import NO_MODEL_KEY
from ..._runtime import RUNTIME
from ...tracking import _check_version
from .. import (
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    call_in_scope,
    class_aliases,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = ["DEVICE_ATTRIBUTE", "VERSION_ATTRIBUTE", "TorchInstrumentor", "module_identity"]

_logger = logging.getLogger("inferscope.instrumentation")

#: The attribute that tells a model's series apart by where its parameters live (``cpu``, ``cuda``).
DEVICE_ATTRIBUTE = "inferscope.device"
#: A module attribute that gives the model's version when ``model_names`` does not.
VERSION_ATTRIBUTE = "inferscope_version"


class _Node:
    """A module in the stage tree of one model: the stage its calls open, and the stages of the
    submodules it calls (None when the depth is exhausted).

    ``children`` maps ``id(submodule)`` to its node, built on the first call of this module; a hit
    is confirmed by identity through ``ref`` (the submodule is held weakly, so the cache never
    keeps a model alive through a submodule that refers back to it).
    """

    __slots__ = ("built", "children", "ref", "remaining", "stage")

    def __init__(self, ref: weakref.ref[Any] | None, stage: Any, remaining: int) -> None:
        self.ref = ref
        self.stage = stage
        self.remaining = remaining
        self.children: dict[int, _Node] | None = None
        self.built = remaining <= 0

    def build(self, module: Any) -> None:
        """The nodes of ``module``'s submodules, named as ``module.named_modules()`` names them."""
        children: dict[int, _Node] = {}
        for name, sub in module.named_modules():
            if not name:
                continue
            # "/" separates stage paths; a module name never needs it.
            stage = RUNTIME.stage(name.replace("/", "_"))
            children[id(sub)] = _Node(weakref.ref(sub), stage, self.remaining - 1)
        self.children = children
        self.built = True


#: Modules whose calls of a module are tracing, not inference (``torch.jit.trace``'s check run).
_TRACING_MODULES = frozenset({"torch.jit._trace"})

#: The scope of a module call that records nothing inside it (training, tracing, depth 0).
_PASS = _Node(None, None, 0)

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
    version: str | None = None
    declared = getattr(target, VERSION_ATTRIBUTE, None)
    if declared is not None:
        try:
            version = _check_version(declared)
        except TypeError:
            _logger.warning(
                "inferscope: %s.%s must be a non-empty str or an int, got %r; the version is ignored",
                name,
                VERSION_ATTRIBUTE,
                declared,
            )
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

    __slots__ = ("attributes", "calls", "identity", "probe", "root", "target")

    def __init__(
        self,
        target: Any,
        identity: ModelIdentity | None,
        attributes: dict[str, str],
        root: _Node,
        probe: weakref.ref[Any] | None,
    ) -> None:
        self.target = target
        #: None: not one of ``models=``; its calls pass through and do not open a scope.
        self.identity = identity
        self.attributes = attributes
        self.root = root
        self.probe = probe
        #: device type -> the tracked original under this model's key for that device
        self.calls: dict[str, Any] = {}

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

    def call(self, original: Any) -> Any:
        device = self.device()
        found = self.calls.get(device)
        if found is None:
            assert self.identity is not None
            model = TrackedModel(self.identity, {**self.attributes, DEVICE_ATTRIBUTE: device})
            found = self.calls[device] = model.tracked(original)
        return found


class _State:
    """Shared by the wrapper of one ``instrument()``; inactive once uninstrumented."""

    def __init__(self, options: InstrumentOptions, stage_depth: int, track_training: bool) -> None:
        import torch

        self.active = True
        self.options = options
        self.stage_depth = stage_depth
        self.track_training = track_training
        self.cache: IdentityCache[_Entry] = IdentityCache()
        self.is_grad_enabled: Callable[[], bool] = torch.is_grad_enabled
        # What torch.jit.is_tracing() returns outside TorchScript, without its extra call.
        self.is_tracing: Callable[[], bool] = torch._C._is_tracing
        self.is_compiling: Callable[[], bool] = torch.compiler.is_compiling
        self._fx: Any = importlib.import_module("torch.fx._symbolic_trace")  # imported by torch

    def entry(self, module: Any) -> _Entry:
        found = self.cache.get(module)
        if found is None:
            found = self._resolve(module)
            self.cache.put(module, found)
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
        root = _Node(None, None, self.stage_depth)
        if not root.built:
            root.build(target)
        return _Entry(target, identity, options.attributes, root, _device_probe(target))

    def tracing(self, caller: types.FrameType) -> bool:
        """Whether torch is tracing the call (non-strict export, jit or fx), so it is not an
        inference. ``caller`` is the frame that called the module: ``torch.jit.trace`` runs the
        module once more, eagerly, to check the trace (``check_trace=True``), and that run is part
        of tracing too. Flags are read before functions are called: this runs on every inference."""
        return bool(
            self.is_tracing()
            or getattr(self._fx, "_is_fx_tracing_flag", False)  # set by torch.fx.symbolic_trace
            or caller.f_globals.get("__name__") in _TRACING_MODULES
            or self.is_compiling()
        )

    def outermost(self, original: Any, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A module called while no model call runs in this context.

        The decision is made inside ``try`` and the call outside it: an exception of the module
        itself must pass through once, untouched, never be taken for our own failure.
        """
        call = original
        scope: _Node | None = None
        try:
            entry = self.cache.get(module) or self.entry(module)
            if entry.identity is not None:
                scope = _PASS
                # Frames: 0 here, 1 the wrapper, 2 its caller.
                if (
                    self.track_training or not self.is_grad_enabled() or not entry.target.training
                ) and not self.tracing(sys._getframe(2)):
                    scope = entry.root
                    if RUNTIME.current_key() == NO_MODEL_KEY or not inference_open():
                        call = entry.calls.get(entry.device()) or entry.call(original)
        except Exception:
            report_internal_error("inferscope: torch instrumentation failed; the call is not recorded")
            call, scope = original, _PASS
        if scope is None:
            return original(module, *args, **kwargs)
        return call_in_scope(_SCOPE, scope, call, module, args, kwargs)


def _stage_call(
    node: _Node, original: Any, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A submodule call that is a stage of the running model: run it inside the stage, with its
    own submodules looked up under it."""
    try:
        if not node.built:
            node.build(module)
    except Exception:
        report_internal_error("inferscope: torch instrumentation failed; the call is not recorded")
        return original(module, *args, **kwargs)
    with node.stage:
        return call_in_scope(_SCOPE, node, original, module, args, kwargs)


def _module_call(state: _State, original: Any) -> Any:
    import torch

    is_dynamo_compiling = torch.compiler.is_dynamo_compiling
    get_scope = _SCOPE.get

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        # First, and alone: TorchDynamo folds is_dynamo_compiling() to True, so what it traces of
        # this wrapper (torch.compile, strict torch.export) is the original call and nothing else.
        # Eagerly it returns False at the cost of one call; non-strict export is caught outermost.
        if is_dynamo_compiling() or not state.active:
            return original(self, *args, **kwargs)
        scope = get_scope()
        if scope is None:
            return state.outermost(original, self, args, kwargs)
        children = scope.children
        if children is not None:
            node = children.get(id(self))
            if node is not None and node.ref is not None and node.ref() is self:
                return _stage_call(node, original, self, args, kwargs)
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
    _extra_options = {"stage_depth": 0, "track_training": False}

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import torch

        stage_depth = extra["stage_depth"]
        if isinstance(stage_depth, bool) or not isinstance(stage_depth, int) or stage_depth < 0:
            raise TypeError(f"stage_depth must be an int >= 0, got {stage_depth!r}")
        track_training = extra["track_training"]
        if not isinstance(track_training, bool):
            raise TypeError(f"track_training must be True or False, got {track_training!r}")
        state = _State(options, stage_depth, track_training)
        module = torch.nn.Module
        patches.replace(module, "__call__", _module_call(state, module.__dict__["__call__"]))
        return state
