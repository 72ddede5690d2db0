"""The NVML layer. No GPU exists on these machines, so the metric mapping is tested with a fake
``pynvml`` module (the outermost boundary), and the failure modes with the real one where installed."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from inferscope.system.gpu import gpu_environment, nvml_status, register_gpu_metrics
from inferscope.system.host import CallbackGuard

from .conftest import run_python


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {12: "NVML Shared Library Not Found", 3: "Not Supported", 9: "Driver Not Loaded"}.get(
            self.value, "Unknown Error"
        )


class NVMLError_LibraryNotFound(FakeNVMLError):  # pynvml's spelling
    def __init__(self) -> None:
        super().__init__(12)


class NVMLError_NotSupported(FakeNVMLError):
    def __init__(self) -> None:
        super().__init__(3)


@dataclass
class Memory:
    total: int
    used: int
    free: int


@dataclass
class Utilization:
    gpu: int
    memory: int


def fake_pynvml(devices=None, *, init_error: Exception | None = None, power_supported=(True, True)):
    """A stand-in for the pynvml module with two GPUs: an H200 that is busy and power-capped, and an
    older card that does not report power."""
    devices = (
        devices
        if devices is not None
        else [
            {
                "name": "NVIDIA H200",
                "uuid": "GPU-8a1c2b3d-0000-1111-2222-333344445555",
                "memory": Memory(total=150_000_000_000, used=30_000_000_000, free=120_000_000_000),
                "util": Utilization(gpu=87, memory=40),
                "power_mw": 412_500,
                "energy_mj": 9_876_543_210,
                "temperature": 61,
                "sm_mhz": 1755,
                "reasons": 0x4 | 0x20,  # sw_power_cap + sw_thermal_slowdown
            },
            {
                "name": b"Tesla T4",  # old pynvml versions return bytes
                "uuid": b"GPU-t4-uuid",
                "memory": Memory(total=16_000_000_000, used=0, free=16_000_000_000),
                "util": Utilization(gpu=0, memory=0),
                "power_mw": None,
                "energy_mj": None,
                "temperature": 35,
                "sm_mhz": 300,
                "reasons": 0x1,  # idle
            },
        ]
    )
    module = types.ModuleType("pynvml")
    module.calls = {"init": 0, "shutdown": 0}  # type: ignore[attr-defined]

    def init():
        module.calls["init"] += 1  # type: ignore[attr-defined]
        if init_error is not None:
            raise init_error

    def shutdown():
        module.calls["shutdown"] += 1  # type: ignore[attr-defined]

    def device(handle):
        return devices[handle]

    def power(handle):
        if device(handle)["power_mw"] is None:
            raise NVMLError_NotSupported()
        return device(handle)["power_mw"]

    def energy(handle):
        if device(handle)["energy_mj"] is None:
            raise NVMLError_NotSupported()
        return device(handle)["energy_mj"]

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: device(h)["name"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda h: device(h)["uuid"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: device(h)["memory"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda h: device(h)["util"]  # type: ignore[attr-defined]
    module.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    module.nvmlDeviceGetTotalEnergyConsumption = energy  # type: ignore[attr-defined]
    module.nvmlDeviceGetTemperature = lambda h, sensor: device(h)["temperature"] if sensor == 0 else -1  # type: ignore[attr-defined]
    module.nvmlDeviceGetClockInfo = lambda h, clock: device(h)["sm_mhz"] if clock == 1 else -1  # type: ignore[attr-defined]
    module.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: device(h)["reasons"]  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    module.nvmlSystemGetCudaDriverVersion = lambda: 12040  # type: ignore[attr-defined]
    return module


def collect(nvml):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    guard = CallbackGuard()
    instruments = register_gpu_metrics(provider.get_meter("t"), guard, nvml=nvml)
    metrics = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                metrics[metric.name] = metric
    provider.shutdown()
    return instruments, metrics, guard


def points(metric, **match):
    return [
        (dict(point.attributes), point.value)
        for point in metric.data.data_points
        if all(point.attributes.get(key) == value for key, value in match.items())
    ]


# --- failure modes ----------------------------------------------------------------------------------------


def test_status_library_not_found_with_the_real_pynvml():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:  # pragma: no cover - a machine with a driver
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here")
    assert nvml_status() == (False, "no NVIDIA driver (NVMLError_LibraryNotFound)")
    assert gpu_environment() == {"available": False, "reason": "no NVIDIA driver (NVMLError_LibraryNotFound)"}
    assert register_gpu_metrics(MeterProvider().get_meter("t"), CallbackGuard()) == []


def test_status_when_pynvml_is_not_installed():
    result = run_python(
        """
        import sys
        sys.modules["pynvml"] = None  # what an interpreter without nvidia-ml-py sees: ImportError
        from opentelemetry.sdk.metrics import MeterProvider
        from inferscope.system.gpu import nvml_status, register_gpu_metrics
        from inferscope.system.host import CallbackGuard, register_system_metrics
        print(nvml_status())
        print(register_gpu_metrics(MeterProvider().get_meter("t"), CallbackGuard()))
        names = [i.name for i in register_system_metrics(MeterProvider().get_meter("t"))]
        print(any(name.startswith("hw.") for name in names), "process.cpu.time" in names)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "(False, 'pynvml is not installed (pip install nvidia-ml-py, or inferscope-sdk[gpu])')"
    assert lines[1] == "[]"
    assert lines[2] == "False True"


def test_status_library_not_found_with_a_fake_module():
    nvml = fake_pynvml(init_error=NVMLError_LibraryNotFound())
    assert nvml_status(nvml) == (False, "no NVIDIA driver (NVMLError_LibraryNotFound)")
    assert nvml.calls["shutdown"] == 0  # nothing was opened


