"""Per-call overhead of each framework instrumentor on a small model, against OTel manual instrumentation.

    python3 benchmarks/frameworks.py                          # ~45 s
    python3 benchmarks/frameworks.py --quick                  # ~13 s, 24 rounds: a smoke test
    python3 benchmarks/frameworks.py --json frameworks.json
    python3 benchmarks/frameworks.py --only torch,sklearn --counters minimal

Models, built in code and sized to take 1-2 ms per call on one core of the dev VM: a torch MLP,
the same MLP exported to ONNX and run in onnxruntime, a scikit-learn Pipeline (scaler, PCA,
logistic regression), an xgboost and a lightgbm classifier (their scikit-learn API). A framework
that is not installed is skipped, and the report says why.

Variants of each model, all measured in the same run:
- ``bare``: no instrumentation;
- ``inferscope``: the framework's instrumentor with its defaults (for torch also ``stage_depth=1``);
- ``OTel manual``: what one writes by hand with the OpenTelemetry SDK, one span
  (``start_as_current_span`` on a ``TracerProvider`` with a ``BatchSpanProcessor`` that exports to
  an exporter that drops everything) and one ``histogram.record`` with 2 attributes (a
  ``MeterProvider`` with an ``InMemoryMetricReader``) around each call.

Method: each call is timed twice, by the wall clock (``perf_counter_ns``; the target's measure) and
by the calling thread's CPU clock (``thread_time_ns``; not slowed when other processes take the CPU,
so a cross-check on a busy VM). The variants take turns in short blocks (~20 ms, a few calls each),
in rounds: every round runs one block of every variant of every model. The order rotates every two
rounds and is reversed every other round (A B C, C B A, B C A, A C B, ...), so each variant takes
each place equally often and drift and bursts of load fall on all variants alike. Every block starts
with the model's ``instrument()``: the instrumented variants keep it until the block ends, the
others uninstrument straight away, so the work of switching comes before every block alike; two
untimed calls follow, and nothing of this is timed. The garbage collector is off inside a block.
Overhead = p50 of the variant - p50 of ``bare``, over all samples of the run, as a percentage of the
``bare`` p50. The spread is shown twice: the interquartile range of the per-round differences (a
block's p50 minus the p50 of the same round's ``bare`` block), and a 90% bootstrap interval of the
overhead (rounds resampled, pairs kept).

Every framework runs on one thread (``--threads``), so that a call keeps to one core of the 2-core
VM and leaves the other to the drainer, the span processor's thread and the rest. inferscope runs
with its default settings (``--counters`` picks the counter set) and no exporter; its drainer runs
as usual, and so does the span processor's export thread.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import _common
import numpy as np
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import inferscope

FRAMEWORKS = ("torch", "onnxruntime", "sklearn", "xgboost", "lightgbm")
#: The target: instrumentation overhead under 1% of the bare p50, for models of 1 ms or more.
TARGET_PERCENT = 1.0
TARGET_MIN_P50_NS = 1_000_000
#: Untimed calls after every switch of variant (the first call after ``instrument()`` resolves the
#: model; the second finds the caches warm).
WARMUP_CALLS = 2
#: The histogram attributes of the OTel manual variant (2, as in the other benchmarks' OTel peer).
OTEL_ATTRIBUTES = {"inferscope.model.name": "bench", "inferscope.stage.name": "infer"}


# --- the models ------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One way of running a model. ``instrumentor`` is on during its blocks, with ``options``; it
    is off when ``options`` is None.

    Every block starts with the same ``instrument()`` call, so that the work of switching (and
    what it leaves in the caches and the allocator) precedes every variant alike. A variant without
    instrumentation uninstruments right after it, before its untimed calls.
    """

    name: str
    call: Callable[[], object]
    instrumentor: Any
    options: dict[str, Any] | None = None
    #: Wall time and thread CPU time of each timed call, one list per round.
    wall_ns: list[list[int]] = field(default_factory=list)
    cpu_ns: list[list[int]] = field(default_factory=list)

    def enter(self) -> None:
        self.instrumentor.instrument(**(self.options or {}))
        if self.options is None:
            self.instrumentor.uninstrument()

    def exit(self) -> None:
        if self.options is not None:
            self.instrumentor.uninstrument()


