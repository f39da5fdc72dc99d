"""A drafter output head restricted to part of the vocabulary (VocabTrim).

A 0.5B drafter with a 152k vocabulary spends over a quarter of its weights, and
so of each memory-bound decode step, on the output projection. Most of those
rows are tokens it will never propose for this request. `TrimmedHead` keeps the
rows of `keep` token ids plus every token of the request's prompt (identifiers a
completion copies), and scatters its logits back into a full-vocabulary row with
-inf elsewhere. Which `keep` ids: the lowest ones (BPE vocabularies such as
Qwen's and Llama's number tokens in merge order, so low ids are roughly the
frequent ones), or, as VocabTrim publishes it, the most frequent ones in text the
target generated (a `FrequencyTable` from `launch.py build-vocab-table`).

Lossless by construction: the drafter's q is whatever distribution it sampled
from (zero outside the kept ids), and verification corrects any q exactly.
Only acceptance can change: a target token outside the kept set is never drafted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FrequencyTable:
    """Token counts of target-generated text, most frequent first (equal counts: lower id first)."""
    ids: torch.Tensor          # [n] long, distinct, only tokens seen (count > 0)
    counts: torch.Tensor       # [n] long, non-increasing, > 0
    meta: dict

    def __len__(self) -> int:
        return self.ids.numel()


def count_tokens(sequences: list[list[int]], meta: dict | None = None) -> FrequencyTable:
    """The frequency table of some token sequences (e.g. the target's greedy outputs, prompts excluded)."""
    flat = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)            # [total]
    ids, counts = torch.unique(flat, return_counts=True)                                     # ids ascending
    order = torch.sort(counts, descending=True, stable=True).indices                          # ties keep id order
    return FrequencyTable(ids[order], counts[order], dict(meta or {}, tokens=flat.numel()))


def save_frequency_table(table: FrequencyTable, path: str | Path) -> None:
    """int32 on disk: 8 bytes per distinct token (< 1.3 MB even for a 152k vocabulary)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": table.ids.int(), "counts": table.counts.int(), "meta": table.meta}, path)


def load_frequency_table(path: str | Path) -> FrequencyTable:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"ids", "counts"} <= set(data):
        raise ValueError(f"{path}: not a VocabTrim frequency table (`launch.py build-vocab-table` writes one)")
    ids, counts = data["ids"].long(), data["counts"].long()
    if (ids.shape != counts.shape or ids.dim() != 1 or ids.unique().numel() != ids.numel()
            or bool((ids < 0).any()) or bool((counts <= 0).any())
            or (counts.numel() > 1 and bool((counts[1:] > counts[:-1]).any()))):
        raise ValueError(f"{path}: not a VocabTrim frequency table (ids distinct and >= 0, counts > 0 "
                         "and non-increasing, one per id)")
    return FrequencyTable(ids, counts, dict(data.get("meta") or {}))


def kept_token_ids(vocab_size: int, keep: int, prompt_ids: list[int],
                   ranking: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted unique ids: `keep` ids plus the prompt's tokens. [n] long.

    ranking: [m] ids best first (a FrequencyTable's); its first `keep` are kept, and when it ranks fewer
    (a table from little text) the lowest ids not in it fill up to `keep`. None = the `keep` lowest ids."""
    kept = torch.zeros(vocab_size, dtype=torch.bool)                                          # [vocab]
    if ranking is None:
        kept[:keep] = True
    else:
        ranked = ranking[ranking < vocab_size][:keep]
        kept[ranked] = True
        missing = min(keep, vocab_size) - ranked.numel()
        if missing > 0:
            kept[(~kept).nonzero().squeeze(1)[:missing]] = True
    prompt = torch.tensor([t for t in set(prompt_ids) if 0 <= t < vocab_size], dtype=torch.long)
    kept[prompt] = True
    return kept.nonzero().squeeze(1)


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
