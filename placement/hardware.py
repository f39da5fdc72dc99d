"""Hardware figures for known devices, each with its source.

Used by the placement planner (memory) and by the capacity simulator
(placement/roofline.py: compute, bandwidth, interconnect). Figures are vendor datasheet peaks; a node pool in a
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
        # CPU nodes: one socket. Bandwidth = channels x transfer rate x 8 bytes; the compute peak is
        # derived from the vendor's per-core per-cycle figure (no vendor quotes a socket TFLOPS number).
        DeviceProfile("CPU-Xeon-8480+", "cpu", 512, 229, 307, 0,
                      "Intel Xeon Platinum 8480+ (ark.intel.com): 56 cores, 2.0 GHz base, 8 channels DDR5-4800 "
                      "= 8 x 38.4 = 307 GB/s; AMX: 1024 BF16 FMA/cycle/core (Intel AMX overview) "
                      "-> 56 x 2.0 GHz x 2048 = 229 TFLOPS BF16"),
        DeviceProfile("CPU-EPYC-9654", "cpu", 768, 29, 461, 0,
                      "AMD EPYC 9654 (amd.com product page): 96 cores, 2.4 GHz base, 12 channels DDR5-4800 "
                      "= 460.8 GB/s; Zen 4 AVX-512 BF16 (VDPBF16PS, 2 x 256-bit pipes: 64 BF16 FLOP/cycle/core) "
                      "-> 96 x 2.4 GHz x 64 = 29 TFLOPS BF16 (derived)"),
        DeviceProfile("CPU-EPYC-7742", "cpu", 512, 4.6, 205, 0,
                      "AMD EPYC 7742, the DGX A100 host CPU (NVIDIA DGX A100 datasheet: 2x 7742): 64 cores, "
                      "2.25 GHz base, 8 channels DDR4-3200 = 204.8 GB/s per socket; Zen 2 has no BF16 "
                      "instructions: FP32 AVX2 2 x 256-bit FMA = 32 FLOP/cycle/core -> 64 x 2.25 GHz x 32 "
                      "= 4.6 TFLOPS FP32 (the figure used for BF16 too, computed in FP32; derived)"),
    ]
}