@dataclass
class Model:
    framework: str
    description: str
    call: Callable[[], object]
    #: The instrumentor class, and the option sets measured (a label each).
    instrumentor: Any
    option_sets: dict[str, dict[str, Any]]
    version: str
    variants: list[Variant] = field(default_factory=list)
    calls_per_block: int = 0


def _torch_mlp(threads: int) -> tuple[Any, Any]:
    import torch
    from torch import nn

    torch.set_num_threads(threads)

    class MLP(nn.Module):
        """stem -> 4 x (Linear, ReLU) -> head: 15 module calls per inference."""

        def __init__(self, features: int = 256, width: int = 512, depth: int = 4, outputs: int = 10) -> None:
            super().__init__()
            self.stem = nn.Linear(features, width)
            self.layers = nn.ModuleList(
                [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)]
            )
            self.head = nn.Linear(width, outputs)

        def forward(self, x: torch.Tensor) -> Any:
            x = self.stem(x)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    torch.manual_seed(0)
    return MLP().eval(), torch


def build_torch(threads: int) -> Model:
    from inferscope.instrumentation.torch import TorchInstrumentor

    model, torch = _torch_mlp(threads)
    x = torch.randn(64, 256)

    def call() -> object:
        with torch.inference_mode():
            return model(x)

    return Model(
        "torch",
        "MLP 256-512x4-10 (15 modules), batch 64, inference_mode",
        call,
        TorchInstrumentor,
        {"inferscope": {}, "inferscope stage_depth=1": {"stage_depth": 1}},
        torch.__version__,
    )


def build_onnxruntime(threads: int) -> Model:
    import onnxruntime

    from inferscope.instrumentation.onnxruntime import OnnxruntimeInstrumentor

    model, torch = _torch_mlp(threads)  # ImportError when torch is missing: it exports the graph
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is deprecated
        torch.onnx.export(
            model,
            (torch.randn(2, 256),),
            buffer,
            dynamo=False,  # the dynamo exporter needs onnxscript
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}},
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).standard_normal((128, 256), dtype=np.float32)}

    def call() -> object:
        return session.run(None, feed)

    return Model(
        "onnxruntime",
        "the torch MLP exported to ONNX, batch 128, CPU provider",
        call,
        OnnxruntimeInstrumentor,
        {"inferscope": {}},
        onnxruntime.__version__,
    )


def build_sklearn(threads: int) -> Model:
    import sklearn
    from sklearn.datasets import make_classification
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from inferscope.instrumentation.sklearn import SklearnInstrumentor

    x, y = make_classification(n_samples=4000, n_features=100, n_informative=20, n_classes=3, random_state=0)
    pipeline = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("pca", PCA(n_components=30, random_state=0)),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    ).fit(x, y)

    def call() -> object:
        return pipeline.predict(x)

    return Model(
        "sklearn",
        "Pipeline scaler -> PCA(30) -> LogisticRegression, 4000 x 100",
        call,
        SklearnInstrumentor,
        {"inferscope": {}},
        sklearn.__version__,
    )


def _tabular(rows: int) -> tuple[Any, Any]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)
    return x.astype(np.float32)[:rows], (x.astype(np.float32), y)


def build_xgboost(threads: int) -> Model:
    import xgboost

    from inferscope.instrumentation.xgboost import XGBoostInstrumentor

    batch, (x, y) = _tabular(1000)
    classifier = xgboost.XGBClassifier(
        n_estimators=200, max_depth=6, tree_method="hist", n_jobs=threads, random_state=0
    ).fit(x, y)

    def call() -> object:
        return classifier.predict_proba(batch)

    return Model(
        "xgboost",
        "XGBClassifier 200 trees, depth 6; predict_proba 1000 x 20",
        call,
        XGBoostInstrumentor,
        {"inferscope": {}},
        xgboost.__version__,
    )


