"""Per-step time of a model (or a shard group) on a device: a roofline plus communication.

A decoding forward streams every weight once per batched step and each request's KV cache
once, and does 2 FLOPs per parameter per new token plus attention. Its time is the slower
of memory and compute, plus tensor-parallel all-reduces and pipeline-stage hops, plus a
fixed per-step overhead (kernel launches, Python):

    t = max(bytes / (bw * mem_eff), flops / (peak * flops_eff)) + comm + overhead

mem_eff / flops_eff are the fraction of the datasheet peak a decoding step reaches. The
defaults are assumptions (typical of published GPU decode kernels), not fitted to anything
here; a measured profile (`launch.py profile`) replaces the whole formula for this machine
(placement/simulate.py: MeasuredStep).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from placement.hardware import DeviceProfile

# hidden size, KV width per layer (kv_heads x head_dim), vocabulary, from each model's config.json.
KNOWN_ARCHS = {
    "qwen2.5-coder-0.5b": (896, 2 * 64, 151936),
    "qwen2.5-coder-1.5b": (1536, 2 * 128, 151936),
    "smollm2-135m": (576, 3 * 64, 49152),
    "qwen2.5-coder-32b": (5120, 8 * 128, 152064),
}


@dataclass(frozen=True)
class ModelShape:
    params: int
    layers: int
    hidden: int
    kv_width: int               # kv_heads * head_dim per layer
    vocab: int
    bytes_per_param: float
    kv_bytes_per_elem: float = 2.0

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_width * self.kv_bytes_per_elem     # K and V

    @staticmethod
    def estimate(params: int, layers: int, bytes_per_param: float) -> "ModelShape":
        """Unknown architecture: params ~ 12 * layers * hidden^2; grouped-query KV of hidden / 8."""
        hidden = int(math.sqrt(params / (12 * layers)))
        return ModelShape(params, layers, hidden, hidden // 8, 152064, bytes_per_param)


def model_shape(spec) -> ModelShape:
    """Shape of a config's ModelSpec (size from placement.plan.footprint, widths from KNOWN_ARCHS or config.json)."""
    from placement.plan import footprint

    fp = footprint(spec)
    key = Path(spec.source).name.lower().removesuffix("-instruct")
    if key in KNOWN_ARCHS:
        hidden, kv, vocab = KNOWN_ARCHS[key]
        return ModelShape(fp.params, fp.layers, hidden, kv, vocab, fp.bytes_per_param)
    cfg = Path(spec.source) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        heads = c["num_attention_heads"]
        kv = c.get("num_key_value_heads", heads) * c.get("head_dim", c["hidden_size"] // heads)
        return ModelShape(fp.params, fp.layers, c["hidden_size"], kv, c["vocab_size"], fp.bytes_per_param)
    return ModelShape.estimate(fp.params, fp.layers, fp.bytes_per_param)


@dataclass(frozen=True)
class Hardware:
    """What the roofline needs of a device; from_profile keeps the datasheet figure's source."""
    name: str
    peak_flops: float           # FLOP/s in the compute dtype
    mem_bw: float               # bytes/s
    link_bw: float              # bytes/s between the devices of a tensor-parallel group / pipeline stages
    link_latency_s: float = 10e-6     # per collective or hop (NVLink-class; assumption)
    mem_eff: float = 0.8
    flops_eff: float = 0.6
    step_overhead_s: float = 0.0
    source: str = ""

    @staticmethod
    def from_profile(d: DeviceProfile, share: float = 1.0, **kw) -> "Hardware":
        """share < 1: a slice of a CPU socket (an actor pinned to some of its cores)."""
        link = d.interconnect_gbs * 1e9 if d.interconnect_gbs else d.memory_bw_gbs * 1e9 * share
        return Hardware(d.name, d.bf16_tflops * 1e12 * share, d.memory_bw_gbs * 1e9 * share, link,
                        source=d.source, **kw)


@dataclass(frozen=True)
class Row:
    """One request in a batched forward: `new` tokens appended to `context` cached ones."""
    new: int
    context: int


def step_time(shape: ModelShape, hw: Hardware, rows: list[Row], tp: int = 1, pp: int = 1) -> float:
    """Seconds for one forward of `rows` (their tokens packed, as forward_many does) on tp x pp devices."""
    if not rows:
        return 0.0
    tokens = sum(r.new for r in rows)                            # ragged: no padding is computed
    weight_bytes = shape.weight_bytes / (tp * pp)               # per device, streamed once per step
    kv_bytes = sum(r.context + r.new for r in rows) * shape.kv_bytes_per_token / (tp * pp)
    flops = (2 * shape.params * tokens
             + sum(4 * shape.layers * shape.hidden * (r.context + r.new) * r.new for r in rows)) / (tp * pp)
    per_stage = max((weight_bytes + kv_bytes) / (hw.mem_bw * hw.mem_eff), flops / (hw.peak_flops * hw.flops_eff))
    return per_stage * pp + comm_time(shape, hw, tokens, tp, pp) + hw.step_overhead_s


def comm_time(shape: ModelShape, hw: Hardware, tokens: int, tp: int, pp: int) -> float:
    """Two ring all-reduces of the activations per layer under TP; one activation hop per stage boundary."""
    act_bytes = tokens * shape.hidden * 2                        # bf16 activations
    t = 0.0
    if tp > 1:
        ring = 2 * (tp - 1) / tp * act_bytes / hw.link_bw + hw.link_latency_s
        t += 2 * shape.layers * ring
    if pp > 1:
        t += (pp - 1) * (act_bytes / hw.link_bw + hw.link_latency_s)
    return t


def transfer_time(num_bytes: float, link_bw: float, latency_s: float) -> float:
    """Draft-to-verifier (or stage-to-stage) transfer: latency plus size over bandwidth."""
    return latency_s + num_bytes / link_bw


def draft_message_bytes(k: int, vocab: int, with_probs: bool) -> float:
    """k token ids (int64), plus k x vocab float32 draft probabilities when sampling (temperature > 0)."""
    return 8 * k + (4 * k * vocab if with_probs else 0)
