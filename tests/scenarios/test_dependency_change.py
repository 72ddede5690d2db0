"""A dependency change across a restart: the same service, a second virtual environment, another numpy.

The service (tests/scenarios/service.py ``--text-fields``) takes its anchor in this environment
(numpy 2.x) and stops; the same service then starts in a second virtual environment, where numpy
1.26 comes first on ``sys.path`` and everything else (inferscope included) is this environment's,
and records into the same flight recorder. Its ``parse`` stage encodes text with numpy's string
functions: compiled ufuncs since numpy 2.0, a Python call per element before, so the same code costs
several times more. The restarted process must load the anchor the first one stored and name a
``dependency_change`` that names numpy's two versions.

The second environment is built once (it downloads numpy 1.26.4) and kept in pytest's cache
directory, keyed by the numpy and Python versions.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import inferscope
from inferscope.recorder import FlightRecorder

from .test_scenarios import run_service

pytestmark = [pytest.mark.scenario, pytest.mark.expensive]

OLD_NUMPY = "1.26.4"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def second_environment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with numpy OLD_NUMPY that sees this environment's packages after its own,
    kept in pytest's cache (a temporary directory when the cache is off: ``-p no:cacheprovider``)."""
    name = f"venv-numpy-{OLD_NUMPY}-py{PYTHON}"
    cache: pytest.Cache | None = getattr(request.config, "cache", None)
    home = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
    python = home / "bin" / "python"
    if (home / "ready").exists():
        return python
    shutil.rmtree(home)
    subprocess.run([sys.executable, "-m", "venv", str(home)], check=True, timeout=300)
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"numpy=={OLD_NUMPY}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if installed.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(f"could not install numpy {OLD_NUMPY} into {home}:\n{installed.stderr[-2000:]}")
    # This environment's packages (inferscope's editable install, threadpoolctl, OpenTelemetry) come
    # after the second environment's own numpy: only numpy differs between the two runs.
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    this = sysconfig.get_paths()["purelib"]
    (Path(site_packages) / "zz-inferscope-tests.pth").write_text(f"import site; site.addsitedir({this!r})\n")
    (home / "ready").write_text("")
    return python


@pytest.mark.skipif(sys.version_info >= (3, 13), reason=f"numpy {OLD_NUMPY} has no wheel for this Python")
@pytest.mark.skipif(np.__version__ < "2", reason="numpy's string functions became ufuncs in numpy 2.0")
def test_another_numpy_after_a_restart_is_a_dependency_change(isolated_recorder, request, tmp_path_factory):
    old_python = second_environment(request, tmp_path_factory)
    versions = subprocess.run(
        [str(old_python), "-c", "import numpy, inferscope; print(numpy.__version__, inferscope.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert versions == [OLD_NUMPY, inferscope.__file__]
    before = run_service("control", isolated_recorder, "--text-fields", "--anchor-only")
    assert not before["regressions"]
    after = run_service(
        "control", isolated_recorder, "--text-fields", "--inject-seconds", "15", python=str(old_python)
    )
    # The restarted process compares with the anchor the first one stored.
    stored = [
        (b["service"], b["saved_unix"], b["payload"]["start_unix"])
        for b in FlightRecorder(str(isolated_recorder), create=False).baselines()
    ]
    assert after["anchor"]["start_unix"] == before["anchor"]["start_unix"], stored
    found = [r for r in after["regressions"] if r["metric"] not in ("rss", "py_heap")]
    parse = [r for r in found if r["stage"] == "parse"]
    assert parse and {r["cause"] for r in parse} == {"dependency_change"}
    assert max(r["change"] for r in parse) > 1.0  # numpy 1.x's Python loop: several times the cost
    changed = f"numpy {np.__version__} -> {OLD_NUMPY}"
    assert all(changed in r["evidence"]["changed"] for r in parse)
    # Nothing is blamed on the service's own work: its code did not change (a neighbour's load on a
    # shared machine may show as contention, with the figures that prove it).
    assert {r["cause"] for r in found} <= {"dependency_change", "contention"}
