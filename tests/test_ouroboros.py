"""Ouroboros (workers/ouroboros.py): the phrase pool's bounds, its fill from the target (not the drafter),
the drafter cache after a step that left the chain for a phrase, the tree rule with a sampled chain child
and one-hot phrase siblings, greedy equality with plain decoding, phrases accepted past the chain, and
concurrent requests sharing one pool. Each property has a broken version shown to be caught."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams
from core.verification import verify_tree
from orchestrator.engine import SpeculativeEngine
from orchestrator.global_verifier import GlobalVerifier
from orchestrator.strategies.ouroboros import OuroborosStrategy
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from tests.test_engine import noisy_copy
from workers.drafters import _DraftModelSession, merge_into_trie
from workers.ouroboros import OuroborosDrafter, OuroborosSession, PhrasePool
from workers.runner import ModelRunner

MAX_NEW = 32
GREEDY = SamplingParams(temperature=0.0)
REPETITIVE = [5, 17, 33, 8, 41] * 6


# ------------------------------------------------------------------ the pool
def check_bounds(pool: PhrasePool, max_keys: int, per_key: int, length: int) -> None:
    assert pool.num_keys <= max_keys, f"{pool.num_keys} keys > {max_keys}"
    for bucket in pool._keys.values():
        assert len(bucket) <= per_key, f"{len(bucket)} phrases for one key > {per_key}"
        assert all(1 <= len(p) <= length for p in bucket)


def fill_many(pool: PhrasePool) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        key, *phrase = torch.randint(0, 500, (8,), generator=g).tolist()
        pool.add(key, phrase)


def test_pool_is_bounded_and_evicts_the_least_recently_used():
    pool = PhrasePool(max_keys=16, phrases_per_key=3, phrase_len=4)
    fill_many(pool)
    check_bounds(pool, 16, 3, 4)
    assert pool.num_keys == 16 and len(pool) > 16
    # recency: a key read stays while newer keys push the others out; within a key the oldest phrase goes
    pool.add(1000, [1, 2])
    for key in range(2000, 2015):
        pool.add(key, [7])
        pool.get(1000, 1)
    assert pool.get(1000, 3) == [(1, 2)]
    for tail in ([3], [4], [5]):
        pool.add(1000, tail)
    assert pool.get(1000, 3) == [(5,), (4,), (3,)]
    # prefixes: a shorter phrase only refreshes a longer one, a longer one replaces its prefixes
    pool.add(1001, [1, 2])
    pool.add(1001, [1])
    pool.add(1001, [1, 2, 3])
    assert pool.get(1001, 3) == [(1, 2, 3)]


def test_a_pool_without_its_key_bound_is_caught():
    pool = PhrasePool(max_keys=16, phrases_per_key=3, phrase_len=4)
    pool.max_keys = 10**9                       # broken: keys never evicted
    fill_many(pool)
    with pytest.raises(AssertionError, match="keys"):
        check_bounds(pool, 16, 3, 4)


def test_the_pool_survives_threads_hammering_it():
    pool = PhrasePool(max_keys=32, phrases_per_key=2, phrase_len=3)

    def work(seed):       # an exception in a thread is raised again by list(map(...)) below
        for i in range(2000):
            pool.add((seed * 7 + i) % 40, [(seed + i * j) % 50 for j in range(1, 5)])
            pool.get((seed + i) % 40, 2)
            len(pool)

    with ThreadPoolExecutor(4) as threads:
        list(threads.map(work, range(4)))
    check_bounds(pool, 32, 2, 3)


# ------------------------------------------------------------------ the fill: the target's argmax
@pytest.fixture(scope="module")
def qwen_pair():
    target = tiny_model("qwen2", seed=0, layers=3)
    return target, noisy_copy(target, 0.6, 5)


def fill_from_a_verification(session: OuroborosSession) -> None:
    """A chain draft [11, 12, 13] after pending 10; the target's argmax after 10, 11, 12, 13 is
    11, 20, 13, 30: it accepts 11, then corrects 12 to 20; after the rejected 12 it would say 13, then 30."""
    session.chain, session.parents = [11, 12, 13], [-1, 0, 1]
    session.observe_target([10, 11, 12, 13], torch.tensor([[11], [20], [13], [30]]))


def check_target_phrases(pool: PhrasePool) -> None:
    assert pool.get(10, 4) == [(11, 20)]          # the accepted draft, then the correction
    assert pool.get(11, 4) == [(20,)]             # the correction
    assert pool.get(12, 4) == [(13, 30)]          # past the first rejection: the target agrees with 13
    assert pool.get(13, 4) == [(30,)]


def test_the_pool_is_filled_from_the_targets_argmax(qwen_pair):
    drafter = OuroborosDrafter(ModelRunner(qwen_pair[1]))
    session = drafter.start([3, 4, 10], GREEDY, None)
    assert session.target_topk == 1
    fill_from_a_verification(session)
    check_target_phrases(drafter.pool)


def test_a_fill_from_the_draft_is_caught(qwen_pair, monkeypatch):
    def from_the_draft(self, input_tokens, topk_ids):     # broken: the drafter's own next tokens
        for i, key in enumerate(input_tokens[:-1]):
            self.pool.add(key, input_tokens[i + 1:])

    monkeypatch.setattr(OuroborosSession, "observe_target", from_the_draft)
    drafter = OuroborosDrafter(ModelRunner(qwen_pair[1]))
    fill_from_a_verification(drafter.start([3, 4, 10], GREEDY, None))
    with pytest.raises(AssertionError):
        check_target_phrases(drafter.pool)


def test_committed_output_is_pooled_once_complete_and_its_tail_at_close(qwen_pair):
    drafter = OuroborosDrafter(ModelRunner(qwen_pair[1]), pool=PhrasePool(phrase_len=3))
    session = drafter.start([3, 4, 10], GREEDY, None)
    session.update([50, 51, 52], 0)
    assert drafter.pool.get(10, 2) == [(50, 51, 52)] and drafter.pool.get(50, 2) == []
    session.update([53], 0)
    assert drafter.pool.get(50, 2) == [(51, 52, 53)]
    session.close()
    assert drafter.pool.get(51, 2) == [(52, 53)] and drafter.pool.get(53, 2) == []


# ------------------------------------------------------------------ the drafter cache
def check_cache_after_leaving_the_chain(session: OuroborosSession, fresh) -> None:
    """Accept the chain's first token, then a phrase's two tokens that differ from it: the next chain must
    come from the same drafter logits as a fresh session's on the same context."""
    chain = session.propose(4).tokens
    other = [t for t in range(3, 90) if t != chain[1]][:2]
    session.update([chain[0]] + other + [7], 3)
    assert session.cache.lengths[0] <= len(session.context)
    # the drafter's next distribution, from its cache, equals that of a session fed the context afresh
    torch.testing.assert_close(session._first_logits(), fresh(session.context)._first_logits(),
                               atol=1e-4, rtol=1e-4)


