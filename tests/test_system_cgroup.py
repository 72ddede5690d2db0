"""cgroup v1 and v2 parsing: recorded layouts with exact values, and this machine's real files."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest

from inferscope.system.cgroup import (
    CpuThrottling,
    read_cgroup,
    read_cpu_limit,
    read_memory_limit,
    read_throttling,
    resolve_cgroup,
)

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
K8S_CONTAINER = (
    "kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod7e1c9a44_2b6d_4c1e_9f0a_5d3e8b2c1a70.slice/cri-containerd-b41f0c7d9e2a.scope"
)


def read_case(name: str):
    case = FIXTURES / name
    return read_cgroup(case / "root", case / "proc_self_cgroup")


# --- recorded layouts ---------------------------------------------------------------------------------


def test_v2_limited_kubernetes_container():
    info = read_case("v2_limited")
    assert info.version == 2
    assert not info.hybrid
    assert info.cpu_dir == FIXTURES / "v2_limited" / "root" / K8S_CONTAINER
    assert (info.cpu_quota_us, info.cpu_period_us) == (200000, 100000)
    assert info.cpu_limit == 2.0
    assert info.cpu_limit_whole == 2
    assert info.memory_limit_bytes == 1073741824
    assert info.throttling == CpuThrottling(
        nr_periods=96154, nr_throttled=5308, throttled_time_ns=412880455000
    )
    assert info.pressure_dir == info.cpu_dir


def test_v2_unlimited_reads_max_as_no_limit():
    info = read_case("v2_unlimited")
    assert info.version == 2
    assert info.cpu_dir == FIXTURES / "v2_unlimited" / "root"
    assert info.cpu_quota_us is None
    assert info.cpu_period_us == 100000  # "max 100000": the period is still recorded
    assert info.cpu_limit is None
    assert info.cpu_limit_whole is None
    assert info.memory_limit_bytes is None
    assert info.throttling == CpuThrottling(0, 0, 0)
    assert info.pressure_dir == FIXTURES / "v2_unlimited" / "root"


def test_v2_limits_set_on_a_parent_bind_the_child():
    info = read_case("v2_parent_limits")
    assert info.cpu_dir == FIXTURES / "v2_parent_limits" / "root" / "app.slice" / "worker.scope"
    assert (info.cpu_quota_us, info.cpu_period_us) == (50000, 100000)
    assert info.cpu_limit == 0.5
    assert info.cpu_limit_whole == 1
    assert info.memory_limit_bytes == 268435456
    assert info.throttling == CpuThrottling(10, 0, 0)
    assert info.pressure_dir is None  # no *.pressure files there: the host-wide /proc/pressure is used


def test_v2_host_side_path_that_is_not_mounted_falls_back_to_the_root():
    info = read_case("v2_host_path_not_mounted")
    assert info.version == 2
    assert info.cpu_dir == FIXTURES / "v2_host_path_not_mounted" / "root"
    assert info.cpu_quota_us is None and info.memory_limit_bytes is None
    assert info.throttling is None  # the root cgroup has no bandwidth control: no nr_periods


def test_v1_docker_without_namespace_combined_cpu_cpuacct_mount():
    info = read_case("v1_docker_limited")
    root = FIXTURES / "v1_docker_limited" / "root"
    assert info.version == 1
    assert not info.hybrid
    assert info.cpu_dir == root / "cpu,cpuacct"  # /docker/<id> is the host's path: stripped
    assert info.memory_dir == root / "memory"
    assert (info.cpu_quota_us, info.cpu_period_us) == (150000, 100000)
    assert info.cpu_limit == 1.5
    assert info.cpu_limit_whole == 2
    assert info.memory_limit_bytes == 536870912
    assert info.throttling == CpuThrottling(4817, 212, 38105402199)


def test_v1_hybrid_recorded_on_this_vm():
    info = read_case("v1_hybrid_recorded")
    root = FIXTURES / "v1_hybrid_recorded" / "root"
    assert info.version == 1
    assert info.hybrid
    assert info.cpu_dir == root / "cpu"
    assert info.memory_dir == root / "memory" / "process_api" / "6eddf5eeb5f23f01d1f5949023cf6ec3"
    assert info.cpu_quota_us is None  # cpu.cfs_quota_us is -1
    assert info.cpu_period_us == 100000
    assert info.memory_limit_bytes is None  # 9223372036854771712 means unlimited
    assert info.throttling == CpuThrottling(0, 0, 0)
    assert info.pressure_dir is None  # v1: PSI comes from /proc/pressure


def test_no_cgroup_filesystem(tmp_path):
    (tmp_path / "proc_self_cgroup").write_text("0::/\n")
    info = read_cgroup(tmp_path / "root", tmp_path / "proc_self_cgroup")
    assert info.version is None
    assert info.cpu_limit is None and info.memory_limit_bytes is None and info.throttling is None


def test_unreadable_or_garbled_files_read_as_unknown(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cpu.max").write_text("lots 100000\n")
    (root / "memory.max").write_text("\n")
    (root / "cpu.stat").write_text("nr_periods x\nnr_throttled 1\n")
    info = read_cgroup(root, tmp_path / "missing")
    assert info.version == 2
    assert info.cpu_quota_us is None and info.memory_limit_bytes is None and info.throttling is None


# --- this machine -----------------------------------------------------------------------------------------


def test_real_cgroup_limits_match_the_files_read_directly():
    info = read_cgroup()
    paths = resolve_cgroup()
    if info.version is None or paths.cpu_dir is None or paths.cpu_mount is None:
        pytest.skip("no cgroup CPU controller here")
    assert paths.cpu_dir.is_dir()
    if info.version == 1:
        quota = int((paths.cpu_dir / "cpu.cfs_quota_us").read_text())
        period = int((paths.cpu_dir / "cpu.cfs_period_us").read_text())
        leaf_limit = quota / period if quota > 0 else None
    else:
        fields = (
            (paths.cpu_dir / "cpu.max").read_text().split() if (paths.cpu_dir / "cpu.max").exists() else []
        )
        leaf_limit = int(fields[0]) / int(fields[1]) if fields and fields[0] != "max" else None
    if leaf_limit is not None:  # the effective limit is the tightest of this level and its parents
        assert info.cpu_limit is not None and info.cpu_limit <= leaf_limit
    if paths.cpu_dir == paths.cpu_mount:  # no parents to consult: the file is the whole answer
        assert info.cpu_limit == leaf_limit
        if info.version == 1:
            assert info.cpu_period_us == period
            assert info.cpu_quota_us == (quota if quota > 0 else None)
    if info.cpu_quota_us is None:
        assert read_cpu_limit(paths) is None and info.cpu_limit_whole is None
    else:
        assert info.cpu_limit_whole == math.ceil(info.cpu_quota_us / info.cpu_period_us)
    if info.memory_limit_bytes is not None:
        assert 0 < info.memory_limit_bytes < 1 << 62
        assert read_memory_limit(paths) == info.memory_limit_bytes


def test_real_memory_cgroup_is_this_process_own():
    paths = resolve_cgroup()
    if paths.version != 1 or paths.memory_dir is None or paths.memory_mount is None:
        pytest.skip("a v1 memory controller is not mounted here")
    memory_path = next(
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if "memory" in line.split(":", 2)[1].split(",")
    )
    if not (paths.memory_mount / memory_path.lstrip("/")).is_dir():
        pytest.skip("the host-side path is not mounted here (no cgroup namespace)")
    assert paths.memory_dir == paths.memory_mount / memory_path.lstrip("/")
    assert str(os.getpid()) in (paths.memory_dir / "cgroup.procs").read_text().split()


def test_real_throttling_counters_are_consistent_and_never_decrease():
    paths = resolve_cgroup()
    first = read_throttling(paths)
    if first is None:
        pytest.skip("no CFS bandwidth counters in this cgroup")
    deadline = time.perf_counter() + 0.05
    while time.perf_counter() < deadline:  # some CPU work between the reads
        pass
    second = read_throttling(paths)
    assert second is not None
    for sample in (first, second):
        assert sample.nr_periods >= sample.nr_throttled >= 0
        assert sample.throttled_time_ns >= 0
        if sample.nr_throttled == 0:
            assert sample.throttled_time_ns == 0
    assert second.nr_periods >= first.nr_periods
    assert second.nr_throttled >= first.nr_throttled
    assert second.throttled_time_ns >= first.throttled_time_ns
