"""Process, host and container signals, the GPU, the environment fingerprint and the oversubscription check.

Everything here runs off the hot path: the signals are OTel observable instruments sampled when the
SDK collects, and the fingerprint is computed once at configure time.
"""

from .cgroup import CgroupInfo, CpuThrottling, read_cgroup

# ``fingerprint()`` stays in its module: re-exported here it would shadow the submodule of the same name.
from .fingerprint import Change, diff, environment, render_diff, resource_attributes
from .gpu import nvml_status
from .host import callback_errors, read_psi, read_steal, register_system_metrics
from .threads import OversubscriptionReport, ThreadPool, check_oversubscription, install_import_hook

__all__ = [
    "CgroupInfo",
    "Change",
    "CpuThrottling",
    "OversubscriptionReport",
    "ThreadPool",
    "callback_errors",
    "check_oversubscription",
    "diff",
    "environment",
    "install_import_hook",
    "nvml_status",
    "read_cgroup",
    "read_psi",
    "read_steal",
    "register_system_metrics",
    "render_diff",
    "resource_attributes",
]
