"""A drafter output head restricted to part of the vocabulary (VocabTrim).

A 0.5B drafter with a 152k vocabulary spends over a quarter of its weights, and
so of each memory-bound decode step, on the output projection. Most of those
rows are tokens it will never propose for this request. `TrimmedHead` keeps the
rows of the `keep_first` lowest token ids (BPE vocabularies such as Qwen's and
Llama's number tokens in merge order, so low ids are the frequent ones) plus
every token of the request's prompt (identifiers a completion copies), and
scatters its logits back into a full-vocabulary row with -inf elsewhere.

Lossless by construction: the drafter's q is whatever distribution it sampled
from (zero outside the kept ids), and verification corrects any q exactly.
Only acceptance can change: a target token outside the kept set is never drafted.
"""
from __future__ import annotations

import torch


def kept_token_ids(vocab_size: int, keep_first: int, prompt_ids: list[int]) -> torch.Tensor:
    """Sorted unique ids: [0, keep_first) plus the prompt's tokens. [n] long."""
    extra = torch.tensor([t for t in set(prompt_ids) if keep_first <= t < vocab_size], dtype=torch.long)
    return torch.cat([torch.arange(min(keep_first, vocab_size)), extra.sort().values])


class TrimmedHead(torch.nn.Module):
    """The rows `ids` of an lm_head (dense or int8 from workers/quantize.py), as a Linear-like module."""

    def __init__(self, lm_head: torch.nn.Linear, ids: torch.Tensor):
        super().__init__()
        dev = lm_head.weight.device
        self.ids = ids.to(dev)                                               # [n]
        self.vocab_size = lm_head.out_features
        self.bias = lm_head.bias[self.ids] if lm_head.bias is not None else None
        w8 = getattr(lm_head, "weight_int8", None)
        if w8 is not None:
            self.weight_int8 = w8[self.ids].contiguous()                     # [n, hidden] int8
            self.weight_scales = lm_head.weight_scales[self.ids].contiguous()
            self.weight = lm_head.weight                                     # empty placeholder, keeps dtype
        else:
            self.weight = lm_head.weight[self.ids].contiguous()              # [n, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., n] trimmed logits -> [..., vocab] with -inf at dropped ids."""
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.ids, logits)
