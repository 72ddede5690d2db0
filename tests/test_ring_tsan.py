"""The C ring and the native drainer under ThreadSanitizer (and ASan/UBSan): pthread producers and
consumers, no GIL anywhere.

No free-threaded CPython exists on these machines, so this is how the claim "correct without the
GIL" is proven. The ring core is plain C11 (ringcore.h), compiled here with -fsanitize=thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "src" / "inferscope" / "_native"
STRESS = ROOT / "tests" / "c" / "ring_stress.c"
#: The native drainer (collector.h): its own thread folds while producers push and a reader takes.
COLLECTOR_STRESS = ROOT / "tests" / "c" / "collector_stress.c"

# Expensive: two sanitizer builds and 800,000 records under each; CI runs them once.
pytestmark = pytest.mark.expensive


def _compiler() -> str:
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have a C compiler for the ThreadSanitizer test")
        pytest.skip("no C compiler")
    return cc


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_ring_stress_under_sanitizer(tmp_path, sanitizer):
    binary = tmp_path / "ring_stress"
    _build(STRESS, binary, sanitizer)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66", ASAN_OPTIONS="detect_leaks=1")
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in run.stderr
    received, dropped, wakes, failures = (int(part.split("=")[1]) for part in run.stdout.split())
    assert failures == 0
    assert received + dropped == 4 * 200_000
    assert received > 0
    assert wakes > 0 or dropped == 0  # a ring that filled up woke its consumer


def _build(source: Path, binary: Path, sanitizer: str) -> None:
    build = subprocess.run(
        [
            _compiler(),
            "-std=c11",
            "-O1",
            "-g",
            f"-fsanitize={sanitizer}",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(NATIVE),
            str(source),
            "-o",
            str(binary),
            "-lpthread",
            "-lm",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr


@pytest.mark.parametrize("sanitizer", ["thread", "address,undefined"])
def test_native_drainer_under_sanitizer(tmp_path, sanitizer):
    """4 producers, the collector's thread folding at half full, and a reader taking folds as the
    Python drainer does: every accepted record is folded exactly once, with no data race."""
    import numpy as np

    from inferscope.histogram import _sub_bucket_tables

    binary = tmp_path / "collector_stress"
    _build(COLLECTOR_STRESS, binary, sanitizer)
    tables = tmp_path / "tables.bin"
    tables.write_bytes(np.concatenate(_sub_bucket_tables(6)).astype(np.int64).tobytes())
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66", ASAN_OPTIONS="detect_leaks=1")
    run = subprocess.run([str(binary), str(tables)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING: ThreadSanitizer" not in run.stderr
    folded, dropped, passes, takes, failures = (int(part.split("=")[1]) for part in run.stdout.split())
    assert failures == 0
    assert folded + dropped == 4 * 200_000
    assert passes > 0  # the thread drained, woken by the producers
    assert takes > 0


def test_extension_source_compiles_without_warnings(tmp_path):
    """A lint of the C source: the whole extension builds with every common warning as an error."""
    import sysconfig

    include = sysconfig.get_paths()["include"]
    build = subprocess.run(
        [
            _compiler(),
            "-std=c11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wshadow",
            "-Wstrict-prototypes",
            "-Wno-unused-parameter",
            "-Wno-missing-field-initializers",
            "-Werror",
            "-fPIC",
            "-c",
            "-I",
            include,
            "-I",
            str(NATIVE),
            str(NATIVE / "ringbuf.c"),
            "-o",
            str(tmp_path / "ringbuf.o"),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
