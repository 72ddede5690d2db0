"""Memory per key: what each distinct (model, version, stage path) costs once it has recorded.

    python3 benchmarks/key_memory.py              # 10,000 keys, ~20 s
    python3 benchmarks/key_memory.py --keys 2000

Method: ``configure(max_keys=N + 100, counters="default")`` with a Prometheus endpoint on a free
127.0.0.1 port; one tracked model calls N distinct stages, four times over, with a drain, a
``snapshot()`` after each round, and a scrape after the last two. The resident set size is read
after a ``gc.collect()`` before the first round, after the second (aggregation state), and after
the last scrape (the aggregation state and what serving scrapes leaves behind). Printed in KiB
per key; these are the figures docs/metrics.md ("Cardinality") and ``_keys.MAX_KEYS_LIMIT`` state.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import urllib.request

import inferscope
from inferscope import _pipeline


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    keys = parser.parse_args().keys
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inferscope.configure(
        metrics_exporters="prometheus",
        prometheus_host="127.0.0.1",
        prometheus_port=port,
        max_keys=keys + 100,
        counters="default",
    )
    url = f"http://127.0.0.1:{port}/metrics"

    @inferscope.track_inference(model="keys")
    def call(i: int) -> None:
        with inferscope.stage(f"s{i}"):
            pass

    def round_trip(scrape: bool) -> int:
        for i in range(keys):
            call(i)
            if i % 20_000 == 0:
                _pipeline.DRAINER.drain()
        inferscope.snapshot()
        if not scrape:
            return 0
        with urllib.request.urlopen(url, timeout=60) as response:
            return len(response.read())

    gc.collect()
    before = rss_bytes()
    round_trip(scrape=False)
    round_trip(scrape=False)
    gc.collect()
    aggregated = rss_bytes()
    round_trip(scrape=True)
    scraped_bytes = round_trip(scrape=True)
    gc.collect()
    scraped = rss_bytes()
    inferscope.shutdown()
    print(f"backend: {inferscope.backend()}, keys: {keys}")
    print(f"aggregation state: {(aggregated - before) / keys / 1024:.1f} KiB per key")
    print(f"with a Prometheus scrape: {(scraped - before) / keys / 1024:.1f} KiB per key")
    print(f"exposition text: {scraped_bytes / keys / 1024:.1f} KiB per key")


if __name__ == "__main__":
    main()
