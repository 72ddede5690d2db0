"""What ``compare`` found: per variant its figures, as a table, as JSON, and as a report section."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "COMPARE_FORMAT",
    "CompareResult",
    "OutputCheck",
    "Speedup",
    "VariantResult",
    "load",
    "report_section",
    "section_html",
]

#: The version of the JSON that ``CompareResult.to_dict()`` writes and :func:`load` reads.
COMPARE_FORMAT = 1
_KIND = "inferscope.compare"

#: A variant's status: timed; built but its outputs differ from the baseline's; not buildable
#: here; raised while built, called or timed; not run because the baseline failed.
STATUSES = ("ok", "mismatch", "unavailable", "failed", "not run")


@dataclass(frozen=True)
class Speedup:
    """The baseline's p50 over the variant's, with its confidence interval (None: too few calls
    to tell)."""

    point: float
    low: float | None
    high: float | None


@dataclass(frozen=True)
class OutputCheck:
    """The variant's outputs against the baseline's, with ``numpy.isclose(rtol, atol)``."""

    passed: bool
    rtol: float
    atol: float
    compared: int
    mismatched: int
    max_abs_diff: float | None
    max_rel_diff: float | None
    detail: str | None = None


@dataclass
class VariantResult:
    """One variant's figures; times in seconds, memory in bytes. Figures of a variant that was not
    timed are None."""

    name: str
    status: str
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    build_seconds: float | None = None
    first_call_seconds: float | None = None
    calls: int = 0
    p50_seconds: float | None = None
    p99_seconds: float | None = None
    mean_seconds: float | None = None
    cpu_per_call_seconds: float | None = None
    #: The process's RSS after the build and first call, less before the build: what it holds.
    held_memory_bytes: int | None = None
    #: The process's peak RSS during a few calls, less its RSS before them: what a call needs.
    call_peak_memory_bytes: int | None = None
    #: The process's peak RSS during those calls.
    peak_rss_bytes: int | None = None
    speedup: Speedup | None = None
    check: OutputCheck | None = None

    @property
    def startup_seconds(self) -> float | None:
        """Build (export, convert, compile) and first call."""
        if self.build_seconds is None or self.first_call_seconds is None:
            return None
        return self.build_seconds + self.first_call_seconds

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["startup_seconds"] = self.startup_seconds
        return data


@dataclass
class CompareResult:
    """The outcome of :func:`inferscope.compare.compare`: ``variants[0]`` is the baseline."""

    model: str
    framework: str
    framework_version: str | None
    method: str | None
    inputs: list[dict[str, Any]]
    rtol: float
    atol: float
    confidence: float
    seconds_per_variant: float
    variants: list[VariantResult]
    best: str
    best_reason: str
    #: What made the figures less telling: a busy machine, oversubscribed thread pools.
    warnings: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    created_unix: float = 0.0

    @property
    def baseline(self) -> VariantResult:
        return self.variants[0]

    def variant(self, name: str) -> VariantResult:
        """The variant called ``name``; KeyError naming the variants there are."""
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"no variant {name!r}; there are {', '.join(v.name for v in self.variants)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (every figure is finite or None)."""
        return {
            "format": COMPARE_FORMAT,
            "kind": _KIND,
            "model": self.model,
            "framework": self.framework,
            "framework_version": self.framework_version,
            "method": self.method,
            "inputs": self.inputs,
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "confidence": self.confidence,
            "seconds_per_variant": self.seconds_per_variant,
            "baseline": self.baseline.name,
            "best": self.best,
            "best_reason": self.best_reason,
            "warnings": self.warnings,
            "variants": [v.to_dict() for v in self.variants],
            "environment": self.environment,
            "created_unix": self.created_unix,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompareResult:
        """The result that :meth:`to_dict` wrote; ValueError when ``data`` is not one."""
        if data.get("kind") != _KIND or data.get("format") != COMPARE_FORMAT:
            raise ValueError(
                f"not an inferscope compare result of format {COMPARE_FORMAT} "
                f"(kind {data.get('kind')!r}, format {data.get('format')!r})"
            )
        variants = []
        for raw in data["variants"]:
            fields = {k: v for k, v in raw.items() if k != "startup_seconds"}
            if fields.get("speedup") is not None:
                fields["speedup"] = Speedup(**fields["speedup"])
            if fields.get("check") is not None:
                fields["check"] = OutputCheck(**fields["check"])
            variants.append(VariantResult(**fields))
        return cls(
            model=data["model"],
            framework=data["framework"],
            framework_version=data.get("framework_version"),
            method=data.get("method"),
            inputs=list(data.get("inputs", [])),
            rtol=data["tolerance"]["rtol"],
            atol=data["tolerance"]["atol"],
            confidence=data["confidence"],
            seconds_per_variant=data["seconds_per_variant"],
            variants=variants,
            best=data["best"],
            best_reason=data["best_reason"],
            warnings=list(data.get("warnings", [])),
            environment=dict(data.get("environment", {})),
            created_unix=data.get("created_unix", 0.0),
        )

    def table(self) -> str:
        """The comparison as a text table, with the verdict and the check's tolerance under it."""
        section = report_section(self)
        rows = [section["columns"], *section["rows"]]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([section["title"], "", *lines, "", *section["notes"]])


def load(path: str) -> CompareResult:
    """A result saved with ``inferscope compare --output FILE`` (or ``result.to_json()``)."""
    with open(path, encoding="utf-8") as file:
        return CompareResult.from_dict(json.load(file))


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"


def _speedup(variant: VariantResult, baseline: str) -> str:
    if variant.name == baseline:
        return "1 (baseline)"
    s = variant.speedup
    if s is None:
        return "-"
    if s.low is None or s.high is None:
        return f"{s.point:.3g}x (too few calls for an interval)"
    return f"{s.point:.3g}x ({s.low:.3g}-{s.high:.3g})"


def report_section(result: CompareResult | Mapping[str, Any]) -> dict[str, Any]:
    """The comparison as a section of ``inferscope report`` (or any page): a title, column
    headings, rows of formatted cells (strings), and notes (the verdict, the check's tolerance,
    each variant's notes). JSON-ready; ``result`` may be a :class:`CompareResult` or its
    ``to_dict()``."""
    if not isinstance(result, CompareResult):
        result = CompareResult.from_dict(result)
    level = f"{result.confidence:.0%}"
    columns = [
        "variant",
        "p50",
        "p99",
        "CPU/call",
        "mem held",
        "call peak",
        "start-up",
        f"speed-up ({level} CI)",
        "status",
    ]
    rows = []
    for v in result.variants:
        timed = v.status == "ok"
        rows.append(
            [
                v.name,
                _time(v.p50_seconds),
                _time(v.p99_seconds),
                _time(v.cpu_per_call_seconds),
                _bytes(v.held_memory_bytes) if timed else "-",
                _bytes(v.call_peak_memory_bytes) if timed else "-",
                _time(v.startup_seconds),
                _speedup(v, result.baseline.name) if timed else "-",
                v.status,
            ]
        )
    version = f" {result.framework_version}" if result.framework_version else ""
    method = f".{result.method}" if result.method else ""
    notes = [
        f"Best: {result.best}. {result.best_reason}",
        *(f"Warning: {warning}" for warning in result.warnings),
        f"Outputs checked against {result.baseline.name} with numpy.isclose(rtol={result.rtol:g}, "
        f"atol={result.atol:g}) before any timing; a variant that differs is not timed.",
        "Speed-up: the baseline's p50 over the variant's, with a block-bootstrap confidence interval. "
        "CPU/call counts every thread of the process. Start-up: build (export, convert, compile) and "
        "first call.",
    ]
    notes += [f"{v.name}: {v.status}: {v.reason}" for v in result.variants if v.reason]
    notes += [f"{v.name}: {note}" for v in result.variants for note in v.notes]
    return {
        "title": f"inferscope compare: {result.model}{method} ({result.framework}{version})",
        "columns": columns,
        "rows": rows,
        "notes": notes,
        "best": result.best,
        "baseline": result.baseline.name,
    }


def section_html(result: CompareResult | Mapping[str, Any]) -> str:
    """:func:`report_section` as an HTML fragment (a heading, a table, the notes), every text
    escaped: for a page rendered on the server rather than from the section's JSON."""
    section = report_section(result)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in section["columns"])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in section["rows"]
    )
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in section["notes"])
    return (
        f'<section class="inferscope-compare"><h2>{html.escape(section["title"])}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ul>{notes}</ul></section>"
    )
