"""Windows: what closing one costs the drainer, and what reading the flight recorder's history costs.

    python3 benchmarks/windows.py            # ~60 s
    python3 benchmarks/windows.py --quick    # ~15 s

Close: a service of 10 keys (three models with two stages each, and one without) runs a few calls
between closes; each ``WINDOWS.close()`` (what the drainer runs every ``window_seconds``: drain,
build, record, the detector) is timed in CPU seconds of the closing thread, the figure that holds
the GIL away from the service. Peers in the same run: one OTel SDK ``histogram.record`` per key,
and one ``prometheus_client.generate_latest`` of a registry of the same number of histogram series
(what a Prometheus scrape of them costs). Also shown: what reading the environment costs, which
the close no longer does per window (it is cached until an ML library is imported).

Reads: one-minute windows of 50 keys written into a recorder file, read back with
``key_windows``, with the histograms as binary blobs (this format) and as JSON (the first
format's rows), projected to 7 days of windows (504,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as PromHistogram

import inferscope
from inferscope.histogram import Histogram
from inferscope.recorder import FlightRecorder, histogram_from_blob, histogram_to_json
from inferscope.system.fingerprint import environment
from inferscope.windows import WINDOWS, KeyWindow, ProcessWindow, Window

KEYS = 10
READ_KEYS = 50
SEVEN_DAYS_ROWS = 7 * 1440 * READ_KEYS


def _thread_cpu(fn: Any, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return samples


def _service() -> Any:
    models = []
    for m in range(3):

        @inferscope.track_inference(model=f"bench-{m}", version="1")
        def predict(x: int) -> int:
            with inferscope.stage("preprocess"):
                total = sum(range(x))
            with inferscope.stage("infer"):
                return total * 2

        models.append(predict)
    models.append(inferscope.track_inference(model="bench-plain")(lambda x: x))

    def calls() -> None:
        for fn in models:
            for i in range(20):
                fn(50 + i)

    return calls


def close_cost(repeat: int) -> dict[str, Any]:
    calls = _service()
    with tempfile.TemporaryDirectory() as directory:
        inferscope.configure(window_seconds=86400, recorder=os.path.join(directory, "r.sqlite"))
        try:
            WINDOWS.tick()
            calls()
            WINDOWS.close()
            for _ in range(3):  # steady state: keys interned, recorder open, anchors asked for
                calls()
                WINDOWS.close()
            samples = []
            keys = 0
            for _ in range(repeat):
                calls()
                start = time.thread_time()
                window = WINDOWS.close()
                samples.append(time.thread_time() - start)
                keys = len(window.keys) if window is not None else 0
        finally:
            inferscope.configure(recorder="off")  # not the user's state directory

    provider = MeterProvider()
    otel = provider.get_meter("bench").create_histogram("bench.duration", unit="s")
    attributes = [{"model": f"m{i}"} for i in range(KEYS)]

    def records() -> None:
        for attrs in attributes:
            otel.record(0.01, attrs)

    registry = CollectorRegistry()
    prom = PromHistogram("bench_duration_seconds", "bench", ["key"], registry=registry)
    for i in range(KEYS):
        prom.labels(key=f"k{i}").observe(0.01)

    otel_samples = _thread_cpu(records, repeat * 20)
    prom_samples = _thread_cpu(lambda: generate_latest(registry), repeat * 5)
    env_samples = _thread_cpu(environment, 3)
    provider.shutdown()
    close = statistics.median(samples)
    return {
        "keys": keys,
        "close_cpu_ms": close * 1e3,
        "otel_records_cpu_ms": statistics.median(otel_samples) * 1e3,
        "prometheus_generate_latest_cpu_ms": statistics.median(prom_samples) * 1e3,
        "environment_read_cpu_ms": statistics.median(env_samples) * 1e3,
        "close_vs_otel": close / statistics.median(otel_samples),
        "close_vs_prometheus": close / statistics.median(prom_samples),
    }


def _key_window(model: str, stage: str | None, rng_seed: int) -> KeyWindow:
    durations = [0.001 * ((rng_seed + i) % 97 + 1) for i in range(200)]
    return KeyWindow(
        model=model,
        version="1",
        stage=stage,
        count=len(durations),
        errors=0,
        duration=Histogram.of(durations),
        wall_seconds=sum(durations),
        cpu_seconds=sum(durations) * 0.9,
        cpu_wall_seconds=sum(durations),
        counters={"voluntary_switches": 3.0, "involuntary_switches": 1.0},
    )


def read_cost(minutes: int) -> dict[str, Any]:
    keys = [
        _key_window(f"read-{k // 5}", None if k % 5 == 0 else f"stage{k % 5}", k) for k in range(READ_KEYS)
    ]
    now = time.time()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "r.sqlite")
        recorder = FlightRecorder(path, max_bytes=2**34)
        for i in range(minutes):
            end = now - (minutes - i) * 60.0
            recorder.save_window(Window("svc", end - 60.0, end, ProcessWindow(), tuple(keys)))
        rows = minutes * READ_KEYS

        def read_all() -> int:
            return sum(len(recorder.key_windows(f"read-{m}")) for m in range(READ_KEYS // 5))

        start = time.perf_counter()
        assert read_all() == rows
        blob_seconds = time.perf_counter() - start
        recorder.close()
        with sqlite3.connect(path) as raw:  # the first format: the same rows with JSON histograms
            updates = [
                (histogram_to_json(histogram_from_blob(blob)), row_id)
                for row_id, blob in raw.execute("SELECT id, duration FROM windows")
            ]
            raw.executemany("UPDATE windows SET duration = ? WHERE id = ?", updates)
        recorder = FlightRecorder(path, max_bytes=2**34)
        start = time.perf_counter()
        assert read_all() == rows
        json_seconds = time.perf_counter() - start
        recorder.close()
    scale = SEVEN_DAYS_ROWS / rows
    return {
        "rows": rows,
        "blob_read_seconds": blob_seconds,
        "json_read_seconds": json_seconds,
        "blob_7_days_projected_seconds": blob_seconds * scale,
        "json_7_days_projected_seconds": json_seconds * scale,
        "json_vs_blob": json_seconds / blob_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run with fewer repeats")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    close = close_cost(30 if args.quick else 200)
    reads = read_cost(60 if args.quick else 360)
    backend = "pure Python" if os.environ.get("INFERSCOPE_NO_EXTENSION") else "C extension"
    print(f"windows.py ({backend})")
    print(f"close of a window, {close['keys']} keys: {close['close_cpu_ms']:.3f} ms of CPU (median)")
    print(
        f"  peers: OTel histogram.record, once per key: {close['otel_records_cpu_ms']:.4f} ms "
        f"(close = {close['close_vs_otel']:.1f}x); prometheus generate_latest of {KEYS} series: "
        f"{close['prometheus_generate_latest_cpu_ms']:.3f} ms ({close['close_vs_prometheus']:.1f}x)"
    )
    print(
        "  reading the environment (once, and again only after an ML library's import): "
        f"{close['environment_read_cpu_ms']:.1f} ms"
    )
    print(
        f"reads: {reads['rows']} rows of {READ_KEYS} keys: blobs {reads['blob_read_seconds']:.3f} s, "
        f"JSON {reads['json_read_seconds']:.3f} s ({reads['json_vs_blob']:.1f}x); 7 days projected: "
        f"blobs {reads['blob_7_days_projected_seconds']:.1f} s, "
        f"JSON {reads['json_7_days_projected_seconds']:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"backend": backend, "close": close, "reads": reads}, out, indent=2)


if __name__ == "__main__":
    main()
