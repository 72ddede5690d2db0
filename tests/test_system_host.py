"""Host and container signals: the PSI and steal parsers, and the observable instruments on a real
MeterProvider, fed by this machine's files and by recorded layouts."""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from inferscope.system.host import (
    CallbackGuard,
    SignalSources,
    read_loadavg,
    read_process,
    read_psi,
    read_steal,
    register_system_metrics,
)

FIXTURES = Path(__file__).parent / "fixtures"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Collected:
    """What one collection of an InMemoryMetricReader returned, by metric name."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.metrics = {}
        data = reader.get_metrics_data()
        for resource_metrics in data.resource_metrics if data else []:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.metrics[metric.name] = metric

    def names(self) -> set[str]:
        return set(self.metrics)

    def unit(self, name: str) -> str:
        return self.metrics[name].unit

    def values(self, name: str) -> dict[tuple, float]:
        """{sorted attribute items: value} for one metric."""
        return {
            tuple(sorted(point.attributes.items())): point.value
            for point in self.metrics[name].data.data_points
        }

    def value(self, name: str, **attributes: str) -> float:
        return self.values(name)[tuple(sorted(attributes.items()))]


@pytest.fixture
def sdk():
    """A real MeterProvider with an in-memory reader: (meter, reader)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield provider.get_meter("inferscope.test"), reader
    provider.shutdown()


# --- parsers ----------------------------------------------------------------------------------------------


def test_psi_recorded_exact():
    assert read_psi(FIXTURES / "proc" / "pressure") == {
        ("cpu", "some"): 155384839,
        ("cpu", "full"): 0,
        ("memory", "some"): 0,
        ("memory", "full"): 0,
        ("io", "some"): 3676111,
        ("io", "full"): 2979398,
    }


def test_psi_before_linux_5_13_has_no_cpu_full():
    totals = read_psi(FIXTURES / "proc" / "pressure_before_5_13")
    assert ("cpu", "full") not in totals
    assert totals[("cpu", "some")] == 7340032
    assert totals[("io", "full")] == 1536


def test_psi_reads_cgroup_v2_pressure_files():
    scope = next((FIXTURES / "cgroup" / "v2_limited" / "root").rglob("cri-containerd-*.scope"))
    totals = read_psi(scope)
    assert totals[("cpu", "some")] == 598233120
    assert totals[("cpu", "full")] == 571004381
    assert totals[("memory", "full")] == 1804
    assert len(totals) == 6


def test_psi_missing_directory_is_empty(tmp_path):
    assert read_psi(tmp_path / "nope") == {}


def test_psi_real_files_are_cumulative():
    root = Path("/proc/pressure")
    first = read_psi(root)
    if not first:
        pytest.skip("no PSI on this kernel")
    second = read_psi(root)
    assert {resource for resource, _ in first} == {"cpu", "memory", "io"}
    for key, total in first.items():
        assert total >= 0
        assert second[key] >= total
    for resource in ("memory", "io"):  # "full" stalls are a subset of "some" stalls
        assert first[(resource, "some")] >= first[(resource, "full")]


def test_steal_recorded_exact():
    assert read_steal(FIXTURES / "proc" / "stat") == pytest.approx(39 / CLOCK_TICKS)


def test_steal_absent_on_kernels_without_the_column():
    assert read_steal(FIXTURES / "proc" / "stat_without_steal") is None
    assert read_steal(Path("/nonexistent/stat")) is None


def test_steal_real_is_non_negative_and_cumulative():
    first = read_steal()
    if first is None:
        pytest.skip("/proc/stat has no steal column here")
    second = read_steal()
    assert 0 <= first <= second


def test_process_sample_real():
    sample = read_process()
    assert sample.cpu_user_seconds > 0
    assert sample.rss_bytes is not None and sample.rss_bytes > 10 * 2**20
    assert sample.virtual_bytes is not None and sample.virtual_bytes >= sample.rss_bytes
    assert sample.threads is not None and sample.threads >= 1


# --- the guard --------------------------------------------------------------------------------------------


def test_guard_counts_every_failure_and_logs_once_a_minute(caplog):
    now = [1000.0]
    guard = CallbackGuard(logging.getLogger("inferscope.system"), clock=lambda: now[0])

    def broken():
        raise OSError("cpu.stat vanished")

    callback = guard.wrap("inferscope.container.cpu.periods", broken)
    with caplog.at_level(logging.WARNING, logger="inferscope.system"):
        for _ in range(3):
            assert list(callback(None)) == []
        now[0] += 61
        assert list(callback(None)) == []
    assert guard.errors == {"inferscope.container.cpu.periods": 4}
    assert guard.total() == 4
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "inferscope.container.cpu.periods" in messages[0] and "cpu.stat vanished" in messages[0]
    assert "4 failure(s)" in messages[1]