def test_status_driver_not_loaded_and_unknown_errors():
    assert nvml_status(fake_pynvml(init_error=FakeNVMLError(9))) == (
        False,
        "the NVIDIA driver is not loaded (NVMLError_DriverNotLoaded)",
    )
    assert nvml_status(fake_pynvml(init_error=FakeNVMLError(999))) == (
        False,
        "NVML failed to initialise (FakeNVMLError: Unknown Error)",
    )


def test_status_no_devices():
    nvml = fake_pynvml(devices=[])
    assert nvml_status(nvml) == (False, "no GPU devices")
    assert nvml.calls == {"init": 1, "shutdown": 1}
    assert gpu_environment(nvml) == {"available": False, "reason": "no GPU devices"}
    nvml = fake_pynvml(devices=[])
    instruments, metrics, _ = collect(nvml)
    assert instruments == [] and metrics == {}
    assert nvml.calls == {"init": 1, "shutdown": 1}  # not held open for nothing


def test_status_ok():
    nvml = fake_pynvml()
    assert nvml_status(nvml) == (True, "2 GPU(s), NVIDIA driver 550.54.15")
    assert nvml.calls == {"init": 1, "shutdown": 1}


# --- the mapping ------------------------------------------------------------------------------------------


def test_gpu_metrics_mapping():
    instruments, metrics, guard = collect(fake_pynvml())
    assert {instrument.name for instrument in instruments} == set(metrics)
    units = {name: metric.unit for name, metric in metrics.items()}
    assert units == {
        "hw.gpu.utilization": "1",
        "hw.gpu.memory.usage": "By",
        "hw.gpu.memory.limit": "By",
        "hw.gpu.memory.utilization": "1",
        "hw.power": "W",
        "hw.energy": "J",
        "hw.temperature": "Cel",
        "inferscope.hw.gpu.clock.sm": "MHz",
        "inferscope.hw.gpu.clock.throttle": "1",
    }
    h200 = {
        "hw.id": "GPU-8a1c2b3d-0000-1111-2222-333344445555",
        "hw.name": "gpu0",
        "hw.type": "gpu",
        "hw.model": "NVIDIA H200",
        "hw.vendor": "NVIDIA",
        "hw.driver_version": "550.54.15",
    }
    assert points(metrics["hw.gpu.utilization"], **{"hw.name": "gpu0"}) == [
        ({**h200, "hw.gpu.task": "general"}, 0.87)
    ]
    assert points(metrics["hw.gpu.memory.usage"], **{"hw.name": "gpu0"}) == [(h200, 30_000_000_000)]
    assert points(metrics["hw.gpu.memory.limit"], **{"hw.name": "gpu0"}) == [(h200, 150_000_000_000)]
    assert points(metrics["hw.gpu.memory.utilization"], **{"hw.name": "gpu0"}) == [(h200, 0.2)]
    assert points(metrics["hw.power"]) == [(h200, 412.5)]  # the T4 does not report power: no series
    assert points(metrics["hw.energy"]) == [(h200, pytest.approx(9_876_543.21))]
    assert points(metrics["inferscope.hw.gpu.clock.sm"], **{"hw.name": "gpu1"})[0][1] == 300
    (temperature,) = points(metrics["hw.temperature"], **{"hw.parent": h200["hw.id"]})
    assert temperature[1] == 61
    assert temperature[0]["hw.type"] == "temperature"
    assert temperature[0]["hw.id"] == h200["hw.id"] + "_temperature"

    t4 = points(metrics["hw.gpu.memory.limit"], **{"hw.name": "gpu1"})
    assert t4[0][0]["hw.model"] == "Tesla T4" and t4[0][0]["hw.id"] == "GPU-t4-uuid"

    reasons = {
        attributes["inferscope.hw.gpu.throttle.reason"]: value
        for attributes, value in points(metrics["inferscope.hw.gpu.clock.throttle"], **{"hw.name": "gpu0"})
    }
    assert len(reasons) == 9
    assert {reason for reason, active in reasons.items() if active} == {"sw_power_cap", "sw_thermal_slowdown"}
    idle = points(metrics["inferscope.hw.gpu.clock.throttle"], **{"hw.name": "gpu1"})
    assert {a["inferscope.hw.gpu.throttle.reason"] for a, v in idle if v} == {"gpu_idle"}
    assert guard.total() == 0


def test_a_device_that_starts_failing_is_counted_and_the_others_still_report():
    nvml = fake_pynvml()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    guard = CallbackGuard()
    register_gpu_metrics(provider.get_meter("t"), guard, nvml=nvml)
    healthy = nvml.nvmlDeviceGetUtilizationRates

    def flaky(handle):
        if handle == 1:
            raise FakeNVMLError(15)  # GPU is lost
        return healthy(handle)

    nvml.nvmlDeviceGetUtilizationRates = flaky  # type: ignore[attr-defined]
    data = reader.get_metrics_data()
    (utilization,) = [
        m
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "hw.gpu.utilization"
    ]
    assert [p.attributes["hw.name"] for p in utilization.data.data_points] == ["gpu0"]
    assert guard.errors == {"hw.gpu.utilization (gpu1)": 1}
    provider.shutdown()


def test_gpu_environment_with_devices():
    assert gpu_environment(fake_pynvml()) == {
        "available": True,
        "driver_version": "550.54.15",
        "cuda_driver_version": "12.4",
        "devices": {
            "gpu0": {"model": "NVIDIA H200", "memory_total_bytes": 150_000_000_000},
            "gpu1": {"model": "Tesla T4", "memory_total_bytes": 16_000_000_000},
        },
    }
