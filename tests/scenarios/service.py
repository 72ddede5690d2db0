"""A small service with one cause injected for real, run in its own process by the scenario tests.

    python tests/scenarios/service.py CAUSE [--anchor-only] [--inject-seconds N]

It configures one-second windows, a short anchor and a 3-second sustain time, serves a steady load
(``inferscope.cli.demo_tax.TaxService``), waits for the anchor, injects CAUSE (``control`` injects
nothing), and prints one JSON object: the regressions that ``inferscope.regressions()`` returned, the
anchor and the windows seen. ``--anchor-only`` stops once the anchor is taken (and stored in the
flight recorder named by INFERSCOPE_RECORDER), for a restart in another environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import inferscope
from inferscope.cli.demo_tax import MODEL, PHASES, TaxService, run_load
from inferscope.detector import detector, regressions
from inferscope.history import regression_to_json

CAUSES = {
    "contention": "contention",
    "slower_library": "slower library path",
    "growing_step": "growing step",
    "larger_inputs": "larger inputs",
    "leak": "leak",
}
WINDOW_SECONDS = 1.0
SUSTAIN_SECONDS = 4.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cause", choices=[*CAUSES, "control"])
    parser.add_argument("--anchor-only", action="store_true")
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--inject-seconds", type=float, default=12.0)
    parser.add_argument("--blas-threads", type=int, default=1, help="0: OpenBLAS's default, one per core")
    args = parser.parse_args()
    inferscope.configure(
        window_seconds=WINDOW_SECONDS,
        baseline_seconds=args.baseline_seconds,
        regression_sustain_seconds=SUSTAIN_SECONDS,
        counters="thread_cpu,python_heap",
        metrics_exporters=(),
    )
    service = TaxService(blas_threads=args.blas_threads)
    stop = threading.Event()
    load = threading.Thread(target=run_load, args=(service, stop), daemon=True)
    load.start()
    current = detector()
    assert current is not None, "configure() installs the detector"
    deadline = time.monotonic() + args.baseline_seconds + 20
    while current.anchor(MODEL) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    anchor = current.anchor(MODEL)
    started = time.time()
    if anchor is not None and not args.anchor_only:
        phase = next((p for p in PHASES if p.name == CAUSES.get(args.cause)), None)
        if phase is not None:
            phase.start(service)
        try:
            begun = time.monotonic()
            while time.monotonic() - begun < args.inject_seconds:
                time.sleep(WINDOW_SECONDS / 2)
                if phase is not None:
                    phase.tick(service, time.monotonic() - begun)
        finally:
            if phase is not None:
                phase.stop(service)
    stop.set()
    load.join(timeout=10)
    found = [regression_to_json(r) for r in regressions()]
    print(
        json.dumps(
            {
                "anchor": None if anchor is None else anchor.to_json() | {"environment": None},
                "injected_unix": started,
                "windows": current.windows_seen,
                "errors": current.errors,
                "regressions": found,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
