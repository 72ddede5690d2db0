"""A small service with one cause injected for real, run in its own process by the scenario tests.

    python tests/scenarios/service.py CAUSE [--anchor-only] [--inject-seconds N] [--text-fields]

It configures one-second windows, a short anchor and a 3-second sustain time, serves a steady load
(``inferscope.cli.demo_tax.TaxService``), waits for the anchor, injects CAUSE (``control`` injects
nothing), and prints one JSON object: the regressions that ``inferscope.regressions()`` returned, the
anchor and the windows seen. ``--anchor-only`` stops once the anchor is taken (and stored in the
flight recorder named by INFERSCOPE_RECORDER), for a restart in another environment.
``--text-fields`` serves requests that also carry text, which a ``parse`` stage encodes with numpy's
string functions (``TextFieldService``): the stage whose cost depends on the numpy version.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np

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
TEXT_FIELDS = 8


class TextFieldService(TaxService):
    """TaxService whose requests are (numbers, text fields): eight codes per row, such as
    ``"  Store-1234_ab "``, that a ``parse`` stage cleans and encodes with ``np.char`` functions.

    Since numpy 2.0 these are compiled ufuncs; numpy 1.x calls a Python ``str`` method per element,
    so the same code costs several times more under numpy 1.26 than under 2.x.
    """

    def batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        codes = rng.integers(0, 100_000, size=(self.items, TEXT_FIELDS))
        kinds = np.array(["Store", "Web", "App", "Partner"])[codes % 4]
        fields = np.char.add(np.char.add(np.char.add("  ", kinds), "-"), codes.astype(str))
        return super().batch(rng), np.char.add(fields, "_ab ")

    def _predict(self, request: tuple[np.ndarray, np.ndarray]) -> np.ndarray:  # type: ignore[override]
        numbers, fields = request
        with inferscope.stage("parse"):
            cleaned = np.char.strip(fields)
            encoded = np.stack(
                [
                    np.char.startswith(cleaned, "Store"),
                    np.char.find(cleaned, "-"),
                    np.char.count(cleaned, "a"),
                    np.char.str_len(cleaned),
                ],
                axis=-1,
            ).reshape(len(numbers), -1)
            numbers = numbers.copy()
            numbers[:, : encoded.shape[1]] += 0.01 * encoded
        return super()._predict(numbers)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cause", choices=[*CAUSES, "control"])
    parser.add_argument("--anchor-only", action="store_true")
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--inject-seconds", type=float, default=12.0)
    parser.add_argument("--blas-threads", type=int, default=1, help="0: OpenBLAS's default, one per core")
    parser.add_argument("--text-fields", action="store_true", help="requests carry text (TextFieldService)")
    args = parser.parse_args()
    inferscope.configure(
        window_seconds=WINDOW_SECONDS,
        baseline_seconds=args.baseline_seconds,
        regression_sustain_seconds=SUSTAIN_SECONDS,
        counters="thread_cpu,python_heap",
        metrics_exporters=(),
    )
    service = (TextFieldService if args.text_fields else TaxService)(blas_threads=args.blas_threads)
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
