"""The gate of inferscope's gRPC calls across fork(): what it counts, and the exporters it gates.

The end-to-end case (a child forked during an export to a collector that never answers) is in
test_reliability.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult, MetricsData

from inferscope.export.grpc_fork import GRPC_CALLS, GatedCalls, GrpcCalls, gated


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_call_inside_a_call_counts_once_and_both_end() -> None:
    calls = GrpcCalls()
    with calls.call():
        with calls.call():
            assert calls.active == 1
        assert calls.active == 1
    assert calls.active == 0


def test_a_raising_call_is_counted_out() -> None:
    calls = GrpcCalls()
    with pytest.raises(RuntimeError), calls.call():
        raise RuntimeError("export failed")
    assert calls.active == 0


def test_a_call_that_starts_while_the_process_forks_waits_until_the_fork_is_done() -> None:
    calls = GrpcCalls(call_wait_s=3600.0)  # no give-up while the test looks
    calls.before_fork()  # what os.fork() runs first: nothing in flight, so it returns at once
    entered = threading.Event()

    def export() -> None:
        with calls.call():
            entered.set()

    thread = threading.Thread(target=export)
    thread.start()
    try:
        # A gate that let it in would set this at once; a slow machine could only delay it.
        assert not entered.wait(0.3)
        assert calls.active == 0
    finally:
        calls.after_fork_in_parent()
    assert entered.wait(30)
    thread.join(30)
    assert calls.active == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_child_forked_while_a_call_is_in_flight_marks_grpc_unusable() -> None:
    # GRPC_CALLS is the gate the fork hooks use; a thread stays inside one of its calls.
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with GRPC_CALLS.call():
            inside.set()
            leave.wait(30)

    def fork_and_report() -> dict:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, json.dumps({"usable": GRPC_CALLS.usable, "active": GRPC_CALLS.active}).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            report: dict = json.loads(pipe.read())
        os.waitpid(pid, 0)
        return report

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        busy = fork_and_report()  # waits out FORK_WAIT_S, then forks with the call in flight
    finally:
        leave.set()
        holder.join(30)
    idle = fork_and_report()
    assert busy == {"usable": False, "active": 0}
    assert idle == {"usable": True, "active": 0}
    assert GRPC_CALLS.usable and GRPC_CALLS.active == 0  # the parent is unchanged


def test_the_exporter_s_channel_and_stub_are_gated_after_it_reconnects() -> None:
    exporter = gated(OTLPMetricExporter)(
        endpoint=f"http://127.0.0.1:{closed_port()}", insecure=True, timeout=0.5
    )
    try:
        client, channel = exporter._client, exporter._channel
        assert isinstance(client, GatedCalls) and isinstance(channel, GatedCalls)
        # Nothing listens: UNAVAILABLE, after which the exporter makes a new channel and stub.
        result = exporter.export(some_metrics(), timeout_millis=500)
        assert result is MetricExportResult.FAILURE
        assert exporter._client is not client, "the exporter did not reconnect: nothing to check"
        assert isinstance(exporter._client, GatedCalls) and isinstance(exporter._channel, GatedCalls)
        assert GRPC_CALLS.active == 0
    finally:
        exporter.shutdown()
    assert GRPC_CALLS.active == 0


def some_metrics() -> MetricsData:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    provider.get_meter("test").create_counter("calls").add(1)
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data
