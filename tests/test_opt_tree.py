"""OPT-Tree (core/opt_tree.py, workers/opt_tree.py): the tree's construction on hand-made distributions,
the drafter's tree forwards against the model run on each node's whole path, the cache across steps,
greedy output equal to plain decoding, more accepted tokens than a chain, and broken versions caught."""
from __future__ import annotations

import itertools

import pytest
import torch

from core.draft_length import FixedDraftLength
from core.opt_tree import OptTreeGrowth
from core.sampling import SamplingParams
from orchestrator.engine import SpeculativeEngine
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from tests.test_engine import noisy_copy
from workers.drafters import DraftModelDrafter, _DraftModelSession
from workers.opt_tree import OptTreeDrafter, OptTreeSession
from workers.runner import ModelRunner

V = 6


def table(seed: int, peak: float = 3.0):
    """A hand-made 'drafter': path (tuple of tokens) -> next-token probabilities [V], random but fixed
    per path, peaked so the weights spread over several orders of magnitude."""
    def probs(path: tuple) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + hash(path) % 1_000_003)
        return torch.softmax(torch.randn(V, generator=g) * peak, dim=-1)
    return probs


def grow(probs, **kw) -> OptTreeGrowth:
    """Grow a tree with `probs` standing in for the drafter; every frontier row from its node's own path."""
    growth = OptTreeGrowth(**kw)
    frontier = growth.start(probs(()))
    while frontier.numel():
        frontier = growth.grow(torch.stack([probs(path_of(growth, n)) for n in frontier.tolist()]))
    return growth


def path_of(growth, node: int) -> tuple:
    path = []
    while node >= 0:
        path.append(int(growth.tokens[node]))
        node = int(growth.parents[node])
    return tuple(reversed(path))


def tree_paths(tree) -> list[tuple]:
    paths: list[tuple] = []
    for tok, parent in zip(tree.tokens.tolist(), tree.parents.tolist()):
        paths.append((paths[parent] if parent >= 0 else ()) + (tok,))
    return paths


def path_weight(probs, path: tuple) -> float:
    w = 1.0
    for i, tok in enumerate(path):
        w *= float(probs(path[:i])[tok])
    return w


