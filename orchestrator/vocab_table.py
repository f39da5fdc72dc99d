"""`launch.py build-vocab-table`: VocabTrim's token frequency table (workers/vocab_trim.py) from text the
target generated.

As MaG's table (orchestrator/mag_table.py, whose `generate_outputs` this reuses): the target decodes each
prompt greedily (plain decoding, no drafter) and the generated tokens, prompts excluded, are counted. A
strategy's `draft_vocab: {size, mode: frequency, table}` then keeps the `size` most frequent of them.
Do not build from the prompts you bench.
"""
from __future__ import annotations

from core.config import ModelsConfig, ModelSpec
from orchestrator.bench import load_prompts
from orchestrator.build import build_engines
from orchestrator.config import EngineConfig
from orchestrator.mag_table import generate_outputs
from workers.vocab_trim import FrequencyTable, count_tokens


def build_vocab_table(model: str, dtype: str, prompt_files: list[str], limit: int | None,
                      max_new_tokens: int, log=print, skip: int = 0, concurrency: int = 1) -> FrequencyTable:
    """The frequency table of `model`'s greedy outputs on the prompt files (`limit` prompts each, after the
    first `skip` of each: `load_prompts`), `concurrency` prompts decoded at a time."""
    config = EngineConfig(name="build-vocab-table", models=ModelsConfig(target=ModelSpec(source=model, dtype=dtype)))
    prompts = [p for path in prompt_files for p in load_prompts(path, limit, skip)]
    built = build_engines(config, only=[])          # the target alone
    outputs = generate_outputs(built, prompts, max_new_tokens, log, concurrency)
    return count_tokens(outputs, meta={"target": model, "dtype": dtype, "prompts": len(prompts),
                                       "data": list(prompt_files), "skip": skip, "limit": limit,
                                       "max_new_tokens": max_new_tokens})
