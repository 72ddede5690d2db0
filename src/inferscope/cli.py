"""The ``inferscope`` command.

``inferscope demo`` runs a small built-in inference pipeline (numpy only, no downloads) under a short
load with inferscope on, prints the per-model and per-stage table, and exports through whatever
exporter the environment configures (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``INFERSCOPE_METRICS_EXPORTER``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import _pipeline
from ._backend import BACKEND, BACKEND_REASON
from .tracking import stage, track_inference

__all__ = ["main"]


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
        if rng.random() < 0.01:
            batch[0, 0] = np.nan  # a bad request now and then: counted under error.type
        with contextlib.suppress(ValueError):
            models.score(batch)
        models.rank(rng.normal(size=(int(rng.integers(50, 400)), 64)))
        calls += 2
    return calls


def demo(seconds: float, threads: int) -> int:
    models = _DemoModels()
    print(
        f"inferscope demo: {threads} thread(s) for {seconds:g} s on the {BACKEND} backend ({BACKEND_REASON})"
    )
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
    print(snap.table())
    dropped = {reason: n for reason, n in snap.dropped.items() if n}
    print(f"\ndropped records: {dropped or 'none'}")
    settings = _pipeline.current_settings()
    exporters = list(settings.metrics_exporters) if settings is not None else []
    if exporters:
        print(f"exporting to: {', '.join(exporters)} (flushed on exit)")
        port = _pipeline.prometheus_port()
        if port is not None:
            print(
                f"Prometheus endpoint: http://{settings.prometheus_host}:{port}/metrics" if settings else ""
            )
    else:
        print(
            "no exporter configured: set OTEL_EXPORTER_OTLP_ENDPOINT or INFERSCOPE_METRICS_EXPORTER to export"
        )
    return 0


def env_command(diff_paths: Sequence[str] | None) -> int:
    """``inferscope env``: the environment as JSON; with ``--diff A B``, what changed from A to B."""
    import json

    from .system.fingerprint import diff, environment, render_diff

    if not diff_paths:
        print(json.dumps(environment(), indent=2))
        return 0
    loaded = []
    for path in diff_paths:
        try:
            with open(path, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            print(f"inferscope env --diff: cannot read {path}: {error}", file=sys.stderr)
            return 2
        if not isinstance(data, dict):
            print(
                f"inferscope env --diff: {path} is not a JSON object (save one with `inferscope env > FILE`)",
                file=sys.stderr,
            )
            return 2
        loaded.append(data)
    print(f"{diff_paths[0]} -> {diff_paths[1]}")
    print(render_diff(diff(loaded[0], loaded[1])))
    return 0


def _stage_cost_ns(counters: str, calls: int) -> tuple[float, float]:
    """(tracked call overhead, stage enter+exit) in ns per call under a counter set, best of 5."""
    import timeit

    from . import _pipeline

    _pipeline.configure(counters=counters, metrics_exporters=())

    def noop() -> None:
        pass

    tracked = track_inference(model="doctor")(noop)
    entered = stage("doctor")

    @track_inference(model="doctor-stage")
    def with_stage() -> None:
        with entered:
            pass

    def best(func: Callable[[], None]) -> float:
        times = []
        for _ in range(5):
            times.append(timeit.timeit(func, number=calls) / calls * 1e9)
            _pipeline.DRAINER.drain()  # outside the timed loop: the ring never fills
        return min(times)

    bare, one, two = best(noop), best(tracked), best(with_stage)
    return one - bare, two - one


def doctor(calls: int) -> int:
    """``inferscope doctor``: which counters and signals work here, why not, and what each set costs."""
    from .counters import COUNTER_SETS, counter_mask, counter_names, counters_status
    from .system import nvml_status, read_cgroup, read_psi, read_steal

    print(f"backend: {BACKEND} ({BACKEND_REASON})\n")
    print("per-stage counters")
    for name, (state, reason) in counters_status(probe_torch=True).items():
        print(f"  {name:<12} {state:<10} {reason}")
    print("\nhost and container signals")
    cgroup = read_cgroup()
    limit = f"{cgroup.cpu_limit:g} CPUs" if cgroup.cpu_limit is not None else "no CPU quota"
    memory = (
        f"{cgroup.memory_limit_bytes} bytes" if cgroup.memory_limit_bytes is not None else "no memory limit"
    )
    throttling = "readable" if cgroup.throttling is not None else "not found"
    print(f"  cgroup       v{cgroup.version or '?'}{' (hybrid)' if cgroup.hybrid else ''}: {limit}, {memory}")
    print(f"  throttling   {throttling}")
    print(f"  PSI          {'available' if read_psi() else 'not available (no /proc/pressure)'}")
    print(f"  steal        {'available' if read_steal() is not None else 'not available'}")
    ok, reason = nvml_status()
    print(f"  GPU (NVML)   {'available' if ok else 'none'}: {reason}")
    print(f"\ncost per call here (ns, best of 5 x {calls:,} calls; stage = enter + exit)")
    print(f"  {'counter set':<12} {'reads':<36} {'tracked call':>12} {'stage':>8}")
    for name in COUNTER_SETS:
        tracked_ns, stage_ns = _stage_cost_ns(name, calls)
        reads = ",".join(counter_names(counter_mask(name))) or "clock only"
        print(f"  {name:<12} {reads:<36} {tracked_ns:>12.0f} {stage_ns:>8.0f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="inferscope", description=__doc__.splitlines()[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="run a built-in pipeline under load and print what it cost"
    )
    demo_parser.add_argument(
        "--seconds", type=float, default=5.0, help="how long to run the load (default 5)"
    )
    demo_parser.add_argument("--threads", type=int, default=2, help="concurrent callers (default 2)")
    commands.add_parser("version", help="print the version and the backend in use")
    env_parser = commands.add_parser(
        "env", help="print the environment (versions, CPU, cgroup, thread pools, GPU) as JSON"
    )
    env_parser.add_argument(
        "--diff",
        nargs=2,
        metavar=("A_JSON", "B_JSON"),
        help="print what changed between two saved `inferscope env` outputs",
    )
    doctor_parser = commands.add_parser(
        "doctor", help="show which counters work on this machine, why not, and what each set costs"
    )
    doctor_parser.add_argument(
        "--calls", type=int, default=20_000, help="calls per timing loop (default 20000)"
    )
    args = parser.parse_args(argv)
    if args.command == "doctor":
        if not 100 <= args.calls <= 10_000_000:
            parser.error(f"--calls must be from 100 to 10000000, got {args.calls}")
        return doctor(args.calls)
    if args.command == "env":
        return env_command(args.diff)
    if args.command == "demo":
        if args.seconds <= 0 or args.seconds > 600:
            parser.error(f"--seconds must be in (0, 600], got {args.seconds}")
        if not 1 <= args.threads <= 64:
            parser.error(f"--threads must be from 1 to 64, got {args.threads}")
        return demo(args.seconds, args.threads)
    from . import __version__

    print(f"inferscope {__version__} ({BACKEND} backend: {BACKEND_REASON})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