# ------------------------------------------------------------------ construction (pure)
@pytest.mark.parametrize("seed", range(4))
def test_tree_is_the_global_top_nodes_of_the_full_tree(seed):
    """With every child offered (width = V) and no threshold, the result is exactly the max_nodes paths of
    highest weight among all V + V^2 + V^3 paths of depth <= 3: the frontier pruning loses nothing."""
    probs = table(seed)
    growth = grow(probs, max_nodes=12, threshold=0.0, max_depth=3, width=V)
    tree = growth.result()
    every = [p for d in (1, 2, 3) for p in itertools.product(range(V), repeat=d)]
    best = sorted(every, key=lambda p: -path_weight(probs, p))[:12]
    assert set(tree_paths(tree)) == set(best)
    # weights are products of the probabilities along the path
    for path, w in zip(tree_paths(tree), tree.weights.tolist()):
        assert w == pytest.approx(path_weight(probs, path), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_tree_is_valid_parents_first_distinct_siblings(seed):
    tree = grow(table(seed, peak=1.0), max_nodes=20, threshold=0.0, max_depth=6, width=4).result()
    assert len(tree) == 20
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    for i, p in enumerate(parents):
        assert -1 <= p < i                                                  # ancestors kept, listed first
        if p >= 0:
            assert tree.weights[p] >= tree.weights[i]
    siblings = {}
    for tok, p in zip(tokens, parents):
        assert tok not in siblings.setdefault(p, set()), "two siblings carry the same token"
        siblings[p].add(tok)


def test_each_layer_keeps_its_top_width_candidates():
    probs = table(7, peak=1.0)
    growth = grow(probs, max_nodes=50, threshold=0.0, max_depth=4, width=3)
    for d in range(1, growth.layers + 1):
        layer = (growth.depths == d).nonzero().flatten()
        assert layer.numel() <= 3
    # layer 2 = the 3 best of (3 parents x 3 children) by weight
    firsts = (growth.depths == 1).nonzero().flatten().tolist()
    cands = sorted((path_weight(probs, path_of(growth, n) + (t,)), path_of(growth, n) + (t,))
                   for n in firsts for t in probs(path_of(growth, n)).topk(3).indices.tolist())
    second = {path_of(growth, n) for n in (growth.depths == 2).nonzero().flatten().tolist()}
    assert second == {p for _, p in cands[-3:]}


def test_growth_stops_when_a_layer_gains_less_than_the_threshold():
    """A drafter sure of every token (p = 0.9 on one token) gains 0.9^d at depth d: with threshold 0.5 the
    layers of gain 0.9, 0.81, ..., 0.531 are grown and the first below 0.5 (0.478, depth 7) ends growth."""
    def sure(path):
        p = torch.full((V,), 0.1 / (V - 1))
        p[len(path) % V] = 0.9
        return p
    growth = grow(sure, max_nodes=60, threshold=0.5, max_depth=10)
    assert growth.layers == 7
    assert growth.gains[-1] < 0.5 <= min(growth.gains[:-1])
    assert growth.result().tokens.tolist()[:1] == [0]
    # max_depth bounds it first
    assert grow(sure, max_nodes=60, threshold=0.5, max_depth=3).layers == 3
    # and a flat drafter's second layer gains little: one layer plus what beat the first layer's tail
    flat = grow(lambda path: torch.full((V,), 1.0 / V), max_nodes=V, threshold=0.5, max_depth=10)
    assert flat.layers == 2 and flat.gains[1] == pytest.approx(0.0)


def test_ties_keep_ancestors():
    """p = 1 makes a child's weight equal its parent's: the tie goes to the parent, the tree stays valid."""
    def certain(path):
        p = torch.zeros(V)
        p[(len(path) + 1) % V] = 1.0
        return p
    tree = grow(certain, max_nodes=3, threshold=0.0, max_depth=10, width=V).result()
    assert tree.tokens.tolist() == [1, 2, 3] and tree.parents.tolist() == [-1, 0, 1]


# ------------------------------------------------------------------ the drafter on tiny models
@pytest.fixture(scope="module")
def qwen_pair():
    """The conftest qwen2 target and a noisy copy of it as drafter (agrees often, not always)."""
    target = tiny_model("qwen2", seed=0, layers=3)
    return target, noisy_copy(target, 0.6, 5)


def reference_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


def assert_weights_match_full_paths(model, session: OptTreeSession, context: list[int]) -> int:
    """Every tree node's weight / its parent's = the model's probability of its token after the
    committed context plus the node's path, run from scratch: the tree forwards (masks, positions,
    the cached window) computed each node's distribution from its own ancestors. Returns nodes checked."""
    g = session.last_growth
    checked = 0
    for node in range(g.tokens.numel()):
        parent = int(g.parents[node])
        path = path_of(g, node)
        p = float(reference_probs(model, context + list(path[:-1]))[path[-1]])
        base = float(g.weights[parent]) if parent >= 0 else 1.0
        assert float(g.weights[node]) == pytest.approx(base * p, rel=1e-3, abs=1e-7), (
            f"node {node} (depth {len(path)}): weight not from its own path's distribution")
        checked += 1
    return checked


def test_tree_forwards_compute_each_nodes_own_distribution(qwen_pair):
    target, drafter_model = qwen_pair
    prompt = list(range(10, 25))
    session = OptTreeDrafter(ModelRunner(drafter_model), max_nodes=24, threshold=0.0, max_depth=4,
                             width=6).start(prompt[:-1], SamplingParams(), None)
    session.update(prompt[-1:], 0)
    draft = session.propose(4)
    assert draft.probs is None and session.last_growth.layers == 4         # 4 layers of 6 nodes
    assert assert_weights_match_full_paths(drafter_model, session, prompt) == 24


def test_cache_after_update_matches_a_fresh_session(qwen_pair):
    """After a step (tree fed, some of it accepted), the next tree equals a fresh session's on the same
    committed context: update dropped every tree node from the drafter's cache."""
    target, drafter_model = qwen_pair
    runner = ModelRunner(drafter_model)
    drafter = OptTreeDrafter(runner, max_nodes=16, threshold=0.0, max_depth=3, width=4)
    prompt = list(range(30, 42))
    session = drafter.start(prompt[:-1], SamplingParams(), None)
    session.update(prompt[-1:], 0)
    first = session.propose(3)
    child = first.parents.index(0)                 # node 0's first child: a path of depth 2 ...
    accepted = [first.tokens[0], first.tokens[child]]
    session.update(accepted + [7], 2)              # ... accepted, then a recovered token
    again = session.propose(3)
    fresh = drafter.start(prompt + accepted, SamplingParams(), None)
    fresh.update([7], 0)
    ref = fresh.propose(3)
    assert (again.tokens, again.parents) == (ref.tokens, ref.parents)
    assert torch.allclose(session.last_growth.weights, fresh.last_growth.weights, atol=1e-5)


# ------------------------------------------------------------------ broken versions are caught
def test_a_tree_built_from_the_wrong_parents_logits_is_caught(qwen_pair, monkeypatch):
    """Rolling the frontier's rows (each node's children from its neighbour's distribution) fails the
    full-path check of test_tree_forwards_compute_each_nodes_own_distribution."""
    target, drafter_model = qwen_pair
    real_grow = OptTreeGrowth.grow
    monkeypatch.setattr(OptTreeGrowth, "grow",
                        lambda self, probs, _root=False: real_grow(self, probs if _root else probs.roll(1, 0), _root))
    prompt = list(range(10, 25))
    session = OptTreeDrafter(ModelRunner(drafter_model), max_nodes=24, threshold=0.0, max_depth=4,
                             width=6).start(prompt[:-1], SamplingParams(), None)
    session.update(prompt[-1:], 0)
    session.propose(4)
    with pytest.raises(AssertionError, match="weight not from its own path"):
        assert_weights_match_full_paths(drafter_model, session, prompt)


def test_a_tree_forward_that_sees_every_earlier_node_is_caught(qwen_pair, monkeypatch):
    """Without the cached window in the mask (each layer attending every earlier tree node, not only its
    ancestors) the full-path check fails."""
    target, drafter_model = qwen_pair
    runner = ModelRunner(drafter_model)
    real_forward = runner.forward

    def no_window(cache, ids, tree_mask=None, **kw):
        if tree_mask is not None:
            tree_mask = tree_mask[:, :, tree_mask.shape[1] - tree_mask.shape[2]:]   # the new tokens' block only
        return real_forward(cache, ids, tree_mask=tree_mask, **kw)
    monkeypatch.setattr(runner, "forward", no_window)
    prompt = list(range(10, 25))
    session = OptTreeDrafter(runner, max_nodes=24, threshold=0.0, max_depth=4, width=6).start(
        prompt[:-1], SamplingParams(), None)
    session.update(prompt[-1:], 0)
    session.propose(4)
    with pytest.raises(AssertionError, match="weight not from its own path"):
        assert_weights_match_full_paths(drafter_model, session, prompt)


def test_a_chain_drafters_crop_is_caught(qwen_pair, monkeypatch):
    """A chain drafter's update (keep the committed tokens plus the first `num_accepted` drafted slots)
    leaves tree nodes that are not the accepted path in the cache (slots follow layers, not paths):
    the fresh-session comparison fails."""
    monkeypatch.setattr(OptTreeSession, "update", _DraftModelSession.update)
    with pytest.raises(AssertionError):
        test_cache_after_update_matches_a_fresh_session(qwen_pair)


# ------------------------------------------------------------------ through the engine
MAX_NEW = 32


def prompt_set():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 17, 33)]


