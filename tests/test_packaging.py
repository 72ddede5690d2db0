"""The distribution: its name, its one version, its metadata, and what the wheel and the sdist hold.

The package index's ``inferscope`` is an unrelated project: this one is published as
``inferscope-sdk`` and imported as ``inferscope``.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib.metadata
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import inferscope

from ._output import ROOT, copy_of_the_checkout

DISTRIBUTION = "inferscope-sdk"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def check_metadata(metadata: email.message.Message) -> None:
    assert metadata["Name"] == DISTRIBUTION
    assert metadata["Version"] == inferscope.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    classifiers = metadata.get_all("Classifier") or []
    for version in PYTHONS:
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "opentelemetry" in (metadata["Keywords"] or "")
    # No extra that would pull every framework (several GB) for opentelemetry-instrument's sake.
    assert not [extra for extra in metadata.get_all("Provides-Extra") or [] if "instruments" in extra]
    assert not [text for text in metadata.get_all("Requires-Dist") or [] if "instruments" in text]


def test_the_installed_distribution_is_inferscope_sdk_at_the_one_version() -> None:
    check_metadata(importlib.metadata.metadata(DISTRIBUTION))  # type: ignore[arg-type]
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["inferscope"] == "inferscope.cli:main"


def test_the_version_is_written_in_one_place() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'(?m)^dynamic = \["version"\]$', pyproject)
    assert 'version = {attr = "inferscope._version.__version__"}' in pyproject
    assert not re.search(r'(?m)^version = "', pyproject)
    sources = [
        path
        for path in (ROOT / "src" / "inferscope").rglob("*.py")
        if re.search(r"""metadata\.(version|distribution)\(\s*["']inferscope""", path.read_text("utf-8"))
    ]
    assert not sources, f"these ask the package metadata for inferscope's version: {sources}"


@pytest.mark.expensive
def test_the_wheel_and_the_sdist_carry_the_license_and_the_metadata(tmp_path: Path) -> None:
    source = copy_of_the_checkout(tmp_path)
    out = tmp_path / "dist"
    wheel = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            ".",
            "-w",
            str(out),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    sdist = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert sdist.returncode == 0, sdist.stdout + sdist.stderr
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text

    [wheel_path] = out.glob("inferscope_sdk-*.whl")
    with zipfile.ZipFile(wheel_path) as archive:
        names = set(archive.namelist())
        info = f"inferscope_sdk-{inferscope.__version__}.dist-info"
        assert archive.read(f"{info}/licenses/LICENSE").decode() == license_text
        check_metadata(email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode()))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert "inferscope = inferscope.cli:main" in entry_points
    for module in ("inferscope/py.typed", "inferscope/cli/__init__.py", "inferscope/cli/__main__.py"):
        assert module in names, module

    [sdist_path] = out.glob("inferscope_sdk-*.tar.gz")
    with tarfile.open(sdist_path) as archive:
        top = f"inferscope_sdk-{inferscope.__version__}"
        license_file = archive.extractfile(f"{top}/LICENSE")
        assert license_file is not None and license_file.read().decode() == license_text
        pkg_info = archive.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        check_metadata(email.parser.Parser().parsestr(pkg_info.read().decode()))
