"""NVIDIA GPUs through NVML: device-level metrics under the semconv ``hw.*`` names, and GPU facts for
the environment fingerprint.

``pynvml`` (the ``nvidia-ml-py`` distribution, extra ``inferscope-sdk[gpu]``) is optional. Without it, or
without a driver, or without devices, nothing here registers and ``nvml_status()`` says why.

Every reading is taken in an OTel observable callback, i.e. when the SDK collects, off the hot path.
Each (metric, device) pair is probed once at registration: a GPU that answers NVMLError_NotSupported
for power, say, simply has no power series.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Instrument, Meter, Observation

from ..export import spec as _spec

__all__ = [
    "GPU_METRICS",
    "THROTTLE_REASONS",
    "GpuMetric",
    "NvmlSampler",
    "gpu_environment",
    "gpu_signals",
    "import_nvml",
    "nvml_status",
    "register_gpu_metrics",
]

# NVML's return codes and enums are part of its stable C ABI; spelled out here so that the mapping
# does not depend on which pynvml version defines which constant.
_NVML_ERROR_NO_PERMISSION = 4
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_TEMPERATURE_GPU = 0
_NVML_CLOCK_SM = 1

#: Clock event ("throttle") reason bits of nvmlDeviceGetCurrentClocksEventReasons, and the attribute
#: value each one is reported as.
THROTTLE_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)

THROTTLE_REASON_ATTRIBUTE = "inferscope.hw.gpu.throttle.reason"

Observe = Callable[[], Sequence[Observation]]
ObservableCallback = Callable[[CallbackOptions], Iterable[Observation]]


class Guard(Protocol):
    """What ``host.CallbackGuard`` offers: wrap a callback so it never raises, and count a failure."""

    def wrap(self, name: str, observe: Observe) -> ObservableCallback: ...

    def guarded(self, name: str, observe: Observe) -> Observe: ...

    def record_error(self, name: str, error: BaseException) -> None: ...


def import_nvml() -> ModuleType | None:
    """The ``pynvml`` module, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    module: ModuleType = pynvml
    return module


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _describe_init_error(error: BaseException) -> str:
    name = type(error).__name__
    code = getattr(error, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND or name == "NVMLError_LibraryNotFound":
        return "no NVIDIA driver (NVMLError_LibraryNotFound)"
    if code == _NVML_ERROR_DRIVER_NOT_LOADED or name == "NVMLError_DriverNotLoaded":
        return "the NVIDIA driver is not loaded (NVMLError_DriverNotLoaded)"
    if code == _NVML_ERROR_NO_PERMISSION or name == "NVMLError_NoPermission":
        return "no permission to use NVML (NVMLError_NoPermission)"
    return f"NVML failed to initialise ({name}: {error})"


_NOT_INSTALLED = "pynvml is not installed (pip install nvidia-ml-py, or inferscope-sdk[gpu])"


def nvml_status(nvml: ModuleType | None = None) -> tuple[bool, str]:
    """Whether NVML works here, and why not: "pynvml is not installed ...", "no NVIDIA driver
    (NVMLError_LibraryNotFound)", "no GPU devices", or, when it works, how many GPUs and the driver.

    ``nvml`` replaces the ``pynvml`` module (tests pass a fake one).

    Example::

        ok, reason = nvml_status()  # (False, 'no NVIDIA driver (NVMLError_LibraryNotFound)')
    """
    module = nvml if nvml is not None else import_nvml()
    if module is None:
        return False, _NOT_INSTALLED
    try:
        module.nvmlInit()
    except Exception as error:
        return False, _describe_init_error(error)
    try:
        count = int(module.nvmlDeviceGetCount())
        if count == 0:
            return False, "no GPU devices"
        driver = _text(module.nvmlSystemGetDriverVersion())
        return True, f"{count} GPU(s), NVIDIA driver {driver}"
    except Exception as error:
        return False, f"NVML failed to list devices ({type(error).__name__}: {error})"
    finally:
        with contextlib.suppress(Exception):
            module.nvmlShutdown()


def _cuda_version(code: int) -> str:
    """NVML's CUDA version integer (12040) as text (12.4)."""
    return f"{code // 1000}.{code % 1000 // 10}"


def _cuda_driver_version(nvml: ModuleType) -> str | None:
    for name in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        get = getattr(nvml, name, None)
        if callable(get):
            try:
                return _cuda_version(int(get()))
            except Exception:
                continue
    return None


def gpu_environment(nvml: ModuleType | None = None) -> dict[str, Any]:
    """The GPU facts for the environment fingerprint: driver, CUDA driver version and each device's
    model and memory, or ``{"available": False, "reason": ...}``."""
    module = nvml if nvml is not None else import_nvml()
    if module is None:
        return {"available": False, "reason": _NOT_INSTALLED}
    try:
        module.nvmlInit()
    except Exception as error:
        return {"available": False, "reason": _describe_init_error(error)}
    try:
        count = int(module.nvmlDeviceGetCount())
        if count == 0:
            return {"available": False, "reason": "no GPU devices"}
        devices: dict[str, dict[str, Any]] = {}
        for index in range(count):
            handle = module.nvmlDeviceGetHandleByIndex(index)
            device: dict[str, Any] = {"model": _text(module.nvmlDeviceGetName(handle))}
            with contextlib.suppress(Exception):
                device["memory_total_bytes"] = int(module.nvmlDeviceGetMemoryInfo(handle).total)
            devices[f"gpu{index}"] = device
        return {
            "available": True,
            "driver_version": _text(module.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": _cuda_driver_version(module),
            "devices": devices,
        }
    except Exception as error:
        return {
            "available": False,
            "reason": f"NVML failed to list devices ({type(error).__name__}: {error})",
        }
    finally:
        with contextlib.suppress(Exception):
            module.nvmlShutdown()


@dataclass
class GpuDevice:
    index: int
    handle: Any
    attributes: dict[str, str]


# A reading returns (value, extra attributes) pairs for one device.
Reading = Callable[[ModuleType, GpuDevice], list[tuple[float, dict[str, str]]]]


def _utilization(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    rates = nvml.nvmlDeviceGetUtilizationRates(device.handle)
    return [(rates.gpu / 100.0, {"hw.gpu.task": "general"})]


def _memory_used(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    return [(int(nvml.nvmlDeviceGetMemoryInfo(device.handle).used), {})]


def _memory_total(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    return [(int(nvml.nvmlDeviceGetMemoryInfo(device.handle).total), {})]


def _memory_fraction(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    memory = nvml.nvmlDeviceGetMemoryInfo(device.handle)
    return [(memory.used / memory.total, {})] if memory.total else []


def _power(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    return [(nvml.nvmlDeviceGetPowerUsage(device.handle) / 1000.0, {})]  # mW


def _energy(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    return [(nvml.nvmlDeviceGetTotalEnergyConsumption(device.handle) / 1000.0, {})]  # mJ


def _temperature(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    # hw.temperature describes a sensor: its own hw.id and hw.type, with the GPU as hw.parent.
    gpu_id = device.attributes["hw.id"]
    sensor = {
        "hw.id": f"{gpu_id}_temperature",
        "hw.type": "temperature",
        "hw.parent": gpu_id,
        "hw.sensor_location": "gpu",
    }
    return [(float(nvml.nvmlDeviceGetTemperature(device.handle, _NVML_TEMPERATURE_GPU)), sensor)]


def _sm_clock(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    return [(float(nvml.nvmlDeviceGetClockInfo(device.handle, _NVML_CLOCK_SM)), {})]


def _throttle(nvml: ModuleType, device: GpuDevice) -> list[tuple[float, dict[str, str]]]:
    # The newer name first; the older one is deprecated but the only one before driver 535.
    get = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if get is None:
        get = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = int(get(device.handle))
    return [(1 if mask & bit else 0, {THROTTLE_REASON_ATTRIBUTE: reason}) for bit, reason in THROTTLE_REASONS]


@dataclass(frozen=True)
class GpuMetric:
    """How one metric of the specification (``export/spec.py``) is read from NVML."""

    name: str
    read: Reading

    @property
    def spec(self) -> _spec.MetricSpec:
        return _spec.get(self.name)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def unit(self) -> str:
        return self.spec.unit

    @property
    def description(self) -> str:
        return self.spec.description


GPU_METRICS: tuple[GpuMetric, ...] = (
    GpuMetric("hw.gpu.utilization", _utilization),
    GpuMetric("hw.gpu.memory.usage", _memory_used),
    GpuMetric("hw.gpu.memory.limit", _memory_total),
    GpuMetric("hw.gpu.memory.utilization", _memory_fraction),
    GpuMetric("hw.power", _power),
    GpuMetric("hw.energy", _energy),
    GpuMetric("hw.temperature", _temperature),
    GpuMetric("inferscope.hw.gpu.clock.sm", _sm_clock),
    GpuMetric("inferscope.hw.gpu.clock.throttle", _throttle),
)


class NvmlSampler:
    """Holds NVML open and the device handles; re-opens after fork (handles do not survive it)."""

    def __init__(self, nvml: ModuleType) -> None:
        self.nvml = nvml
        self._open()

    def _open(self) -> None:
        self.nvml.nvmlInit()
        self._pid = os.getpid()
        try:
            driver: str | None = _text(self.nvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        devices = []
        for index in range(int(self.nvml.nvmlDeviceGetCount())):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(self.nvml.nvmlDeviceGetName(handle))
            try:
                uuid = _text(self.nvml.nvmlDeviceGetUUID(handle))
            except Exception:
                uuid = f"gpu{index}"
            attributes = {
                "hw.id": uuid,
                "hw.name": f"gpu{index}",
                "hw.type": "gpu",
                "hw.model": name,
                "hw.vendor": "NVIDIA",
            }
            if driver:
                attributes["hw.driver_version"] = driver
            devices.append(GpuDevice(index, handle, attributes))
        self.devices: list[GpuDevice] = devices

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()
        self.devices = []

    def current_devices(self) -> list[GpuDevice]:
        if os.getpid() != self._pid:
            self._open()
        return self.devices

    def supported(self, metric: GpuMetric) -> list[int]:
        """Indexes of the devices that answer ``metric`` now (probed once, at registration)."""
        found = []
        for device in self.devices:
            try:
                metric.read(self.nvml, device)
            except Exception:
                continue
            found.append(device.index)
        return found

    def observe(self, metric: GpuMetric, indexes: Sequence[int], guard: Guard) -> list[Observation]:
        points: list[Observation] = []
        for device in self.current_devices():
            if device.index not in indexes:
                continue
            try:
                readings = metric.read(self.nvml, device)
            except Exception as error:  # one failing device must not hide the others
                guard.record_error(f"{metric.name} (gpu{device.index})", error)
                continue
            points.extend(Observation(value, {**device.attributes, **extra}) for value, extra in readings)
        return points


def gpu_signals(guard: Guard, *, nvml: ModuleType | None = None) -> list[_spec.Signal]:
    """The GPU metrics that at least one device supports, as specification entries with a safe
    observe function; none without NVML, a driver or a device."""
    module = nvml if nvml is not None else import_nvml()
    if module is None:
        return []
    try:
        sampler = NvmlSampler(module)
    except Exception:
        return []  # nvml_status() explains why
    signals: list[_spec.Signal] = []
    for metric in GPU_METRICS if sampler.devices else ():
        indexes = sampler.supported(metric)
        if not indexes:
            continue

        def observe(metric: GpuMetric = metric, indexes: list[int] = indexes) -> list[Observation]:
            return sampler.observe(metric, indexes, guard)

        signals.append(_spec.Signal(metric.spec, guard.guarded(metric.name, observe)))
    if not signals:
        sampler.close()
    return signals


def register_gpu_metrics(meter: Meter, guard: Guard, *, nvml: ModuleType | None = None) -> list[Instrument]:
    """Register the ``hw.*`` GPU instruments that at least one device supports; none without NVML."""
    return [
        _spec.create_observable(meter, signal.spec, [_callback(signal.observe)])
        for signal in gpu_signals(guard, nvml=nvml)
    ]


def _callback(observe: Observe) -> ObservableCallback:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return observe()

    return callback