def fresh_session(drafter):
    """A session opened on context[:-1] and told context[-1], as the engine opens one (prefill, first token)."""
    def start(context):
        session = drafter.start(context[:-1], GREEDY, None)
        session.update(context[-1:], 0)
        return session
    return start


def test_the_cache_keeps_only_the_accepted_chain_tokens(qwen_pair):
    drafter = OuroborosDrafter(ModelRunner(qwen_pair[1]))
    check_cache_after_leaving_the_chain(fresh_session(drafter)(REPETITIVE[:10]), fresh_session(drafter))


def test_a_crop_to_every_accepted_token_is_caught(qwen_pair, monkeypatch):
    """Broken: the chain drafter's crop (committed + num_accepted) keeps the chain tokens the phrase replaced."""
    drafter = OuroborosDrafter(ModelRunner(qwen_pair[1]))
    session = fresh_session(drafter)(REPETITIVE[:10])
    monkeypatch.setattr(OuroborosSession, "update", _DraftModelSession.update)
    with pytest.raises(AssertionError):
        check_cache_after_leaving_the_chain(session, fresh_session(drafter))


# ------------------------------------------------------------------ the tree rule with mixed nodes
V = 5
# the target after the root, and the drafter's q there: picked (by a search over random pairs) so that
# trying the phrase sibling first biases the first token by ~0.1 (exact: 0.097)
P = torch.tensor([0.15, 0.06, 0.45, 0.13, 0.21])
Q = torch.tensor([0.29, 0.07, 0.05, 0.37, 0.22])


