"""`launch.py mag-table`: MaG's bigram table from text the target generated (workers/mag.py).

The target decodes each prompt greedily (plain decoding, the engine without a
drafter); the generated tokens, prompts excluded, are counted into a "most likely
next token" table, saved sparse (int32 pairs). CS-Drafting builds its table the
same way from the target's outputs.
"""
from __future__ import annotations

import time

import torch

from core.sampling import SamplingParams
from orchestrator.bench import Prompt, encode
from orchestrator.build import Built
from workers.mag import BigramTable, build_bigram_table


def generate_outputs(built: Built, prompts: list[Prompt], max_new_tokens: int, log=print) -> list[list[int]]:
    """Greedy outputs of the target, one per prompt."""
    plain = built.engines["plain"]
    outputs = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        outputs.append(plain.generate(encode(built.tokenizer, p), max_new_tokens, SamplingParams()).tokens)
        log(f"[{i + 1}/{len(prompts)}] {p.id}: {len(outputs[-1])} tokens in {time.perf_counter() - t0:.1f} s")
    return outputs


def table_from_outputs(outputs: list[list[int]]) -> BigramTable:
    return build_bigram_table([torch.tensor(o, dtype=torch.long) for o in outputs])
