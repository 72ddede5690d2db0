"""A service that gives every metric of the specification a reason to have points, then exits.

Run by tests/integration/test_spec_rotel.py, either plainly (``configure`` as the first argument:
inferscope.configure() with the settings in the JSON second argument) or under
``opentelemetry-instrument`` (``instrument``: inferscope joins the SDK's pipeline, configured by the
OTEL_* and INFERSCOPE_* environment). It makes: successful and failing inferences with stages, an
inference whose generator is closed early, more kept spans than the rate limit lets through, a
stage on CUDA when torch has a GPU, and the tax meter's points through the provider hook (standing
in for the regression detector).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import sys
import time

import inferscope
from inferscope.export import spec

try:  # torch decides whether the CUDA metrics can have points; the test imports it as well
    import torch
except ImportError:
    torch = None  # type: ignore[assignment]

RSS_STEP = 1 << 18

TAX_ATTRIBUTES = {
    "inferscope.model.name": "fraud",
    "inferscope.model.version": "3",
    "inferscope.stage.name": "infer",
}


def main() -> None:
    mode = sys.argv[1]
    if mode == "configure":
        inferscope.configure(**json.loads(sys.argv[2]))

    on_gpu = torch is not None and torch.cuda.is_available()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    kept: list[bytes] = []
    mapped: list[mmap.mmap] = []

    def migrate() -> None:
        """Move this thread to each CPU it may use in turn: the kernel counts real migrations."""
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
        os.sched_setaffinity(0, set(cpus))

    @inferscope.track_inference(model="fraud", version="3")
    def predict(fail: bool) -> int:
        with inferscope.stage("preprocess"):
            if len(kept) < 60:  # the Python heap grows: its change is above zero
                kept.append(b"x" * (1 << 20))
            # RSS grows on every call, by pages that no allocator can serve from resident memory:
            # RSS is read on a random sample of entries, and a sum of zero is not exported.
            touched = mmap.mmap(-1, RSS_STEP)
            touched.write(b"x" * RSS_STEP)
            mapped.append(touched)
            if len(cpus) > 1:
                migrate()
        with inferscope.stage("infer"):
            time.sleep(0.001)
            if on_gpu:
                with inferscope.stage("kernel", device="cuda"):
                    (torch.ones(256, device="cuda") * 2).sum().item()
            if fail:
                raise ValueError("bad input")
        return len(kept)

    @inferscope.track_inference(model="streamer")
    def stream() -> object:
        for i in range(3):
            with inferscope.stage("chunk"):
                yield i

    # RSS is read on one entry in 16, chosen at random: 200 inferences leave a chance of about 1 in
    # 400,000 that no preprocess entry was read.
    for i in range(200):
        with contextlib.suppress(ValueError):
            predict(fail=i % 10 == 9)
    generator = stream()
    next(generator)
    generator.close()  # abandoned before it was exhausted
    # Once the pipeline runs (its regression detector registers its own providers then), stand in
    # for the detector with points of our own.
    spec.register_provider(
        "inferscope.regression.active",
        lambda: [(1, {**TAX_ATTRIBUTES, "inferscope.regression.cause": "data_growth"})],
    )
    spec.register_provider("inferscope.tax.latency", lambda: [(0.0042, TAX_ATTRIBUTES)])
    spec.register_provider("inferscope.tax.cpu", lambda: [(0.0031, TAX_ATTRIBUTES)])
    inferscope.shutdown(timeout_millis=20_000)


if __name__ == "__main__":
    main()
