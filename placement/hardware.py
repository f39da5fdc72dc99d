"""Hardware figures for known devices, each with its source.

Used by the placement planner (memory) and, later, by the capacity simulator
(compute, bandwidth). Figures are vendor datasheet peaks; a node pool in a
cluster config may override any of them with measured values.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str                   # "gpu" or "cpu"
    memory_gb: float            # per device
    bf16_tflops: float          # dense peak
    memory_bw_gbs: float
    interconnect_gbs: float     # device-to-device within a node (NVLink per GPU; 0 for CPU)
    source: str


KNOWN_DEVICES: dict[str, DeviceProfile] = {
    d.name: d
    for d in [
        DeviceProfile("A100-40GB", "gpu", 40, 312, 1555, 600,
                      "NVIDIA A100 Tensor Core GPU datasheet, SXM4 40GB: 312 TFLOPS BF16 dense, 1,555 GB/s, NVLink 600 GB/s"),
        DeviceProfile("A100-80GB", "gpu", 80, 312, 2039, 600,
                      "NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB: 312 TFLOPS BF16 dense, 2,039 GB/s, NVLink 600 GB/s"),
        DeviceProfile("H100-80GB", "gpu", 80, 989, 3350, 900,
                      "NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989 TFLOPS BF16 dense, 3.35 TB/s, NVLink 900 GB/s"),
        DeviceProfile("H200", "gpu", 141, 989, 4800, 900,
                      "NVIDIA H200 Tensor Core GPU datasheet, SXM: 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS BF16 dense, NVLink 900 GB/s"),
    ]
}