def build_lightgbm(threads: int) -> Model:
    import lightgbm

    from inferscope.instrumentation.lightgbm import LightGBMInstrumentor

    batch, (x, y) = _tabular(200)
    classifier = lightgbm.LGBMClassifier(
        n_estimators=100, num_leaves=31, n_jobs=threads, random_state=0, verbose=-1
    ).fit(x, y)

    def call() -> object:
        return classifier.predict_proba(batch)

    return Model(
        "lightgbm",
        "LGBMClassifier 100 trees, 31 leaves; predict_proba 200 x 20",
        call,
        LightGBMInstrumentor,
        {"inferscope": {}},
        lightgbm.__version__,
    )


BUILDERS: dict[str, Callable[[int], Model]] = {
    "torch": build_torch,
    "onnxruntime": build_onnxruntime,
    "sklearn": build_sklearn,
    "xgboost": build_xgboost,
    "lightgbm": build_lightgbm,
}


# --- the OTel manual peer --------------------------------------------------------------------------


class OtelManual:
    """One span and one ``histogram.record`` (2 attributes) around a call, as written by hand."""

    def __init__(self) -> None:
        self.span_drops = _common.count_span_drops()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(_common.DiscardSpans()))
        self.meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()], shutdown_on_exit=False)
        self.tracer = self.tracer_provider.get_tracer("bench")
        self.histogram = self.meter_provider.get_meter("bench").create_histogram("bench.duration", unit="s")

    def wrap(self, call: Callable[[], object]) -> Callable[[], object]:
        tracer, histogram, attributes, clock = self.tracer, self.histogram, OTEL_ATTRIBUTES, time.perf_counter

        def instrumented() -> object:
            with tracer.start_as_current_span("inference"):
                start = clock()
                result = call()
                histogram.record(clock() - start, attributes=attributes)
            return result

        return instrumented

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


# --- running ---------------------------------------------------------------------------------------


def build_models(names: Sequence[str], threads: int) -> tuple[list[Model], dict[str, str]]:
    """The models of ``names``. A framework is skipped, with the reason, when it is not installed,
    when its model cannot be built, or when its instrumentor patches nothing (it logs why: an
    unsupported version, say), since its "inferscope" variant would then measure a bare call."""
    models: list[Model] = []
    skipped: dict[str, str] = {}
    for name in names:
        _common.progress(f"frameworks.py: building the {name} model")
        try:
            model = BUILDERS[name](threads)
        except ImportError as exc:
            skipped[name] = f"not installed ({exc})"
            continue
        except Exception as exc:
            skipped[name] = f"the model could not be built ({type(exc).__name__}: {exc})"
            continue
        instrumentor = model.instrumentor()
        instrumentor.instrument()
        active = instrumentor.active
        instrumentor.uninstrument()
        if not active:
            skipped[name] = "its instrumentor patched nothing (see the log)"
            continue
        models.append(model)
    return models, skipped


def add_variants(model: Model, otel: OtelManual) -> None:
    instrumentor = model.instrumentor()
    model.variants = [Variant("bare", model.call, instrumentor)]
    for label, options in model.option_sets.items():
        model.variants.append(Variant(label, model.call, instrumentor, options))
    model.variants.append(Variant("OTel manual", otel.wrap(model.call), instrumentor))


def time_block(call: Callable[[], object], calls: int) -> tuple[list[int], list[int]]:
    """The wall time and the thread CPU time of each of ``calls`` calls. The CPU clock is read
    outside the wall-clock reads, so the wall time does not include its syscalls."""
    wall_clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    wall, cpu = [], []
    gc.disable()
    try:
        for _ in range(calls):
            cpu_start = cpu_clock()
            start = wall_clock()
            call()
            end = wall_clock()
            cpu.append(cpu_clock() - cpu_start)
            wall.append(end - start)
    finally:
        gc.enable()
    return wall, cpu


