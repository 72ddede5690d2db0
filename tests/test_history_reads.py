"""The detector reads the flight recorder when a model is first seen and where another process could
have changed it, never its whole history per window: rows read per window stay bounded whatever the
size of the file. Counts, not timings: the recorder counts its queries and the rows they return."""

from __future__ import annotations

import dataclasses
import sqlite3
import time

import pytest

import inferscope
from inferscope import detector as detector_module
from inferscope.baseline import Baseline
from inferscope.detector import Detector, DetectorSettings
from inferscope.history import HistoryStore
from inferscope.recorder import FlightRecorder
from inferscope.windows import WINDOWS, Window

MINUTE = 60.0
SETTINGS = DetectorSettings(window_seconds=MINUTE, baseline_seconds=3600.0, sustain_seconds=600.0)

_COLUMNS = (
    "service, model, version, stage, host, pid, fingerprint, count, errors, wall_seconds, cpu_seconds, "
    "cpu_wall_seconds, process_cpu_seconds, size_sum, size_count, duration, counters"
)


@inferscope.track_inference(model="reads-model", version="1")
def predict(x: int) -> int:
    with inferscope.stage("preprocess"):
        total = sum(range(x))
    with inferscope.stage("infer"):
        return total * 2


@pytest.fixture
def seed(tmp_path_factory) -> tuple[str, list[Window]]:
    """Windows of a short real run, as the drainer closed and recorded them (per test, so that the
    suite's own recorder isolation is in force when it configures inferscope back)."""
    path = tmp_path_factory.mktemp("seed") / "seed.sqlite"
    inferscope.configure(window_seconds=86400, recorder=str(path))
    try:
        WINDOWS.tick()
        WINDOWS.close()
        for _ in range(3):
            for i in range(50):
                predict(100 + i)
            WINDOWS.close()
    finally:
        inferscope.configure()
    store = HistoryStore(FlightRecorder(path, create=False))
    windows = [w for w in store.windows(None, "reads-model") if w.keys]
    assert windows and {k.stage for k in windows[-1].keys} == {None, "preprocess", "infer"}
    return str(path), windows


def _fill(seed_path: str, path: str, *, end: float, minutes: int) -> None:
    """Replicate the seed's last window into one window a minute over ``minutes`` before ``end``."""
    with sqlite3.connect(path) as raw:
        raw.execute("ATTACH DATABASE ? AS seed", (seed_path,))
        last = raw.execute("SELECT max(end_unix) FROM seed.windows").fetchone()[0]
        raw.execute(
            "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < ?) "
            f"INSERT INTO windows (start_unix, end_unix, {_COLUMNS}) "
            f"SELECT ? - (n + 1) * ?, ? - n * ?, {_COLUMNS} FROM seed.windows, k WHERE end_unix = ?",
            (minutes, end, MINUTE, end, MINUTE, last),
        )
        raw.execute(
            "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < ?) "
            "INSERT INTO process_windows (service, start_unix, end_unix, host, pid, fingerprint, figures) "
            "SELECT service, ? - (n + 1) * ?, ? - n * ?, host, pid, fingerprint, figures "
            "FROM seed.process_windows, k WHERE end_unix = ?",
            (minutes, end, MINUTE, end, MINUTE, last),
        )


def _run(
    recorder: FlightRecorder, template: Window, *, start: float, count: int
) -> tuple[Detector, list[int]]:
    """Feed ``count`` windows to a fresh detector as the drainer does (recorded first, then handed
    to the listener); the rows the recorder returned during each window."""
    detector = Detector(SETTINGS, store=HistoryStore(recorder))
    reads = []
    for i in range(count):
        end = start + (i + 1) * MINUTE
        window = dataclasses.replace(template, start_unix=end - MINUTE, end_unix=end)
        assert recorder.save_window(window)
        before = recorder.rows_read
        detector.on_window(window)
        reads.append(recorder.rows_read - before)
    assert detector.errors == 0
    return detector, reads


@pytest.mark.parametrize("days", [2, 4])
def test_rows_read_per_window_do_not_grow_with_the_history(seed, tmp_path, days) -> None:
    seed_path, windows = seed
    template = windows[-1]
    keys = len(template.keys)
    now = float(int(time.time() // MINUTE) * MINUTE)
    path = str(tmp_path / "recorder.sqlite")
    recorder = FlightRecorder(path)
    assert recorder.available
    _fill(seed_path, path, end=now, minutes=days * 1440)
    stored = len(recorder.key_windows("reads-model"))
    assert stored == days * 1440 * keys

    detector, reads = _run(recorder, template, start=now, count=120)
    assert detector.anchor("reads-model") is not None
    # The first window reads the anchor's span (the first baseline_seconds of the history, read
    # up to twice as far) and the rolling reference: one hour of one model a day ago.
    hour = (3600.0 / MINUTE + 2) * (keys + 1)
    assert 0 < reads[0] <= 2 * (SETTINGS.baseline_seconds / MINUTE + 1) * (keys + 1) + hour
    # Then only the rolling reference, once per sustain period.
    assert max(reads[1:]) <= hour
    refreshes = sum(1 for r in reads[1:] if r)
    assert refreshes <= len(reads) * MINUTE / SETTINGS.sustain_seconds + 1
    recorder.close()


def test_the_same_reads_with_twice_the_history(seed, tmp_path) -> None:
    seed_path, windows = seed
    now = float(int(time.time() // MINUTE) * MINUTE)
    found = []
    for days in (2, 4):  # both hold the hour a day ago that the rolling reference reads
        path = str(tmp_path / f"recorder-{days}.sqlite")
        recorder = FlightRecorder(path)
        assert recorder.available
        _fill(seed_path, path, end=now, minutes=days * 1440)
        _, reads = _run(recorder, windows[-1], start=now, count=60)
        found.append(reads)
        recorder.close()
    assert found[0] == found[1]


def test_an_incomplete_anchor_is_kept_in_memory_and_read_again_only_when_due(
    seed, tmp_path, monkeypatch
) -> None:
    """Ten minutes of history two days ago, an anchor of an hour: the span stays short (the windows
    of today are too late for it), and the recorder is not read again until the re-read is due;
    then an anchor that another worker stored meanwhile is adopted."""
    seed_path, windows = seed
    now = float(int(time.time() // MINUTE) * MINUTE)
    path = str(tmp_path / "recorder.sqlite")
    recorder = FlightRecorder(path)
    assert recorder.available
    _fill(seed_path, path, end=now - 2 * 86400, minutes=10)
    monkeypatch.setattr(detector_module, "_HISTORY_REREAD_SECONDS", 1e9)
    detector, reads = _run(recorder, windows[-1], start=now, count=30)
    assert reads[0] > 0 and reads[1:] == [0] * 29
    assert detector.anchor("reads-model") is None

    other_worker = HistoryStore(FlightRecorder(path))
    stored = other_worker.windows(None, "reads-model")
    anchor = Baseline.from_windows("reads-model", stored, source="anchor")
    assert anchor.service == windows[-1].service
    assert other_worker.save_baseline(anchor)
    monkeypatch.setattr(detector_module, "_HISTORY_REREAD_SECONDS", 0.0)
    queries = recorder.queries
    window = dataclasses.replace(windows[-1], start_unix=now + 30 * MINUTE, end_unix=now + 31 * MINUTE)
    detector.on_window(window)
    assert recorder.queries > queries
    assert detector.anchor("reads-model") is not None
    assert detector.anchor("reads-model").seconds == pytest.approx(anchor.seconds)
    recorder.close()
