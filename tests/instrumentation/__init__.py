"""Tests of the framework instrumentors, with real frameworks and small models built in code."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


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
