"""The gate's baseline files: ``inferscope baseline``'s versioned JSON, with the calls kept.

A file holds one document of ``baseline.py``'s format (``"format": "inferscope.baseline"``, its
``schema_version``, a list of ``baselines``), one entry per benchmark of a test. Each entry written
by the gate also carries a ``"samples"`` object: the per-call wall and CPU seconds (at most
``MAX_STORED_CALLS``, thinned evenly), where each round starts, the items per call and the canary's
runs. Readers of the format ignore it, so ``inferscope baseline load`` takes a gate's file as the
anchor of a service, and the gate takes a file saved from production (without samples) and
compares with its quantiles instead.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..baseline import BASELINE_FORMAT, Baseline, BaselineFormatError, parse_baselines
from ..windows import SCHEMA_VERSION
from .runner import BenchRun
from .stats import Sample

__all__ = [
    "DEFAULT_BASELINE_DIR",
    "MAX_STORED_CALLS",
    "StoredBaseline",
    "baseline_file_name",
    "read_baselines",
    "write_baselines",
]

#: Where the pytest plugin keeps baselines, relative to the project's root directory.
DEFAULT_BASELINE_DIR = ".inferscope/baselines"
#: Calls kept per baseline: enough for the quantiles the gate compares, ~100 KB of JSON.
MAX_STORED_CALLS = 4000


@dataclass(frozen=True)
class StoredBaseline:
    """A baseline, with the calls it was measured from when a gate saved it."""

    baseline: Baseline
    wall: Sample | None = None
    cpu: Sample | None = None
    items_per_call: float | None = None
    canary_wall: tuple[float, ...] = ()
    canary_cpu: tuple[float, ...] = ()

    @property
    def model(self) -> str:
        return self.baseline.model

    @classmethod
    def of_run(cls, run: BenchRun) -> StoredBaseline:
        return cls(
            run.baseline(),
            run.wall_sample(),
            run.cpu_sample(),
            run.items_per_call,
            tuple(run.canary_wall),
            tuple(run.canary_cpu),
        )

    def samples_json(self) -> dict[str, Any] | None:
        if self.wall is None or self.cpu is None:
            return None
        keep = _kept(len(self.wall))
        # The round a kept call falls in: rounds stay rounds after thinning.
        starts = sorted({int(np.searchsorted(keep, s)) for s in self.wall.round_starts})
        return {
            "wall_seconds": _rounded(self.wall.values[keep]),
            "cpu_seconds": _rounded(self.cpu.values[keep]),
            "round_starts": starts,
            "items_per_call": self.items_per_call,
            "canary_wall_seconds": _rounded(np.asarray(self.canary_wall)),
            "canary_cpu_seconds": _rounded(np.asarray(self.canary_cpu)),
        }


def _kept(count: int) -> np.ndarray:
    if count <= MAX_STORED_CALLS:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, MAX_STORED_CALLS).astype(np.int64))


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 9) for v in values]  # nanoseconds: what the clocks resolve


def baseline_file_name(node_id: str) -> str:
    """The file name of a test's baselines: its pytest node id with path separators and ``::`` as
    dots and anything unsafe in a file name as ``_``.

    >>> baseline_file_name("tests/perf/test_model.py::test_fraud[batch-64]")
    'tests.perf.test_model.py.test_fraud[batch-64].json'
    """
    name = node_id.replace("::", ".").replace("/", ".").replace("\\", ".")
    name = re.sub(r"[^A-Za-z0-9_.,=+\-\[\]]", "_", name).strip(".") or "baseline"
    return name[:200] + ".json"


def write_baselines(path: str | os.PathLike[str], stored: Sequence[StoredBaseline]) -> None:
    """Write ``stored`` to ``path`` (directories created; atomically: a reader never sees half a
    file) as one baseline document whose entries keep their samples."""
    entries = []
    for item in stored:
        entry = item.baseline.to_json()
        samples = item.samples_json()
        if samples is not None:
            entry["samples"] = samples
        entries.append(entry)
    document = {"format": BASELINE_FORMAT, "schema_version": SCHEMA_VERSION, "baselines": entries}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=1, allow_nan=False)
            file.write("\n")
        os.chmod(temporary, 0o644)  # a file for the repository, not a private one (mkstemp's 0600)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_baselines(path: str | os.PathLike[str]) -> dict[str, StoredBaseline]:
    """The baselines of a file by model, with their samples where the gate saved them.

    Raises BaselineFormatError for a file that is not a baseline document (or a malformed
    ``samples`` object), OSError when it cannot be read.
    """
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BaselineFormatError(f"{where} is not JSON ({error})") from None
    baselines = parse_baselines(document, where=where, source="ci")
    found: dict[str, StoredBaseline] = {}
    for index, (baseline, entry) in enumerate(zip(baselines, document["baselines"], strict=True)):
        samples = entry.get("samples")
        try:
            found[baseline.model] = _with_samples(baseline, samples)
        except (KeyError, TypeError, ValueError) as error:
            raise BaselineFormatError(
                f"{where}: baselines[{index}].samples is malformed ({type(error).__name__}: {error})"
            ) from None
    return found


def _with_samples(baseline: Baseline, samples: Mapping[str, Any] | None) -> StoredBaseline:
    if samples is None:
        return StoredBaseline(baseline)
    wall = np.asarray(samples["wall_seconds"], dtype=np.float64)
    cpu = np.asarray(samples["cpu_seconds"], dtype=np.float64)
    if wall.ndim != 1 or wall.shape != cpu.shape or len(wall) < 2:
        raise ValueError("wall_seconds and cpu_seconds must be lists of the same length, at least 2")
    starts = tuple(int(s) for s in samples["round_starts"]) or (0,)
    items = samples.get("items_per_call")
    return StoredBaseline(
        baseline,
        Sample(wall, starts),
        Sample(cpu, starts),
        float(items) if items is not None else None,
        tuple(float(v) for v in samples.get("canary_wall_seconds", ())),
        tuple(float(v) for v in samples.get("canary_cpu_seconds", ())),
    )
