"""``inferscope status``: per model, what it costs now against its anchor, its regressions and its tax.

It reads the flight recorder (the file the service writes; ``INFERSCOPE_RECORDER`` or
``--recorder``), so it works from another shell, after the service stopped, and across its workers.
For each model: per stage, p50, p95 and CPU per call over the last ``--last`` seconds against the
anchor; the active regressions with their cause and evidence; and the tax, in ms per inference and
CPU-hours per day. ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from ._command import Command, bounded

__all__ = ["COMMAND", "status"]


def _recorder_path(given: str | None) -> str | None:
    from ..config import RECORDER_OFF, load_settings

    if given:
        return given
    path: str = load_settings().recorder
    return None if path == RECORDER_OFF else path


def _ms(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value * 1e3, 4)


def _change(now: float | None, then: float | None) -> float | None:
    if now is None or then is None or then <= 0 or not math.isfinite(now):
        return None
    return round(now / then - 1.0, 4)


#: Points of the p95 sparkline; each pools the windows of its share of the period.
SPARKLINE_POINTS = 40
_BARS = "▁▂▃▄▅▆▇█"


def p95_trend(
    windows: list[Any], model: str, quantile: float, points: int = SPARKLINE_POINTS
) -> list[float | None]:
    """The inference's quantile per slice of ``windows`` (oldest first), in seconds: the windows of
    each slice are pooled (their histograms merged), so a slice with few calls still counts them all.
    A slice without calls is None."""
    from ..histogram import Histogram

    if not windows:
        return []
    slices: list[Histogram | None] = [None] * min(points, len(windows))
    for i, window in enumerate(windows):
        at = i * len(slices) // len(windows)
        for k in window.keys:
            if k.model == model and k.stage is None and k.duration.count:
                pooled = slices[at]
                if pooled is None:
                    slices[at] = pooled = Histogram.empty(k.duration.scale)
                pooled.merge(k.duration)
    return [None if h is None else h.quantile(quantile) for h in slices]


def sparkline(values: list[float | None]) -> str:
    """Block characters scaled between the smallest and largest value; a gap is a space."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    return "".join(
        " "
        if v is None or not math.isfinite(v)
        else _BARS[0 if span <= 0 else min(len(_BARS) - 1, int((v - low) / span * len(_BARS)))]
        for v in values
    )


def _model_status(
    store: Any, service: str, model: str, last_seconds: float, quantile: float
) -> dict[str, Any]:
    from ..baseline import KeyFigures
    from ..detector import tax_of
    from ..history import regression_from_json, regression_to_json
    from ..profile.stored import profile_of, profiles_of

    recorder = store.recorder
    newest = (
        store.recorder.key_windows(model, service=service, limit=1, newest_first=True)
        if store.recorder
        else []
    )
    end = newest[0].end_unix if newest else time.time()
    windows = store.windows(service, model, end - last_seconds, end)
    anchor = store.load_anchor(service, model)
    stages: dict[str | None, Any] = {}
    for w in windows:
        for k in w.keys:
            if k.model == model:
                stages.setdefault(k.stage, []).append((k, w.seconds))
    rows = []
    for stage in sorted(stages, key=lambda s: (s is not None, s or "")):
        now = KeyFigures.pool(stages[stage])
        base = anchor.stage(stage) if anchor is not None else None
        p50, p95 = now.quantile(0.5), now.quantile(quantile)
        then_p50 = base.quantiles.get("p50") if base else None
        then_p95 = base.quantiles.get("q") if base else None
        rows.append(
            {
                "stage": stage,
                "calls": now.count,
                "errors": now.errors,
                "p50_ms": [_ms(then_p50), _ms(p50)],
                "p50_change": _change(p50, then_p50),
                "p95_ms": [_ms(then_p95), _ms(p95)],
                "p95_change": _change(p95, then_p95),
                "cpu_per_call_ms": [_ms(base.cpu_per_call if base else None), _ms(now.cpu_per_call)],
                "cpu_change": _change(now.cpu_per_call, base.cpu_per_call if base else None),
            }
        )
    # A regression still open when its process stopped writing is not known to be open now: it is
    # shown as it was last seen ("stale"), not as active.
    window_length = newest[0].end_unix - newest[0].start_unix if newest else 60.0
    profiles = profiles_of(recorder, service, model)
    regressions = []
    for record in recorder.regressions(service=service, model=model) if recorder is not None else []:
        try:
            item = regression_to_json(regression_from_json(record["payload"]))
        except (KeyError, TypeError, ValueError):
            continue
        stale = item["active"] and record["updated_unix"] < end - 3 * max(window_length, 1.0)
        if stale:
            item["active"] = False
        item["stale"] = stale
        if item["active"] or item["since"] >= end - 86400:
            item["profile"] = profile_of(profiles, item)  # the regressed stage's sampled stacks
            regressions.append(item)
    tax = tax_of(anchor, windows) if anchor is not None and windows else None
    trend = p95_trend(windows, model, quantile)
    return {
        "service": service,
        "model": model,
        "now": {"start_unix": end - last_seconds, "end_unix": end, "windows": len(windows)},
        "anchor": None
        if anchor is None
        else {
            "source": anchor.source,
            "start_unix": anchor.start_unix,
            "end_unix": anchor.end_unix,
            "versions": list(anchor.versions),
            "fingerprint": anchor.fingerprint,
        },
        "stages": rows,
        "p95_trend_ms": [_ms(v) for v in trend],
        "regressions": regressions,
        "tax": None
        if tax is None
        else {
            "latency_p50_ms": _ms(tax.latency_p50_seconds),
            "latency_p95_ms": _ms(tax.latency_p95_seconds),
            "cpu_cores": None if tax.cpu_cores is None else round(tax.cpu_cores, 6),
            "cpu_hours_per_day": None if tax.cpu_hours_per_day is None else round(tax.cpu_hours_per_day, 4),
            "calls_per_second": None if tax.calls_per_second is None else round(tax.calls_per_second, 3),
        },
    }


