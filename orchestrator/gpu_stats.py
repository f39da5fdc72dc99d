"""Accelerator utilisation and memory through nvidia-ml-py (the `pynvml` module), when there is a GPU.

Without one (no driver, no library, no device) `GpuMonitor.read()` returns None and the monitor says
so once in the log; callers carry on. DuoDecoding records a reading per request, next to the drafter's
and target's busy time, so the bench shows how busy the accelerator really was.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class GpuReading:
    index: int
    utilization_pct: int        # share of the last sample period a kernel was running
    memory_used_gb: float
    memory_total_gb: float

    def __str__(self) -> str:
        return (f"gpu{self.index}: {self.utilization_pct}% busy, "
                f"{self.memory_used_gb:.1f}/{self.memory_total_gb:.1f} GB")


class GpuMonitor:
    def __init__(self, nvml=None):
        """nvml: the pynvml module (tests pass a stand-in); imported lazily otherwise."""
        self._nvml = nvml
        self._handles: list | None = None
        self._unavailable = False

    def _init(self) -> list | None:
        if self._handles is not None or self._unavailable:
            return self._handles
        try:
            nvml = self._nvml
            if nvml is None:
                import pynvml as nvml
                self._nvml = nvml
            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            if not self._handles:
                raise RuntimeError("no devices")
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_* (no driver/library), no devices
            self._unavailable, self._handles = True, None
            log.info("no GPU utilisation/memory readings (nvidia-ml-py: %s: %s); carrying on without them",
                     type(exc).__name__, exc)
        return self._handles

    @property
    def available(self) -> bool:
        return self._init() is not None

    def read(self) -> list[GpuReading] | None:
        handles = self._init()
        if handles is None:
            return None
        nvml = self._nvml
        out = []
        try:
            for i, h in enumerate(handles):
                util = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                out.append(GpuReading(i, int(util.gpu), mem.used / 1e9, mem.total / 1e9))
        except Exception as exc:  # noqa: BLE001 - a device lost mid-run: stop reading, keep decoding
            self._unavailable, self._handles = True, None
            log.info("GPU readings stopped (%s: %s)", type(exc).__name__, exc)
            return None
        return out