def test_greedy_equals_plain_decoding(target_model, draft_model):
    """Both conftest families; a small tree, the paper's defaults, and the target drafting for itself."""
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    drafters = {
        "small": OptTreeDrafter(ModelRunner(draft_model), max_nodes=8, width=4, max_depth=4),
        "paper": OptTreeDrafter(ModelRunner(draft_model)),
        "self": OptTreeDrafter(ModelRunner(target_model), threshold=0.0),
        "noisy-vocab": OptTreeDrafter(ModelRunner(noisy_copy(target_model, 0.3, 5)), draft_vocab=40),
    }
    for name, drafter in drafters.items():
        engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(5), name=name)
        runs = []
        for prompt in prompt_set():
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == plain.generate(prompt, MAX_NEW).tokens, f"{name} diverged from plain decoding"
            runs.append(res)
        assert_drafted(runs, accepted=name in ("self", "noisy-vocab"), what=name)


def test_more_tokens_per_step_than_a_chain_of_the_same_depth(qwen_pair):
    """The noisy drafter's top token is often not the target's: a chain of 5 rarely survives its first
    token, the tree (depth <= 5) often holds the target's token among its siblings."""
    target_model, drafter_model = qwen_pair
    target, runner = ModelRunner(target_model), ModelRunner(drafter_model)
    plain = SpeculativeEngine(target)

    def accepted_per_step(drafter):
        engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(5))
        acc = steps = 0
        for prompt in prompt_set():
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == plain.generate(prompt, MAX_NEW).tokens
            acc, steps = acc + res.stats.accepted_tokens, steps + res.stats.steps
        return acc / steps

    tree, chain = accepted_per_step(OptTreeDrafter(runner)), accepted_per_step(DraftModelDrafter(runner))
    assert tree > chain + 0.5, (tree, chain)


