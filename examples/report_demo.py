"""A report of a real run: a small scoring service, a regression injected for real, one HTML file.

    python examples/report_demo.py --output report.html

The service (``inferscope demo --tax``'s numpy model: preprocess, an OpenBLAS product in infer,
postprocess) runs under a steady load with one-second windows and writes the flight recorder.
Once its anchor is taken, ``infer`` switches to numpy's einsum loops (the same result, several
times slower) until the detector names the regression; then the service runs as before for a few
seconds. The report is written from the recorder, as ``inferscope report`` writes it:

    inferscope report --recorder DIR/recorder.sqlite --since 1h -o report.html

``--also-model NAME`` serves a second model under that name beside it (any name: the report shows
it as text).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import inferscope
from inferscope.cli.demo_tax import TaxService, run_load
from inferscope.detector import detector, regressions
from inferscope.recorder import FlightRecorder
from inferscope.report import collect, render_html

MODEL = "scoring"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="report.html", help="the HTML report to write")
    parser.add_argument("--recorder", help="the flight recorder to write (default: a new temporary one)")
    parser.add_argument("--baseline-seconds", type=float, default=6.0, help="the anchor's length")
    parser.add_argument("--inject-seconds", type=float, default=20.0, help="at most this long slowed down")
    parser.add_argument("--after-seconds", type=float, default=4.0, help="steady load after the injection")
    parser.add_argument("--also-model", help="a second model served beside the first, under this name")
    args = parser.parse_args()

    path = args.recorder or os.path.join(tempfile.mkdtemp(prefix="inferscope-report-"), "recorder.sqlite")
    inferscope.configure(
        service_name="report-demo",
        window_seconds=1.0,
        baseline_seconds=args.baseline_seconds,
        regression_sustain_seconds=3.0,
        counters="thread_cpu,python_heap",
        metrics_exporters=(),
        recorder=path,
    )
    services = [TaxService(model=MODEL, blas_threads=1)]
    if args.also_model:
        services.append(TaxService(model=args.also_model, seed=12, blas_threads=1))
    stop = threading.Event()
    loads = [
        threading.Thread(target=run_load, args=(service, stop), kwargs={"seed": n}, daemon=True)
        for n, service in enumerate(services)
    ]
    for load in loads:
        load.start()
    found = detector()
    assert found is not None, "configure() installs the regression detector"
    deadline = time.monotonic() + args.baseline_seconds + 30
    while found.anchor(MODEL) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"anchor of {MODEL} taken: {found.anchor(MODEL) is not None}")

    services[0].library_path = "einsum"  # the slower library path, for real
    began = time.monotonic()
    while time.monotonic() - began < args.inject_seconds:
        time.sleep(0.5)
        if any(r.active and r.model == MODEL for r in regressions()):
            time.sleep(2.0)
            break
    services[0].library_path = "blas"
    time.sleep(args.after_seconds)
    stop.set()
    for load in loads:
        load.join(timeout=10)
    inferscope.shutdown()  # closes the last window into the recorder

    for r in regressions():
        print(f"regression: {r.model} {r.stage or '(inference)'} {r.metric} {r.change:+.0%}, cause {r.cause}")
    recorder = FlightRecorder(path, create=False)
    try:
        page = render_html(collect(recorder, since_unix=time.time() - 3600, now_seconds=3.0))
    finally:
        recorder.close()
    with open(args.output, "w", encoding="utf-8") as file:
        file.write(page)
    print(f"flight recorder: {path}")
    print(f"report: {args.output} ({len(page) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
