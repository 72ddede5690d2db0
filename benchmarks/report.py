"""``inferscope report`` at scale: generation time, file size and load time for 7, 30 and 90 days of 5,
20 and 50 keys.

    python3 benchmarks/report.py            # several minutes: three recorders of 90 days
    python3 benchmarks/report.py --quick    # 7 and 30 days of 5 and 20 keys

Each recorder is filled as a service fills it: one-minute windows for the last 7 days and, before
them, hourly rollups (written as hour-long windows and folded by the recorder's own retention), up to
90 days back. A key is one model's inference or one of its four stages, so 50 keys are 10 models.
The figures in the windows are synthetic (latencies drawn from a log-normal): what is measured is
the report's cost, not what it shows.

Per case: the time to gather the report (``collect``) and write the page (``render_html``), next to
its peer, the time ``HistoryStore.windows()`` takes to read the same windows (what any reader of the
recorder pays); the ratio says what the report adds to the read. Then the file's size against the
5 MB budget, and, where Chromium is installed, the time from navigation to the last chart drawn in
headless Chromium, as the page records it (``data-rendered-ms``).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

from inferscope.histogram import Histogram
from inferscope.history import HistoryStore
from inferscope.recorder import FlightRecorder
from inferscope.report import collect, render_html
from inferscope.windows import KeyWindow, ProcessWindow, Window

DAY = 86400.0
MINUTE_DAYS = 7  # the recorder's default window retention: older windows are hourly rollups
STAGES = (None, "preprocess", "infer", "infer/encoder", "postprocess")
BUDGET_BYTES = 5 * 1024 * 1024
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _key_windows(rng: np.random.Generator, models: int, variants: int = 16) -> list[tuple[KeyWindow, ...]]:
    """``variants`` sets of key windows (one per key), reused across the windows."""
    sets = []
    for _ in range(variants):
        keys = []
        for m in range(models):
            for stage in STAGES:
                seconds = rng.lognormal(math.log(0.004 if stage is None else 0.001), 0.4, size=600)
                keys.append(
                    KeyWindow(
                        model=f"model-{m}",
                        version="1",
                        stage=stage,
                        count=len(seconds),
                        errors=int(rng.integers(0, 3)),
                        duration=Histogram.of(seconds),
                        wall_seconds=float(seconds.sum()),
                        cpu_seconds=float(seconds.sum() * 0.7),
                        cpu_wall_seconds=float(seconds.sum()),
                        process_cpu_seconds=float(seconds.sum() * 1.3) if stage is None else None,
                        counters={"voluntary_switches": 600.0, "minor_faults": 1200.0},
                        size_sum=600.0 * 16 if stage is None else 0.0,
                        size_count=600 if stage is None else 0,
                    )
                )
        sets.append(tuple(keys))
    return sets


def fill(path: str, models: int, days: float, now: float) -> int:
    """A recorder of ``days`` of ``models`` x 5 keys; returns the windows written."""
    rng = np.random.default_rng(7)
    sets = _key_windows(rng, models)
    recorder = FlightRecorder(path, max_bytes=2**40)
    recorder.save_fingerprint("bench", {"packages": {"numpy": np.__version__}}, seen_unix=now - days * DAY)
    process = ProcessWindow(
        rss_bytes=300e6, py_heap_bytes=40e6, process_cpu_seconds=30.0, canary_wall_seconds=0.0004,
        canary_cpu_seconds=0.0004, canary_runs=5, fingerprint="bench",
    )  # fmt: skip
    split = now - min(days, MINUTE_DAYS) * DAY
    starts = [*np.arange(now - days * DAY, split, 3600.0), *np.arange(split, now, 60.0)]
    written = 0
    for index, start in enumerate(starts):
        end = starts[index + 1] if index + 1 < len(starts) else now
        recorder.save_window(
            Window("bench", float(start), float(end), process, sets[index % len(sets)]), pid=1
        )
        written += 1
    recorder.maintain(now)  # folds the hour-long windows past the retention into rollups
    recorder.close()
    return written


def generate(path: str, since: float, now: float) -> dict[str, Any]:
    """Read the recorder's windows (the peer), then gather and render the report, timed."""
    recorder = FlightRecorder(path, create=False)
    try:
        store = HistoryStore(recorder)
        started = time.perf_counter()
        for _, model, _, _ in recorder.models():
            store.windows(None, model, since, now)
            store.windows(None, model, since, now, hourly=True)
        read = time.perf_counter() - started
        started = time.perf_counter()
        data = collect(recorder, since_unix=since, until_unix=now)
        gathered = time.perf_counter() - started
        started = time.perf_counter()
        page = render_html(data)
        rendered = time.perf_counter() - started
    finally:
        recorder.close()
    return {"read_seconds": read, "collect_seconds": gathered, "render_seconds": rendered, "page": page}


