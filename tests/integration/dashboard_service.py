"""A service that serves inferscope's Prometheus endpoint under steady load, for the dashboards'
queries (tests/integration/test_dashboards_prometheus.py): two models, two versions of one, three
stages with a nested one, failures of two exception types, counters=full, kept spans (exemplars)
beyond the span rate limit, and the tax meter's points through the provider hook (standing in for
the regression detector). It prints the endpoint's port, then serves until its stdin closes.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import inferscope
from inferscope import _pipeline
from inferscope.export import spec

FRAUD = {"inferscope.model.name": "fraud", "inferscope.model.version": "4"}


def main() -> None:
    inferscope.configure(
        service_name="dashboards-svc",
        metrics_exporters=["prometheus"],
        prometheus_port=0,
        counters="full",
        span_exporters=[InMemorySpanExporter()],
        trace_ratio=0.05,
        trace_max_spans_per_second=2,  # errors are kept: some are dropped at this rate
        recorder="off",
        # Fewer buckets than the default: the test repeats every series over a week.
        histogram_boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
    )
    # The regression detector registers its own providers as the pipeline starts: stand in for it.
    spec.register_provider(
        "inferscope.regression.active",
        lambda: [
            (
                1,
                {
                    **FRAUD,
                    "inferscope.stage.name": "preprocess",
                    "inferscope.regression.cause": "data_growth",
                },
            )
        ],
    )
    spec.register_provider(
        "inferscope.tax.latency",
        lambda: [
            (0.0021, {**FRAUD, "inferscope.stage.name": "preprocess", "inferscope.quantile": "0.5"}),
            (0.0043, {**FRAUD, "inferscope.stage.name": "preprocess", "inferscope.quantile": "0.95"}),
        ],
    )
    spec.register_provider(
        "inferscope.tax.cpu", lambda: [(0.031, {**FRAUD, "inferscope.stage.name": "preprocess"})]
    )

    kept: list[bytes] = []

    def model(name: str, version: str, fail_every: int, error: type[Exception]) -> object:
        @inferscope.track_inference(model=name, version=version)
        def predict(i: int) -> int:
            with inferscope.stage("preprocess"):
                if len(kept) < 40 and i % 8 == 0:  # RSS grows during preprocess, within a bound
                    kept.append(b"x" * (1 << 20))
                sum(range(3_000))
            with inferscope.stage("infer"):
                with inferscope.stage("encoder"):
                    sum(range(2_000))
                time.sleep(0.002)  # off CPU
                if i % fail_every == 0:
                    raise error("bad input")
            with inferscope.stage("postprocess"):
                return len(str(i))

        return predict

    models = [
        model("fraud", "3", 10, ValueError),
        model("fraud", "4", 10, ValueError),
        model("ranker", "1", 20, KeyError),
    ]
    stop = threading.Event()

    def serve() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            for predict in models:
                with contextlib.suppress(ValueError, KeyError):
                    predict(i)  # type: ignore[operator]

    for i in range(1, 41):  # every series exists before the first scrape
        for predict in models:
            with contextlib.suppress(ValueError, KeyError):
                predict(i)  # type: ignore[operator]
    _pipeline.DRAINER.drain()
    thread = threading.Thread(target=serve, name="dashboard-load", daemon=True)
    thread.start()
    print(_pipeline.prometheus_port(), flush=True)
    sys.stdin.read()  # until the test closes it
    stop.set()
    thread.join(10)
    inferscope.shutdown(timeout_millis=5_000)


if __name__ == "__main__":
    main()
