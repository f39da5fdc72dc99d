"""Weight-only int8 for drafters (per output channel, symmetric).

A drafter's precision changes only how often its tokens are accepted, never the
output: verification against the target keeps decoding lossless. On a
memory-bound CPU decode step, int8 weights halve the bytes streamed per token.
The runner calls `torch._weight_int8pack_mm` for layers carrying `weight_int8`.
"""
from __future__ import annotations

import torch

from workers.hugepages import _libc, hugepage_copy


@torch.no_grad()
def quantize_linear_int8(layer: torch.nn.Linear) -> None:
    w = layer.weight.float()                                            # [out, in]
    scales = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0                # [out]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    libc = _libc()
    layer.register_buffer("weight_int8", hugepage_copy(q, libc) if libc else q, persistent=False)
    layer.register_buffer("weight_scales", scales.to(layer.weight.dtype), persistent=False)
    # Keep a handle to the original dtype; drop the dense weight to free its memory.
    layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)


def quantize_model_int8(model: torch.nn.Module, include_lm_head: bool = True) -> int:
    """Quantize every Linear of a decoder (bf16/fp16 CPU only). Returns the number of layers."""
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (include_lm_head or not name.endswith("lm_head")):
            if module.weight.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"int8 drafting needs a bf16/fp16 model, {name} is {module.weight.dtype}")
            quantize_linear_int8(module)
            n += 1
    return n
