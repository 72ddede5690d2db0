"""The flight recorder: windows, fingerprints, baselines and regressions in one SQLite file, shared by
processes, kept across restarts, bounded, and never a failure for the service."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import fields, replace

import pytest

from inferscope.histogram import Histogram
from inferscope.history import HistoryStore
from inferscope.recorder import (
    FlightRecorder,
    histogram_from_blob,
    histogram_from_json,
    histogram_to_blob,
    histogram_to_json,
)
from inferscope.windows import RECORDER_SCHEMA_VERSION, KeyWindow, ProcessWindow, Window

from .conftest import run_python


def _window(end: float, *, model: str = "fraud", count: int = 10, seconds: float = 60.0) -> Window:
    durations = [0.01 * (i + 1) for i in range(count)]
    keys = (
        KeyWindow(
            model=model,
            version="3",
            stage=None,
            count=count + 1,
            errors=1,
            duration=Histogram.of(durations),
            wall_seconds=sum(durations) + 0.5,
            cpu_seconds=0.2,
            cpu_wall_seconds=sum(durations),
            process_cpu_seconds=0.4,
            counters={"involuntary_switches": 7.0},
            size_sum=32.0 * count,
            size_count=count,
        ),
        KeyWindow(
            model=model,
            version=None,
            stage="infer/encoder",
            count=count,
            errors=0,
            duration=Histogram.of(durations),
            wall_seconds=sum(durations),
        ),
    )
    process = ProcessWindow(
        rss_bytes=1e8,
        process_cpu_seconds=1.5,
        canary_wall_seconds=4e-5,
        canary_cpu_seconds=4e-5,
        canary_runs=120,
        fingerprint="abcd",
    )
    return Window("svc", end - seconds, end, process, keys)


@pytest.fixture
def recorder(tmp_path):
    found = FlightRecorder(tmp_path / "state" / "recorder.sqlite")
    yield found
    found.close()


def test_histogram_json_round_trip() -> None:
    hist = Histogram.of([0.0, 0.001, 0.02, 0.02, 3.5])
    assert histogram_from_json(histogram_to_json(hist)) == hist
    empty = histogram_from_json(histogram_to_json(Histogram.empty()))
    assert empty == Histogram.empty() and empty.count == 0


def test_histogram_blob_round_trip() -> None:
    hist = Histogram.of([0.0, 0.001, 0.02, 0.02, 3.5, 1e-9, 250.0])
    blob = histogram_to_blob(hist)
    assert isinstance(blob, bytes) and histogram_from_blob(blob) == hist
    back = histogram_from_blob(blob)
    assert (back.min, back.max, back.sum, back.zero_count) == (hist.min, hist.max, hist.sum, hist.zero_count)
    empty = histogram_from_blob(histogram_to_blob(Histogram.empty()))
    assert empty == Histogram.empty() and empty.count == 0
    with pytest.raises(ValueError, match="format"):
        histogram_from_blob(b"\x09" + blob[1:])


def test_a_file_of_json_histograms_stays_readable_and_is_marked_upgraded(tmp_path) -> None:
    """Rows of the first file format (histograms as JSON) are read, rolled up and kept; new rows
    are blobs, and the file says so, so that an older inferscope does not write to it."""
    path = tmp_path / "recorder.sqlite"
    now = time.time()
    old = FlightRecorder(path)
    assert old.save_window(_window(now - 9 * 86400)) and old.save_window(_window(now - 120))
    old.close()
    with sqlite3.connect(path) as raw:
        for row_id, blob in raw.execute("SELECT id, duration FROM windows").fetchall():
            raw.execute(
                "UPDATE windows SET duration = ? WHERE id = ?",
                (histogram_to_json(histogram_from_blob(blob)), row_id),
            )
        raw.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
    reopened = FlightRecorder(path)
    try:
        assert [r.window for r in reopened.key_windows("fraud")] == list(
            _window(now - 9 * 86400).keys
        ) + list(_window(now - 120).keys)
        assert reopened.save_window(_window(now - 60))
        assert reopened.maintain(now)
        (hour,) = reopened.key_windows("fraud", stage=None, hourly=True)
        assert hour.window.duration == _window(now).keys[0].duration
        assert len(reopened.key_windows("fraud", stage=None)) == 2
    finally:
        reopened.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone() == (
            str(RECORDER_SCHEMA_VERSION),
        )
        kinds = raw.execute("SELECT typeof(duration), count(*) FROM windows GROUP BY 1 ORDER BY 1").fetchall()
        assert kinds == [("blob", 2), ("text", 2)]
        assert raw.execute("SELECT DISTINCT typeof(duration) FROM rollups").fetchall() == [("blob",)]


def test_reads_are_counted(recorder) -> None:
    now = time.time()
    for minutes in (3, 2, 1):
        recorder.save_window(_window(now - 60 * minutes))
    before = (recorder.queries, recorder.rows_read)
    assert len(recorder.key_windows("fraud")) == 6
    assert (recorder.queries, recorder.rows_read) == (before[0] + 1, before[1] + 6)
    assert recorder.first_start("fraud") == pytest.approx(now - 240)
    assert recorder.first_start("fraud", service="other") is None
    assert recorder.queries == before[0] + 3


def test_window_round_trip_keyed_by_names(recorder) -> None:
    window = _window(time.time())
    assert recorder.save_window(window)
    rows = recorder.key_windows("fraud")
    assert [(r.window.version, r.window.stage) for r in rows] == [("3", None), (None, "infer/encoder")]
    stored = rows[0]
    assert stored.window == window.keys[0]
    assert (stored.service, stored.start_unix, stored.end_unix) == ("svc", window.start_unix, window.end_unix)
    assert (stored.pid, stored.fingerprint) == (os.getpid(), "abcd")
    assert recorder.key_windows("fraud", stage=None) == rows[:1]
    assert recorder.key_windows("fraud", stage="infer/encoder", version=None) == rows[1:]
    assert recorder.key_windows("other") == []
    (process,) = recorder.process_windows(service="svc")
    assert process.window == window.process
    # Names, never interned integers: the raw table says what it holds.
    with sqlite3.connect(recorder.path) as raw:
        assert raw.execute("SELECT DISTINCT service, model FROM windows").fetchall() == [("svc", "fraud")]


def test_filters_by_time_and_order(recorder) -> None:
    now = time.time()
    for minutes in (3, 2, 1):
        recorder.save_window(_window(now - 60 * minutes))
    ends = [r.end_unix for r in recorder.key_windows("fraud", stage=None)]
    assert ends == sorted(ends) and len(ends) == 3
    newest = recorder.key_windows("fraud", stage=None, newest_first=True, limit=1)
    assert [r.end_unix for r in newest] == [ends[-1]]
    middle = recorder.key_windows("fraud", stage=None, since_unix=ends[1], until_unix=ends[1])
    assert [r.end_unix for r in middle] == [ends[1]]
    ((service, model, first, last),) = recorder.models()
    assert (service, model, first, last) == ("svc", "fraud", ends[0] - 60, ends[-1])


def test_files_are_private(tmp_path) -> None:
    previous = os.umask(0)
    try:
        recorder = FlightRecorder(tmp_path / "new" / "dir" / "recorder.sqlite")
        assert recorder.save_window(_window(time.time()))
        directory = tmp_path / "new" / "dir"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for path in directory.iterdir():  # the database and its -wal and -shm files
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        recorder.close()
    finally:
        os.umask(previous)


def test_logged_once_where_it_records(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="inferscope")
    recorder = FlightRecorder(tmp_path / "r.sqlite")
    for _ in range(3):
        recorder.save_window(_window(time.time()))
    recorder.close()
    recorder.save_window(_window(time.time()))  # reopened: not announced again
    messages = [r.getMessage() for r in caplog.records if "flight recorder writes to" in r.getMessage()]
    assert len(messages) == 1 and str(tmp_path / "r.sqlite") in messages[0]
    recorder.close()


def test_fingerprints_keep_the_full_environment(recorder) -> None:
    env = {"fingerprint": "abcd", "packages": {"numpy": "2.1.0"}, "cpu": {"model": "EPYC"}}
    assert recorder.save_fingerprint("abcd", env, seen_unix=100.0)
    assert recorder.save_fingerprint("abcd", {"other": 1}, seen_unix=50.0)
    recorder.save_fingerprint("ef01", {"packages": {"numpy": "2.2.0"}}, seen_unix=200.0)
    assert recorder.environment("abcd") == env  # the first environment seen is kept
    assert recorder.fingerprints() == [("abcd", 50.0, 100.0), ("ef01", 200.0, 200.0)]
    assert recorder.environment("missing") is None


def test_baselines_and_regressions(recorder) -> None:
    assert recorder.load_baseline("svc", "fraud", "anchor") is None
    assert recorder.save_baseline("svc", "fraud", "anchor", {"p95": 0.1}, fingerprint="abcd", saved_unix=5.0)
    assert recorder.save_baseline("svc", "fraud", "anchor", {"p95": 0.2}, saved_unix=6.0)  # replaced
    assert recorder.load_baseline("svc", "fraud", "anchor") == {
        "service": "svc",
        "model": "fraud",
        "name": "anchor",
        "saved_unix": 6.0,
        "fingerprint": None,
        "payload": {"p95": 0.2},
    }
    args = ("svc", "fraud", None, "infer", "p95", 1000.0, "contention")
    assert recorder.save_regression(*args, True, {"change": 0.5}, updated_unix=1100.0)
    assert recorder.save_regression(*args, False, {"change": 0.6}, updated_unix=1200.0)  # it closed
    recorder.save_regression("svc", "other", "2", None, "cpu", 10.0, "more_work", True, {}, updated_unix=20.0)
    (closed,) = recorder.regressions(model="fraud")
    assert closed == {
        "service": "svc",
        "model": "fraud",
        "version": None,
        "stage": "infer",
        "metric": "p95",
        "since_unix": 1000.0,
        "cause": "contention",
        "active": False,
        "updated_unix": 1200.0,
        "payload": {"change": 0.6},
    }
    assert [r["model"] for r in recorder.regressions(active=True)] == ["other"]
    assert [r["model"] for r in recorder.regressions(since_unix=1000.0)] == ["fraud"]


def test_old_windows_fold_into_hourly_rollups(tmp_path) -> None:
    recorder = FlightRecorder(tmp_path / "r.sqlite", window_retention_seconds=86400.0)
    now = 1_800_000_000.0
    hour = (now - 2 * 86400) // 3600 * 3600
    old = [_window(hour + 60 * (m + 1)) for m in range(5)]  # five minutes of one hour, two days ago
    for window in old:
        recorder.save_window(window)
    recorder.save_window(_window(now))
    assert recorder.maintain(now_unix=now)
    assert [r.end_unix for r in recorder.key_windows("fraud", stage=None)] == [now]
    (rollup,) = recorder.key_windows("fraud", stage=None, hourly=True)
    assert (rollup.start_unix, rollup.end_unix, rollup.pid) == (hour, hour + 3600, 0)
    assert rollup.window.count == sum(w.keys[0].count for w in old)
    assert rollup.window.size_sum == sum(w.keys[0].size_sum for w in old)
    merged = Histogram.empty()
    for w in old:
        merged.merge(w.keys[0].duration)
    assert rollup.window.duration == merged
    assert rollup.window.counters == {"involuntary_switches": 35.0}
    # A model's history begins where its rollups begin.
    assert recorder.models()[0][2] == hour
    # Rollups past their own retention go.
    recorder.rollup_retention_seconds = 86400.0
    recorder.maintain(now_unix=now)
    assert recorder.key_windows("fraud", hourly=True) == []
    recorder.close()


def test_old_process_windows_fold_into_hourly_rollups_that_the_history_reads(tmp_path) -> None:
    # Months of RSS are what shows a slow leak: the process's figures outlive the per-minute windows.
    recorder = FlightRecorder(tmp_path / "r.sqlite", window_retention_seconds=86400.0)
    now = 1_800_000_000.0
    hour = (now - 2 * 86400) // 3600 * 3600
    every = {f.name for f in fields(ProcessWindow)}

    def window(minute: int, pid: int, rss: float) -> Window:
        w = _window(hour + 60 * minute)
        process = replace(
            w.process,
            rss_bytes=rss,
            py_heap_bytes=rss / 2,
            canary_wait_seconds=1e-4 * minute,
            cpu_pressure=0.1,
            steal_fraction=0.0,
            throttled_seconds=0.5,
            cpu_model="Test CPU",
            cpu_count=2.0,
            cpu_quota_cores=1.5,
            records_dropped=1,
            inference_cpu_seconds=1.0,
            run_queue_seconds=0.25,
        )
        assert {f.name for f in fields(ProcessWindow) if getattr(process, f.name) is None} == set()
        return replace(w, process=process)

    # Two workers; the rollup is folded in two passes (maintenance runs as the hour ages).
    for minute in (1, 2, 3):
        recorder.save_window(window(minute, 0, 100e6 + minute * 1e6), pid=11)
        recorder.save_window(window(minute, 0, 300e6 + minute * 1e6), pid=12)
    assert recorder.maintain(now_unix=now)
    for minute in (4, 5):
        recorder.save_window(window(minute, 0, 100e6 + minute * 1e6), pid=11)
    assert recorder.maintain(now_unix=now)
    assert recorder.process_windows() == []
    (rollup,) = recorder.process_windows(hourly=True)
    assert (rollup.start_unix, rollup.end_unix, rollup.host, rollup.pid) == (hour, hour + 3600, "", 0)
    folded = rollup.window
    # Each worker's last RSS in the hour, averaged: 105 MB (pid 11 at minute 5) and 303 MB (pid 12).
    assert folded.rss_bytes == pytest.approx((105e6 + 303e6) / 2, rel=0.02)
    assert folded.process_cpu_seconds == pytest.approx(8 * 1.5)
    assert folded.canary_runs == 8 * 120 and folded.records_dropped == 8
    assert folded.run_queue_seconds == pytest.approx(8 * 0.25)
    assert folded.cpu_pressure == pytest.approx(0.1)
    assert 1e-4 <= folded.canary_wait_seconds <= 5e-4
    assert (folded.cpu_model, folded.cpu_quota_cores, folded.fingerprint) == ("Test CPU", 1.5, "abcd")
    assert {name for name in every if getattr(folded, name) is None} == set()
    # The history's hourly windows carry them, as the report reads months.
    (read,) = HistoryStore(recorder).windows("svc", "fraud", hourly=True)
    assert read.process == folded
    # Rollups past their own retention go.
    recorder.rollup_retention_seconds = 86400.0
    recorder.maintain(now_unix=now)
    assert recorder.process_windows(hourly=True) == []
    recorder.close()


def test_size_bound_drops_the_oldest_windows_first(tmp_path) -> None:
    recorder = FlightRecorder(tmp_path / "r.sqlite", max_bytes=300_000)
    now = time.time()
    for i in range(400):
        recorder.save_window(_window(now - 60 * (400 - i), count=50))
    assert recorder.used_bytes() > 300_000
    assert recorder.maintain(now_unix=now)
    assert recorder.used_bytes() <= 300_000
    ends = [r.end_unix for r in recorder.key_windows("fraud", stage=None)]
    assert ends and ends[-1] == now - 60  # the newest survive
    assert len(ends) < 400
    recorder.close()
    assert os.path.getsize(tmp_path / "r.sqlite") <= 300_000 + 64 * 1024  # freed pages went back


def test_locked_file_is_counted_logged_once_and_retried(tmp_path, caplog) -> None:
    path = tmp_path / "r.sqlite"
    recorder = FlightRecorder(path, busy_timeout_seconds=0.05, retry_seconds=0.0)
    assert recorder.save_window(_window(time.time()))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert not recorder.save_window(_window(time.time()))
        assert not recorder.save_window(_window(time.time()))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert recorder.failures == {"locked": 2}
    logged = [r for r in caplog.records if "flight recorder cannot use" in r.getMessage()]
    assert len(logged) == 1 and "locked" in logged[0].getMessage()
    assert recorder.save_window(_window(time.time()))  # the lock is gone: recording goes on
    assert len(recorder.key_windows("fraud", stage=None)) == 2
    recorder.close()


def _without_root_override() -> None:
    """In a child run as root: drop the capabilities that let root write where modes forbid it
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that a read-only directory is read-only to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_directory_is_counted_and_recording_goes_on_in_memory(tmp_path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    code = """
        import json, time, inferscope
        from inferscope.windows import WINDOWS
        inferscope.configure(window_seconds=0.2)

        @inferscope.track_inference(model="m")
        def predict(x):
            return x

        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            predict(1)
            time.sleep(0.005)
        windows = inferscope.recent_windows()
        print(json.dumps({"windows": len(windows), "calls": sum(k.count for w in windows for k in w.keys),
                          "failures": WINDOWS.recorder().failures}))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "INFERSCOPE_RECORDER": str(directory / "r.sqlite")},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_without_root_override if os.geteuid() == 0 else None,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["windows"] >= 3 and report["calls"] > 0
    assert report["failures"] == {"read_only": 1}  # tried once; the next try is a minute later
    assert result.stderr.count("flight recorder cannot use") == 1
    assert not (directory / "r.sqlite").exists()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a small tmpfs"
)
def test_full_disk_is_counted_and_logged_once(tmp_path) -> None:
    # A 256 KiB tmpfs, mounted in a private mount namespace, fills up for real (ENOSPC).
    disk = tmp_path / "disk"
    disk.mkdir()
    code = f"""
        import json, logging, time
        logging.basicConfig()
        from inferscope.recorder import FlightRecorder
        from tests.test_recorder import _window
        recorder = FlightRecorder({str(disk / "r.sqlite")!r}, retry_seconds=0.0)
        stored = [recorder.save_window(_window(time.time(), count=200)) for _ in range(300)]
        print(json.dumps({{"stored": sum(stored), "failed": len(stored) - sum(stored),
                           "failures": recorder.failures}}))
    """
    script = f'mount -t tmpfs -o size=256k tmpfs {disk} && exec {sys.executable} -c "$0"'
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stored"] >= 1 and report["failed"] >= 1
    assert set(report["failures"]) == {"disk_full"}
    assert result.stderr.count("flight recorder cannot use") == 1


_WRITER = """
    import os, sys, time
    from inferscope.recorder import FlightRecorder
    from tests.test_recorder import _window
    recorder = FlightRecorder(sys.argv[1], busy_timeout_seconds=5.0)
    base = 1_800_000_000.0
    ok = sum(recorder.save_window(_window(base + 60 * i, model=f"m{os.getpid()}")) for i in range(60))
    recorder.close()
    print(ok, sum(recorder.failures.values()))
"""


def test_several_processes_write_one_file(tmp_path) -> None:
    path = str(tmp_path / "shared.sqlite")
    FlightRecorder(path).close()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        for _ in range(4)
    ]
    outputs = [w.communicate(timeout=120) for w in writers]
    for writer, (out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
        assert out.split() == ["60", "0"]
    reader = FlightRecorder(path)
    models = reader.models()
    assert len(models) == 4
    for _, model, _, _ in models:
        assert len(reader.key_windows(model)) == 120  # 60 windows x 2 keys, none lost
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    reader.close()


def test_history_survives_a_restart(tmp_path) -> None:
    path = str(tmp_path / "r.sqlite")
    code = """
        import json, time, inferscope
        inferscope.configure(window_seconds=0.2, service_name="restart-svc")

        @inferscope.track_inference(model="m", version="{version}")
        def predict(x):
            return x

        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            predict(1)
            time.sleep(0.002)
        inferscope.shutdown()
        recorder = inferscope.windows.WINDOWS.recorder()
        rows = recorder.key_windows("m", service="restart-svc")
        print(json.dumps({{"versions": sorted({{r.window.version for r in rows}}),
                           "pids": len({{r.pid for r in rows}}), "models": recorder.models()}}))
    """
    env = {"INFERSCOPE_RECORDER": path}
    first = run_python(code.format(version="1"), env=env)
    assert first.returncode == 0, first.stderr
    second = run_python(code.format(version="2"), env=env)
    assert second.returncode == 0, second.stderr
    before, after = json.loads(first.stdout), json.loads(second.stdout)
    assert before["versions"] == ["1"] and after["versions"] == ["1", "2"]
    assert after["pids"] == 2
    # The model's history still begins where the first run began.
    assert after["models"][0][2] == before["models"][0][2]


def test_forked_child_writes_with_its_own_connection(tmp_path) -> None:
    code = f"""
        import os, sqlite3, threading, time
        from inferscope.recorder import FlightRecorder
        from tests.test_recorder import _window
        path = {str(tmp_path / "r.sqlite")!r}
        # A long wait: four processes write at once on a busy machine; this is about fork().
        recorder = FlightRecorder(path, busy_timeout_seconds=30.0)
        os.register_at_fork(
            before=recorder.before_fork,
            after_in_parent=recorder.after_fork_in_parent,
            after_in_child=recorder.after_fork_in_child,
        )
        stop = threading.Event()

        def keep_writing():  # a writer thread, busy while the process forks
            i = 0
            while not stop.is_set():
                recorder.save_window(_window(1_800_000_000.0 + i, model="parent"))
                i += 1
                time.sleep(0.001)

        writer = threading.Thread(target=keep_writing)
        writer.start()
        time.sleep(0.2)
        children = []
        for n in range(3):
            pid = os.fork()
            if pid == 0:
                ok = all(recorder.save_window(_window(1_900_000_000.0 + i, model=f"child{{n}}"))
                         for i in range(20))
                os._exit(0 if ok else 1)
            children.append(pid)
        for pid in children:
            assert os.waitpid(pid, 0)[1] == 0
        time.sleep(0.1)
        stop.set()
        writer.join()
        assert recorder.save_window(_window(2_000_000_000.0, model="parent"))  # the parent's WAL survived
        assert os.path.exists(path + "-wal")
        for n in range(3):
            assert len(recorder.key_windows(f"child{{n}}")) == 40
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        print("ok", recorder.failures)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "{}"]


