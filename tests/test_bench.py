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
