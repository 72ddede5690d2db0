"""The process-wide runtime and key registry that decorators bind to at definition time.

They exist from import on, so ``@track_inference`` works before (and without) ``configure()``;
``configure()`` swaps the ring and the counter set in place and never replaces these objects.
"""

from __future__ import annotations

from ._backend import Ring, Runtime
from ._contract import RuntimeContract
from ._keys import KeyRegistry

DEFAULT_RING_CAPACITY = 65536

REGISTRY = KeyRegistry()
RUNTIME: RuntimeContract = Runtime(Ring(DEFAULT_RING_CAPACITY), REGISTRY)
