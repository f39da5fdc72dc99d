"""CS-Drafting: MaG, the cascade's review rules and k_matrix schedule, and losslessness through the engine.

Levels in these tests, top-down: the target (level 0, verified by the engine), then the
neural drafters named, then MaG. "2-level" = target <- drafter <- MaG, "3-level" =
target <- drafter A <- drafter B <- MaG, "MaG alone" = target <- MaG.
"""
from __future__ import annotations

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.config import EngineConfig
from orchestrator.engine import SpeculativeEngine
from tests.conftest import VOCAB
from tests.drafting import assert_drafted
from tests.test_engine import noisy_copy
from tests.test_sampling_lossless import N_NEW, V, exact_sequence_probs, small_vocab_model
from tests.test_verification import chi_square_p_value
from workers import cascade as cascade_mod
from workers.cascade import CascadeDrafter, review_greedy, review_sampled, schedule
from workers.drafters import DraftModelDrafter
from workers.mag import (BigramTable, MaGDrafter, build_bigram_table, load_table, mag_draft, save_table)
from workers.runner import ModelRunner


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def table_of(pairs: dict[int, int]) -> BigramTable:
    src = sorted(pairs)
    return BigramTable(torch.tensor(src), torch.tensor([pairs[s] for s in src]))


# ------------------------------------------------------------------ MaG
def test_suffix_match_wins_over_the_table():
    context = torch.tensor([5, 6, 7, 8, 9, 1, 5, 6])
    table = table_of({6: 42, 7: 43})
    assert mag_draft(context, 3, [table], max_ngram=4) == [7, 8, 9]


def test_longest_suffix_match_is_copied_then_bigrams_fill():
    # "2 3" occurs twice; the longest suffix "1 2 3" only once, at the start: copy what followed it.
    context = torch.tensor([1, 2, 3, 50, 51, 9, 2, 3, 60, 1, 2, 3])
    table = table_of({51: 70, 70: 71})
    assert mag_draft(context, 6, [table], max_ngram=4) == [50, 51, 9, 2, 3, 60][:6]
    # The copy ends at the context's end (4 tokens), the table continues from its last token.
    context = torch.tensor([10, 11, 12, 13, 10, 11])
    assert mag_draft(context, 6, [table_of({11: 20, 20: 21})], max_ngram=4) == [12, 13, 10, 11, 20, 21]


def test_bigram_fill_without_a_match_stops_at_an_unknown_token():
    context = torch.tensor([1, 2, 3])
    assert mag_draft(context, 5, [table_of({3: 4, 4: 5})], max_ngram=3) == [4, 5]
    # A second table covers what the first never saw.
    assert mag_draft(context, 5, [table_of({3: 4}), table_of({4: 9, 3: 77})], max_ngram=3) == [4, 9]


def test_bigram_table_keeps_the_most_frequent_successor_lowest_id_on_ties():
    table = build_bigram_table([torch.tensor([3, 4, 3, 5, 3, 4, 8]), torch.tensor([8, 9, 8, 7])])
    assert table.next_token(3) == 4          # 3->4 twice, 3->5 once
    assert table.next_token(8) == 7          # 8->9 and 8->7 once each: the lower id
    assert table.next_token(4) == 3          # 4->3 once, 4->8 once
    assert table.next_token(7) == -1         # never followed by anything
    assert len(table) == 5                   # sources 3, 4, 5, 8, 9
    assert table.src.tolist() == sorted(set(table.src.tolist()))


def test_table_save_load_round_trip(tmp_path):
    table = build_bigram_table([torch.randint(0, 1000, (500,), generator=torch.Generator().manual_seed(0))])
    path = tmp_path / "mag.pt"
    save_table(table, path, meta={"source": "test"})
    loaded = load_table(path)
    assert torch.equal(loaded.src, table.src) and torch.equal(loaded.dst, table.dst)
    assert path.stat().st_size < 16 * len(table) + 4096      # int32 pairs, not a dense vocab x vocab table


