"""The oversubscription check, for real: subprocesses pinned to one CPU with OpenMP asked for more."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from inferscope.system.cgroup import read_cgroup
from inferscope.system.threads import ThreadPool, build_report, usable_cpus

from .conftest import run_python

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"

pytest.importorskip("threadpoolctl")

# Pinned to one CPU, the process imports scikit-learn, which loads its OpenMP runtime (libgomp) sized
# by OMP_NUM_THREADS. The post-import hook re-runs the check as soon as the import finishes.
PINNED_SCRIPT = """
import json, logging, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from inferscope.system import threads
from inferscope.system.host import register_system_metrics

before = threads.check_oversubscription()
threads.install_import_hook()
threads.install_import_hook()  # idempotent
print("MARK importing sklearn", file=sys.stderr, flush=True)
import sklearn
print("MARK imported sklearn", file=sys.stderr, flush=True)
after = threads.check_oversubscription()

reader = InMemoryMetricReader()
provider = MeterProvider(metric_readers=[reader])
register_system_metrics(provider.get_meter("t"), gpu=False)
reader.get_metrics_data()  # the gauge's callback runs the check again: still no second warning
gauge = {}
for rm in reader.get_metrics_data().resource_metrics:
    for sm in rm.scope_metrics:
        for metric in sm.metrics:
            if metric.name == "inferscope.process.threads.oversubscription":
                gauge = {dict(p.attributes)["library"]: p.value for p in metric.data.data_points}
                unit = metric.unit
print(json.dumps({
    "before": [before.oversubscribed, before.usable_cpus, before.affinity_cpus],
    "after": [after.oversubscribed, after.usable_cpus, [[p.library, p.num_threads] for p in after.pools]],
    "gauge": gauge,
    "unit": unit,
}))
"""


def run_pinned(omp_threads: str):
    pytest.importorskip("sklearn")
    result = run_python(PINNED_SCRIPT, env={"OMP_NUM_THREADS": omp_threads})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr.splitlines()


def test_openmp_oversubscription_on_one_cpu_warns_once_after_the_import():
    report, stderr = run_pinned("2")
    if not any(library == "openmp" for library, _ in report["after"][2]):
        pytest.skip("this scikit-learn build loads no OpenMP runtime at import")
    usable_before = report["before"]
    assert usable_before[1] == 1 and usable_before[2] == 1
    assert usable_before[0] is False  # numpy's OpenBLAS sizes itself to the affinity mask
    assert report["after"][0] is True
    assert ["openmp", 2] in report["after"][2]

    warnings = [line for line in stderr if "thread oversubscription" in line]
    assert len(warnings) == 1, stderr
    # The hook fired during the import, not at the explicit check after it.
    assert stderr.index(warnings[0]) > stderr.index("MARK importing sklearn")
    assert stderr.index(warnings[0]) < stderr.index("MARK imported sklearn")
    warning = warnings[0]
    assert warning.startswith("WARNING inferscope.system")
    assert "openmp (libgomp" in warning and "2 threads" in warning
    assert "may use 1 CPU(s)" in warning and "affinity 1 CPU(s)" in warning
    assert "OMP_NUM_THREADS=1" in warning
    assert "torch.set_num_threads(1)" in warning
    assert "threadpoolctl.threadpool_limits(1)" in warning

    assert report["unit"] == "1"
    assert report["gauge"]["openmp"] == 2.0
    assert report["gauge"]["openblas"] == 1.0


def test_no_warning_when_threads_fit():
    report, stderr = run_pinned("1")
    assert report["after"][0] is False
    assert not [line for line in stderr if "oversubscription" in line]
    assert report["gauge"]["openmp"] == 1.0


def test_usable_cpus_is_affinity_intersected_with_the_cgroup_quota():
    limited = read_cgroup(
        FIXTURES / "v1_docker_limited" / "root", FIXTURES / "v1_docker_limited" / "proc_self_cgroup"
    )
    assert usable_cpus(limited, affinity=range(8)) == (2, 8, 1.5)  # ceil(1.5)
    assert usable_cpus(limited, affinity=[3]) == (1, 1, 1.5)
    half = read_cgroup(
        FIXTURES / "v2_parent_limits" / "root", FIXTURES / "v2_parent_limits" / "proc_self_cgroup"
    )
    assert usable_cpus(half, affinity=range(4)) == (1, 4, 0.5)
    unlimited = read_cgroup(
        FIXTURES / "v2_unlimited" / "root", FIXTURES / "v2_unlimited" / "proc_self_cgroup"
    )
    assert usable_cpus(unlimited, affinity=range(6)) == (6, 6, None)


def test_usable_cpus_here_matches_the_affinity_mask():
    usable, affinity, limit = usable_cpus()
    assert affinity == len(os.sched_getaffinity(0))
    assert usable == (affinity if limit is None else min(affinity, max(1, math.ceil(limit))))


def test_report_ratios_take_the_largest_pool_of_each_library():
    pools = [
        ThreadPool("openblas", "blas", 4, "numpy.libs/libscipy_openblas"),
        ThreadPool("openblas", "blas", 8, "scipy.libs/libscipy_openblas"),
        ThreadPool("torch", "torch", 2, "torch.get_num_threads()"),
    ]
    report = build_report(pools, usable=2, affinity_cpus=16, cgroup_cpu_limit=2.0)
    assert report.ratios == {"openblas": 4.0, "torch": 1.0}
    assert [pool.num_threads for pool in report.oversubscribed_pools] == [4, 8]
    message = report.message()
    assert "openblas (numpy.libs/libscipy_openblas) 4 threads" in message
    assert "cgroup quota 2 CPUs" in message and "affinity 16 CPU(s)" in message
    assert "torch (" not in message  # torch fits: not named
