"""Tests of the framework instrumentors, with real frameworks and small models built in code."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any, NoReturn

import pytest

import inferscope


def missing(what: str, how: str) -> NoReturn:
    """Skip the test because ``what`` is not installed; under CI (``CI`` set) fail it instead,
    because CI must run every framework test."""
    message = f"{what} is not installed; {how}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so the frameworks are required)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import a framework the test needs, or :func:`missing` (skip, or fail under CI). At module
    level it skips or fails the whole module."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(module, f"pip install -e . --group frameworks ({exc})")


def instrumenting(instrumentor_class: type) -> Iterator[Callable[..., Any]]:
    """The body of an ``instrument`` fixture: yields ``start(**options)``, which instruments one
    ``instrumentor_class()`` and returns it; teardown always uninstruments."""
    instrumentor = instrumentor_class()

    def start(**options: Any) -> Any:
        instrumentor.instrument(**options)
        return instrumentor

    yield start
    instrumentor.uninstrument()


def instrumenting_in_order(instrumentors: Mapping[str, type]) -> Iterator[Callable[..., list[Any]]]:
    """The body of an ``instrumented`` fixture: yields ``start(*names)``, which instruments those of
    ``instrumentors`` in that order; teardown uninstruments them in the reverse order."""
    started: list[Any] = []

    def start(*names: str) -> list[Any]:
        for name in names:
            instrumentor = instrumentors[name]()
            instrumentor.instrument()
            started.append(instrumentor)
        return started

    yield start
    for instrumentor in reversed(started):
        instrumentor.uninstrument()


def sorted_rows() -> list[tuple[str | None, str | None, int]]:
    """``(model, stage, count)`` of every snapshot row, sorted by model and stage."""
    return sorted(((r.model, r.stage, r.count) for r in inferscope.snapshot().rows), key=_order)


def _order(row: tuple[str | None, str | None, int]) -> tuple[str, str]:
    return row[0] or "", row[1] or ""
