"""``inferscope version``: the version and the backend in use."""

from __future__ import annotations

import argparse

from .. import __version__
from .._backend import BACKEND, BACKEND_REASON
from ._command import Command

__all__ = ["COMMAND"]


def _version(args: argparse.Namespace) -> int:
    print(f"inferscope {__version__} ({BACKEND} backend: {BACKEND_REASON})")
    return 0


COMMAND = Command(name="version", help="print the version and the backend in use", run=_version)
