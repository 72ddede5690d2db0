"""The gate's reports: a Markdown summary (a pull request comment, a CI step summary) and JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .result import BenchResult

__all__ = ["json_report", "markdown_summary", "write_report"]

_ICONS = {"pass": "✅ pass", "regression": "❌ regression", "inconclusive": "⚠️ inconclusive"}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.3f}"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e6:.1f}"


def _outcome(result: BenchResult) -> str:
    outcomes = [v.outcome for v in result.verdicts]
    for worst in ("regression", "inconclusive"):
        if worst in outcomes:
            return _ICONS[worst]
    if result.saving:
        return "💾 baseline saved"
    if outcomes:
        return _ICONS["pass"]
    return "⚠️ no baseline" if result.notes else "measured"


def markdown_summary(results: Sequence[BenchResult]) -> str:
    """A Markdown table of every benchmark, its checks and stages, for a pull request or a CI
    step summary."""
    lines = [
        "## inferscope performance gate",
        "",
        "| benchmark | calls | p50 ms | p99 ms | CPU/item µs | canary µs | outcome |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.name}` | {r.calls} | {_ms(r.p50)} | {_ms(r.p99)} | {_us(r.cpu_per_item)} | "
            f"{_us(r.canary_cpu_seconds)} | {_outcome(r)} |"
        )
    details = [r for r in results if r.verdicts or r.notes]
    if details:
        lines += ["", "### Verdicts", ""]
        for r in details:
            for v in r.verdicts:
                lines.append(f"- `{r.name}` ({v.metric}): {v.message}")
            for note in r.notes:
                lines.append(f"- `{r.name}`: {note}")
    staged = [r for r in results if len(r.stages) > 1]
    if staged:
        lines += [
            "",
            "### Stages",
            "",
            "| benchmark | stage | p50 ms | p95 ms | p99 ms | CPU/call ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in staged:
            for path, s in r.stages.items():
                lines.append(
                    f"| `{r.name}` | {path or '(inference)'} | {_ms(s.p50)} | {_ms(s.p95)} | {_ms(s.p99)} | "
                    f"{_ms(s.cpu_per_call)} |"
                )
    return "\n".join(lines) + "\n"


def json_report(results: Sequence[BenchResult]) -> dict[str, Any]:
    """Every benchmark's figures, stages and verdicts as one JSON-ready document."""
    return {"format": "inferscope.gate.report", "version": 1, "benchmarks": [r.to_json() for r in results]}


def write_report(path: str | os.PathLike[str], results: Sequence[BenchResult], *, kind: str) -> None:
    """Write the ``kind`` ("markdown" or "json") report to ``path``. A path that is the file named
    by ``GITHUB_STEP_SUMMARY`` is appended to, as GitHub Actions expects; others are replaced."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = (
        markdown_summary(results)
        if kind == "markdown"
        else json.dumps(json_report(results), indent=2, allow_nan=False, default=str) + "\n"
    )
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    append = summary is not None and Path(summary).resolve() == target.resolve()
    with open(target, "a" if append else "w", encoding="utf-8") as file:
        file.write(text)