def first_tokens(phrase_first: bool, n: int = 20000) -> torch.Tensor:
    """The first output token's frequencies when the chain's first token c ~ Q is verified beside a
    phrase sibling that depends on it, (c + 1) % V, as propose builds it: merge_into_trie (the chain
    first) and the chain's q row, one-hot rows for phrase nodes. phrase_first: broken order."""
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    target = torch.stack([P] + [torch.full((V,), 1.0 / V)] * 2)          # [3, V]: root, then after each node
    for _ in range(n):
        c = int(torch.multinomial(Q, 1, generator=g))
        sequences = [[c], [(c + 1) % V]]
        tree = merge_into_trie(sequences[::-1] if phrase_first else sequences)
        if phrase_first:        # the same rows, the phrase's first: [one-hot(phrase), Q]
            probs = OuroborosSession._with_one_hot_phrases(Q[None], tree.tokens[::-1]).flip(0)
        else:
            probs = OuroborosSession._with_one_hot_phrases(Q[None], tree.tokens)       # [Q, one-hot(phrase)]
        assert probs[tree.tokens.index(c)].equal(Q)
        res = verify_tree(torch.tensor(tree.tokens), torch.tensor(tree.parents), target, probs, g)
        out = tree.tokens[res.accepted_nodes[0]] if res.accepted_nodes else res.next_token
        counts[out] += 1
    return counts / n


def test_a_sampled_chain_child_then_one_hot_phrase_siblings_keep_the_targets_distribution():
    assert (first_tokens(phrase_first=False) - P).abs().max() < 0.015


def test_phrase_siblings_tried_before_the_sampled_child_are_caught():
    assert (first_tokens(phrase_first=True) - P).abs().max() > 0.05


def sampled_draft(drafter: OuroborosDrafter):
    """A draft at temperature 1 with a phrase of the last committed token in the pool (the chain's
    first token's siblings); returns the draft and the chain's length."""
    session = drafter.start(REPETITIVE[:9], SamplingParams(temperature=1.0, seed=3), torch.Generator().manual_seed(0))
    session.update(REPETITIVE[9:10], 0)
    drafter.pool.add(REPETITIVE[9], [60, 61, 62])
    draft = session.propose(3)
    return draft, len(session.chain)


def check_sampled_rows(draft, m: int) -> None:
    n = len(draft)
    assert draft.parents is not None and n > m and draft.parents[:m] == list(range(-1, m - 1))
    assert draft.probs.shape[0] == n
    for i in range(m):                          # the q the chain token was sampled from: a distribution
        row = draft.probs[i]
        assert row[draft.tokens[i]] > 0 and row.max() < 1 and float(row.sum()) == pytest.approx(1, abs=1e-4)
    for i in range(m, n):                       # phrase nodes: one-hot at their token
        assert draft.probs[i].sum() == 1 and draft.probs[i, draft.tokens[i]] == 1


def test_sampled_drafts_keep_the_chains_q_and_one_hot_phrase_rows(qwen_pair):
    check_sampled_rows(*sampled_draft(OuroborosDrafter(ModelRunner(qwen_pair[1]))))


def test_a_chain_passed_off_as_one_hot_is_caught(qwen_pair, monkeypatch):
    """Broken: every row one-hot, as if the sampled chain were deterministic (the rule would then accept
    its tokens with probability p alone: not the target's distribution)."""
    monkeypatch.setattr(OuroborosSession, "_with_one_hot_phrases", staticmethod(
        lambda chain_probs, tokens: torch.nn.functional.one_hot(torch.tensor(tokens),
                                                                chain_probs.shape[1]).float()))
    with pytest.raises(AssertionError):
        check_sampled_rows(*sampled_draft(OuroborosDrafter(ModelRunner(qwen_pair[1]))))


