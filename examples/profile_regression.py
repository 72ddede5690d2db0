"""Where a regressed stage spends its time: a scoring model profiled by stage, then the same stage
regressing in a running service and its stacks sampled as the regression opens.

The model (``predict``) has three stages: ``preprocess`` parses the records, ``infer`` scores them,
``postprocess`` rounds the scores. Profile it over a data file with cProfile, one profile per stage::

    cd examples && inferscope profile profile_regression:predict --data calls.jsonl

(``python profile_regression.py --write-calls calls.jsonl`` writes such a file.) Run as a script, it
serves the model under a steady load with one-second windows; once the anchor is taken, ``infer``
starts re-normalising every record's features (a costly step someone added), the detector opens a
regression of ``infer``, the sampler reads the stacks of the threads inside ``infer`` for a few
seconds, and the script prints what it found and what ``inferscope status`` shows::

    python examples/profile_regression.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time

import inferscope

FEATURES = 32
#: Set while the costly step runs in ``infer``.
RENORMALISE = threading.Event()


def parse(records: list[list[float]]) -> list[list[float]]:
    return [[float(v) for v in record] for record in records]


def renormalise(row: list[float]) -> list[float]:
    # The costly step: a norm recomputed feature by feature, many times over.
    for _ in range(40):
        norm = math.sqrt(sum(v * v for v in row)) or 1.0
        row = [v / norm for v in row]
    return row


def score(row: list[float]) -> float:
    return sum(v * (i % 5 - 2) for i, v in enumerate(row))


@inferscope.track_inference(model="scoring")
def predict(records: list[list[float]]) -> list[float]:
    with inferscope.stage("preprocess"):
        rows = parse(records)
    with inferscope.stage("infer"):
        if RENORMALISE.is_set():
            rows = [renormalise(row) for row in rows]
        scores = [score(row) for row in rows]
    with inferscope.stage("postprocess"):
        return [round(s, 4) for s in scores]


def batch(size: int, seed: int) -> list[list[float]]:
    return [[((seed + i * FEATURES + j) % 17) / 17.0 for j in range(FEATURES)] for i in range(size)]


def serve(stop: threading.Event) -> None:
    seed = 0
    while not stop.is_set():
        predict(batch(8, seed))
        seed += 1
        time.sleep(0.0005)  # a busy service: most of its time is spent in the model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--write-calls", metavar="FILE", help="write a .jsonl data file for inferscope profile"
    )
    parser.add_argument("--recorder", help="the flight recorder to write (default: a new temporary one)")
    parser.add_argument("--baseline-seconds", type=float, default=5.0, help="the anchor's length")
    parser.add_argument("--sample-seconds", type=float, default=4.0, help="how long the stacks are sampled")
    args = parser.parse_args()
    if args.write_calls:
        with open(args.write_calls, "w", encoding="utf-8") as f:
            for seed in range(20):
                f.write(json.dumps([batch(8, seed)]) + "\n")
        return

    from inferscope.cli.status import status
    from inferscope.detector import detector
    from inferscope.profile.sampler import SAMPLER

    path = args.recorder or os.path.join(tempfile.mkdtemp(prefix="inferscope-profile-"), "recorder.sqlite")
    inferscope.configure(
        service_name="profile-demo",
        window_seconds=1.0,
        baseline_seconds=args.baseline_seconds,
        regression_sustain_seconds=3.0,
        counters="thread_cpu",
        recorder=path,
        metrics_exporters=(),
        profile_on_regression=True,
    )
    SAMPLER.window_seconds = args.sample_seconds  # 10 s in production
    stop = threading.Event()
    worker = threading.Thread(target=serve, args=(stop,), daemon=True)
    worker.start()
    current = detector()
    assert current is not None
    deadline = time.monotonic() + args.baseline_seconds + 30
    while current.anchor("scoring") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    print("anchor taken; infer now renormalises every record")
    RENORMALISE.set()
    while not any(p.stage == "infer" for p in SAMPLER.recent) and time.monotonic() < deadline + 60:
        time.sleep(0.1)
    stop.set()
    worker.join(10)
    inferscope.shutdown()
    for profile in [p for p in SAMPLER.recent if p.stage == "infer"]:
        payload = profile.payload
        print(
            f"sampled {profile.model}/{profile.stage}: {payload['samples']} stacks, attribution "
            f"{payload['attribution']}, sampler CPU {payload['sampler_cpu_seconds'] * 1e3:.1f} ms "
            f"in {payload['seconds']:.1f} s"
        )
        for entry in payload["top"][:5]:
            print(f"  {entry['share']:>5.0%}  {entry['function']}")
    print()
    status(path, model="scoring", last_seconds=30.0, as_json=False)


if __name__ == "__main__":
    main()