# --- instruments on this machine ------------------------------------------------------------------------


def test_real_instruments_names_units_and_values(sdk):
    meter, reader = sdk
    instruments = register_system_metrics(meter, gpu=False, oversubscription=False)
    names = {instrument.name for instrument in instruments}
    collected = Collected(reader)
    # Every instrument reports, except a limit that says "unlimited".
    assert collected.names() <= names
    assert names - collected.names() <= {
        "inferscope.container.cpu.limit",
        "inferscope.container.memory.limit",
    }
    expected_units = {
        "process.cpu.time": "s",
        "process.memory.usage": "By",
        "process.memory.virtual": "By",
        "process.thread.count": "{thread}",
    }
    for name, unit in expected_units.items():
        assert collected.unit(name) == unit
    assert set(collected.values("process.cpu.time")) == {(("cpu.mode", "user"),), (("cpu.mode", "system"),)}
    assert collected.value("process.thread.count") >= 1
    if read_steal() is not None:
        assert collected.unit("inferscope.host.cpu.steal.time") == "s"
        assert collected.value("inferscope.host.cpu.steal.time") >= 0
    if read_loadavg() is not None:
        assert collected.unit("system.linux.cpu.load_1m") == "{thread}"
        assert collected.value("system.linux.cpu.load_1m") >= 0
    if read_psi():
        pressure = collected.values("inferscope.host.pressure.stall.time")
        assert (("kind", "some"), ("resource", "cpu")) in pressure
        assert all(value >= 0 for value in pressure.values())
    if Path("/sys/fs/cgroup/cpu/cpu.stat").exists():  # the v1 layout of these VMs
        assert collected.unit("inferscope.container.cpu.throttled.time") == "s"
        assert collected.unit("inferscope.container.cpu.periods") == "{period}"
        periods = collected.value("inferscope.container.cpu.periods")
        assert periods >= collected.value("inferscope.container.cpu.throttled.periods") >= 0
        assert "inferscope.container.cpu.limit" in names  # the source exists ...
        if int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text()) < 0:  # ... but says unlimited
            assert "inferscope.container.cpu.limit" not in collected.names()


def test_process_cpu_time_grows_after_a_busy_loop(sdk):
    meter, reader = sdk
    register_system_metrics(meter, gpu=False, oversubscription=False)
    before = Collected(reader).value("process.cpu.time", **{"cpu.mode": "user"})
    deadline = time.process_time() + 0.3
    total = 0
    while time.process_time() < deadline:
        total += sum(range(1000))
    time.sleep(0.3)  # _SAMPLE_REUSE_SECONDS: the next collection takes a fresh sample
    after = Collected(reader).value("process.cpu.time", **{"cpu.mode": "user"})
    assert after - before >= 0.2


def test_process_memory_usage_grows_after_touching_50_mb(sdk):
    meter, reader = sdk
    register_system_metrics(meter, gpu=False, oversubscription=False)
    before = Collected(reader).value("process.memory.usage")
    # A fresh anonymous mapping: malloc could hand back freed heap pages that are already resident.
    with mmap.mmap(-1, 50 * 2**20) as block:
        np.frombuffer(block, dtype=np.uint8)[::4096] = 1  # one write per page: the kernel backs every page
        time.sleep(0.3)  # _SAMPLE_REUSE_SECONDS: the next collection takes a fresh sample
        after = Collected(reader).value("process.memory.usage")
    assert after - before >= 45 * 2**20


# --- instruments on recorded layouts --------------------------------------------------------------------


def fixture_sources(case: str, tmp_path: Path) -> SignalSources:
    return SignalSources(
        proc_self=tmp_path / "no-proc-self",
        proc_stat=FIXTURES / "proc" / "stat",
        pressure_root=FIXTURES / "proc" / "pressure",
        cgroup_root=FIXTURES / "cgroup" / case / "root",
        proc_self_cgroup=FIXTURES / "cgroup" / case / "proc_self_cgroup",
        loadavg=lambda: (1.5, 1.25, 0.75),
    )


def test_v2_kubernetes_container_signals_exact(sdk, tmp_path):
    meter, reader = sdk
    register_system_metrics(
        meter, sources=fixture_sources("v2_limited", tmp_path), gpu=False, oversubscription=False
    )
    got = Collected(reader)
    assert got.value("inferscope.container.cpu.periods") == 96154
    assert got.value("inferscope.container.cpu.throttled.periods") == 5308
    assert got.value("inferscope.container.cpu.throttled.time") == pytest.approx(412.880455)
    assert got.value("inferscope.container.cpu.limit") == 2.0
    assert got.unit("inferscope.container.cpu.limit") == "{cpu}"
    assert got.value("inferscope.container.memory.limit") == 1073741824
    assert got.unit("inferscope.container.memory.limit") == "By"
    # The container's own pressure files win over the host-wide /proc/pressure.
    assert got.value("inferscope.host.pressure.stall.time", resource="cpu", kind="some") == pytest.approx(
        598.23312
    )
    assert got.value("inferscope.host.pressure.stall.time", resource="io", kind="full") == pytest.approx(
        0.870012
    )
    assert got.value("inferscope.host.cpu.steal.time") == pytest.approx(39 / CLOCK_TICKS)
    assert got.value("system.linux.cpu.load_1m") == 1.5
    assert got.value("system.linux.cpu.load_15m") == 0.75


