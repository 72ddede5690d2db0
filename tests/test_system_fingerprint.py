"""The environment fingerprint: contents, stability across calls and processes, sensitivity to what
matters, resource attributes, diff, the `inferscope env` command and the example."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inferscope.system.fingerprint import (
    Change,
    diff,
    environment,
    fingerprint,
    read_cpuinfo,
    render_diff,
    resource_attributes,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    return environment()


def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return subprocess.run(
        [sys.executable, "-m", "inferscope.cli", *args],
        cwd=ROOT,
        env={**base, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- contents ---------------------------------------------------------------------------------------------


def test_environment_is_json_with_a_stable_key_order(env):
    assert list(env) == [
        "fingerprint",
        "inferscope",
        "python",
        "os",
        "cpu",
        "cgroup",
        "packages",
        "threads_env",
        "threadpools",
        *(["torch"] if "torch" in sys.modules else []),
        "gpu",
    ]
    assert json.loads(json.dumps(env)) == env
    assert list(environment()) == list(env)


def test_environment_reports_this_machine(env):
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["python"]["implementation"] == "CPython"
    assert env["os"]["release"] == os.uname().release
    assert env["cpu"]["logical_cpus"] == os.cpu_count()
    assert env["cpu"]["affinity"] == sorted(os.sched_getaffinity(0))
    assert 1 <= env["cpu"]["usable_cpus"] <= len(os.sched_getaffinity(0))
    assert env["packages"]["numpy"] == importlib.metadata.version("numpy")
    model, flags = read_cpuinfo()
    assert env["cpu"]["model"] == model
    assert env["cpu"]["flags"] == flags
    if "avx2" in Path("/proc/cpuinfo").read_text().split():
        assert "avx2" in flags
    assert all(flag.startswith(("avx", "amx", "sse4", "fma", "f16c", "bmi2")) for flag in flags)
    assert env["gpu"]["available"] is False and env["gpu"]["reason"]  # no GPU on these machines


def test_never_imports_a_heavy_library_to_fingerprint():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from inferscope.system.fingerprint import environment; environment();"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'sklearn', 'tensorflow', 'xgboost',"
            " 'lightgbm', 'transformers') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_threadpools_come_from_threadpoolctl_with_thread_counts(env):
    pytest.importorskip("threadpoolctl")
    pools = env["threadpools"]
    assert pools["source"] == "threadpoolctl"
    blas = [lib for lib in pools["libraries"].values() if lib["user_api"] == "blas"]
    assert blas, "numpy is imported: its BLAS must be listed"
    assert all(isinstance(lib["num_threads"], int) and lib["num_threads"] >= 1 for lib in blas)


def test_without_threadpoolctl_numpy_reports_its_blas():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json; sys.modules['threadpoolctl'] = None\n"
            "from inferscope.system.fingerprint import environment\n"
            "print(json.dumps(environment()['threadpools']))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    pools = json.loads(result.stdout)
    assert pools["source"].startswith("numpy.show_config")
    (blas,) = pools["libraries"].values()
    assert blas["user_api"] == "blas" and blas["internal_api"] and blas["num_threads"] is None


def test_read_cpuinfo_arm_features(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nBogoMIPS\t: 243.75\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs "
        "sb paca pacg dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm "
        "svebf16 i8mm bf16 dgh rng\nCPU implementer\t: 0x41\n"
    )
    assert read_cpuinfo(cpuinfo) == (None, ["asimd", "asimddp", "bf16", "i8mm", "sve", "sve2"])
    assert read_cpuinfo(tmp_path / "missing") == (None, [])


# --- the hash ----------------------------------------------------------------------------------------------


def test_fingerprint_is_16_hex_and_stable_across_calls(env):
    assert len(env["fingerprint"]) == 16
    int(env["fingerprint"], 16)
    assert fingerprint(env) == env["fingerprint"]
    assert fingerprint() == env["fingerprint"]
    assert environment()["fingerprint"] == env["fingerprint"]


def test_fingerprint_is_stable_across_processes(env):
    outputs = {
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from inferscope.system.fingerprint import fingerprint; print(fingerprint())",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    }
    assert outputs == {env["fingerprint"]}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("packages", "numpy"), "0.0.1"),
        (("packages", "torch"), "2.13.0"),
        (("python", "version"), "3.99.0"),
        (("python", "free_threaded"), True),
        (("os", "release"), "7.0.0-other"),
        (("cpu", "flags"), ["avx2"]),
        (("cpu", "usable_cpus"), 64),
        (("cgroup", "cpu_limit"), 0.5),
        (("cgroup", "memory_limit_bytes"), 2**30),
        (("threads_env", "OMP_NUM_THREADS"), "1"),
        (("gpu", "driver_version"), "550.54.15"),
    ],
)
def test_fingerprint_changes_when_a_relevant_input_changes(env, path, value):
    changed = copy.deepcopy(env)
    changed[path[0]][path[1]] = value
    assert fingerprint(changed) != env["fingerprint"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("python", "executable"), "/opt/other-venv/bin/python"),
        (("cpu", "affinity"), [1]),
        (("os", "version"), "#2 SMP PREEMPT_DYNAMIC another build"),
        (("threadpools", "libraries"), {}),
        (("gpu", "reason"), "another wording"),
        (("fingerprint", None), "0000000000000000"),
    ],
)
def test_fingerprint_ignores_volatile_and_incidental_values(env, path, value):
    changed = copy.deepcopy(env)
    if path[1] is None:
        changed[path[0]] = value
    else:
        changed[path[0]][path[1]] = value
    changed["torch"] = {"version": "x", "intra_op_threads": 3, "inter_op_threads": 1}  # depends on imports
    assert fingerprint(changed) == env["fingerprint"]


def test_fingerprint_of_a_partial_dict():
    assert fingerprint({}) == fingerprint({"unrelated": 1})
    assert fingerprint({"packages": {"numpy": "1"}}) != fingerprint({"packages": {"numpy": "2"}})


# --- resource attributes ----------------------------------------------------------------------------------


def test_resource_attributes_are_flat_strings(env):
    attributes = resource_attributes(env)
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in attributes.items())
    assert attributes["inferscope.env.fingerprint"] == env["fingerprint"]
    assert attributes["inferscope.env.python.version"] == env["python"]["version"]
    assert attributes["inferscope.env.numpy.version"] == importlib.metadata.version("numpy")
    assert attributes["inferscope.env.cpu.usable"] == str(env["cpu"]["usable_cpus"])
    assert all(key.startswith("inferscope.env.") for key in attributes)
    if "torch" not in env["packages"]:
        assert "inferscope.env.torch.version" not in attributes
    if "scikit-learn" in env["packages"]:
        assert attributes["inferscope.env.scikit_learn.version"] == env["packages"]["scikit-learn"]
    blas = {
        lib["internal_api"] for lib in env["threadpools"]["libraries"].values() if lib["user_api"] == "blas"
    }
    for name in blas:
        assert name in attributes["inferscope.env.blas"]


def test_resource_attributes_with_a_gpu_and_torch():
    env = {
        "fingerprint": "0123456789abcdef",
        "packages": {"torch": "2.13.0", "numpy": "2.1.0"},
        "threadpools": {
            "libraries": {"a/libmkl_rt": {"user_api": "blas", "internal_api": "mkl", "version": "2024.2"}}
        },
        "gpu": {
            "available": True,
            "cuda_driver_version": "12.4",
            "cuda_runtime": "12.1",
            "devices": {"gpu0": {"model": "NVIDIA H200"}, "gpu1": {"model": "NVIDIA H200"}},
        },
    }
    assert resource_attributes(env) == {
        "inferscope.env.fingerprint": "0123456789abcdef",
        "inferscope.env.numpy.version": "2.1.0",
        "inferscope.env.torch.version": "2.13.0",
        "inferscope.env.blas": "mkl 2024.2",
        "inferscope.env.gpu.model": "NVIDIA H200",
        "inferscope.env.gpu.count": "2",
        "inferscope.env.cuda.driver.version": "12.4",
        "inferscope.env.cuda.runtime.version": "12.1",
    }


# --- diff ---------------------------------------------------------------------------------------------------


BEFORE = {
    "fingerprint": "aaaaaaaaaaaaaaaa",
    "packages": {"numpy": "1.26.4", "torch": "2.3.0"},
    "cpu": {"flags": ["avx", "avx2", "avx512f"], "usable_cpus": 4},
    "threads_env": {"OMP_NUM_THREADS": "4"},
}
AFTER = {
    "fingerprint": "bbbbbbbbbbbbbbbb",
    "packages": {"numpy": "2.1.0", "onnxruntime": "1.19.0"},
    "cpu": {"flags": ["avx", "avx2", "amx_tile"], "usable_cpus": 4},
    "threads_env": {},
}


def test_diff_lists_changed_removed_and_added_leaves():
    assert diff(BEFORE, AFTER) == [
        Change("fingerprint", "changed", "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"),
        Change("packages.numpy", "changed", "1.26.4", "2.1.0"),
        Change("packages.torch", "removed", old="2.3.0"),
        Change("cpu.flags", "changed", ["avx", "avx2", "avx512f"], ["avx", "avx2", "amx_tile"]),
        Change("threads_env.OMP_NUM_THREADS", "removed", old="4"),
        Change("packages.onnxruntime", "added", new="1.19.0"),
    ]
    assert diff(BEFORE, copy.deepcopy(BEFORE)) == []


def test_render_diff_text():
    assert render_diff(diff(BEFORE, AFTER)) == "\n".join(
        [
            "6 change(s):",
            "  changed  fingerprint                  aaaaaaaaaaaaaaaa -> bbbbbbbbbbbbbbbb",
            "  changed  packages.numpy               1.26.4 -> 2.1.0",
            "  removed  packages.torch               2.3.0",
            "  changed  cpu.flags                    added amx_tile; removed avx512f",
            "  removed  threads_env.OMP_NUM_THREADS  4",
            "  added    packages.onnxruntime         1.19.0",
        ]
    )
    assert render_diff([]) == "no changes"
    assert render_diff([Change("cgroup.cpu_limit", "changed", None, 1.5)]).endswith("null -> 1.5")


# --- the command and the example -------------------------------------------------------------------------


def test_cli_env_prints_the_environment_as_json(env):
    result = cli("env")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["fingerprint"] == env["fingerprint"]
    assert printed["packages"] == env["packages"]


def test_cli_env_diff(tmp_path):
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    first = cli("env")
    second = cli("env", extra_env={"OMP_NUM_THREADS": "3"})
    before.write_text(first.stdout)
    after.write_text(second.stdout)
    result = cli("env", "--diff", str(before), str(after))
    assert result.returncode == 1, result.stderr  # as diff does: they differ
    lines = result.stdout.splitlines()
    assert lines[0] == f"{before} -> {after}"
    assert any(line.split()[:2] == ["changed", "fingerprint"] for line in lines)
    assert any(line.split() == ["added", "threads_env.OMP_NUM_THREADS", "3"] for line in lines)
    same = cli("env", "--diff", str(before), str(before))
    assert same.returncode == 0 and same.stdout.splitlines()[-1] == "no changes"


def test_cli_env_diff_unreadable_files_exit_2(tmp_path):
    good = tmp_path / "good.json"
    good.write_text("{}")
    missing = cli("env", "--diff", str(good), str(tmp_path / "missing.json"))
    assert missing.returncode == 2
    assert f"cannot read {tmp_path / 'missing.json'}" in missing.stderr
    assert "No such file" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    invalid = cli("env", "--diff", str(broken), str(good))
    assert invalid.returncode == 2 and f"cannot read {broken}" in invalid.stderr
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    not_object = cli("env", "--diff", str(good), str(array))
    assert not_object.returncode == 2 and "is not a JSON object" in not_object.stderr
    assert not missing.stdout and not invalid.stdout and not not_object.stdout


def test_environment_diff_example():
    result = subprocess.run(
        [sys.executable, "examples/environment_diff.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "change(s):" in out
    assert "changed  fingerprint" in out
    assert "packages.numpy" in out and "0.0.0-after-deploy" in out
    assert "threads_env.OMP_NUM_THREADS" in out
