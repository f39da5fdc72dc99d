"""Token Recycling (workers/token_recycling.py): the matrix update, the tree fill, greedy equality with
plain decoding, learning within and across requests, and concurrent requests sharing one matrix."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from core.draft_length import AdaptiveDraftLength, FixedDraftLength
from orchestrator.engine import SpeculativeEngine, tree_attention
from orchestrator.global_verifier import GlobalVerifier
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from workers.runner import ModelRunner
from workers.token_recycling import (ROW_CHUNK, UNSEEN, RecyclingMatrix, TokenRecyclingDrafter, TreeTemplate,
                                     _TokenRecyclingSession)

MAX_NEW = 40


# ------------------------------------------------------------------ pure pieces
def test_paper_template_shape():
    t = TreeTemplate.paper()
    assert len(t) == 80 and t.depth == 6
    widths = [end - start for start, end in zip((0,) + t.level_ends, t.level_ends)]
    assert widths == [8, 21, 25, 15, 8, 3]
    assert all(-1 <= p < i for i, p in enumerate(t.parents))            # parents before children
    assert max(t.ranks) == 7
    siblings = {}
    for p, r in zip(t.parents, t.ranks):
        siblings.setdefault(p, []).append(r)
    assert all(rs == list(range(len(rs))) for rs in siblings.values())   # the top-ranked successors


def test_branching_template():
    t = TreeTemplate.branching([2, 2, 1])
    assert t.parents == (-1, -1, 0, 0, 1, 1, 2, 3, 4, 5)
    assert t.ranks == (0, 1, 0, 1, 0, 1, 0, 0, 0, 0)
    assert t.level_ends == (2, 6, 10)
    with pytest.raises(ValueError):
        TreeTemplate.branching([8, 8, 8, 8])       # 4680 nodes


def test_matrix_update_keeps_rows_and_grows_in_chunks():
    m = RecyclingMatrix(width=3)
    assert m.nbytes == 0
    m.observe([5, 9], torch.tensor([[7, 8, 1], [4, 3, 2]]))                     # [2 inputs, 3]
    assert m.rows.shape == (ROW_CHUNK, 3) and m.rows.dtype == torch.int32
    assert m.rows[5].tolist() == [7, 8, 1] and m.rows[9].tolist() == [4, 3, 2]
    assert m.rows[6].tolist() == [UNSEEN] * 3                                   # never observed
    m.observe([5], torch.tensor([[6, 7, 8]]))                                   # a newer forward overwrites
    assert m.rows[5].tolist() == [6, 7, 8]
    # A token fed twice (two tree nodes) keeps its shallowest (first) row.
    m.observe([11, 3, 11], torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
    assert m.rows[11].tolist() == [1, 2, 3]
    # A vocabulary smaller than the width: the rest of the row is unseen.
    m.observe([12], torch.tensor([[4, 5]]))
    assert m.rows[12].tolist() == [4, 5, UNSEEN]
    m.observe([ROW_CHUNK + 2], torch.tensor([[1, 2, 3]]))
    assert m.rows.shape == (2 * ROW_CHUNK, 3) and m.rows[5].tolist() == [6, 7, 8]


def test_fill_follows_the_template_and_drops_unseen_rows():
    m = RecyclingMatrix(width=2)
    template = TreeTemplate.branching([2, 2, 1])
    assert len(m.fill(5, template, 3)) == 0                     # an empty matrix drafts nothing
    m.observe([5, 7, 8], torch.tensor([[7, 8], [9, 10], [11, 12]]))
    d = m.fill(5, template, 3)
    # depth 3 needs rows 9..12, never observed: those nodes are dropped
    assert d.tokens == [7, 8, 9, 10, 11, 12] and d.parents == [-1, -1, 0, 0, 1, 1]
    assert m.fill(5, template, 1).tokens == [7, 8]             # k bounds the depth
    assert len(m.fill(5, template, 0)) == 0
    assert len(m.fill(6, template, 3)) == 0                    # unseen root: a plain step
    m.observe([9], torch.tensor([[13, 14]]))
    d = m.fill(5, template, 6)                                  # deeper than the template: cut to it
    assert d.tokens == [7, 8, 9, 10, 11, 12, 13] and d.parents == [-1, -1, 0, 0, 1, 1, 2]
    assert d.depth == 3


def test_fill_drops_repeated_siblings_with_their_subtrees():
    m = RecyclingMatrix(width=3)
    m.observe([5, 7, 8], torch.tensor([[7, 8, 0], [9, 10, 0], [11, 12, 0]]))
    m.rows[5] = torch.tensor([7, 7, 8], dtype=torch.int32)      # not what topk writes, but must stay valid
    d = m.fill(5, TreeTemplate.branching([3, 1]), 2)
    assert d.tokens == [7, 8, 9, 11] and d.parents == [-1, -1, 0, 1]


def test_a_single_path_is_a_chain():
    m = RecyclingMatrix(width=2)
    m.observe([1, 2, 3], torch.tensor([[2, 5], [3, 6], [4, 7]]))
    d = m.fill(1, TreeTemplate.branching([1] * 6), 6)
    assert d.tokens == [2, 3, 4] and d.parents is None


def test_session_learns_from_target_topk_and_tracks_the_last_token():
    drafter = TokenRecyclingDrafter(width=2, template=TreeTemplate.branching([2, 1]))
    s = drafter.start([4, 5], None, None)
    assert s.target_topk == 2 and len(s.propose(4)) == 0
    s.observe_target([5], torch.tensor([[6, 7]]))
    s.update([6], 0)
    assert len(s.propose(4)) == 0                                # row 6 unseen yet
    s.observe_target([6, 8], torch.tensor([[8, 9], [1, 2]]))
    s.update([8, 1], 1)
    other = drafter.start([3, 6], None, None)                    # another request: the same matrix
    assert other.propose(4).tokens == [8, 9, 1]
    assert len(s.propose(4)) == 0                                # its last token, 1: row unseen
    with pytest.raises(ValueError, match="width"):
        TokenRecyclingDrafter(width=4, template=TreeTemplate.paper())


def test_a_tree_that_grows_the_cache_can_be_compacted(target_model):
    """An 80-node tree outgrows the engine's cache headroom: the forward grows the cache (inside inference
    mode) and compacting the accepted path afterwards must still work (it raised before the fix)."""
    runner = ModelRunner(target_model)
    cache = runner.new_cache(1, capacity=8)
    runner.prefill(cache, 0, [5, 6, 7])
    mask, depths = tree_attention(list(TreeTemplate.paper().parents), runner.device)   # [81, 81], [81]
    runner.forward(cache, torch.tensor([[7] + list(range(3, 83))]), depths=depths[None], tree_mask=mask[None])
    assert cache.capacity >= 84
    cache.keep(0, 3, torch.tensor([0, 1, 9]))
    assert cache.lengths == [6]


# ------------------------------------------------------------------ through the engine
def engines(target: ModelRunner, drafter=None):
    drafter = drafter or TokenRecyclingDrafter()
    return {
        "paper/k6": SpeculativeEngine(target, drafter, lambda: FixedDraftLength(6), name="tr"),
        "paper/adaptive": SpeculativeEngine(target, drafter, lambda: AdaptiveDraftLength(k_init=3, k_max=8),
                                            name="tr"),
        "chain/k4": SpeculativeEngine(target, TokenRecyclingDrafter(template=TreeTemplate.branching([1] * 6)),
                                      lambda: FixedDraftLength(4), name="tr-chain"),
        "small-tree/k4": SpeculativeEngine(target, TokenRecyclingDrafter(template=TreeTemplate.branching([3, 2, 1])),
                                           lambda: FixedDraftLength(4), name="tr-small"),
    }


def test_greedy_equals_plain(target_model, prompts):
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    refs = [plain.generate(p, MAX_NEW).tokens for p in prompts]
    for name, engine in engines(target).items():
        runs = []
        for prompt, ref in zip(prompts, refs):
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == ref, f"{name} diverged from plain decoding"
            assert res.stats.generated_tokens == MAX_NEW
            runs.append(res)
        assert_drafted(runs, accepted=True, what=name)


REPETITIVE = [5, 17, 33, 8, 41] * 6


@pytest.fixture
def target_runner(target_model):
    return ModelRunner(target_model)


def run(target, drafter, prompt=REPETITIVE, max_new=MAX_NEW):
    return SpeculativeEngine(target, drafter, lambda: FixedDraftLength(6), name="tr").generate(prompt, max_new)


def test_accepts_after_warm_up(target_runner):
    """The check a broken matrix fails: `accepted_tokens > 0` on the second pass (see the next test)."""
    drafter = TokenRecyclingDrafter()
    run(target_runner, drafter)                                         # warm-up
    stats = run(target_runner, drafter).stats
    assert stats.drafted_tokens > 0
    assert stats.accepted_tokens > 0
    assert stats.accepted_tokens / stats.steps > 1.0                    # most steps keep more than one draft


def test_a_matrix_never_updated_drafts_and_accepts_nothing(target_runner, monkeypatch):
    """Negative control for the test above: with observe_target a no-op (the engine's feedback lost)
    the matrix stays empty, every draft is empty, and `accepted_tokens > 0` would fail."""
    monkeypatch.setattr(_TokenRecyclingSession, "observe_target", lambda self, tokens, topk: None)
    drafter = TokenRecyclingDrafter()
    run(target_runner, drafter)
    stats = run(target_runner, drafter).stats
    assert stats.drafted_tokens == 0 and stats.accepted_tokens == 0
    assert drafter.matrix.nbytes == 0


def test_a_second_request_benefits_from_the_first(prompts):
    """The matrix is the drafter's, not the session's: a request after another one (on another prompt)
    accepts more, in fewer target forwards, than the same request through a fresh drafter (which is
    what a per-session matrix would give: this assertion catches one). On the tiny Qwen2 target: the
    tiny Llama repeats its last token, which a single row learned at the prefill already predicts."""
    target = ModelRunner(tiny_model("qwen2", seed=0, layers=3))
    cold = run(target, TokenRecyclingDrafter(), prompts[2], max_new=12)
    shared = TokenRecyclingDrafter()
    run(target, shared, prompts[0], max_new=12)                         # another request first
    warm = run(target, shared, prompts[2], max_new=12)
    assert warm.tokens == cold.tokens
    assert warm.stats.accepted_tokens > cold.stats.accepted_tokens
    assert warm.stats.steps < cold.stats.steps
    # the matrix: V x 8 int32, grown in chunks from the ids seen (tiny vocabulary here)
    assert shared.matrix.rows.shape == (ROW_CHUNK, 8) and shared.matrix.nbytes == ROW_CHUNK * 8 * 4


def test_concurrent_requests_share_one_matrix_and_equal_plain(target_model, prompts):
    """Several request threads draft from and write to one matrix, their target forwards batched by the
    global verifier: every output equals its plain decoding."""
    plain = SpeculativeEngine(ModelRunner(target_model))
    jobs = [prompts[i % len(prompts)] + [3 + i] for i in range(8)]
    expected = [plain.generate(p, MAX_NEW).tokens for p in jobs]
    drafter = TokenRecyclingDrafter()
    verifier = GlobalVerifier(ModelRunner(target_model), max_batch=4)
    try:
        engine = SpeculativeEngine(verifier, drafter, lambda: FixedDraftLength(6), name="tr")
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: engine.generate(p, MAX_NEW), jobs))
    finally:
        verifier.close()
    for i, (res, ref) in enumerate(zip(results, expected)):
        assert res.tokens == ref, f"request {i} diverged from plain decoding"
    assert_drafted(results, accepted=True, what="concurrent token recycling")
    assert verifier.stats.max_rows > 1


def test_strategy_config_builds_the_drafter():
    from orchestrator.strategies import KINDS

    cfg = KINDS["token_recycling"](name="tr", kind="token_recycling", tree=[4, 2, 1], width=4)
    drafter = cfg.make_drafter(None)
    assert isinstance(drafter, TokenRecyclingDrafter) and drafter.deterministic
    assert drafter.matrix.width == 4 and len(drafter.template) == 4 + 8 + 8
    assert cfg.draft_length.k == 6 and cfg.actor_drafters() == []       # through Ray: beside the engine
