"""Device time per stage and CUDA memory per inference, for a torch model.

    python examples/gpu_stages.py [--calls 200]

On a machine with a CUDA device the model runs there. The ``infer`` stage is marked
``device="cuda"``: its wall time is the time to launch the kernels, and its device time (CUDA
events, read off the hot path) is the time they ran. ``counters="full"`` adds, per inference, the
change of torch's CUDA allocation and the inference's peak above its allocation at the start.

Without a CUDA device the same code runs on the CPU: ``device="cpu"`` gives the plain stage, and
the example says that there is no device time to show.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import inferscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="inferences to run")
    args = parser.parse_args()

    inferscope.configure(counters="full", metrics_exporters=[])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 256)]
    model = torch.nn.Sequential(*layers).to(device)
    model.eval()

    @inferscope.track_inference(model="embedder", version="2")
    def embed(batch: np.ndarray) -> np.ndarray:
        with inferscope.stage("preprocess"):
            x = torch.from_numpy(batch).to(device, non_blocking=True)
        with inferscope.stage("infer", device=device), torch.no_grad():
            y = torch.nn.functional.normalize(model(x), dim=1)
        with inferscope.stage("postprocess"):
            return y.cpu().numpy()  # waits for the device: the result is needed on the host

    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((64, 1024), dtype=np.float32) for _ in range(8)]
    for i in range(args.calls):
        embed(batches[i % len(batches)])

    inferscope.shutdown()  # waits for the last device times, then flushes
    snap = inferscope.snapshot()
    print(snap.table())
    infer = snap.row("embedder", "infer")
    if infer.gpu_count:
        counters = snap.row("embedder").counters
        calls = snap.row("embedder").count
        print(
            f"\ninfer on {torch.cuda.get_device_name()}: host (launch) p50 {infer.p50 * 1e3:.3f} ms, "
            f"device p50 {infer.gpu_p50 * 1e3:.3f} ms over {infer.gpu_count} stages"
        )
        print(
            f"CUDA memory per inference: change {counters['memory.cuda.change'] / calls:,.0f} bytes, "
            f"peak above the start {counters['memory.cuda.peak'] / calls:,.0f} bytes"
        )
    else:
        print(f"\nno CUDA device here: the model ran on the {device}, and no stage has device time")


if __name__ == "__main__":
    main()
