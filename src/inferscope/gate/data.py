"""What ``inferscope bench`` runs: a function named ``module:function`` and calls read from a file.

- ``.npy``: one array, the single argument of every call (a canonical batch);
- ``.npz``: the arrays saved positionally (``arr_0``, ``arr_1``...) are the positional arguments of
  every call, the others its keyword arguments;
- ``.jsonl``: one call per line; a list is the call's positional arguments, an object its keyword
  arguments, anything else its one argument. The calls are made in turn.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runner import Call

__all__ = ["DATA_SUFFIXES", "load_calls", "load_function"]

DATA_SUFFIXES = (".npy", ".npz", ".jsonl")


def load_function(target: str) -> Callable[..., Any]:
    """The callable named by ``module:attribute`` (``attribute`` may be dotted: ``mod:Model.predict``
    of a class is the unbound function). The current directory is importable, as with ``python -m``.

    Raises ValueError with what is wrong.
    """
    obj = resolve_target(target, "module:function (e.g. mymodel.serve:predict)")
    if not callable(obj):
        raise ValueError(f"{target} is not callable (it is a {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def resolve_target(target: str, expected: str = "module:attribute") -> Any:
    """The object named by ``module:attribute`` (``attribute`` may be dotted), the current
    directory importable as with ``python -m``. Raises ValueError with what is wrong (``expected``
    says what form the target takes)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected {expected}, got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r}: {error}") from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj


def load_calls(path: str | os.PathLike[str]) -> list[Call]:
    """The calls a data file holds (see the module's text). Raises ValueError for an unknown
    suffix or an empty or malformed file, OSError when it cannot be read."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return [((np.load(file, allow_pickle=False),), {})]
    if suffix == ".npz":
        import numpy as np

        with np.load(file, allow_pickle=False) as arrays:
            named = {name: arrays[name] for name in arrays.files}
        positional = [named.pop(f"arr_{i}") for i in range(len(named)) if f"arr_{i}" in named]
        return [(tuple(positional), named)]
    if suffix == ".jsonl":
        calls: list[Call] = []
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{file}:{number}: not JSON ({error.msg})") from None
                if isinstance(value, list):
                    calls.append((tuple(value), {}))
                elif isinstance(value, dict):
                    calls.append(((), value))
                else:
                    calls.append(((value,), {}))
        if not calls:
            raise ValueError(f"{file} holds no call (one JSON value per line)")
        return calls
    raise ValueError(
        f"--data {file}: unknown file type {suffix or '(none)'!r}; accepted: {', '.join(DATA_SUFFIXES)}"
    )
