"""EasySpec (in-process mode): lossless with every calibration policy; calibration restores exact KV."""
from __future__ import annotations

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.engine import SpeculativeEngine
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from workers.easyspec import Calibration, EasySpecDrafter, default_groups
from workers.runner import ModelRunner


def test_default_groups_follow_the_paper():
    g = default_groups(32, 2)
    assert g[:4] == [[0], [1], [2], [3]] and g[-4:] == [[28], [29], [30], [31]]
    assert g[4:-4] == [[4 + 2 * i, 5 + 2 * i] for i in range(12)]
    assert default_groups(24, 3)[3] == [3, 4, 5]
    # Small models: the edge is at least one layer (the first and last layers are never fused), and the
    # middle is still fused; only when the two edges cover every layer does each layer stay single.
    assert default_groups(4, 2) == [[0], [1, 2], [3]]
    assert default_groups(2, 2) == [[0], [1]]


def test_single_layer_groups_equal_sequential_forward():
    model = tiny_model("qwen2", seed=0, layers=4)
    runner = ModelRunner(model)
    ids = torch.tensor([[5, 9, 13, 7, 21, 4]])
    a = runner.forward(runner.new_cache(1, 16), ids)
    b = runner.forward(runner.new_cache(1, 16), ids, layer_groups=[[0], [1], [2], [3]])
    assert torch.equal(a, b)
    c = runner.forward(runner.new_cache(1, 16), ids, layer_groups=[[0], [1, 2], [3]])
    assert not torch.allclose(a, c)          # the approximation is real


@pytest.mark.parametrize("calibration", list(Calibration))
@pytest.mark.parametrize("mode", ["attn_only", "direct_mlp"])
def test_easyspec_is_lossless(calibration, mode, prompts):
    target_model = tiny_model("llama", seed=0, layers=3)
    target = ModelRunner(target_model)
    drafter = EasySpecDrafter(ModelRunner(tiny_model("llama", seed=0, layers=3)), mode=mode,
                              calibration=calibration, groups=[[0], [1, 2]])
    engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4))
    plain = SpeculativeEngine(target)
    runs = []
    for prompt in prompts:
        res = engine.generate(prompt, 30)
        assert res.tokens == plain.generate(prompt, 30).tokens
        runs.append(res)
    assert_drafted(runs, accepted=True)     # the drafter is the target's own weights, layer-parallel
    params = SamplingParams(temperature=0.8, seed=4)
    assert engine.generate(prompts[0], 20, params).tokens == engine.generate(prompts[0], 20, params).tokens


def test_calibration_restores_sequential_kv(prompts):
    """After a mismatch round, EVERY_MISMATCH leaves exactly the KV sequential (exact) drafting would have."""
    model = tiny_model("llama", seed=0, layers=3)
    runner = ModelRunner(model)
    prompt = prompts[1]
    easy = EasySpecDrafter(runner, groups=[[0], [1, 2]]).start(prompt, SamplingParams(), None)
    easy.update([7], 0)                       # the token sampled from the target's prefill
    draft = easy.propose(4)                   # layer-parallel: approximate KV for the drafts
    committed = [draft.tokens[0], (draft.tokens[1] + 1) % 96]   # one accepted, then a rejection
    easy.update(committed, 1)
    assert easy.exact_len == len(prompt)      # the accepted draft's KV is approximate
    context = prompt + [7] + committed
    n = len(context)
    ref = runner.new_cache(1, 64)
    runner.forward(ref, torch.tensor([context]))
    slot = len(prompt) + 1                    # the accepted draft token
    before = easy.cache.keys[2][:, :, slot].clone()
    assert not torch.allclose(before, ref.keys[2][:, :, slot], atol=1e-3)   # approximate before calibration
    easy.propose(1)                           # calibration pass fused with the first draft step
    assert easy.cache.lengths[0] == n and easy.exact_len == n
    for ke, kr, ve, vr in zip(easy.cache.keys, ref.keys, easy.cache.values, ref.values):
        torch.testing.assert_close(ke[:, :, :n], kr[:, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ve[:, :, :n], vr[:, :, :n], rtol=1e-5, atol=1e-5)

    never = EasySpecDrafter(runner, groups=[[0], [1, 2]], calibration="never").start(prompt, SamplingParams(), None)
    never.update([7], 0)
    never.propose(2)
    assert never.exact_len == 0
