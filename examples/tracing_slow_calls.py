"""Traces of the calls worth keeping: the slow ones, the failed ones, and a sample of the rest.

    python3 examples/tracing_slow_calls.py              # the kept spans' summary
    python3 examples/tracing_slow_calls.py --console    # also print every kept span as OTel JSON

A scoring service receives 2,000 requests. Its feature lookup is usually fast, but now and then (3
requests in 1,000) the feature store stalls for 50 ms, and a few requests carry a record that fails
to parse. Each request runs under a server span of the application's own (as a web framework
instrumentation would make), so inferscope keeps the requests that span samples, and, on top, every
slow or failed one, decided after the call ended. The feature store call makes a span of the
application's own inside the `preprocess` stage: it nests under that stage.

Nothing is sent anywhere: spans go to an in-memory exporter (and the console with --console).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import inferscope

REQUESTS = 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--console", action="store_true", help="print every kept span")
    args = parser.parse_args(argv)

    # The application's tracing: it samples 5% of requests at the edge.
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=TraceIdRatioBased(0.05))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    if args.console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    tracer = provider.get_tracer("scoring-service")

    # inferscope's spans go through the same provider. Unsampled requests still count in the
    # metrics; of those, inferscope keeps the slowest (above the running p99) and the failed ones.
    inferscope.configure(
        service_name="scoring",
        tracer_provider=provider,
        trace_sampler="parentbased_traceidratio",
        trace_ratio=0.0,  # no extra sample of calls without a parent: every request has one
        trace_slow_ms="p99",
    )
    rng = random.Random(19)
    stalled_traces: set[int] = set()  # the trace ids of the stalled requests, sampled or not

    @inferscope.track_inference(model="scorer", version="2")
    def score(record: str) -> float:
        with inferscope.stage("preprocess"):
            with tracer.start_as_current_span("feature-store GET"):
                stalled = rng.random() < 0.003
                if stalled:
                    stalled_traces.add(trace.get_current_span().get_span_context().trace_id)
                time.sleep(0.05 if stalled else 0.0002)
            fields = record.split(",")
            values = [float(field) for field in fields]  # a bad record raises here
        with inferscope.stage("infer"):
            return sum(values) / len(values)

    failures = 0
    for i in range(REQUESTS):
        record = "1,2,x" if i % 500 == 499 else "1,2,3"
        with tracer.start_as_current_span("POST /score"):
            try:
                score(record)
            except ValueError:
                failures += 1

    inferscope.shutdown()
    provider.shutdown()
    spans = exporter.get_finished_spans()
    kept = Counter(
        span.attributes.get("inferscope.trace.kept") for span in spans if span.name == "inference scorer"
    )
    nested = [span for span in spans if span.name == "feature-store GET" and span.parent is not None]
    stages = {span.context.span_id: span for span in spans if span.name == "stage preprocess"}
    under_stage = sum(1 for span in nested if span.parent.span_id in stages)
    inferences = [span for span in spans if span.name == "inference scorer"]
    stalled_kept = sum(1 for span in inferences if span.context.trace_id in stalled_traces)
    failed_kept = sum(1 for span in inferences if not span.status.is_ok)
    print(f"requests: {REQUESTS}")
    print(f"inference spans kept: {len(inferences)} ({dict(sorted(kept.items()))})")
    print(f"stalled requests: {len(stalled_traces)}, kept: {stalled_kept}")
    print(f"failed requests: {failures}, kept: {failed_kept}")
    print(f"feature-store spans nested under a kept preprocess stage: {under_stage}")
    print(inferscope.snapshot().table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
