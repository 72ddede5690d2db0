"""``inferscope report``: the flight recorder as one self-contained HTML page.

:func:`collect` reads the recorder through :class:`~inferscope.history.HistoryStore` and turns each
model's windows into chart series on one time axis, downsampled to at most ``max_points`` buckets
(windows in a bucket are pooled as the detector pools them, so a bucket's p95 is the p95 of its
calls, not an average of p95s). :func:`render_html` inlines the data as JSON, the vendored uPlot and
the page's own script and style, under a Content-Security-Policy that allows no network request.

Example::

    recorder = FlightRecorder(path, create=False)
    data = collect(recorder, since_unix=time.time() - 30 * 86400)
    Path("report.html").write_text(render_html(data))
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from ..baseline import MIN_WINDOW_CALLS, Baseline, KeyFigures, ProcessFigures
from ..detector import describe, tax_of
from ..history import HistoryStore, regression_to_json
from ..profile.stored import profile_of, profiles_of
from ..recorder import FlightRecorder
from ..system.fingerprint import diff
from ..windows import Window

__all__ = ["DEFAULT_MAX_POINTS", "REPORT_FORMAT", "collect", "render_html", "to_json"]

#: The version of the report's data block (``<script id="inferscope-data">``).
REPORT_FORMAT = 1
#: Buckets per model on the time axis: enough for a 1,000-pixel-wide chart, and what keeps 90 days
#: of 50 keys within a few MB.
DEFAULT_MAX_POINTS = 720
#: Environment sections shown in the timeline. ``threads_env`` (environment variables) and the
#: interpreter's path are left out: the report holds no environment variables and no paths.
_ENVIRONMENT_SECTIONS = {
    "inferscope",
    "python",
    "os",
    "cpu",
    "cgroup",
    "packages",
    "threadpools",
    "torch",
    "gpu",
}
_ENVIRONMENT_LEFT_OUT = {"python.executable", "cpu.flags", "cpu.affinity"}
_MB = 1024.0 * 1024.0
_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


def _num(value: float | None, scale: float = 1.0) -> float | None:
    """A finite value times ``scale`` with 4 significant digits (what a chart shows), else None."""
    if value is None:
        return None
    scaled = float(value) * scale
    return float(f"{scaled:.4g}") if math.isfinite(scaled) else None


def _series(label: str, values: Sequence[float | None], **style: Any) -> dict[str, Any] | None:
    """A chart series, or None when it has no finite point (a chart shows only what was measured)."""
    if not any(v is not None for v in values):
        return None
    return {"label": label, "values": list(values), **style}


def _chart(
    chart_id: str, title: str, unit: str, series: Iterable[dict[str, Any] | None], **options: Any
) -> dict[str, Any] | None:
    kept = [s for s in series if s is not None]
    return {"id": chart_id, "title": title, "unit": unit, "series": kept, **options} if kept else None


class _Bucket:
    """The windows whose ends fall in one bucket of the time axis."""

    def __init__(self) -> None:
        self.windows: list[Window] = []

    @property
    def elapsed(self) -> float:
        return max(w.end_unix for w in self.windows) - min(w.start_unix for w in self.windows)

    def key(self, model: str, stage: str | None) -> KeyFigures:
        return KeyFigures.pool(
            (k, w.seconds) for w in self.windows for k in w.keys if k.model == model and k.stage == stage
        )

    def process(self) -> ProcessFigures:
        return ProcessFigures.pool(
            [
                (w.process, w.seconds)
                for w in self.windows
                if w.process.rss_bytes is not None or w.process.canary_runs
            ]
        )


def _model_windows(store: HistoryStore, service: str, model: str, since: float, until: float) -> list[Window]:
    """The model's windows in [since, until]: the per-minute windows, and the hourly rollups before
    the first of them (older windows are folded into rollups by the recorder)."""
    windows = store.windows(service, model, since, until)
    rollup_until = windows[0].start_unix if windows else until
    hourly = store.windows(service, model, since, rollup_until, hourly=True)
    return [w for w in hourly if w.end_unix <= rollup_until] + windows


def _bucketed(windows: Sequence[Window], max_points: int) -> tuple[float, list[tuple[float, _Bucket]]]:
    """The windows in at most ``max_points`` buckets of equal width over the span they cover (never
    narrower than a window), each with the end of its last window."""
    if not windows:
        return 0.0, []
    finest = statistics.median(w.seconds for w in windows) or 1.0  # the last one may be cut short
    span = max(w.end_unix for w in windows) - min(w.start_unix for w in windows)
    width = max(finest, span / max(1, max_points))
    buckets: dict[int, _Bucket] = {}
    for window in windows:
        buckets.setdefault(math.floor(window.end_unix / width), _Bucket()).windows.append(window)
    return width, [(max(w.end_unix for w in b.windows), b) for _, b in sorted(buckets.items())]


def _stages(windows: Sequence[Window], model: str) -> list[str]:
    return sorted({k.stage for w in windows for k in w.keys if k.model == model and k.stage is not None})


def _anchor_json(anchor: Baseline | None) -> dict[str, Any] | None:
    if anchor is None:
        return None
    base = anchor.stage(None)
    return {
        "source": anchor.source,
        "start_unix": anchor.start_unix,
        "end_unix": anchor.end_unix,
        "versions": list(anchor.versions),
        "fingerprint": anchor.fingerprint,
        "quantiles_ms": {}
        if base is None
        else {name: _num(base.quantiles.get(name), 1e3) for name, _ in _QUANTILES},
    }


def _tax_json(
    store: HistoryStore,
    service: str,
    model: str,
    anchor: Baseline | None,
    now_seconds: float,
    until: float,
    regressions: Sequence[Mapping[str, Any]],
) -> dict[str, Any] | None:
    """The tax as ``inferscope status`` computes it (``detector.tax_of`` over the last
    ``now_seconds`` of the model's history), and since when it is paid: the start of the earliest
    active regression of the model's latency or CPU."""
    if anchor is None:
        return None
    recorder = store.recorder
    newest = (
        recorder.key_windows(model, service=service, until_unix=until, limit=1, newest_first=True)
        if recorder
        else []
    )
    if not newest:
        return None
    end = newest[0].end_unix
    tax = tax_of(anchor, store.windows(service, model, end - now_seconds, end))
    if tax is None:
        return None
    since = [r["since"] for r in regressions if r["active"] and r["metric"] not in ("rss", "py_heap")]
    return {
        "latency_p50_ms": _num(tax.latency_p50_seconds, 1e3),
        "latency_p95_ms": _num(tax.latency_p95_seconds, 1e3),
        "cpu_hours_per_day": _num(tax.cpu_hours_per_day),
        "calls_per_second": _num(tax.calls_per_second),
        "since_unix": min(since) if since else None,
        "over_seconds": now_seconds,
        "end_unix": end,
    }


def _model_report(
    store: HistoryStore,
    service: str,
    model: str,
    since: float,
    until: float,
    max_points: int,
    now_seconds: float,
) -> dict[str, Any]:
    windows = _model_windows(store, service, model, since, until)
    width, buckets = _bucketed(windows, max_points)
    anchor = store.load_anchor(service, model)
    stages = _stages(windows, model)
    times = [round(end, 3) for end, _ in buckets]
    inference = [b.key(model, None) for _, b in buckets]
    per_stage = {s: [b.key(model, s) for _, b in buckets] for s in stages}
    process = [b.process() for _, b in buckets]
    elapsed = [b.elapsed for _, b in buckets]

    def quantile(figures: Sequence[KeyFigures], q: float) -> list[float | None]:
        return [_num(f.quantile(q), 1e3) for f in figures]

    reference = _anchor_json(anchor)
    refs = (reference or {}).get("quantiles_ms", {})
    charts = [
        _chart(
            "latency",
            "Inference latency",
            "ms",
            [_series(name, quantile(inference, q)) for name, q in _QUANTILES]
            + [
                _series(f"anchor {name}", [refs.get(name)] * len(times), dash=True, like=name)
                for name, _ in _QUANTILES
                if refs.get(name) is not None
            ],
        ),
        _chart(
            "throughput",
            "Throughput",
            "calls/s",
            [
                _series(
                    "calls/s",
                    [
                        _num(f.count / e) if e > 0 and f.count else None
                        for f, e in zip(inference, elapsed, strict=True)
                    ],
                )
            ],
        ),
        _chart(
            "errors",
            "Error rate",
            "%",
            [_series("errors", [_num(f.errors / f.count, 100.0) if f.count else None for f in inference])],
        ),
        _chart(
            "stage_p95", "p95 per stage", "ms", [_series(s, quantile(per_stage[s], 0.95)) for s in stages]
        ),
        _chart(
            "stage_split",
            "Time per call by stage: CPU and off-CPU (stacked)",
            "ms",
            [
                series
                for s in stages
                for series in (
                    _series(f"{s} CPU", [_num(f.cpu_per_call, 1e3) for f in per_stage[s]], group=s),
                    _series(
                        f"{s} off-CPU",
                        [_num(f.off_cpu_per_call, 1e3) for f in per_stage[s]],
                        group=s,
                        light=True,
                    ),
                )
            ],
            stacked=True,
        ),
        _chart(
            "cpu",
            "CPU per inference",
            "ms",
            [
                _series(
                    "process CPU (library threads included)",
                    [_num(f.process_cpu_per_call, 1e3) for f in inference],
                ),
                _series("calling thread CPU", [_num(f.cpu_per_call, 1e3) for f in inference]),
            ],
        ),
        _chart(
            "size",
            "Input size per call",
            "items, tokens or bytes",
            [_series("size per call", [_num(f.size_per_call) for f in inference])],
        ),
        _chart(
            "gpu",
            "GPU device time per call",
            "ms",
            [_series(s, [_num(f.gpu_per_call, 1e3) for f in per_stage[s]]) for s in stages]
            + [
                _series(
                    "cuda peak memory (MB)",
                    [_num(f.counter_per_call("cuda_peak_bytes"), 1 / _MB) for f in inference],
                )
            ],
        ),
        _chart(
            "memory",
            "Memory",
            "MB",
            [
                _series("RSS", [_num(p.rss_bytes, 1 / _MB) for p in process]),
                _series("Python heap", [_num(p.py_heap_bytes, 1 / _MB) for p in process]),
            ],
        ),
        _chart(
            "canary",
            "Machine canary (one fixed unit of work)",
            "ms",
            [
                _series("canary wall", [_num(p.canary_wall_seconds, 1e3) for p in process]),
                _series("canary CPU", [_num(p.canary_cpu_seconds, 1e3) for p in process]),
            ],
        ),
    ]
    regressions = []
    profiles = profiles_of(store.recorder, service, model)
    # Those updated in the period (open ones are updated as they evolve), begun by its end.
    for regression in store.regressions(service, model, since_unix=since):
        if regression.since > until:
            continue
        entry = regression_to_json(regression)
        entry["summary"] = describe(regression)
        entry["profile"] = profile_of(profiles, entry)  # the regressed stage's sampled stacks
        regressions.append(entry)
    regressions.sort(key=lambda r: (r["since"], r["stage"] or "", r["metric"]))
    return {
        "service": service,
        "model": model,
        "versions": sorted(
            {k.version for w in windows for k in w.keys if k.model == model and k.version is not None}
        ),
        "windows": len(windows),
        "bucket_seconds": round(width, 3),
        "min_calls": MIN_WINDOW_CALLS,
        "anchor": reference,
        "tax": _tax_json(store, service, model, anchor, now_seconds, until, regressions),
        "time": times,
        "charts": [c for c in charts if c is not None],
        "regressions": regressions,
    }


def _environment_view(environment: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded environment without what the report must not hold (environment variables, paths)."""
    kept = {name: value for name, value in environment.items() if name in _ENVIRONMENT_SECTIONS}
    python = kept.get("python")
    if isinstance(python, Mapping):
        kept["python"] = {k: v for k, v in python.items() if f"python.{k}" not in _ENVIRONMENT_LEFT_OUT}
    cpu = kept.get("cpu")
    if isinstance(cpu, Mapping):
        kept["cpu"] = {k: v for k, v in cpu.items() if f"cpu.{k}" not in _ENVIRONMENT_LEFT_OUT}
    return kept


def _environment_timeline(recorder: FlightRecorder, since: float, until: float) -> list[dict[str, Any]]:
    """Each environment seen, oldest first, with its changes from the one before."""
    timeline: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    for fingerprint, first_seen, last_seen in recorder.fingerprints():
        environment = recorder.environment(fingerprint)
        if environment is None:
            continue
        view = _environment_view(environment)
        if last_seen >= since and first_seen <= until:
            changes = [] if previous is None else diff(previous, view)
            timeline.append(
                {
                    "fingerprint": fingerprint,
                    "first_seen_unix": first_seen,
                    "last_seen_unix": last_seen,
                    "python": view.get("python", {}).get("version"),
                    "cpu_model": view.get("cpu", {}).get("model"),
                    "changes": [
                        {"path": c.path, "kind": c.kind, "old": c.old, "new": c.new} for c in changes
                    ],
                }
            )
        previous = view
    return timeline


def collect(
    recorder: FlightRecorder,
    *,
    since_unix: float,
    until_unix: float | None = None,
    model: str | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    now_seconds: float = 60.0,
) -> dict[str, Any]:
    """The report's data: per model (or only ``model``), its charts over [since, until], its
    regressions and its tax over the last ``now_seconds`` of its history; and the environment
    timeline. Only what the recorder holds: no environment variables, arguments or request data."""
    until = time.time() if until_unix is None else until_unix
    store = HistoryStore(recorder)
    models = [
        _model_report(store, service, name, since_unix, until, max_points, now_seconds)
        for service, name, first, last in recorder.models()
        if (model is None or name == model) and last >= since_unix and first <= until
    ]
    return {
        "format": REPORT_FORMAT,
        "generated_unix": round(time.time(), 3),
        "since_unix": since_unix,
        "until_unix": until,
        "recorder": os.path.basename(recorder.path),
        "models": models,
        "environment": _environment_timeline(recorder, since_unix, until),
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def to_json(data: Mapping[str, Any]) -> str:
    """``data`` as JSON safe to inline in HTML: ``<``, ``>`` and ``&`` are escaped (``\\u003c``...),
    so no value can close the script element or open a comment; non-finite numbers become null."""
    text = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_PLACEHOLDER = re.compile(r"<!--inferscope:(\w+)-->")


def render_html(data: Mapping[str, Any], *, served: bool = False) -> str:
    """The page: one HTML file with the data, uPlot and the page's script and style inlined.

    Its Content-Security-Policy forbids every network request (``default-src 'none'``) and runs
    only the inlined scripts and styles, by hash. ``served``: the page may also fetch its data from
    its own origin (``inferscope report --serve``).
    """
    scripts = [_asset("vendor/uPlot.iife.min.js"), _asset("report.js")]
    styles = [_asset("vendor/uPlot.min.css"), _asset("report.css")]
    for text in scripts + styles:
        if re.search(r"</(script|style)", text, re.IGNORECASE):
            raise ValueError("an inlined asset closes its own element")
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_sha256(s) for s in scripts),
            "style-src " + " ".join(_sha256(s) for s in styles),
            "connect-src 'self'" if served else "connect-src 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ]
    )
    pieces = {
        "csp": policy,
        "uplot_css": styles[0],
        "style": styles[1],
        "data": to_json(data),
        "uplot_js": scripts[0],
        "script": scripts[1],
        "mode": "served" if served else "file",
    }
    # One pass, so that nothing inserted is scanned for placeholders again.
    return _PLACEHOLDER.sub(lambda m: pieces[m.group(1)], _asset("template.html"))