def test_sampled_drafts_are_deterministic_trees(qwen_pair):
    """Temperature > 0: nodes chosen from the warped distribution, q one-hot (probs None); seeded
    requests reproduce."""
    target_model, drafter_model = qwen_pair
    engine = SpeculativeEngine(ModelRunner(target_model), OptTreeDrafter(ModelRunner(drafter_model), max_nodes=16),
                               lambda: FixedDraftLength(4))
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3)
    a, b = engine.generate(prompt_set()[1], 16, params), engine.generate(prompt_set()[1], 16, params)
    assert a.tokens == b.tokens and a.stats.drafted_tokens > 0 and not a.stats.events
    session = OptTreeDrafter(ModelRunner(drafter_model), max_nodes=16).start([5, 6, 7], params, None)
    session.update([8], 0)
    draft = session.propose(4)
    assert draft.probs is None and draft.parents is not None and len(draft) == 16


def test_tree_forwards_batched_with_other_requests(qwen_pair):
    """The drafter actor's batching queue (GlobalVerifier, batch_drafting) packs concurrent requests' tree
    forwards into one ragged forward: each request's tree is the one it grows alone."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.global_verifier import GlobalVerifier

    _, drafter_model = qwen_pair
    runner = ModelRunner(drafter_model)
    prompts = prompt_set()

    def trees(drafter) -> list:
        def one(prompt):
            session = drafter.start(prompt[:-1], SamplingParams(), None)
            session.update(prompt[-1:], 0)
            out = []
            for _ in range(2):
                draft = session.propose(3)
                out.append((draft.tokens, draft.parents))
                session.update([draft.tokens[0], 5], 1)
            return out
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(one, prompts))

    queue = GlobalVerifier(runner, max_batch=4, name="draft-batcher")
    try:
        batched = trees(OptTreeDrafter(queue, max_nodes=12, width=4, threshold=0.0))
    finally:
        queue.close()
    assert queue.stats.max_rows > 1
    assert batched == trees(OptTreeDrafter(runner, max_nodes=12, width=4, threshold=0.0))
