"""onnxruntime: ``InferenceSession.run`` and ``run_with_iobinding`` become tracked inferences.

>>> from inferscope.instrumentation.onnxruntime import OnnxruntimeInstrumentor
>>> OnnxruntimeInstrumentor().instrument(model_names={"mlp": ("fraud-mlp", "7")})  # doctest: +SKIP

Model identity, after the options (see ``inferscope.instrumentation``):

- a session created from a file: the file's stem (``/models/mlp.onnx`` is ``mlp``);
- a session created from bytes: ``producer:graph`` from the model's metadata (``pytorch:main_graph``),
  or, when both are empty, ``onnx-`` and the first 12 hex digits of the model's SHA-256;
- the version: the model's ``model_version`` when it is set (not 0).

Aliases that ``models`` and ``model_names`` match: the path as given, the absolute path, the file
name, the stem, and ``producer:graph``.

A run made while an inference is already open (inside your ``@track_inference``, or inside an
instrumented scikit-learn estimator that wraps a session) passes through: it is part of that
inference, not a second one.

The methods are wrapped on the class that defines them (``Session``), so every session class
inherits the wrapper; ``uninstrument()`` puts the original functions back.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from .. import (
    IdentityCache,
    InferscopeInstrumentor,
    InstrumentOptions,
    ModelIdentity,
    Patches,
    TrackedModel,
    defining_class,
    inference_open,
    report_internal_error,
)
from .package import _instruments, _instruments_any

__all__ = ["TRACKED_METHODS", "OnnxruntimeInstrumentor", "session_identity"]

TRACKED_METHODS = ("run", "run_with_iobinding")


def session_identity(session: Any) -> tuple[ModelIdentity, tuple[str, ...]]:
    """The default identity of a session and the aliases it is known by."""
    meta = session.get_modelmeta()
    producer = getattr(meta, "producer_name", "") or ""
    graph = getattr(meta, "graph_name", "") or ""
    version_number = getattr(meta, "version", 0) or 0
    version = str(version_number) if version_number else None
    produced = ":".join(part for part in (producer, graph) if part)
    path = getattr(session, "_model_path", None)
    if path:
        text = os.fspath(path)
        file = Path(text)
        aliases = (text, os.path.abspath(text), file.name, file.stem)
        return ModelIdentity(file.stem or file.name, version), (*aliases, produced) if produced else aliases
    if produced:
        return ModelIdentity(produced, version), (produced,)
    model_bytes = getattr(session, "_model_bytes", None)
    if model_bytes:
        name = "onnx-" + hashlib.sha256(model_bytes).hexdigest()[:12]
        return ModelIdentity(name, version), (name,)
    return ModelIdentity(type(session).__name__, version), (type(session).__name__,)


class _Entry:
    __slots__ = ("model",)

    def __init__(self, model: TrackedModel | None) -> None:
        #: None when ``models=`` leaves this session out: its runs pass through.
        self.model = model


class _State:
    def __init__(self, options: InstrumentOptions) -> None:
        self.active = True
        self.options = options
        self.cache: IdentityCache[_Entry] = IdentityCache()

    def model(self, session: Any) -> TrackedModel | None:
        found = self.cache.get(session)
        if found is None:
            identity, aliases = session_identity(session)
            model = None
            if self.options.selects(session, aliases):
                model = TrackedModel(
                    self.options.identity(session, identity, aliases), self.options.attributes
                )
            found = _Entry(model)
            self.cache.put(session, found)
        return found.model


def _tracked_method(state: _State, original: Any) -> Any:
    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state.active:
            try:
                model = state.model(self)
                call = None if model is None or inference_open() else model.tracked(original)
            except Exception:
                report_internal_error(
                    "inferscope: onnxruntime instrumentation failed; the run is not recorded"
                )
                call = None
            if call is not None:
                return call(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    wrapper.__inferscope_original__ = original  # type: ignore[attr-defined]
    return wrapper


class OnnxruntimeInstrumentor(InferscopeInstrumentor):
    """Instruments ``onnxruntime.InferenceSession.run`` and ``run_with_iobinding``.

    Options of ``instrument()``, all optional:

    - ``models``: sessions (by identity) or aliases (path, file name, stem, ``producer:graph``)
      that count as models; default all.
    - ``model_names``: ``{session or alias: name or (name, version)}`` or a callable
      ``f(session) -> name | (name, version) | None``.
    - ``attributes``: static attributes on every series of these models.
    """

    _instruments = _instruments
    _instruments_any = _instruments_any

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import onnxruntime

        state = _State(options)
        for name in TRACKED_METHODS:
            owner = defining_class(onnxruntime.InferenceSession, name)
            if owner is None:
                continue
            patches.replace(owner, name, _tracked_method(state, owner.__dict__[name]))
        return state