def test_v1_docker_limits_and_host_pressure(sdk, tmp_path):
    meter, reader = sdk
    register_system_metrics(
        meter, sources=fixture_sources("v1_docker_limited", tmp_path), gpu=False, oversubscription=False
    )
    got = Collected(reader)
    assert got.value("inferscope.container.cpu.limit") == 1.5
    assert got.value("inferscope.container.memory.limit") == 536870912
    assert got.value("inferscope.container.cpu.throttled.time") == pytest.approx(38.105402199)
    assert got.value("inferscope.host.pressure.stall.time", resource="cpu", kind="some") == pytest.approx(
        155.384839
    )


def test_unlimited_cgroup_has_limit_instruments_without_points(sdk, tmp_path):
    meter, reader = sdk
    instruments = register_system_metrics(
        meter, sources=fixture_sources("v2_unlimited", tmp_path), gpu=False, oversubscription=False
    )
    names = {instrument.name for instrument in instruments}
    assert {"inferscope.container.cpu.limit", "inferscope.container.memory.limit"} <= names
    got = Collected(reader)
    assert "inferscope.container.cpu.limit" not in got.names()
    assert "inferscope.container.memory.limit" not in got.names()
    assert got.value("inferscope.container.cpu.throttled.periods") == 0


def test_sources_that_do_not_exist_are_skipped_silently(sdk, tmp_path, caplog):
    meter, _ = sdk
    empty = SignalSources(
        proc_self=tmp_path / "a",
        proc_stat=tmp_path / "b",
        pressure_root=tmp_path / "c",
        cgroup_root=tmp_path / "d",
        proc_self_cgroup=tmp_path / "e",
        loadavg=lambda: None,
    )
    with caplog.at_level(logging.DEBUG, logger="inferscope"):
        instruments = register_system_metrics(meter, sources=empty, gpu=False, oversubscription=False)
    assert [instrument.name for instrument in instruments] == ["process.cpu.time"]  # getrusage needs no file
    assert not caplog.records


def test_a_source_that_vanishes_after_registration_yields_no_points_and_never_raises(sdk, tmp_path):
    meter, reader = sdk
    copy = tmp_path / "cgroup"
    shutil.copytree(FIXTURES / "cgroup" / "v1_docker_limited", copy)
    sources = SignalSources(
        proc_self=tmp_path / "none",
        proc_stat=tmp_path / "stat",
        pressure_root=tmp_path / "pressure",
        cgroup_root=copy / "root",
        proc_self_cgroup=copy / "proc_self_cgroup",
        loadavg=lambda: None,
    )
    guard = CallbackGuard()
    register_system_metrics(meter, sources=sources, gpu=False, oversubscription=False, guard=guard)
    assert Collected(reader).value("inferscope.container.cpu.periods") == 4817
    shutil.rmtree(copy / "root")
    time.sleep(0.3)
    got = Collected(reader)
    assert "inferscope.container.cpu.limit" not in got.names()
    assert "inferscope.container.cpu.periods" not in got.names()
    assert "process.cpu.time" in got.names()
    assert guard.total() == 0  # a vanished file reads as "unknown", not as a failure


def test_registration_never_raises_into_the_caller(sdk, tmp_path):
    meter, reader = sdk

    class FailingGauges:
        """The real meter, except that creating a gauge fails (an SDK bug, say)."""

        def __getattr__(self, name):
            return getattr(meter, name)

        def create_observable_gauge(self, *args, **kwargs):
            raise RuntimeError("gauge creation failed")

    guard = CallbackGuard()
    sources = fixture_sources("v2_limited", tmp_path)
    instruments = register_system_metrics(FailingGauges(), sources=sources, gpu=False, guard=guard)
    names = {instrument.name for instrument in instruments}
    # The host group failed at its first gauge (the load average) after the steal counter was made;
    # the cgroup counters, made before the cgroup group's gauges, survive.
    assert {"process.cpu.time", "inferscope.host.cpu.steal.time", "inferscope.container.cpu.periods"} <= names
    assert not any(name.endswith(".limit") or name.startswith("system.linux") for name in names)
    assert set(guard.errors) == {
        "registration (register_host)",
        "registration (register_cgroup)",
        "registration (register_oversubscription)",
    }
    assert Collected(reader).value("inferscope.container.cpu.periods") == 96154