def test_mag_falls_back_to_the_contexts_own_bigrams():
    session = MaGDrafter(table=None, max_ngram=2).start([4, 5, 4, 6, 4, 5, 7], SamplingParams(), None)
    # Suffix "7" never occurred before: walk the context's bigrams 7 -> ? (unknown) -> empty draft.
    assert session.propose(3).tokens == []
    session.update([4], 0)
    # Suffix "7 4" is new, "4" matched most recently at index 4 -> copies "5 7 4", then the context's
    # bigrams: 4 -> 5 (twice, vs 4 -> 6 once), 5 -> 4 (tie with 5 -> 7: the lower id).
    assert session.propose(5).tokens == [5, 7, 4, 5, 4]


# ------------------------------------------------------------------ review rules and schedule
def test_review_greedy_accepts_argmax_prefix_and_leniency_widens_it():
    logits = torch.full((4, 6), -5.0)
    logits[0, 1], logits[1, 2], logits[2, 3], logits[3, 4] = 5.0, 5.0, 5.0, 5.0
    logits[1, 0] = 3.0                                           # token 0 at position 1: second choice
    draft = torch.tensor([1, 0, 3])
    exact = review_greedy(draft, torch.ones(3), logits, leniency=1.0)
    assert (exact.num_accepted, exact.next_token) == (1, 2)
    p = logits[1].softmax(-1)[0]                                 # ~0.12: accepted when q / leniency < p
    lenient = review_greedy(draft, torch.ones(3), logits, leniency=1.5 / float(p))
    assert (lenient.num_accepted, lenient.next_token) == (3, 4)
    assert review_greedy(draft, torch.ones(3), logits, leniency=0.5 / float(p)).num_accepted == 1


def test_review_sampled_output_rows_are_distributions_and_match_the_empirical_law():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])      # reviewer, [m+1, vocab]
    q = torch.tensor([[0.1, 0.1, 0.1, 0.7]])                                 # the draft's q, [m, vocab]
    counts = torch.zeros(4)
    rows = None
    for _ in range(4000):
        tok = torch.multinomial(q[0], 1, generator=g)
        res = review_sampled(tok, q, p, leniency=3.0, generator=g)
        out = tok if res.num_accepted else torch.tensor([res.next_token])
        counts[out] += 1
        rows = res.out_probs
    assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[0]))
    expected = torch.minimum(q[0], 3.0 * p[0])
    expected = expected + (1 - expected.sum()) * (p[0] - q[0]).clamp_min(0) / (p[0] - q[0]).clamp_min(0).sum()
    assert chi_square_p_value(torch.repeat_interleave(torch.arange(4), counts.long()), expected) > 1e-3


def test_k_matrix_schedule_follows_the_papers_increments():
    # LLaMA example [[13, 10], [0, 10]]: the target gets >= 13 tokens from the drafter's reviews, then
    # MaG up to 23; the drafter reviews 10-token MaG drafts.
    assert schedule([13, 10], 0) == [(1, 13), (2, 23)]
    assert schedule([0, 10], 1) == [(2, 10)]
    # FLAN-T5 example, row of the middle model: 1 token from the next model, then MaG up to 11.
    assert schedule([0, 1, 10], 1) == [(2, 1), (3, 11)]
    with pytest.raises(ValueError, match=r"k_matrix\[1\]"):
        CascadeDrafter([ModelRunner(small_vocab_model(1))], MaGDrafter(), [[2, 2], [1, 2]])
    with pytest.raises(ValueError, match="k_matrix must be 2 x 2"):
        CascadeDrafter([ModelRunner(small_vocab_model(1))], MaGDrafter(), [[2, 2]])


def test_horizontal_cascade_builds_the_draft_by_position_ranges(target_model, monkeypatch):
    """k = [[3, 4], [0, 2]]: the drafter reviews 2-token MaG drafts until the draft has >= 3 tokens,
    then MaG fills it to exactly 7 (a full bigram table, so MaG never comes up short)."""
    seen = []
    original = cascade_mod._Reviewer.logits

    def spy(self, prefix, draft):
        seen.append(len(draft))
        return original(self, prefix, draft)

    monkeypatch.setattr(cascade_mod._Reviewer, "logits", spy)
    full = BigramTable(torch.arange(VOCAB), (torch.arange(VOCAB) * 7 + 3) % VOCAB)
    drafter = CascadeDrafter([ModelRunner(noisy_copy(target_model, 0.3, 5))], MaGDrafter(full, max_ngram=3),
                             [[3, 4], [0, 2]])
    session = drafter.start([5, 9, 14, 3, 7], SamplingParams(), None)
    draft = session.propose(64)
    assert len(draft) == 7
    assert seen and all(n == 2 for n in seen)
    assert session.forwards == [len(seen)]
    assert len(session.propose(5)) == 5                        # the engine's k caps the schedule


