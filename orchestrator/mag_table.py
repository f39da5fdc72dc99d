"""`launch.py mag-table`: MaG's bigram table from text the target generated (workers/mag.py).

The target decodes each prompt greedily (plain decoding, the engine without a
drafter); the generated tokens, prompts excluded, are counted into a "most likely
next token" table, saved sparse (int32 pairs). CS-Drafting builds its table the
same way from the target's outputs.
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from core.sampling import SamplingParams
from orchestrator.bench import Prompt, encode
from orchestrator.build import Built
from orchestrator.global_verifier import GlobalVerifier
from workers.mag import BigramTable, build_bigram_table


def generate_outputs(built: Built, prompts: list[Prompt], max_new_tokens: int, log=print,
                     concurrency: int = 1) -> list[list[int]]:
    """Greedy outputs of the target, one per prompt, in prompt order. concurrency > 1 decodes that many
    prompts at a time through one global verifier (batched forwards: on a 2-core CPU 8 requests make
    about 4x the tokens per second of one: 30 against ~7 tokens/s, docs/vocab_trim.md). A batched bf16
    forward can flip a near-tie that a one-row forward would not, so a few outputs may part from
    one-at-a-time decoding there: still the target's own text, which is what these tables count."""
    plain = built.engines["plain"]
    verifier = GlobalVerifier(built.target, max_batch=concurrency) if concurrency > 1 else None
    engine = plain.with_target(verifier) if verifier else plain
    done = itertools.count(1)

    def one(p: Prompt) -> list[int]:
        t0 = time.perf_counter()
        tokens = engine.generate(encode(built.tokenizer, p), max_new_tokens, SamplingParams()).tokens
        log(f"[{next(done)}/{len(prompts)}] {p.id}: {len(tokens)} tokens in {time.perf_counter() - t0:.1f} s")
        return tokens

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, prompts))
    finally:
        if verifier:
            verifier.close()


def table_from_outputs(outputs: list[list[int]]) -> BigramTable:
    return build_bigram_table([torch.tensor(o, dtype=torch.long) for o in outputs])
