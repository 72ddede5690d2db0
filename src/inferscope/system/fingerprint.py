"""The environment fingerprint: what this process runs on, as JSON, a stable hash, and resource attributes.

When the cost of an inference creeps up after a deploy, the first question is "what changed?". The
environment answers it: Python and its build, the kernel, the CPU and its vector extensions, the CPUs
and memory the cgroup allows, the versions of the ML libraries, the BLAS/OpenMP thread pools and the
GPU. ``fingerprint()`` hashes the parts that matter into 16 hex characters that stay the same between
runs on the same machine with the same dependencies, and ``diff()`` lists what differs between two
saved environments (``inferscope env --diff a.json b.json``).

Nothing here imports a heavy library: versions come from package metadata, and torch's threads are
read only when torch is already imported.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import cgroup as _cgroup
from . import gpu as _gpu
from . import threads as _threads

__all__ = [
    "Change",
    "cached_environment",
    "diff",
    "environment",
    "fingerprint",
    "read_cpuinfo",
    "render_diff",
    "resource_attributes",
]

#: Libraries whose version is recorded: (key, distribution names to try, in order).
PACKAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("numpy", ("numpy",)),
    ("scipy", ("scipy",)),
    ("torch", ("torch",)),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino")),
    ("scikit-learn", ("scikit-learn",)),
    ("xgboost", ("xgboost", "xgboost-cpu")),
    ("lightgbm", ("lightgbm",)),
    ("transformers", ("transformers",)),
    ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-intel")),
)

#: Environment variables that size thread pools; a change in one changes the cost of an inference.
THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OMP_PROC_BIND",
    "OMP_WAIT_POLICY",
    "KMP_AFFINITY",
    "KMP_BLOCKTIME",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)

#: CPU flags that change which kernels BLAS, oneDNN and onnxruntime pick.
_CPU_FLAG_PREFIXES = ("avx", "amx")
_CPU_FLAGS = frozenset(
    {"sse4_1", "sse4_2", "fma", "f16c", "bmi2", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm", "sme"}
)

#: The parts of the environment the fingerprint hashes. Left out on purpose: paths (the same
#: dependencies in another virtualenv are the same environment), the affinity list (a pinned worker
#: differs from its siblings only in which CPUs, not how many), the loaded thread pools and torch's
#: threads (they depend on what was imported before the call) and the kernel's build string.
_HASHED: dict[str, tuple[str, ...] | None] = {
    "inferscope": None,
    "python": ("implementation", "version", "build", "compiler", "debug", "free_threaded", "gil_enabled"),
    "os": ("system", "release", "machine", "libc"),
    "cpu": ("model", "flags", "logical_cpus", "usable_cpus"),
    "cgroup": ("version", "cpu_limit", "memory_limit_bytes"),
    "packages": None,
    "threads_env": None,
    "gpu": ("available", "driver_version", "cuda_driver_version", "cuda_runtime", "devices"),
}

#: The packages exported as resource attributes, when installed.
_ATTRIBUTE_PACKAGES = (
    "numpy",
    "torch",
    "onnxruntime",
    "scikit-learn",
    "xgboost",
    "lightgbm",
    "transformers",
    "tensorflow",
)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, list[str]]:
    """(CPU model, the flags that matter, sorted) from /proc/cpuinfo; x86 ``flags`` and Arm ``Features``."""
    try:
        text = path.read_text()
    except OSError:
        return None, []
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "cpu model"):
            model = value.strip() or None
        elif not flags and key in ("flags", "Features"):
            flags = {
                flag for flag in value.split() if flag.startswith(_CPU_FLAG_PREFIXES) or flag in _CPU_FLAGS
            }
    return model, sorted(flags)


def _python() -> dict[str, Any]:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return {
        "implementation": platform.python_implementation(),
        "version": platform.python_version(),
        "build": " ".join(platform.python_build()),
        "compiler": platform.python_compiler(),
        "debug": hasattr(sys, "gettotalrefcount"),
        "free_threaded": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
        "gil_enabled": bool(is_gil_enabled()) if callable(is_gil_enabled) else True,
        "executable": sys.executable,
    }


def _os() -> dict[str, Any]:
    uname = platform.uname()
    libc = " ".join(part for part in platform.libc_ver() if part)
    return {
        "system": uname.system,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
        "libc": libc or None,
    }


def _cpu(info: _cgroup.CgroupInfo) -> dict[str, Any]:
    model, flags = read_cpuinfo()
    try:
        affinity: list[int] | None = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    usable, _, _ = _threads.usable_cpus(info, affinity)
    return {
        "model": model or platform.processor() or None,
        "flags": flags,
        "logical_cpus": os.cpu_count(),
        "affinity": affinity,
        "usable_cpus": usable,
    }


def _cgroup_section(info: _cgroup.CgroupInfo) -> dict[str, Any]:
    return {
        "version": info.version,
        "hybrid": info.hybrid,
        "cpu_quota_us": info.cpu_quota_us,
        "cpu_period_us": info.cpu_period_us,
        "cpu_limit": info.cpu_limit,
        "memory_limit_bytes": info.memory_limit_bytes,
    }


def _packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for key, distributions in PACKAGES:
        for distribution in distributions:
            try:
                found[key] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
            except Exception:  # a broken METADATA file must not break the fingerprint
                continue
    return found


def _threadpools() -> dict[str, Any]:
    """The loaded BLAS/OpenMP libraries and their threads: threadpoolctl when installed, else what an
    already-imported numpy says about its BLAS (without a thread count)."""
    info = _threads.threadpoolctl_info()
    libraries: dict[str, dict[str, Any]] = {}
    if info is not None:
        for entry in sorted(info, key=lambda item: str(item.get("filepath", ""))):
            filepath = str(entry.get("filepath", ""))
            label = f"{Path(filepath).parent.name}/{entry.get('prefix', '?')}"
            while label in libraries:
                label += "+"
            libraries[label] = {
                "user_api": entry.get("user_api"),
                "internal_api": entry.get("internal_api"),
                "version": entry.get("version"),
                "num_threads": entry.get("num_threads"),
                "threading_layer": entry.get("threading_layer"),
                "architecture": entry.get("architecture"),
            }
        return {"source": "threadpoolctl", "libraries": libraries}
    numpy = sys.modules.get("numpy")
    config = getattr(getattr(numpy, "__config__", None), "CONFIG", None)
    if isinstance(config, Mapping):
        blas = config.get("Build Dependencies", {}).get("blas", {})
        if isinstance(blas, Mapping) and blas.get("name"):
            libraries["numpy/blas"] = {
                "user_api": "blas",
                "internal_api": blas.get("name"),
                "version": blas.get("version"),
                "num_threads": None,
            }
        return {
            "source": "numpy.show_config (install threadpoolctl for thread counts)",
            "libraries": libraries,
        }
    return {"source": "unavailable (install threadpoolctl)", "libraries": libraries}


def _torch_cuda_runtime() -> str | None:
    """The CUDA runtime torch was built with, read from torch/version.py without importing torch."""
    torch = sys.modules.get("torch")
    version = getattr(torch, "version", None)
    if version is not None:
        cuda = getattr(version, "cuda", None)
        return str(cuda) if cuda else None
    try:
        text = Path(str(importlib.metadata.distribution("torch").locate_file("torch/version.py"))).read_text()
    except Exception:
        return None
    match = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def _torch() -> dict[str, Any] | None:
    torch = sys.modules.get("torch")
    threads = _threads.torch_threads(torch)
    if torch is None or threads is None:
        return None
    return {
        "version": str(getattr(torch, "__version__", "")),
        "intra_op_threads": threads[0],
        "inter_op_threads": threads[1],
    }


def _gpu_section(packages: Mapping[str, str]) -> dict[str, Any]:
    section = _gpu.gpu_environment()
    if "torch" in packages:
        section["cuda_runtime"] = _torch_cuda_runtime()
    return section


def environment() -> dict[str, Any]:
    """This process's environment as a JSON-serialisable dict in a stable key order, its
    ``fingerprint`` first.

    Example::

        env = environment()
        env["packages"]["numpy"], env["cpu"]["usable_cpus"], env["fingerprint"]
    """
    info = _cgroup.read_cgroup()
    packages = _safe(_packages)
    body: dict[str, Any] = {
        "inferscope": _safe(lambda: {"version": _inferscope_version()}),
        "python": _safe(_python),
        "os": _safe(_os),
        "cpu": _safe(lambda: _cpu(info)),
        "cgroup": _safe(lambda: _cgroup_section(info)),
        "packages": packages,
        "threads_env": {name: os.environ[name] for name in THREAD_ENV_VARS if name in os.environ},
        "threadpools": _safe(_threadpools),
    }
    torch = _safe(_torch) if "torch" in sys.modules else None
    if torch:
        body["torch"] = torch
    body["gpu"] = _safe(lambda: _gpu_section(packages))
    return {"fingerprint": fingerprint(body), **body}


#: Modules whose first import can change the environment (a BLAS or OpenMP runtime loaded, torch's
#: thread pools): the import names of ``PACKAGES``. Not threadpoolctl: reading the environment
#: imports it, and it loads nothing.
_ENVIRONMENT_MODULES = (
    "numpy",
    "scipy",
    "torch",
    "onnxruntime",
    "sklearn",
    "xgboost",
    "lightgbm",
    "transformers",
    "tensorflow",
)
#: Bumped by the post-import hooks; the cached environment holds the generation it was read at.
_import_generation = 0
_hooks_installed = False
_cached: tuple[int, dict[str, Any]] | None = None


def _module_imported(_module: Any) -> None:
    global _import_generation
    _import_generation += 1


def _install_environment_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    import wrapt

    for name in _ENVIRONMENT_MODULES:
        # Fires at once for a module already imported: harmless, the first read follows.
        wrapt.register_post_import_hook(_module_imported, name)


def cached_environment(cgroup: _cgroup.CgroupInfo | None = None) -> dict[str, Any]:
    """``environment()``, read again only when it can have changed: reading it walks every
    package's metadata and the loaded libraries (hundreds of milliseconds with torch installed), too
    much for every window.

    It is read on the first call, again after one of the ML libraries is first imported (a
    post-import hook notices), and again when ``cgroup`` (the caller's fresh reading) shows other
    limits than the cached environment. Packages upgraded on disk while the process runs are not
    noticed: the process keeps running the code it loaded. Do not modify the result.
    """
    global _cached
    with suppress(Exception):  # without the hooks, the cache is kept until the cgroup changes
        _install_environment_hooks()
    cached = _cached
    if cached is not None and cached[0] == _import_generation:
        env = cached[1]
        if cgroup is None or _safe(lambda: _cgroup_section(cgroup)) == env.get("cgroup"):
            return env
    generation = _import_generation
    env = environment()
    _cached = (generation, env)
    return env


def _safe(section: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    """A section of the environment, or ``{"error": ...}`` when reading it failed in an unforeseen
    way: the fingerprint is computed at configure time and must never break it."""
    try:
        return section() or {}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _inferscope_version() -> str:
    from .._version import __version__

    return __version__


def fingerprint(env: Mapping[str, Any] | None = None) -> str:
    """A 16-hex-digit hash of the parts of the environment that change the cost of an inference.

    Stable between runs on the same machine with the same dependencies and settings; pids, time,
    load, paths and what happens to be imported are left out.
    """
    if env is None:
        env = environment()
    selected: dict[str, Any] = {}
    for section, keys in _HASHED.items():
        value = env.get(section)
        if value is None:
            continue
        if keys is not None and isinstance(value, Mapping):
            value = {key: value[key] for key in keys if key in value}
        selected[section] = value
    canonical = json.dumps(selected, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def resource_attributes(env: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Flat string resource attributes: ``inferscope.env.fingerprint`` plus the key versions.

    Example::

        Resource.create({**resource_attributes(), "service.name": "fraud"})
    """
    if env is None:
        env = cached_environment()
    attributes = {"inferscope.env.fingerprint": str(env.get("fingerprint") or fingerprint(env))}

    def put(name: str, value: Any) -> None:
        if value is not None and value != "":
            attributes[f"inferscope.env.{name}"] = str(value)

    python = env.get("python", {})
    put("python.version", python.get("version"))
    put("python.implementation", python.get("implementation"))
    put("os.release", env.get("os", {}).get("release"))
    cpu = env.get("cpu", {})
    put("cpu.model", cpu.get("model"))
    put("cpu.usable", cpu.get("usable_cpus"))
    packages = env.get("packages", {})
    for key in _ATTRIBUTE_PACKAGES:
        put(f"{key.replace('-', '_')}.version", packages.get(key))
    libraries = env.get("threadpools", {}).get("libraries", {})
    blas = sorted(
        {
            f"{library.get('internal_api')} {library.get('version') or ''}".strip()
            for library in libraries.values()
            if library.get("user_api") == "blas"
        }
    )
    put("blas", ", ".join(blas))
    gpu = env.get("gpu", {})
    if gpu.get("available"):
        models = sorted({str(device.get("model")) for device in gpu.get("devices", {}).values()})
        put("gpu.model", ", ".join(models))
        put("gpu.count", len(gpu.get("devices", {})))
        put("cuda.driver.version", gpu.get("cuda_driver_version"))
    put("cuda.runtime.version", gpu.get("cuda_runtime"))
    return attributes


@dataclass(frozen=True)
class Change:
    """One difference between two environments, at a dotted path such as ``packages.numpy``."""

    path: str
    kind: Literal["added", "removed", "changed"]
    old: Any = None
    new: Any = None


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{prefix}{key}"
        if isinstance(item, Mapping):
            flat.update(_flatten(item, f"{path}."))
        else:
            flat[path] = item
    return flat


def diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Change]:
    """What changed from environment ``a`` to ``b``: added, removed and changed leaves, in ``a``'s order
    and then ``b``'s new keys. Nested dicts are compared key by key; lists as whole values.

    Example::

        for change in diff(json.load(open("before.json")), environment()):
            print(change.path, change.old, "->", change.new)
    """
    flat_a, flat_b = _flatten(a), _flatten(b)
    changes: list[Change] = []
    for path, old in flat_a.items():
        if path not in flat_b:
            changes.append(Change(path, "removed", old=old))
        elif flat_b[path] != old:
            changes.append(Change(path, "changed", old=old, new=flat_b[path]))
    changes.extend(Change(path, "added", new=new) for path, new in flat_b.items() if path not in flat_a)
    return changes


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _describe(change: Change) -> str:
    if change.kind == "added":
        return _show(change.new)
    if change.kind == "removed":
        return _show(change.old)
    old, new = change.old, change.new
    if _is_list(old) and _is_list(new):
        gained = [item for item in new if item not in old]
        lost = [item for item in old if item not in new]
        if gained or lost:
            parts = []
            if gained:
                parts.append("added " + ", ".join(_show(item) for item in gained))
            if lost:
                parts.append("removed " + ", ".join(_show(item) for item in lost))
            return "; ".join(parts)
    return f"{_show(old)} -> {_show(new)}"


def render_diff(changes: Sequence[Change]) -> str:
    """The changes as aligned text lines, for ``inferscope env --diff``; ``no changes`` when empty."""
    if not changes:
        return "no changes"
    width = max(len(change.path) for change in changes)
    lines = [f"{len(changes)} change(s):"]
    for change in changes:
        lines.append(f"  {change.kind:<8} {change.path:<{width}}  {_describe(change)}")
    return "\n".join(lines)
