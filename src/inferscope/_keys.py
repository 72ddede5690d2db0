"""Interning of model/stage keys and error types to small integers.

The hot path only ever handles the integers. The registry is consulted once per new
(model, version, attributes) at decoration time, once per new (parent key, stage name) pair on a
stage's cache miss, and once per new exception type. A lock guards those misses; it is never
taken for a key that is already cached on the native side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ._records import NO_ERROR, NO_MODEL_KEY, OTHER_ERROR, OVERFLOW_KEY

DEFAULT_MAX_KEYS = 2000
#: The most keys ``max_keys`` may allow. A key that records keeps about 6 KiB of aggregation state
#: (the histograms of its duration and CPU time, its counters and windows) for the life of the
#: process, so 20,000 keys hold about 120 MiB; a Prometheus scrape renders about 5 KiB of text per
#: key on top while it runs. Measured by benchmarks/key_memory.py; see docs/metrics.md.
MAX_KEYS_LIMIT = 20_000
MAX_ERROR_TYPES = 256
OTHER_ERROR_TYPE = "_OTHER"  # the OTel semantic-convention fallback for error.type

MODEL_NAME = "inferscope.model.name"
MODEL_VERSION = "inferscope.model.version"
STAGE_NAME = "inferscope.stage.name"
ERROR_TYPE = "error.type"
OVERFLOW_ATTRIBUTE = "otel.metric.overflow"


@dataclass(frozen=True)
class KeyInfo:
    """What an interned key stands for."""

    key: int
    kind: str  # "inference" or "stage"
    model: str | None
    version: str | None
    stage: str | None  # the stage path, e.g. "infer/encoder"; None for an inference key
    attributes: tuple[tuple[str, str], ...] = ()
    overflow: bool = False
    parent: int | None = None
    _metric_attributes: dict[str, str | bool] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        attrs: dict[str, str | bool] = dict(self.attributes)
        if self.overflow:
            attrs[OVERFLOW_ATTRIBUTE] = True
        if self.model is not None:
            attrs[MODEL_NAME] = self.model
        if self.version is not None:
            attrs[MODEL_VERSION] = self.version
        if self.stage is not None:
            attrs[STAGE_NAME] = self.stage
        self._metric_attributes.update(attrs)

    @property
    def metric_attributes(self) -> Mapping[str, str | bool]:
        """The OTel attributes of every series of this key (without ``error.type``)."""
        return self._metric_attributes


def error_type_name(exc_type: type[BaseException]) -> str:
    """``error.type`` for an exception class: the qualified class name, module-prefixed unless builtin."""
    module = getattr(exc_type, "__module__", None)
    qualname = getattr(exc_type, "__qualname__", None) or exc_type.__name__
    if module in (None, "builtins", "__main__"):
        return qualname
    return f"{module}.{qualname}"


class KeyRegistry:
    """Interns keys for one process; keys survive ``fork()`` so a child's series keep their identity."""

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._infos: list[KeyInfo] = [
            KeyInfo(NO_MODEL_KEY, "inference", None, None, None),
            KeyInfo(OVERFLOW_KEY, "inference", None, None, None, overflow=True),
        ]
        self._inference_keys: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], int] = {}
        self._stage_keys: dict[tuple[int, str], int] = {}
        self._error_ids: dict[type[BaseException], int] = {}
        self._error_names: list[str | None] = [None, OTHER_ERROR_TYPE]
        #: How many distinct keys were folded into the overflow key because of the cap.
        self.overflowed = 0
        #: Called once, outside the lock, after the first key is made: the pipeline configured
        #: from the environment starts there (the first tracked function or stage), not at import.
        self.on_first_key: Callable[[], None] | None = None
        #: Called with each new inference key, before it is returned (so before any record of it):
        #: the native drainer shares process CPU out to those records (_native/share.h).
        self.on_inference_key: Callable[[int], None] | None = None
        os.register_at_fork(after_in_child=self._reinit_lock_in_child)

    def _reinit_lock_in_child(self) -> None:
        # Another thread may have held the lock at fork time; the child has only the forking thread.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: int) -> KeyInfo:
        return self._infos[key]

    def infos(self) -> list[KeyInfo]:
        return list(self._infos)

    def _add(self, make: type[KeyInfo], **fields: object) -> int:
        # Caller holds the lock.
        if len(self._infos) >= self.max_keys:
            self.overflowed += 1
            return OVERFLOW_KEY
        key = len(self._infos)
        self._infos.append(make(key=key, **fields))  # type: ignore[arg-type]
        return key

    def inference_key(
        self, model: str, version: str | None = None, attributes: Mapping[str, str] | None = None
    ) -> int:
        attrs = tuple(sorted((str(k), str(v)) for k, v in (attributes or {}).items()))
        ident = (model, version, attrs)
        with self._lock:
            key = self._inference_keys.get(ident)
            if key is None:
                key = self._add(
                    KeyInfo, kind="inference", model=model, version=version, stage=None, attributes=attrs
                )
                if key != OVERFLOW_KEY:
                    self._inference_keys[ident] = key
                    if self.on_inference_key is not None:
                        self.on_inference_key(key)
        if self.on_first_key is not None:
            self._first_key_made()
        return key

    def _first_key_made(self) -> None:
        hook, self.on_first_key = self.on_first_key, None
        if hook is not None:
            hook()

    def stage_key(self, parent: int, name: str) -> int:
        """The key of stage ``name`` entered while ``parent`` is the innermost key."""
        if parent == OVERFLOW_KEY:
            return OVERFLOW_KEY
        with self._lock:
            key = self._stage_keys.get((parent, name))
            if key is None:
                p = self._infos[parent]
                path = name if p.stage is None else f"{p.stage}/{name}"
                key = self._add(
                    KeyInfo,
                    kind="stage",
                    model=p.model,
                    version=p.version,
                    stage=path,
                    attributes=p.attributes,
                    parent=parent,
                )
                if key != OVERFLOW_KEY:
                    self._stage_keys[(parent, name)] = key
        if self.on_first_key is not None:
            self._first_key_made()
        return key

    def error_id(self, exc_type: type[BaseException] | None) -> int:
        if exc_type is None:
            return NO_ERROR
        found = self._error_ids.get(exc_type)
        if found is not None:
            return found
        with self._lock:
            found = self._error_ids.get(exc_type)
            if found is None:
                if len(self._error_names) >= MAX_ERROR_TYPES:
                    return OTHER_ERROR
                found = len(self._error_names)
                self._error_names.append(error_type_name(exc_type))
                self._error_ids[exc_type] = found
            return found

    def error_name(self, error_id: int) -> str | None:
        return self._error_names[error_id]