def test_settings_turn_it_off_and_move_it(tmp_path) -> None:
    code = """
        import inferscope
        from inferscope.windows import WINDOWS
        print(WINDOWS.recorder() is None)
        inferscope.configure(recorder={path!r}, window_seconds=0.1)
        WINDOWS.tick()
        print(WINDOWS.recorder().path)
    """
    moved = str(tmp_path / "moved.sqlite")
    result = run_python(code.format(path=moved), env={"INFERSCOPE_RECORDER": "off"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", moved]


def test_the_suite_never_records_into_the_users_state_directory(isolated_recorder) -> None:
    from inferscope import current_settings

    assert os.environ["INFERSCOPE_RECORDER"] == str(isolated_recorder)
    home_state = os.path.expanduser("~/.local/state/inferscope")
    settings = current_settings()
    assert settings is not None and not settings.recorder.startswith(home_state)


def test_a_file_that_is_not_a_recorder_is_counted_and_left_alone(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    path.write_bytes(b"this is not a database" * 1000)
    recorder = FlightRecorder(path, retry_seconds=3600.0)
    assert not recorder.save_window(_window(time.time()))
    assert recorder.key_windows("fraud") == []
    assert recorder.failures == {"corrupt": 1}  # tried once, then left alone until the retry
    assert path.read_bytes().startswith(b"this is not a database")


def test_a_newer_schema_is_not_written_to(tmp_path) -> None:
    path = tmp_path / "r.sqlite"
    first = FlightRecorder(path)
    assert first.available  # opened (on first use), with its tables
    first.close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = '999' WHERE name = 'schema_version'")
    raw.close()
    recorder = FlightRecorder(path)
    assert not recorder.save_window(_window(time.time()))
    assert sum(recorder.failures.values()) == 1
    recorder.close()


def test_an_io_error_is_named_counted_and_tried_again_on_the_next_write(tmp_path, caplog) -> None:
    # A disk that answers EIO cannot be made here: the error is SQLite's, as it raises one.
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorname = "SQLITE_IOERR_SHORT_READ"  # type: ignore[attr-defined]
    recorder = FlightRecorder(tmp_path / "r.sqlite", retry_seconds=3600.0)
    with caplog.at_level(logging.WARNING, logger="inferscope"), recorder._lock:
        recorder._failed(error, "writing")
    assert recorder.failures == {"io_error": 1}
    assert "disk I/O error [SQLITE_IOERR_SHORT_READ]" in caplog.text
    assert "tried again on the next write" in caplog.text
    # Not left alone for retry_seconds: the next window is written.
    assert recorder.save_window(_window(time.time()))
    assert [w.window.count for w in recorder.key_windows("fraud", stage=None)] == [11]
