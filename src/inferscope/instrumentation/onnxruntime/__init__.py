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

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...windows import add_batch_size
from .. import (
    InferscopeInstrumentor,
    InstrumentationState,
    InstrumentOptions,
    ModelEntry,
    ModelIdentity,
    Patches,
    TrackedModel,
    tracked_method,
    wrap_defined_methods,
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


class _State(InstrumentationState):
    def model(self, session: Any) -> TrackedModel | None:
        return self.cached_model(session, self._resolve)

    def _resolve(self, session: Any) -> tuple[ModelEntry, bool]:
        identity, aliases = session_identity(session)
        return ModelEntry(self.options.model(session, identity, aliases)), True


def _add_feed_size(call: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """The input size of ``run(output_names, input_feed)``: the first dimension of the feed's first
    input (``run_with_iobinding`` binds its inputs elsewhere and reports none)."""
    feed = args[1] if len(args) > 1 else kwargs.get("input_feed")
    if isinstance(feed, Mapping) and feed:
        add_batch_size(call, (next(iter(feed.values())),), {})


def _tracked_method(state: _State, original: Any) -> Any:
    """A wrapper of ``original`` that tracks a run, unless an inference is already open."""
    return tracked_method(
        state,
        original,
        state.model,
        "inferscope: onnxruntime instrumentation failed; the run is not recorded",
        add_size=_add_feed_size,
    )


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
    _module = "onnxruntime"

    def _apply(self, patches: Patches, options: InstrumentOptions, extra: dict[str, Any]) -> _State:
        import onnxruntime

        state = _State(options)
        wrap_defined_methods(
            patches,
            onnxruntime.InferenceSession,
            TRACKED_METHODS,
            lambda original: _tracked_method(state, original),
        )
        return state
