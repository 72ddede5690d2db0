"""Shared fixtures. Every test starts from empty aggregates and must leave no stage open."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# The flight recorder of every test (and of the interpreters it starts, which inherit the
# environment) writes under a temporary directory, never the user's state directory: set before
# inferscope is imported, since importing it configures it from the environment.
_RECORDER_ROOT = tempfile.mkdtemp(prefix="inferscope-tests-")
# Registered before inferscope's own exit hook, so it runs after that hook's last write.
atexit.register(shutil.rmtree, _RECORDER_ROOT, ignore_errors=True)
os.environ["XDG_STATE_HOME"] = _RECORDER_ROOT
os.environ["INFERSCOPE_RECORDER"] = os.path.join(_RECORDER_ROOT, "session", "recorder.sqlite")

import inferscope  # noqa: E402
from inferscope import _pipeline, _purepy  # noqa: E402
from inferscope._runtime import RUNTIME  # noqa: E402

try:
    from inferscope import _native
except ImportError:  # pragma: no cover - only without a compiler
    _native = None

#: Both backend modules, for tests that build their own Ring and Runtime of each.
BACKENDS = [pytest.param(_purepy, id="python")]
if _native is not None:
    BACKENDS.append(pytest.param(_native, id="c"))
elif os.environ.get("CI"):
    raise RuntimeError("CI builds the C extension; it must be importable")


@pytest.fixture(autouse=True)
def isolated_recorder(tmp_path_factory, monkeypatch):
    """Each test's configure() calls and subprocesses record into a file of their own, so that no
    test finds windows, baselines or an anchor left by another one."""
    path = tmp_path_factory.mktemp("recorder") / "recorder.sqlite"
    monkeypatch.setenv("INFERSCOPE_RECORDER", str(path))
    return path


@pytest.fixture(autouse=True)
def clean_state():
    """No global state leaks between tests: aggregates start empty, and after the test no stage
    or inference is left open and nothing recorded is left in the ring."""
    _pipeline.reset_aggregates()
    yield
    depth = RUNTIME.active_depth()
    assert depth == 0, f"{depth} inference/stage entries were left open by the test"
    _pipeline.DRAINER.drain()
    assert len(RUNTIME.ring) == 0, "records were left in the ring"


@pytest.fixture
def seeded_random(request):
    """A seeded Random whose seed is printed when the test fails."""
    seed = int(os.environ.get("INFERSCOPE_TEST_SEED", random.randrange(2**32)))
    yield random.Random(seed)
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\nseeded_random: INFERSCOPE_TEST_SEED={seed}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


#: For code run by :func:`run_python`: ``hold(lock)`` starts a thread that takes ``lock`` and keeps
#: it until ``release.set()``, as a thread in the middle of a write or a patch keeps its lock while
#: the process forks. It returns the thread once the lock is held.
HOLD_A_LOCK = """
import threading
held, release = threading.Event(), threading.Event()

def hold(lock):
    def holding():
        with lock:
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holding)
    thread.start()
    held.wait(30)
    return thread
"""


#: The test modules where the backend decides the outcome, marked ``backend``: CI runs them on the
#: pure-Python backend of every Python it covers (``-m "backend and not expensive"``), and the whole
#: suite on both backends of the default Python.
BACKEND_TESTS = (
    "test_tracking.py",
    "test_tracking_edges.py",
    "test_backends.py",
    "test_backend_parity.py",
    "test_contract.py",
    "test_lifecycle.py",
    "test_windows.py",
    "test_counters.py",
    "test_tracing.py",
    "test_aggregate.py",
    "instrumentation",
)


def pytest_collection_modifyitems(config, items):
    tests = Path(__file__).parent
    for item in items:
        relative = Path(item.path).relative_to(tests) if Path(item.path).is_relative_to(tests) else None
        if relative is not None and relative.parts[0] in BACKEND_TESTS:
            item.add_marker(pytest.mark.backend)


def run_python(
    code: str, *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the same backend selection; a crash fails the test
    instead of killing pytest."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def snapshot_row():
    """Look up one row of a fresh snapshot."""

    def get(model, stage=None):
        return inferscope.snapshot().row(model, stage)

    return get
