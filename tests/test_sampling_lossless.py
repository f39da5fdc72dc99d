"""End-to-end distribution test: speculative sampling through the engine reproduces the target.

A tiny model with an 8-token vocabulary; we compute the exact target distribution of
the first 4 generated tokens and compare sampled outputs of each strategy against
its marginals with a chi-square test (the rule-level tests, including ones showing
that a wrong residual rule is caught, live in test_verification.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams, warp_probs
from orchestrator.engine import SpeculativeEngine
from tests.test_verification import chi_square_p_value
from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter
from workers.easyspec import Calibration, EasySpecDrafter
from workers.runner import ModelRunner

V = 8
N_NEW = 4
# 1,000 requests a case: with an accept-always verifier or a drafter that misreports q, the checks below
# gave p-values of 5e-49 and below at 1,000 (threshold 1e-3); 2,000 only doubled the time.
SAMPLES = 1000


def small_vocab_model(seed: int, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked, position-dependent distributions
    return model.float().eval()


def exact_sequence_probs(model, prompt, params) -> torch.Tensor:
    """P(t1..t4) for all V**4 sequences, from the target's warped next-token distributions."""
    seqs = [()]
    joint = torch.ones(1)
    for _ in range(N_NEW):
        batch = torch.tensor([prompt + list(s) for s in seqs])
        with torch.inference_mode():
            p = warp_probs(model(batch).logits[:, -1], params)              # [len(seqs), V]
        joint = (joint.unsqueeze(1) * p).reshape(-1)                        # [len(seqs) * V]
        seqs = [s + (t,) for s in seqs for t in range(V)]
    return joint.reshape([V] * N_NEW)


CASES = {
    "draft-model-t1": ("draft-model", SamplingParams(temperature=1.0)),
    "draft-model-t0.7-topk-topp": ("draft-model", SamplingParams(temperature=0.7, top_k=5, top_p=0.9)),
    "prompt-lookup-t1": ("prompt-lookup", SamplingParams(temperature=1.0)),
    "prompt-lookup-tree-t1": ("prompt-lookup-tree", SamplingParams(temperature=1.0)),
    # q is zero outside ids {0..3} + the prompt's {3, 5}: the target's other tokens come from the residual
    "draft-vocab-t1": ("draft-vocab", SamplingParams(temperature=1.0)),
    "lookup-then-model-t1": ("lookup-then-model", SamplingParams(temperature=1.0)),
    # EasySpec: both drafter layers in one group, so every non-exact draft step is approximate
    **{f"easyspec-{c.value}-t1": (f"easyspec-attn_only-{c.value}", SamplingParams(temperature=1.0))
       for c in Calibration},
}


def easyspec_drafter(kind: str) -> EasySpecDrafter:
    _, mode, calibration = kind.split("-")
    return EasySpecDrafter(ModelRunner(small_vocab_model(1, layers=2)), mode=mode, calibration=calibration,
                           groups=[[0, 1]])


@pytest.mark.parametrize("case", sorted(CASES))
def test_speculative_sampling_matches_target_distribution(case):
    kind, params = CASES[case]
    target_model = small_vocab_model(0)
    prompt = [3, 5, 3, 5, 3]
    exact = exact_sequence_probs(target_model, prompt, params)               # [V, V, V, V]
    target = ModelRunner(target_model)
    drafter = {
        "draft-model": lambda: DraftModelDrafter(ModelRunner(small_vocab_model(1))),
        "prompt-lookup": lambda: PromptLookupDrafter(2),
        "prompt-lookup-tree": lambda: PromptLookupDrafter(2, num_candidates=3),
        "draft-vocab": lambda: DraftModelDrafter(ModelRunner(small_vocab_model(1)), draft_vocab=4),
        "lookup-then-model": lambda: LookupThenModelDrafter(
            PromptLookupDrafter(3, 3), DraftModelDrafter(ModelRunner(small_vocab_model(1))), lookup_k=3),
    }.get(kind, lambda: easyspec_drafter(kind))()
    engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(3))
    gen = torch.Generator().manual_seed(0)
    outs = torch.empty(SAMPLES, N_NEW, dtype=torch.long)
    drafted = 0
    for i in range(SAMPLES):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        res = engine.generate(prompt, N_NEW, SamplingParams(params.temperature, params.top_k, params.top_p, seed))
        outs[i] = torch.tensor(res.tokens)
        drafted += res.stats.drafted_tokens
    assert drafted > SAMPLES // 2, f"{case}: too few drafts to test the verification rule"
    # Marginals covering the verification steps: (t2, t3), (t3, t4) and t4.
    for dims, cols in [((0, 3), (1, 2)), ((0, 1), (2, 3)), ((0, 1, 2), (3,))]:
        probs = exact.sum(dim=dims).reshape(-1)
        ids = sum(outs[:, c] * V ** (len(cols) - 1 - j) for j, c in enumerate(cols))
        p_value = chi_square_p_value(ids, probs)
        assert p_value > 1e-3, f"{case}: tokens {cols} deviate from the target (p={p_value:.2e})"
