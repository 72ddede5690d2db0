"""``inferscope demo``: see what inferscope reports, in a few seconds, without writing any code.

It runs a small built-in inference pipeline (numpy only, no downloads) under a short load with
inferscope on, prints the per-model and per-stage table, and exports through whatever exporter the
environment configures (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``INFERSCOPE_METRICS_EXPORTER``).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np

from .. import _pipeline
from .._backend import BACKEND, BACKEND_REASON
from ..tracking import stage, track_inference
from ._command import Command, bounded

__all__ = ["COMMAND", "demo"]

#: The share of demo-fraud's batches that carry a NaN, so that the errors column shows something.
ERROR_RATE = 0.01


class _DemoModels:
    """A fraud scorer (an MLP) and a ranker (a linear model), with fixed random weights."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.mean = rng.normal(size=32)
        self.scale = rng.uniform(0.5, 2.0, size=32)
        self.w1 = rng.normal(size=(32, 128)) / 8
        self.w2 = rng.normal(size=(128, 2)) / 8
        self.ranker_w = rng.normal(size=(64,))

        @track_inference(model="demo-fraud", version="1")
        def score(batch: np.ndarray) -> np.ndarray:
            with stage("preprocess"):
                if not np.isfinite(batch).all():
                    raise ValueError("batch contains NaN or inf")
                x = (batch - self.mean) / self.scale
                x = np.concatenate([x, x**2], axis=1)[:, :32]
            with stage("infer"):
                with stage("layer1"):
                    hidden = np.maximum(x @ self.w1, 0.0)
                with stage("layer2"):
                    logits = hidden @ self.w2
            with stage("postprocess"):
                exp = np.exp(logits - logits.max(axis=1, keepdims=True))
                return np.asarray(exp[:, 1] / exp.sum(axis=1))

        @track_inference(model="demo-ranker", version="2024-11")
        def rank(items: np.ndarray) -> np.ndarray:
            with stage("queue"):
                time.sleep(0.0005)  # waiting for a batch slot: wall time without CPU time
            with stage("infer"):
                scores = items @ self.ranker_w
            with stage("postprocess"):
                return np.argsort(-scores)[:10]

        self.score = score
        self.rank = rank


def _load(models: _DemoModels, seconds: float, seed: int) -> int:
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + seconds
    calls = 0
    while time.monotonic() < deadline:
        batch = rng.normal(size=(int(rng.integers(8, 256)), 32))
        if rng.random() < ERROR_RATE:
            batch[0, 0] = np.nan  # a bad request on purpose: counted under error.type
        with contextlib.suppress(ValueError):
            models.score(batch)
        models.rank(rng.normal(size=(int(rng.integers(50, 400)), 64)))
        calls += 2
    return calls


def demo(seconds: float, threads: int) -> int:
    """Run the load on ``threads`` threads for ``seconds``, print the table, and say where it went."""
    models = _DemoModels()
    settings = _pipeline.current_settings()
    exporters = list(settings.metrics_exporters) if settings is not None and settings.enabled else []
    print(f"inferscope demo: {threads} thread(s) calling two models for {seconds:g} s")
    print(
        f"about {ERROR_RATE:.0%} of demo-fraud's batches contain a NaN on purpose: "
        "its preprocess stage raises, and the errors column counts them"
    )
    port = _pipeline.prometheus_port()
    if settings is not None and port is not None:
        print(f"Prometheus endpoint: http://{settings.prometheus_host}:{port}/metrics (while the demo runs)")
    print(flush=True)  # the lines above reach a pipe now, while the endpoint can be scraped
    counts: list[int] = []
    workers = [
        threading.Thread(target=lambda i=i: counts.append(_load(models, seconds, seed=i)), name=f"demo-{i}")
        for i in range(threads)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    snap = _pipeline.snapshot()
    print(f"{sum(counts)} tracked calls in {elapsed:.1f} s\n")
    print(snap.table())  # its last line names the backend
    if BACKEND != "c":
        print(f"(the C extension is not in use: {BACKEND_REASON})")
    dropped = {reason: n for reason, n in snap.dropped.items() if n}
    print(f"\ndropped records: {dropped or 'none'}")
    pushed = [name for name in exporters if name != "prometheus"]
    if pushed:
        print(f"exporting to: {', '.join(pushed)} (flushed on exit)")
    if port is not None:
        print("the Prometheus endpoint closes with the demo: to scrape it longer, run a longer demo")
    if not exporters:
        print(
            "no exporter configured: set OTEL_EXPORTER_OTLP_ENDPOINT or INFERSCOPE_METRICS_EXPORTER to export"
        )
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seconds",
        type=bounded(float, 0.1, 600.0),
        default=5.0,
        help="how long to run the load, 0.1 to 600 (default 5)",
    )
    parser.add_argument(
        "--threads", type=bounded(int, 1, 64), default=2, help="concurrent callers, 1 to 64 (default 2)"
    )
    parser.add_argument(
        "--tax",
        action="store_true",
        help="instead: inject causes one after another into a small service (CPU hogs, a slower library "
        "path, a growing step, larger inputs, a leak) and print what the regression detector names (~1 min)",
    )


def _run(args: argparse.Namespace) -> int:
    if args.tax:
        from .demo_tax import run_tax_demo

        return run_tax_demo()
    return demo(args.seconds, args.threads)


COMMAND = Command(
    name="demo",
    help="run a built-in pipeline under load and print what each model and stage cost",
    description="Run a small built-in pipeline (numpy only, no downloads) under load with inferscope on, "
    "and print what each model and stage cost. Exports go wherever the environment says "
    "(OTEL_EXPORTER_OTLP_ENDPOINT, INFERSCOPE_METRICS_EXPORTER).",
    add_arguments=_add_arguments,
    run=_run,
)