# ------------------------------------------------------------------ through the engine
def cascades(target_model, draft_model):
    a = ModelRunner(noisy_copy(target_model, 0.3, 5))        # as deep as the target, close to it
    b = ModelRunner(draft_model)                              # 1 layer: the smallest neural level
    return {
        "mag-alone": CascadeDrafter([], MaGDrafter(max_ngram=3), [[5]]),
        "2-level": CascadeDrafter([a], MaGDrafter(max_ngram=3), [[4, 3], [0, 3]]),
        "3-level": CascadeDrafter([a, b], MaGDrafter(max_ngram=3), [[3, 2, 2], [0, 2, 2], [0, 0, 3]]),
        "3-level-huge-leniency": CascadeDrafter([a, b], MaGDrafter(max_ngram=3),
                                                [[3, 2, 2], [0, 2, 2], [0, 0, 3]], leniency=[1e9, 1e9]),
    }


def test_greedy_cascades_equal_plain_decoding(target_model, draft_model, prompts):
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    refs = [plain.generate(prompt, 24) for prompt in prompts]
    assert refs[0].stats.cost_speedup == 1.0
    for name, drafter in cascades(target_model, draft_model).items():
        engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(16), name=name)
        runs = []
        for prompt, ref in zip(prompts, refs):
            res = engine.generate(prompt, 24)
            assert res.tokens == ref.tokens, f"{name} diverged from plain decoding"
            runs.append(res)
        # Over the prompt set (MaG alone may find nothing to copy on one prompt); the neural levels
        # start from the target's noisy copy, so the target keeps some of their drafts.
        assert_drafted(runs, accepted=name != "mag-alone", what=name)
        drafted = sum(r.stats.drafted_tokens for r in runs)
        accepted = sum(r.stats.accepted_tokens for r in runs)
        if name == "3-level-huge-leniency":
            # Intermediate levels accept every draft token; the target (exact) still rejects some.
            assert accepted < drafted


def test_cost_model_counts_reviews_times_parameters(target_model, draft_model, prompts):
    target = ModelRunner(target_model)
    drafters = cascades(target_model, draft_model)
    res = SpeculativeEngine(target, drafters["3-level"], lambda: FixedDraftLength(16)).generate(prompts[1], 24)
    a, b = (sum(p.numel() for p in r.model.parameters()) for r in drafters["3-level"].runners)
    t = sum(p.numel() for p in target_model.parameters())
    forwards = res.stats.draft_forwards
    assert forwards[drafters["3-level"].level_names[0]] > 0 and forwards["level2"] > 0
    assert res.stats.draft_cost == pytest.approx((forwards["level1"] * a + forwards["level2"] * b) / t)
    mag = SpeculativeEngine(target, drafters["mag-alone"], lambda: FixedDraftLength(16)).generate(prompts[1], 24)
    assert mag.stats.draft_cost == 0.0 and mag.stats.cost_speedup == mag.stats.mean_accepted_tokens
    # Plain speculative decoding with drafter A: one forward per drafted token.
    sd = SpeculativeEngine(target, DraftModelDrafter(drafters["3-level"].runners[0]), lambda: FixedDraftLength(4))
    res = sd.generate(prompts[1], 24)
    assert res.stats.draft_cost == pytest.approx(res.stats.drafted_tokens * a / t)
    assert res.stats.cost_speedup == pytest.approx(res.stats.step_tokens / (res.stats.steps + res.stats.draft_cost))