def chromium_render_ms(page: Path, profile: Path) -> float | None:
    """Milliseconds from navigation to the last chart drawn, as the page records it, in headless
    Chromium (None without Chromium)."""
    if CHROMIUM is None:
        return None
    done = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1280,2000", "--dump-dom", page.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    found = re.search(r'data-rendered-ms="(\d+)"', done.stdout)
    return float(found.group(1)) if found else None


def measure(quick: bool = False) -> dict[str, Any]:
    days_list = (7, 30) if quick else (7, 30, 90)
    keys_list = (5, 20) if quick else (5, 20, 50)
    now = time.time()
    cases = []
    with tempfile.TemporaryDirectory(prefix="inferscope-report-bench-") as directory:
        root = Path(directory)
        for keys in keys_list:
            path = str(root / f"recorder-{keys}.sqlite")
            _common.progress(f"filling a recorder of {max(days_list)} days of {keys} keys")
            written = fill(path, keys // len(STAGES), max(days_list), now)
            for days in days_list:
                timed = generate(path, now - days * DAY, now)
                page = timed.pop("page")
                out = root / f"report-{keys}-{days}.html"
                out.write_text(page, encoding="utf-8")
                rendered = chromium_render_ms(out, root / f"profile-{keys}-{days}")
                cases.append(
                    {
                        "days": days,
                        "keys": keys,
                        "windows_written": written,
                        **timed,
                        "bytes": len(page.encode()),
                        "chromium_render_ms": rendered,
                    }
                )
                seconds = timed["collect_seconds"] + timed["render_seconds"]
                _common.progress(f"{days} days of {keys} keys: {len(page) / 1e6:.2f} MB in {seconds:.1f} s")
    return {"cases": cases}


def report(runs: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    rows = []
    for case in runs["c"]["cases"]:
        generation = case["collect_seconds"] + case["render_seconds"]
        rendered = case["chromium_render_ms"]
        rows.append(
            [
                f"{case['days']} d x {case['keys']} keys",
                f"{generation:.2f}",
                f"{case['read_seconds']:.2f}",
                f"{generation / case['read_seconds']:.2f}x" if case["read_seconds"] > 0 else "-",
                f"{case['bytes'] / 1e6:.2f}",
                _common.verdict(case["bytes"] <= BUDGET_BYTES),
                "-" if rendered is None else f"{rendered:.0f}",
            ]
        )
    text = "\n".join(
        [
            "inferscope report: generation, size and load (synthetic recorders, one-minute windows for",
            "7 days and hourly rollups before)",
            "",
            _common.table(
                [
                    "case",
                    "generate s",
                    "read s (peer)",
                    "ratio",
                    "MB",
                    "<= 5 MB",
                    "drawn in Chromium, ms",
                ],
                rows,
            ),
        ]
    )
    return text, runs["c"]


def main() -> int:
    # One backend is enough: the report reads the recorder and never touches the hot path.
    args = _common.base_parser(__doc__.split("\n")[0]).parse_args()
    runs = {"c": measure(quick=args.quick)}
    text, data = report(runs)
    print(text)
    print(_common.environment_line(_common.environment()))
    if args.json:
        _common.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