# ------------------------------------------------------------------ engines
def engine(target, drafter, k=3):
    return SpeculativeEngine(target, drafter, lambda: FixedDraftLength(k), name="ouroboros")


def test_greedy_equals_plain_decoding(target_model, draft_model, prompts):
    """Both conftest families; the tiny drafter and a noisy copy of the target; one pool over the prompt
    set (the later prompts draft from what the earlier ones taught it)."""
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    drafters = {
        "tiny": OuroborosDrafter(ModelRunner(draft_model)),
        "noisy": OuroborosDrafter(ModelRunner(noisy_copy(target_model, 0.3, 5)), candidates=6),
    }
    jobs = prompts + [REPETITIVE]
    refs = [plain.generate(prompt, MAX_NEW).tokens for prompt in jobs]
    for name, drafter in drafters.items():
        runs = []
        for prompt, ref in zip(jobs, refs):
            res = engine(target, drafter).generate(prompt, MAX_NEW)
            assert res.tokens == ref, f"{name} diverged from plain decoding"
            runs.append(res)
        assert_drafted(runs, accepted=True, what=name)
        assert len(drafter.pool) > 0


def second_pass_longest_step(target, drafter, k=2) -> int:
    """Decode REPETITIVE twice with one drafter; the second pass's most tokens accepted in one step."""
    engine(target, drafter, k).generate(REPETITIVE, MAX_NEW)
    res = engine(target, drafter, k).generate(REPETITIVE, MAX_NEW)
    assert_drafted(res)
    return max(res.stats.accepted_lengths)


@pytest.fixture(scope="module")
def bad_drafter(qwen_pair):
    """A heavily perturbed copy of the target: its chains are often wrong."""
    return ModelRunner(noisy_copy(qwen_pair[0], 1.5, 9))


def test_phrases_accept_more_than_the_chain(qwen_pair, bad_drafter):
    """The chain is 2 tokens. With the pool warm, some step accepts more than 2: phrases extended the
    chain and the target took them."""
    assert second_pass_longest_step(ModelRunner(qwen_pair[0]), OuroborosDrafter(bad_drafter)) > 2


def test_a_pool_never_read_is_caught(qwen_pair, bad_drafter, monkeypatch):
    """Negative control: with no phrases a step accepts at most the chain's 2 tokens."""
    monkeypatch.setattr(PhrasePool, "get", lambda self, key, n: [])
    assert second_pass_longest_step(ModelRunner(qwen_pair[0]), OuroborosDrafter(bad_drafter)) <= 2


def test_concurrent_requests_share_one_pool_and_equal_plain(target_model, prompts):
    """Request threads draft from and fill one pool, their target forwards batched by the global verifier."""
    plain = SpeculativeEngine(ModelRunner(target_model))
    jobs = [prompts[i % len(prompts)] + [3 + i] for i in range(6)]
    expected = [plain.generate(p, MAX_NEW).tokens for p in jobs]
    drafter = OuroborosDrafter(ModelRunner(noisy_copy(target_model, 0.3, 5)))
    verifier = GlobalVerifier(ModelRunner(target_model), max_batch=4)
    try:
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda p: engine(verifier, drafter).generate(p, MAX_NEW), jobs))
    finally:
        verifier.close()
    for i, (res, ref) in enumerate(zip(results, expected)):
        assert res.tokens == ref, f"request {i} diverged from plain decoding"
    assert_drafted(results, accepted=True, what="concurrent ouroboros")
    assert verifier.stats.max_rows > 1


def test_strategy_config_builds_the_drafter(qwen_pair):
    cfg = OuroborosStrategy(name="o", kind="ouroboros", drafter="d", pool_keys=10, phrases_per_key=2,
                            phrase_len=3, candidates=5)
    drafter = cfg.make_drafter(ModelRunner(qwen_pair[1]))
    assert (drafter.pool.max_keys, drafter.pool.phrases_per_key, drafter.pool.phrase_len) == (10, 2, 3)
    assert drafter.candidates == 5 and drafter.name == "o"
    with pytest.raises(ValueError):
        OuroborosStrategy(name="o", kind="ouroboros", drafter="d", phrase_length=3)   # unknown key
