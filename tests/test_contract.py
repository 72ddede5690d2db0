"""The backend contract is type-checked: both backends against one Protocol (``_contract.py``),
and every use of the runtime against it, so calling a method one backend lacks fails mypy."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("mypy", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mypy is not installed (the lint group)")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(code))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_both_backends_satisfy_the_contract_and_a_missing_method_fails(tmp_path):
    code = textwrap.dedent(
        """
        from inferscope import _native, _purepy
        from inferscope._contract import Backend, RuntimeContract
        from inferscope._runtime import RUNTIME

        c_backend: Backend = _native
        python_backend: Backend = _purepy
        runtime: RuntimeContract = python_backend.Runtime(python_backend.Ring(8), object())  # E: registry
        RUNTIME.enter(object(), 1)
        RUNTIME.no_such_method()  # E: not in the contract
        RUNTIME.ring.push(1, 0, 0, 0, 0)  # E: one argument short
        """
    )
    result = _mypy(tmp_path, code)
    expected = [n for n, line in enumerate(code.splitlines(), 1) if "# E:" in line]
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert sorted({int(line.split(":")[1]) for line in errors}) == expected, result.stdout
    assert '"RuntimeContract" has no attribute "no_such_method"' in result.stdout