def calibrate(model: Model, block_seconds: float) -> None:
    """Pick the block size so that one block lasts about ``block_seconds``; this also warms up."""
    for _ in range(5):
        model.call()
    p50 = statistics.median(time_block(model.call, 15)[0])
    model.calls_per_block = max(3, min(500, round(block_seconds * 1e9 / p50)))


def round_order(variants: Sequence[Variant], index: int) -> list[Variant]:
    """The order of the variants in round ``index``: rotated by one every two rounds, and reversed
    in every other round (A B C, C B A, B C A, A C B, ...). Each variant takes each place equally
    often, so no variant always runs first after another model's blocks, and linear drift within a
    round cancels over each pair of rounds."""
    shift = (index // 2) % len(variants)
    order = [*variants[shift:], *variants[:shift]]
    return order if index % 2 == 0 else order[::-1]


def run_rounds(models: Sequence[Model], rounds: int) -> None:
    for index in range(rounds):
        for model in models:
            for variant in round_order(model.variants, index):
                variant.enter()
                try:
                    for _ in range(WARMUP_CALLS):
                        variant.call()
                    wall, cpu = time_block(variant.call, model.calls_per_block)
                    variant.wall_ns.append(wall)
                    variant.cpu_ns.append(cpu)
                finally:
                    variant.exit()
        if (index + 1) % max(1, rounds // 5) == 0:
            _common.progress(f"frameworks.py: round {index + 1}/{rounds}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (24 if args.quick else 96)
    names = [name.strip() for name in args.only.split(",")] if args.only else list(FRAMEWORKS)
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        raise SystemExit(f"--only: unknown framework {unknown[0]!r} (accepted: {', '.join(FRAMEWORKS)})")
    _limit_threads(args.threads)
    inferscope.configure(counters=args.counters, metrics_exporters="none")
    models, skipped = build_models(names, args.threads)
    otel = OtelManual()
    for model in models:
        add_variants(model, otel)
        calibrate(model, args.block_seconds)
    blocks = sum(len(model.variants) for model in models)
    _common.progress(f"frameworks.py: {len(models)} models, {blocks} blocks per round, {rounds} rounds")
    run_rounds(models, rounds)
    otel.shutdown()
    dropped = dict(inferscope.snapshot().dropped)
    return {
        "environment": _common.environment(),
        "settings": {
            "rounds": rounds,
            "block_seconds": args.block_seconds,
            "threads": args.threads,
            "counters": args.counters,
            "warmup_calls_per_block": WARMUP_CALLS,
        },
        "skipped": skipped,
        "span_queue_full_drops": otel.span_drops.count,
        "inferscope_dropped": dropped,
        "models": {
            model.framework: {
                "description": model.description,
                "version": model.version,
                "calls_per_block": model.calls_per_block,
                "wall_ns": {variant.name: variant.wall_ns for variant in model.variants},
                "cpu_ns": {variant.name: variant.cpu_ns for variant in model.variants},
            }
            for model in models
        },
    }


def _limit_threads(threads: int) -> None:
    """Cap the BLAS and OpenMP pools of numpy and scikit-learn for the rest of the process (torch,
    onnxruntime, xgboost and lightgbm get ``threads`` through their own settings as well)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # installed with scikit-learn; without it numpy keeps its own default
        return
    threadpool_limits(threads)


# --- statistics ------------------------------------------------------------------------------------

CLOCKS = {"wall": "wall_ns", "cpu": "cpu_ns"}


def summarize(rounds_by_variant: dict[str, list[list[int]]], bootstrap: int, seed: int = 0) -> dict[str, Any]:
    """For each variant, from the samples of one clock: the p50 over all samples and, against
    ``bare``, the overhead with its spread."""
    variants = {name: np.asarray(rounds, dtype=np.float64) for name, rounds in rounds_by_variant.items()}
    bare = variants["bare"]
    bare_p50 = float(np.median(bare))
    bare_round_p50 = np.median(bare, axis=1)
    # The same resampled rounds for every variant, so that each pair stays a pair.
    picks = np.random.default_rng(seed).integers(0, bare.shape[0], size=(bootstrap, bare.shape[0]))
    out: dict[str, Any] = {}
    for name, samples in variants.items():
        entry: dict[str, Any] = {
            "p50_ns": float(np.median(samples)),
            "p10_ns": float(np.percentile(samples, 10)),
            "p90_ns": float(np.percentile(samples, 90)),
            "samples": int(samples.size),
        }
        if name != "bare":
            per_round = np.median(samples, axis=1) - bare_round_p50
            boot = np.empty(bootstrap)
            for start in range(0, bootstrap, 50):  # in chunks, to bound the memory
                chunk = picks[start : start + 50]
                ours = np.median(samples[chunk].reshape(len(chunk), -1), axis=1)
                boot[start : start + len(chunk)] = ours - np.median(
                    bare[chunk].reshape(len(chunk), -1), axis=1
                )
            overhead = entry["p50_ns"] - bare_p50
            entry.update(
                {
                    "overhead_ns": overhead,
                    "overhead_percent": 100 * overhead / bare_p50,
                    "round_iqr_percent": [
                        float(100 * np.percentile(per_round, q) / bare_p50) for q in (25, 75)
                    ],
                    "interval_90_percent": [float(100 * np.percentile(boot, q) / bare_p50) for q in (5, 95)],
                }
            )
        out[name] = entry
    return out


def targets(run: dict[str, Any], summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per instrumented variant: is its overhead under the target, by each clock?"""
    found = []
    for framework, by_clock in summaries.items():
        for name in run["models"][framework]["wall_ns"]:
            if name in ("bare", "OTel manual"):
                continue
            row: dict[str, Any] = {"framework": framework, "variant": name}
            for clock, summary in by_clock.items():
                bare = summary["bare"]["p50_ns"]
                entry = summary[name]
                applies = bare >= TARGET_MIN_P50_NS
                row[clock] = {
                    "bare_p50_ns": bare,
                    "overhead_percent": entry["overhead_percent"],
                    "interval_90_percent": entry["interval_90_percent"],
                    "applies": applies,
                    "ok": entry["overhead_percent"] < TARGET_PERCENT if applies else None,
                }
            found.append(row)
    return found


# --- the report ------------------------------------------------------------------------------------


def _us(ns: float) -> str:
    return f"{ns / 1e3:,.1f}"


def _pct(value: float) -> str:
    return f"{value:+.2f}%"


def _range(values: Sequence[float]) -> str:
    return f"{values[0]:+.2f}..{values[1]:+.2f}%"


def _versus(ours: float, otel: float) -> str:
    """Our overhead against the OTel manual one: how many of ours fit in one of theirs."""
    if ours <= 0:
        return "below noise"
    return _common.fraction(ours, otel)


def overhead_table(run: dict[str, Any], summaries: dict[str, dict[str, Any]], clock: str) -> str:
    rows = []
    for framework, by_clock in summaries.items():
        summary = by_clock[clock]
        model = run["models"][framework]
        otel = summary["OTel manual"]["overhead_ns"]
        for name, entry in summary.items():
            shape = f"{model['calls_per_block']} x {entry['samples'] // model['calls_per_block']}"
            if name == "bare":
                rows.append((framework, name, _us(entry["p50_ns"]), "-", "-", "-", "-", "-", shape))
                continue
            rows.append(
                (
                    framework,
                    name,
                    _us(entry["p50_ns"]),
                    _us(entry["overhead_ns"]),
                    _pct(entry["overhead_percent"]),
                    _range(entry["round_iqr_percent"]),
                    _range(entry["interval_90_percent"]),
                    "-" if name == "OTel manual" else _versus(entry["overhead_ns"], otel),
                    shape,
                )
            )
    headers = (
        "framework",
        "variant",
        "p50 µs",
        "overhead µs",
        "of bare p50",
        "round IQR",
        "90% interval",
        "of OTel manual",
        "calls x blocks",
    )
    return _common.table(headers, rows, left=2)


def targets_table(found: list[dict[str, Any]]) -> str:
    def verdict(entry: dict[str, Any]) -> str:
        return _common.verdict(entry["ok"]) if entry["applies"] else "n/a (< 1 ms)"

    rows = [
        (
            t["framework"],
            t["variant"],
            _us(t["wall"]["bare_p50_ns"]),
            _pct(t["wall"]["overhead_percent"]),
            _range(t["wall"]["interval_90_percent"]),
            verdict(t["wall"]),
            _pct(t["cpu"]["overhead_percent"]),
            _range(t["cpu"]["interval_90_percent"]),
            verdict(t["cpu"]),
        )
        for t in found
    ]
    headers = (
        "framework",
        "variant",
        "bare p50 µs",
        "wall",
        "90% interval",
        "result",
        "CPU",
        "90% interval",
        "result",
    )
    return _common.table(headers, rows, left=2)


def report(run: dict[str, Any], bootstrap: int) -> tuple[str, dict[str, Any]]:
    settings = run["settings"]
    summaries = {
        framework: {clock: summarize(model[key], bootstrap) for clock, key in CLOCKS.items()}
        for framework, model in run["models"].items()
    }
    found = targets(run, summaries)
    versions = ", ".join(f"{name} {model['version']}" for name, model in run["models"].items())
    skipped = "; ".join(f"{name} skipped: {why}" for name, why in run["skipped"].items())
    parts = [
        "inferscope framework instrumentation benchmark",
        _common.environment_line(run["environment"]),
        f"frameworks: {versions or 'none'}" + (f"; {skipped}" if skipped else ""),
        f"method: {settings['rounds']} rounds; in each, every variant of every model runs one block of "
        f"~{settings['block_seconds'] * 1e3:.0f} ms (each call timed by the wall and thread CPU clocks, gc "
        "off), in an order that rotates every two rounds and is reversed every other round, with "
        f"{settings['warmup_calls_per_block']} untimed calls after each switch (every block starts with "
        "instrument(), uninstrumented at once for bare and OTel manual); "
        f"{settings['threads']} thread(s) per framework; inferscope counters={settings['counters']}, default "
        "ring and drainer, no exporter. overhead = p50(variant) - p50(bare) over all samples of the run; "
        "'round IQR': interquartile range of the per-round differences of block p50s; '90% interval': "
        f"bootstrap over rounds ({bootstrap} resamples); 'of OTel manual': the overhead as a fraction of "
        "the OTel manual one.",
    ]
    for model in run["models"].values():
        parts.append(f"  {model['description']}")
    parts += [
        "",
        "Wall time per call (the target's measure)",
        overhead_table(run, summaries, "wall"),
        "",
        "Thread CPU time per call (the calling thread only; not slowed by other processes taking the CPU)",
        overhead_table(run, summaries, "cpu"),
        "",
        f"Targets: overhead < {TARGET_PERCENT:g}% of the bare p50 for models of >= "
        f"{TARGET_MIN_P50_NS / 1e6:g} ms (informational; the result uses the point estimate, the wall "
        "clock is the target's measure and the CPU clock a cross-check)",
        targets_table(found),
        "",
        f"spans dropped by the OTel batch processor: {run['span_queue_full_drops']}; "
        f"inferscope records dropped: {run['inferscope_dropped'] or 'none'}",
    ]
    data = {**run, "summaries": summaries, "targets": found}
    return "\n".join(parts), data


def main(argv: list[str] | None = None) -> int:
    parser = _common.base_parser(__doc__.split("\n")[0])
    parser.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of {','.join(FRAMEWORKS)}")
    parser.add_argument(
        "--counters", default="default", help="inferscope counter set (default: default, as configured)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per framework (default 1)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 96, --quick 24)")
    parser.add_argument("--block-seconds", type=float, default=0.02, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    load = _common.MachineLoad()
    run = measure(args)
    text, data = report(run, bootstrap=300 if args.quick else 1000)
    data["machine_load"] = load.summary()
    print(text)
    print(_common.load_line(data["machine_load"]))
    _common.write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
