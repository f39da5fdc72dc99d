"""bench's bf16 divergence check: where an output parts from plain decoding, the target's own logits
say whether it was a near-tie (reported beside the equal count, never hidden) or a real mismatch."""
from __future__ import annotations

import torch

from orchestrator.bench import NEAR_TIE_LOGITS, logit_gap, markdown, summarise
from workers.runner import ModelRunner


def test_logit_gap_is_the_targets_own_logit_difference(target_model, prompts):
    runner = ModelRunner(target_model)
    ids = prompts[1]
    logits = runner.prefill(runner.new_cache(1, 64), 0, ids)
    a, b = int(logits.argmax()), int(logits.argmin())
    assert logit_gap(runner, ids, a, b) == float(logits[a] - logits[b]) > 0
    assert logit_gap(runner, ids, b, a) == -logit_gap(runner, ids, a, b)


def _rec(equal: bool, gap: float | None = None) -> dict:
    rec = {"id": "p", "category": "c", "tokens_per_s": 1.0, "equals_plain": equal}
    if gap is not None:
        rec["divergence_logit_gap"] = gap
    return rec


def test_near_ties_are_counted_apart_from_mismatches():
    records = {"plain": [_rec(True)] * 3,
               "spec": [_rec(True), _rec(False, 0.1), _rec(False, NEAR_TIE_LOGITS * 4)]}
    row = next(r for r in summarise(records)["table"] if r["scope"] == "overall" and r["method"] == "spec")
    assert row["outputs_equal_plain"] == 1 and row["bf16_near_ties"] == 1      # the third is a mismatch
    assert "| 1/3 + 1 near-tie |" in markdown([row])


def test_mean_draft_length_counts_empty_drafts_as_steps():
    """Drafted tokens per verification step: a step whose draft was empty (k = 0, a lookup miss) counts."""
    def rec(steps, drafted):
        return {"id": "p", "category": "c", "tokens_per_s": 1.0, "equals_plain": True, "steps": steps,
                "step_tokens": steps, "drafted": drafted, "accepted": 0}
    records = {"plain": [_rec(True)], "spec": [rec(4, 8), rec(6, 2)]}
    row = next(r for r in summarise(records)["table"] if r["scope"] == "overall" and r["method"] == "spec")
    assert row["mean_draft_length"] == 1.0                     # 10 tokens over 10 steps, not 10 / 2 prompts
    assert "| 1.00 | 1.00 | 0.00 |" in markdown([row])          # mean accepted, draft length, acceptance


def test_warmup_runs_only_the_named_strategies_on_other_prompts(target_model):
    """A warm-up pass decodes its prompts with the named strategies only, before anything is measured;
    an unknown name is refused."""
    import pytest

    from orchestrator.bench import Prompt, run_bench
    from orchestrator.engine import SpeculativeEngine

    class Counting(SpeculativeEngine):
        def __init__(self, target):
            super().__init__(target)
            self.seen = []

        def generate(self, prompt_ids, max_new_tokens, params=None, on_tokens=None):
            self.seen.append(tuple(prompt_ids))
            return super().generate(prompt_ids, max_new_tokens)

    class Tok:
        def __call__(self, text):
            return type("E", (), {"input_ids": [3 + ord(c) % 90 for c in text]})()

    class Built:
        pass
    runner = ModelRunner(target_model)
    built = Built()
    built.engines = {"plain": Counting(runner), "other": Counting(runner)}
    built.tokenizer, built.target = Tok(), runner
    built.config = type("C", (), {"bench": type("B", (), {"hf_peers": []})()})()
    measured = [Prompt(id="m", category="c", text="measured prompt", chat=False)]
    warm = [Prompt(id="w", category="c", text="warm-up text", chat=False)]
    run_bench(built, measured, 4, log=lambda s: None, warmup=warm, warmup_strategies=["other"])
    warm_ids = tuple(Tok()("warm-up text").input_ids)
    assert warm_ids in built.engines["other"].seen and warm_ids not in built.engines["plain"].seen
    assert built.engines["other"].seen.index(warm_ids) < len(built.engines["other"].seen) - 1   # before measuring
    with pytest.raises(ValueError, match="nope"):
        run_bench(built, measured, 4, log=lambda s: None, warmup=warm, warmup_strategies=["nope"])