SAMPLING_CASES = {
    "2-level": (["a"], [[2, 1], [0, 2]], None),
    "2-level-lenient": (["a"], [[2, 1], [0, 2]], [3.0]),
    "3-level-lenient": (["a", "b"], [[1, 1, 1], [0, 1, 1], [0, 0, 2]], [2.0, 4.0]),
}


@pytest.mark.parametrize("case", sorted(SAMPLING_CASES))
def test_sampling_through_a_cascade_matches_the_target_distribution(case):
    levels, k_matrix, leniency = SAMPLING_CASES[case]
    params = SamplingParams(temperature=1.0)
    target_model = small_vocab_model(0)
    prompt = [3, 5, 3, 5, 3]
    exact = exact_sequence_probs(target_model, prompt, params)             # [V, V, V, V]
    models = {"a": noisy_copy(target_model, 0.5, 7), "b": small_vocab_model(1)}
    drafter = CascadeDrafter([ModelRunner(models[key]) for key in levels], MaGDrafter(max_ngram=2),
                             k_matrix, leniency)
    engine = SpeculativeEngine(ModelRunner(target_model), drafter, lambda: FixedDraftLength(3))
    gen = torch.Generator().manual_seed(1)
    samples = 1500
    outs = torch.empty(samples, N_NEW, dtype=torch.long)
    drafted = 0
    for i in range(samples):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        res = engine.generate(prompt, N_NEW, SamplingParams(1.0, seed=seed))
        outs[i] = torch.tensor(res.tokens)
        drafted += res.stats.drafted_tokens
    assert drafted > samples // 2, f"{case}: too few drafts to test the verification rule"
    for dims, cols in [((0, 3), (1, 2)), ((0, 1), (2, 3)), ((0, 1, 2), (3,))]:
        probs = exact.sum(dim=dims).reshape(-1)
        ids = sum(outs[:, c] * V ** (len(cols) - 1 - j) for j, c in enumerate(cols))
        p_value = chi_square_p_value(ids, probs)
        assert p_value > 1e-3, f"{case}: tokens {cols} deviate from the target (p={p_value:.2e})"


# ------------------------------------------------------------------ config
BASE = {"models": {"target": {"source": "t"}, "drafters": {"d": {"source": "d"}, "e": {"source": "e"}}}}


def strategy(**kw):
    return EngineConfig.model_validate({**BASE, "strategies": [{"name": "c", "kind": "cascade", **kw}]})


def test_cascade_config_validation():
    cfg = strategy(drafters=["d", "e"], k_matrix=[[3, 2, 2], [0, 2, 2], [0, 0, 3]], leniency=[2, 1],
                   mag={"table": None, "max_ngram": 4})
    assert cfg.strategies[0].draft_length.k == 64
    with pytest.raises(ValueError, match="k_matrix must be 2 x 2"):
        strategy(drafters=["d"], k_matrix=[[3, 2, 2], [0, 2, 2], [0, 0, 3]])
    with pytest.raises(ValueError, match=r"leniency: one value >= 1 per drafter \(1\)"):
        strategy(drafters=["d"], k_matrix=[[3, 2], [0, 2]], leniency=[2, 2])   # none for the target
    with pytest.raises(ValueError, match="leniency"):
        strategy(drafters=["d"], k_matrix=[[3, 2], [0, 2]], leniency=[0.5])
    with pytest.raises(ValueError, match=r"strategies\.0\.drafters\.1"):
        strategy(drafters=["d", "missing"], k_matrix=[[3, 2, 2], [0, 2, 2], [0, 0, 3]])
    with pytest.raises(ValueError, match="(?i)extra"):
        strategy(drafters=["d"], k_matrix=[[3, 2], [0, 2]], mag={"tabel": "x.pt"})


def test_every_shipped_config_loads():
    from pathlib import Path

    from orchestrator.config import load_config
    from orchestrator.strategies.cascade import CascadeStrategy

    root = Path(__file__).resolve().parents[1] / "cluster_configs"
    cascades = 0
    for path in sorted(root.glob("*.yaml")):
        cascades += sum(isinstance(s, CascadeStrategy) for s in load_config(path).strategies)
    assert cascades >= 3
