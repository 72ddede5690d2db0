"""GPU: what ``cuda_memory`` costs per inference and a CUDA-timed stage per call, on a CUDA device.

    python3 benchmarks/gpu.py            # needs torch with a CUDA device; ~30 s
    python3 benchmarks/gpu.py --quick    # ~10 s
    python3 benchmarks/gpu.py --json gpu.json

What: a 3-layer MLP (1024 wide, batch 256) on the current CUDA device, each call followed by
``torch.cuda.synchronize()`` as serving code waits for its result. Cases, in one process:
- ``bare``: the call;
- ``tracked [default]``: ``@track_inference`` around it;
- ``tracked [thread_cpu,cuda_memory]``: plus the allocator read around each inference;
- ``tracked + stage [default]``: plus ``with stage("infer")`` around the model;
- ``tracked + cuda stage [default]``: the stage marked ``device="cuda"`` (two CUDA events);
- the peer, OTel ``histogram.record`` with 2 attributes.
Each figure is ns per call, the median over round-robin repeats (see benchmarks/overhead.py), and
the overheads are differences of medians. Then a check of accuracy: the device time recorded for
the CUDA stage against CUDA events recorded around the model call by this script.

Without a CUDA device the script says why and exits 0: there is nothing to measure.
"""

from __future__ import annotations

import sys
from typing import Any

import _common

import inferscope

CASES = (
    ("tracked [default]", "default", "plain"),
    ("tracked [thread_cpu,cuda_memory]", "thread_cpu,cuda_memory", "plain"),
    ("tracked + stage [default]", "default", "stage"),
    ("tracked + cuda stage [default]", "default", "cuda"),
)
OTEL_RECORD = "OTel histogram.record, 2 attrs"


def measure(*, quick: bool) -> dict[str, Any]:
    import torch

    repeats, target_seconds = (5, 0.05) if quick else (15, 0.15)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(1024, 1024)).cuda().eval()
    x = torch.randn(256, 1024, device="cuda")
    synchronize = torch.cuda.synchronize

    def bare() -> None:
        with torch.no_grad():
            model(x)
        synchronize()

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def staged() -> None:
        with inferscope.stage("infer"), torch.no_grad():
            model(x)

    def cuda_staged() -> None:
        with inferscope.stage("infer", device="cuda"), torch.no_grad():
            model(x)

    bodies = {"plain": plain, "stage": staged, "cuda": cuda_staged}
    pipeline = _common.LoopPipeline()
    cases = [_common.Case("bare", "f()", {"f": bare})]
    for name, counters, body in CASES:
        tracked = inferscope.track_inference(model=f"bench.gpu.{body}")(bodies[body])

        def call(tracked: Any = tracked) -> None:
            tracked()
            synchronize()

        cases.append(
            _common.Case(
                name,
                "f()",
                {"f": call},
                prepare=lambda counters=counters: pipeline.use(counters),
                after=lambda name=name: pipeline.settle(name),
                max_number=200_000,
            )
        )
    cases.append(_common.otel_histogram_case(OTEL_RECORD))
    _common.progress(f"gpu.py: {torch.cuda.get_device_name()}, {len(cases)} cases x {repeats} repeats")
    _common.run_interleaved(cases, repeats, target_seconds)
    results = {case.name: case.summary() for case in cases}
    for name, counts in pipeline.drops.items():
        results[name]["dropped"] = counts

    # Accuracy: the stage's device time against CUDA events around the same work.
    pipeline.use("default")
    ours = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with inferscope.stage("accuracy", device="cuda"), torch.no_grad():
            start.record()
            model(x)
            end.record()
        synchronize()
        ours.append(start.elapsed_time(end) / 1e3)
    row = inferscope.snapshot().row(None, "accuracy")
    inferscope.configure()
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "environment": _common.environment(),
        "cases": results,
        "accuracy": {
            "stages": row.gpu_count,
            "recorded_p50_s": row.gpu_p50,
            "events_p50_s": _common.median(ours),
        },
    }


def report(run: dict[str, Any]) -> str:
    m = {name: case["median_ns"] for name, case in run["cases"].items()}
    bare, record = m["bare"], m[OTEL_RECORD]
    tracked = m["tracked [default]"]
    rows = [
        ("tracked [default]", tracked - bare, bare),
        ("cuda_memory, per inference", m["tracked [thread_cpu,cuda_memory]"] - tracked, bare),
        ("stage [default]", m["tracked + stage [default]"] - tracked, bare),
        ("stage on cuda [default]", m["tracked + cuda stage [default]"] - tracked, bare),
    ]
    lines = [
        f"{run['device']}, torch {run['torch']}; bare call + synchronize: p50 {_common.ns(bare)} ns",
        "",
        _common.table(
            ("what", "ns per call", "of the bare call", "/ OTel record"),
            [
                (name, _common.ns(delta), f"{delta / base:+.2%}", _common.fraction(delta, record))
                for name, delta, base in rows
            ],
        ),
        "",
        f"OTel histogram.record, 2 attrs: {_common.ns(record)} ns",
    ]
    accuracy = run["accuracy"]
    lines.append(
        f"device time of the CUDA stage: {accuracy['stages']} stages, p50 "
        f"{accuracy['recorded_p50_s'] * 1e3:.3f} ms recorded vs {accuracy['events_p50_s'] * 1e3:.3f} ms "
        "from CUDA events around the model call"
    )
    lines.append(_common.drops_line({inferscope.backend(): run}))
    return "\n".join(lines)


def main() -> int:
    args = _common.base_parser(__doc__.splitlines()[0]).parse_args()
    try:
        import torch
    except ImportError:
        print("gpu.py: torch is not installed; nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("gpu.py: torch has no usable CUDA device here (torch.cuda.is_available() is False)")
        return 0
    run = measure(quick=args.quick)
    print(report(run))
    _common.write_json(args.json, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
