"""One scrape of a pre-fork server: 8 workers x 200 keys, inferscope against prometheus_client.

    python3 benchmarks/scrape_workers.py            # ~40 s
    python3 benchmarks/scrape_workers.py --quick    # ~15 s

inferscope (``multiprocess=True``): 8 workers' publications, each of 200 inference keys with a
duration and a CPU-time histogram, lie in a server directory; one scrape reads and merges them and
renders the Prometheus text (``generate_latest`` of the merged collector, with the serving
process's host signals, as the endpoint serves it).

Peer, in the same run: prometheus_client's multiprocess mode, 8 worker processes that observed the
same calls into two labelled ``Histogram`` families of 200 series each (the same 18 explicit
buckets), then ``generate_latest`` of a ``MultiProcessCollector``: what its ``/metrics`` costs.

Printed: each scrape's median wall time and their ratio (inferscope / prometheus_client), the
figure to watch; below 1 inferscope is faster. Also the size of what each keeps in memory files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import _common
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from inferscope._keys import KeyRegistry
from inferscope._records import empty_records
from inferscope.aggregator import Aggregator
from inferscope.config import DEFAULT_HISTOGRAM_BOUNDARIES, Settings
from inferscope.export.multiworker import Publication, merged_collector

WORKERS = 8
KEYS = 200


def _durations(worker: int, calls: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(worker)
    wall = rng.lognormal(mean=np.log(0.02), sigma=0.6, size=calls)
    return wall, wall * rng.uniform(0.3, 0.9, size=calls)


def _publish_inferscope(directory: Path, calls_per_key: int) -> int:
    """Write the 8 workers' publications; returns their total size in bytes."""
    size = 0
    for worker in range(WORKERS):
        registry = KeyRegistry()
        keys = [registry.inference_key(f"model-{k}", "1") for k in range(KEYS)]
        wall, cpu = _durations(worker, KEYS * calls_per_key)
        records = empty_records(wall.size)
        records["key"] = np.repeat(keys, calls_per_key)
        records["wall_ns"] = (wall * 1e9).astype(np.int64)
        records["cpu_ns"] = (cpu * 1e9).astype(np.int64)
        aggregator = Aggregator(registry)
        aggregator.add(records)
        data = Publication.of_view(aggregator.view(), slot=worker, generation=f"g{worker}").encode()
        (directory / f"slot-{worker}.data").write_bytes(data)
        size += len(data)
    return size


_PROMETHEUS_WORKER = """
import sys
import numpy as np
from prometheus_client import Histogram

worker, calls_per_key, keys = (int(a) for a in sys.argv[1:4])
buckets = [float(b) for b in sys.argv[4].split(",")]
rng = np.random.default_rng(worker)
wall = rng.lognormal(mean=np.log(0.02), sigma=0.6, size=keys * calls_per_key)
cpu = wall * rng.uniform(0.3, 0.9, size=wall.size)
duration = Histogram("inference_duration_seconds", "d", ["model", "version"], buckets=buckets)
cpu_time = Histogram("inference_cpu_time_seconds", "c", ["model", "version"], buckets=buckets)
for i in range(wall.size):
    model = f"model-{i // calls_per_key}"
    duration.labels(model, "1").observe(wall[i])
    cpu_time.labels(model, "1").observe(cpu[i])
"""


def _publish_prometheus(directory: Path, calls_per_key: int) -> int:
    buckets = ",".join(str(b) for b in DEFAULT_HISTOGRAM_BOUNDARIES)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(_PROMETHEUS_WORKER),
                str(w),
                str(calls_per_key),
                str(KEYS),
                buckets,
            ],
            env=env,
        )
        for w in range(WORKERS)
    ]
    for worker in workers:
        if worker.wait(300) != 0:
            raise SystemExit("a prometheus_client worker failed")
    return sum(path.stat().st_size for path in directory.iterdir())


def _median_seconds(scrape: object, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        scrape()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return _common.median(samples)


def main() -> None:
    args = _common.base_parser(__doc__.splitlines()[0]).parse_args()
    calls_per_key = 20 if args.quick else 100
    repeat = 5 if args.quick else 15
    load = _common.MachineLoad()
    _common.progress("scrape_workers.py: writing 8 workers' data for each side")

    with tempfile.TemporaryDirectory() as ours, tempfile.TemporaryDirectory() as theirs:
        ours_bytes = _publish_inferscope(Path(ours), calls_per_key)
        theirs_bytes = _publish_prometheus(Path(theirs), calls_per_key)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(merged_collector(Settings(recorder="off"), directories=lambda: [Path(ours)]))
        inferscope_text = generate_latest(registry)

        from prometheus_client import multiprocess

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = theirs
        peer = CollectorRegistry()
        multiprocess.MultiProcessCollector(peer, path=theirs)
        peer_text = generate_latest(peer)

        for _ in range(2):  # warm both
            generate_latest(registry)
            generate_latest(peer)
        inferscope_s = _median_seconds(lambda: generate_latest(registry), repeat)
        peer_s = _median_seconds(lambda: generate_latest(peer), repeat)

    series = inferscope_text.count(b"_count{")
    print(f"{WORKERS} workers x {KEYS} keys, {calls_per_key} calls per key and worker")
    print(f"  inferscope merged scrape      {inferscope_s * 1e3:8.1f} ms  ({len(inferscope_text):,} bytes, "
          f"{series} histogram series; shared files {ours_bytes / 1024:,.0f} KiB)")  # fmt: skip
    print(f"  prometheus_client multiprocess {peer_s * 1e3:7.1f} ms  ({len(peer_text):,} bytes; "
          f"files {theirs_bytes / 1024:,.0f} KiB)")  # fmt: skip
    print(f"  ratio inferscope / prometheus_client: {inferscope_s / peer_s:.2f}")
    machine = load.summary()
    print(_common.load_line(machine))
    _common.write_json(
        args.json,
        {
            "workers": WORKERS,
            "keys": KEYS,
            "calls_per_key": calls_per_key,
            "inferscope_scrape_seconds": inferscope_s,
            "prometheus_client_scrape_seconds": peer_s,
            "ratio": inferscope_s / peer_s,
            "inferscope_bytes": len(inferscope_text),
            "prometheus_client_bytes": len(peer_text),
            "machine_load": machine,
        },
    )


if __name__ == "__main__":
    main()