def _pair(values: list[float | None], change: float | None) -> str:
    then, now = values
    text = f"{'-' if then is None else f'{then:.3f}'} -> {'-' if now is None else f'{now:.3f}'}"
    return text + (f" ({change:+.0%})" if change is not None else "")


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix))


def render(report: dict[str, Any]) -> str:
    """The text of ``inferscope status``."""
    lines = [f"flight recorder: {report['recorder']}"]
    if not report["models"]:
        lines.append("no model has been recorded yet")
    for m in report["models"]:
        lines.append("")
        lines.append(f"model {m['model']} (service {m['service']})")
        anchor = m["anchor"]
        if anchor is None:
            lines.append("  anchor: none yet (taken once the model has baseline_seconds of history)")
        else:
            lines.append(
                f"  anchor: {anchor['source']}, {_when(anchor['start_unix'])} to "
                f"{_when(anchor['end_unix'])}, version {', '.join(anchor['versions']) or '-'}"
            )
        now = m["now"]
        lines.append(f"  now: {now['windows']} window(s) since {_when(now['start_unix'])}")
        trend = [v for v in m["p95_trend_ms"] if v is not None]
        if trend:
            lines.append(
                f"  p95 trend: {sparkline(m['p95_trend_ms'])}  ({min(trend):.3f} to {max(trend):.3f} ms)"
            )
        lines.append(
            f"  {'stage':<24} {'calls':>8}  {'p50 ms (anchor -> now)':<30} {'p95 ms':<30} cpu/call ms"
        )
        for row in m["stages"]:
            lines.append(
                f"  {row['stage'] or '(inference)':<24} {row['calls']:>8}  "
                f"{_pair(row['p50_ms'], row['p50_change']):<30} "
                f"{_pair(row['p95_ms'], row['p95_change']):<30} "
                f"{_pair(row['cpu_per_call_ms'], row['cpu_change'])}"
            )
        active = [r for r in m["regressions"] if r["active"]]
        stale = sum(1 for r in m["regressions"] if r.get("stale"))
        closed = len(m["regressions"]) - len(active) - stale
        lines.append(
            f"  regressions: {len(active)} active, {closed} closed in the last day"
            + (f", {stale} open when the service stopped writing" if stale else "")
        )
        for r in active:
            where = r["stage"] or "(inference)"
            lines.append(
                f"    {r['cause']:<18} {where} {r['metric']} {r['change']:+.0%} since {_when(r['since'])} "
                f"({r['shape']})"
            )
            evidence = r["evidence"]
            if evidence.get("why"):
                lines.append(f"      why: {evidence['why']}")
            for name, value in evidence.items():
                if name not in ("why", "candidates"):
                    lines.append(f"      {name}: {value}")
            for cause, reason in (evidence.get("candidates") or {}).items():
                lines.append(f"      not {cause}: {reason}")
            if r.get("profile"):
                from ..profile.stored import profile_lines

                lines.extend(profile_lines(r["profile"]))
        tax = m["tax"]
        if tax is not None:
            lines.append(
                f"  tax: {_fmt(tax['latency_p50_ms'])} ms at p50, {_fmt(tax['latency_p95_ms'])} ms at p95 "
                f"per inference; {_fmt(tax['cpu_hours_per_day'])} CPU-hours per day "
                f"at {_fmt(tax['calls_per_second'])} calls/s"
            )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}" if value < 0 else f"{value:.3f}"


def status(recorder_path: str | None, *, model: str | None, last_seconds: float | None, as_json: bool) -> int:
    """Print the status of every recorded model (or of ``model``); 2 when there is nothing to read."""
    from ..config import load_settings
    from ..history import HistoryStore
    from ..recorder import FlightRecorder

    path = _recorder_path(recorder_path)
    if path is None:
        print("inferscope status: the flight recorder is off (INFERSCOPE_RECORDER=off)", file=sys.stderr)
        return 2
    settings = load_settings()
    last = last_seconds if last_seconds is not None else settings.regression_sustain_seconds
    if not os.path.exists(path):
        print(f"inferscope status: no flight recorder at {path} (has a service run here?)", file=sys.stderr)
        return 2
    recorder = FlightRecorder(path, create=False)
    try:
        if not recorder.available:
            print(f"inferscope status: cannot read a flight recorder at {path}", file=sys.stderr)
            return 2
        store = HistoryStore(recorder)
        models = [(s, m) for s, m, _, _ in recorder.models() if model is None or m == model]
        report = {
            "recorder": path,
            "models": [_model_status(store, s, m, last, settings.regression_quantile) for s, m in models],
        }
    finally:
        recorder.close()
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recorder", help="the flight recorder file (default: INFERSCOPE_RECORDER or its default)"
    )
    parser.add_argument("--model", help="only this model")
    parser.add_argument(
        "--last",
        type=bounded(float, 1.0, 90 * 86400.0),
        metavar="SECONDS",
        help="how much recent history counts as now (default: regression_sustain_seconds)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _run(args: argparse.Namespace) -> int:
    return status(args.recorder, model=args.model, last_seconds=args.last, as_json=args.json)


COMMAND = Command(
    name="status",
    help="per model: now against the anchor, active regressions with their cause, and the tax",
    run=_run,
    add_arguments=_add_arguments,
    description="Per model, what it costs now against its anchor, per stage; its active regressions with "
    "their cause and evidence; and the tax in ms per inference and CPU-hours per day. Reads the flight "
    "recorder that the service writes.",
)
