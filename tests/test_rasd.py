"""RASD (core/rasd.py, workers/rasd.py, orchestrator/strategies/rasd.py): the fused tree is a correct
prefix-merged tree holding every draft and retrieval path up to the cap; retrieved nodes are scored with
the draft model's own probabilities (checked against the model run from scratch on each node's path) and
pruned by them, the branches skipped before scoring losing no path that full scoring keeps; the
drafter's cache after `update`; greedy output equal to plain decoding; broken versions caught (a merge
without prefix matching, a graft under the wrong parent, an ignored threshold, a scoring forward that
sees the draft tree's nodes, an early pruning that drops deeper nodes or none, a chain drafter's crop)."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch

import core.paths
import core.rasd
import workers.rasd
from core.draft_length import FixedDraftLength
from core.opt_tree import TreeChoice, subtree
from core.rasd import fuse, prune
from core.sampling import SamplingParams
from orchestrator.engine import SpeculativeEngine
from orchestrator.strategies import KINDS
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from tests.test_distribution_paths import model_dir, placed  # noqa: F401 (model_dir: a fixture)
from tests.test_engine import noisy_copy
from tests.test_opt_tree import reference_probs, tree_paths
from workers.drafters import _DraftModelSession
from workers.hierarchy import HierarchyDrafter, build_corpus, save_corpus
from workers.opt_tree import OptTreeDrafter, OptTreeSession
from workers.rasd import RasdDrafter
from workers.runner import ModelRunner


# ------------------------------------------------------------------ fusion (pure)
def random_tree(rng: random.Random, n: int, vocab: int = 4) -> TreeChoice:
    """A random trie of n nodes (distinct siblings), weights falling along each path."""
    tokens, parents, weights, used = [], [], [], set()
    while len(tokens) < n:
        parent = rng.randrange(-1, len(tokens))
        tok = rng.randrange(vocab)
        if (parent, tok) in used:
            continue
        used.add((parent, tok))
        tokens.append(tok)
        parents.append(parent)
        weights.append((weights[parent] if parent >= 0 else 1.0) * rng.uniform(0.2, 1.0))
    return TreeChoice(torch.tensor(tokens), torch.tensor(parents), torch.tensor(weights))


def assert_valid_fusion(trees: list[TreeChoice], fused: TreeChoice, max_nodes: int) -> None:
    """Parents first, distinct siblings, each path once; with room for all, exactly the union of the
    inputs' paths; under the cap, the top `max_nodes` paths by weight (ancestors included)."""
    parents = fused.parents.tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents)), "a parent after its child"
    pairs = list(zip(parents, fused.tokens.tolist()))
    assert len(set(pairs)) == len(pairs), "two siblings carry the same token (prefixes not merged)"
    weight_of: dict[tuple, float] = {}
    for tree in trees:
        for path, w in zip(tree_paths(tree), tree.weights.tolist()):
            weight_of[path] = max(weight_of.get(path, 0.0), w)
    fused_paths = tree_paths(fused)
    assert set(fused_paths) <= set(weight_of), "a fused path that no input tree has (grafted wrongly)"
    assert len(fused) == min(max_nodes, len(weight_of)), "nodes lost below the cap"
    dropped = set(weight_of) - set(fused_paths)
    if dropped:      # every kept path weighs at least any dropped one (weights fall along paths)
        assert min(weight_of[p] for p in fused_paths) >= max(weight_of[p] for p in dropped) - 1e-6
    for path in fused_paths:
        assert path[:-1] == () or path[:-1] in fused_paths, "a node without its parent"


def test_fusion_merges_shared_prefixes_and_grafts_divergent_branches():
    w = torch.tensor
    drafted = TreeChoice(w([7, 1, 3]), w([-1, 0, -1]), w([0.6, 0.3, 0.2]))            # paths 7, 7 1, 3
    retrieved = TreeChoice(w([7, 1, 5, 9]), w([-1, 0, 1, 2]), w([0.6, 0.3, 0.25, 0.2]))  # 7 1 5 9
    fused = fuse([drafted, retrieved], 10)
    assert fused.tokens.tolist() == [7, 1, 3, 5, 9] and fused.parents.tolist() == [-1, 0, -1, 1, 3]
    assert_valid_fusion([drafted, retrieved], fused, 10)
    capped = fuse([drafted, retrieved], 4)            # 9 (0.2) ties 3 (0.2): the earlier node, 3, stays
    assert tree_paths(capped) == [(7,), (7, 1), (3,), (7, 1, 5)]


@pytest.mark.parametrize("seed", range(6))
def test_fusion_of_random_trees_is_a_valid_prefix_merged_tree(seed):
    rng = random.Random(seed)
    trees = [random_tree(rng, 12), random_tree(rng, 9)]
    for cap in (100, 10, 3):
        assert_valid_fusion(trees, core.rasd.fuse(trees, cap), cap)


def concatenated(trees, max_nodes):
    """Broken: the retrieval tree appended beside the draft tree without prefix matching."""
    tokens = torch.cat([t.tokens for t in trees])
    offset = trees[0].tokens.numel()
    second = torch.where(trees[1].parents >= 0, trees[1].parents + offset, trees[1].parents)
    return TreeChoice(tokens, torch.cat([trees[0].parents, second]), torch.cat([t.weights for t in trees]))


def local_parents(trees, max_nodes):
    """Broken: a grafted node's parent taken as its index in its own tree, not its fused node."""
    index, tokens, parents, weights = {}, [], [], []
    for tree in trees:
        for tok, p, w in zip(tree.tokens.tolist(), tree.parents.tolist(), tree.weights.tolist()):
            if (p, tok) not in index:
                index[(p, tok)] = len(tokens)
                tokens.append(tok), parents.append(p), weights.append(w)
    return TreeChoice(torch.tensor(tokens), torch.tensor(parents), torch.tensor(weights))


@pytest.mark.parametrize("broken", [concatenated, local_parents])
def test_a_broken_merge_is_caught(broken, monkeypatch):
    monkeypatch.setattr(core.rasd, "fuse", broken)
    with pytest.raises(AssertionError):
        for seed in range(6):
            test_fusion_of_random_trees_is_a_valid_prefix_merged_tree(seed)


def test_prune_keeps_the_paths_above_the_threshold():
    tree = TreeChoice(torch.tensor([4, 5, 6, 8]), torch.tensor([-1, 0, 1, -1]), torch.tensor([0.9, 0.4, 0.1, 0.3]))
    kept = prune(tree, 0.3)
    assert tree_paths(kept) == [(4,), (4, 5), (8,)] and kept.weights.tolist() == pytest.approx([0.9, 0.4, 0.3])
    assert len(prune(tree, 0.95)) == 0 and len(prune(tree, 0.0)) == 4


# ------------------------------------------------------------------ the drafter on tiny models
PROMPT = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 12, 13, 5, 6, 7]     # "5 6 7" recurs: the context retrieves


@pytest.fixture(scope="module")
def qwen_pair():
    target = tiny_model("qwen2", seed=0, layers=3)
    return target, noisy_copy(target, 0.6, 5)


def rasd(model_or_runner, max_nodes=40, prune_threshold=0.0, sources=("context",), corpus=None, tree_nodes=6,
         width=3, tree_threshold=0.5):
    """max_nodes: the fused tree's; tree_nodes, width, tree_threshold: the draft model's tree's (OPT-Tree);
    retrieval: context n-grams of 1-3 tokens, 4 continuations."""
    runner = model_or_runner if isinstance(model_or_runner, ModelRunner) else ModelRunner(model_or_runner)
    return RasdDrafter(OptTreeDrafter(runner, max_nodes=tree_nodes, width=width, threshold=tree_threshold),
                       HierarchyDrafter(3, 1, 4, corpus=corpus, levels=sources),
                       max_nodes=max_nodes, prune_threshold=prune_threshold)


def started(drafter, prompt=PROMPT):
    session = drafter.start(prompt[:-1], SamplingParams(), None)
    session.update(prompt[-1:], 0)
    return session


def assert_scored_by_the_drafter(model, session, context: list[int]) -> int:
    """Each scored retrieval node's weight is the product, along its path, of the drafter's probabilities
    computed from scratch on the committed context plus the path. Returns nodes checked."""
    _, scored, _, _ = session.last_trees
    for path, w in zip(tree_paths(scored), scored.weights.tolist()):
        expected = 1.0
        for i, tok in enumerate(path):
            expected *= float(reference_probs(model, context + list(path[:i]))[tok])
        assert w == pytest.approx(expected, rel=1e-3, abs=1e-7), f"retrieved path {path}: not the drafter's probability"
    return len(scored)


def assert_pruned_by_threshold(session, threshold: float) -> None:
    """Pruned = the scored nodes at or above the threshold; every retrieval-only node of the fused tree
    is one of them, and the draft tree's nodes all made it (the cap has room)."""
    drafted, scored, pruned, fused = session.last_trees
    above = {p for p, w in zip(tree_paths(scored), scored.weights.tolist()) if w >= threshold}
    assert set(tree_paths(pruned)) == above, "pruning did not follow the drafter's probabilities"
    fused_paths = set(tree_paths(fused))
    assert set(tree_paths(drafted)) <= fused_paths
    assert fused_paths - set(tree_paths(drafted)) <= above, "a retrieved node below the threshold was verified"


def test_retrieval_tree_is_scored_and_pruned_by_the_drafter(qwen_pair):
    _, drafter_model = qwen_pair
    session = started(rasd(drafter_model))
    session.propose(6)
    assert assert_scored_by_the_drafter(drafter_model, session, PROMPT) >= 6      # "8 9 10 11 5 6", "8 12 13 ..."
    weights = sorted(session.last_trees[1].weights.tolist())
    threshold = weights[len(weights) // 2]              # some retrieved nodes below, some above
    session = started(rasd(drafter_model, prune_threshold=threshold))
    session.propose(6)
    drafted, scored, pruned, fused = session.last_trees
    assert 0 < len(pruned) < len(scored)
    assert_pruned_by_threshold(session, threshold)
    assert_valid_fusion([drafted, pruned], fused, 40)


def early_pruning_against_full_scoring(drafter_model, break_early_pruning=lambda: None) -> None:
    """The scoring forward does not feed a branch whose first token is below the threshold already
    (workers/rasd.py: RasdSession._score). The retrieved paths that survive pruning must be exactly those
    whose weight is >= the threshold when every node is scored (threshold 0), with the same weights.

    The corpus offers two continuations of the prompt: the drafter's own greedy one (its weights fall
    slowly) and one starting with the drafter's least likely token; the threshold lies between that
    token's weight and the greedy path's second node's, so a whole branch goes early and deeper nodes stay."""
    prompt = [40, 41, 42, 43, 44, 45]                                    # nothing repeats: corpus only
    greedy = []
    for _ in range(4):
        greedy.append(int(reference_probs(drafter_model, prompt + greedy).argmax()))
    unlikely = [int(reference_probs(drafter_model, prompt).argmin()), 50, 51, 52]
    corpus = build_corpus([prompt[-2:] + greedy, prompt[-2:] + unlikely], ngram_sizes=(2, 1), continuation_tokens=4)
    full = started(rasd(drafter_model, sources=("corpus",), corpus=corpus), prompt)
    full.propose(4)
    scored = full.last_trees[1]
    weight_of = dict(zip(tree_paths(scored), scored.weights.tolist()))
    assert len(weight_of) == 8, "both continuations retrieved and scored in full"
    dropped_early, kept_deep = weight_of[tuple(unlikely[:1])], weight_of[tuple(greedy[:2])]
    assert dropped_early < kept_deep
    threshold = (dropped_early * kept_deep) ** 0.5
    expected = {path for path, w in weight_of.items() if w >= threshold}
    break_early_pruning()
    session = started(rasd(drafter_model, sources=("corpus",), corpus=corpus, prune_threshold=threshold), prompt)
    session.propose(4)
    _, scored_early, pruned, _ = session.last_trees
    kept = dict(zip(tree_paths(pruned), pruned.weights.tolist()))
    assert not expected - set(kept), f"a retrieved path lost: {sorted(expected - set(kept))}"
    assert not set(kept) - expected, f"a path below the threshold kept: {sorted(set(kept) - expected)}"
    for path, w in kept.items():
        assert w == pytest.approx(weight_of[path], rel=1e-4), f"retrieved path {path}: another weight than in full"
    assert set(tree_paths(scored_early)) == set(weight_of) - {tuple(unlikely[:i]) for i in (2, 3, 4)}, (
        "the unlikely branch's deeper nodes were fed (no early pruning)")


def test_early_pruning_keeps_exactly_the_paths_above_the_threshold(qwen_pair):
    early_pruning_against_full_scoring(qwen_pair[1])


@pytest.mark.parametrize("keep, message", [
    (lambda tree, keep: tree.parents < 0, "a retrieved path lost"),         # only first tokens kept
    (lambda tree, keep: torch.ones_like(keep), "no early pruning"),         # every branch fed
], ids=["first-tokens-only", "every-branch-fed"])
def test_a_broken_early_pruning_is_caught(qwen_pair, monkeypatch, keep, message):
    def broken():      # after the full scoring: it is the early-pruned run that must fail
        monkeypatch.setattr(workers.rasd, "subtree", lambda tree, mask: subtree(tree, keep(tree, mask)))
    with pytest.raises(AssertionError, match=message):
        early_pruning_against_full_scoring(qwen_pair[1], broken)


def test_an_ignored_threshold_is_caught(qwen_pair, monkeypatch):
    _, drafter_model = qwen_pair
    monkeypatch.setattr(workers.rasd, "prune", lambda tree, threshold: prune(tree, 0.0))
    session = started(rasd(drafter_model, prune_threshold=0.2))
    session.propose(6)
    with pytest.raises(AssertionError, match="pruning did not follow"):
        assert_pruned_by_threshold(session, 0.2)


def test_a_scoring_forward_that_sees_the_draft_tree_is_caught(qwen_pair, monkeypatch):
    """With the draft tree's cached nodes visible to the retrieval nodes, the from-scratch check fails."""
    _, drafter_model = qwen_pair
    runner = ModelRunner(drafter_model)
    real_forward = runner.forward

    def whole_window(cache, ids, tree_mask=None, **kw):
        if tree_mask is not None:
            tree_mask = tree_mask.clone()
            tree_mask[:, :, : tree_mask.shape[2] - tree_mask.shape[1]] = True
        return real_forward(cache, ids, tree_mask=tree_mask, **kw)
    monkeypatch.setattr(runner, "forward", whole_window)
    session = started(rasd(runner, tree_threshold=0.0))
    session.propose(6)
    assert session.last_growth.layers > 1          # draft tree nodes were cached before the scoring forward
    with pytest.raises(AssertionError, match="not the drafter's probability"):
        assert_scored_by_the_drafter(drafter_model, session, PROMPT)


def test_corpus_retrieval_when_the_context_has_no_match(qwen_pair):
    _, drafter_model = qwen_pair
    prompt = [40, 41, 42, 43]                                       # nothing repeats
    corpus = build_corpus([[50, 42, 43, 60, 61, 62]], ngram_sizes=(2, 1), continuation_tokens=4)
    session = started(rasd(drafter_model, sources=("context", "corpus"), corpus=corpus), prompt)
    session.propose(4)
    assert tree_paths(session.last_trees[1]) == [(60,), (60, 61), (60, 61, 62)]
    assert_scored_by_the_drafter(drafter_model, session, prompt)
    assert {(60,), (60, 61), (60, 61, 62)} <= set(tree_paths(session.last_trees[3]))


def test_cache_after_update_matches_a_fresh_session(qwen_pair):
    """The cache held the draft tree and the scored retrieval nodes; after update the next fused tree
    equals a fresh session's on the same committed context."""
    _, drafter_model = qwen_pair
    drafter = rasd(drafter_model)
    session = started(drafter)
    first = session.propose(6)
    assert len(session.last_trees[1]) > 0
    accepted = [first.tokens[0]]
    session.update(accepted + [8], 1)
    again = session.propose(6)
    fresh = started(drafter, PROMPT + accepted + [8])
    ref = fresh.propose(6)
    assert (again.tokens, again.parents) == (ref.tokens, ref.parents)
    assert torch.allclose(session.last_trees[3].weights, fresh.last_trees[3].weights, atol=1e-5)


def test_a_chain_drafters_crop_is_caught(qwen_pair, monkeypatch):
    monkeypatch.setattr(OptTreeSession, "update", _DraftModelSession.update)
    with pytest.raises(AssertionError):
        test_cache_after_update_matches_a_fresh_session(qwen_pair)


# ------------------------------------------------------------------ through the engine
MAX_NEW = 32


def test_greedy_equals_plain_decoding(target_model, draft_model, prompts):
    """Both conftest families; a capped tree with a threshold, the target drafting for itself, a noisy copy."""
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    expected = [plain.generate(prompt, MAX_NEW).tokens for prompt in prompts]
    drafters = {
        "capped": rasd(draft_model, max_nodes=8, prune_threshold=0.1),
        "self": rasd(target_model, max_nodes=16, prune_threshold=0.05),
        "noisy": rasd(noisy_copy(target_model, 0.3, 5), max_nodes=12, prune_threshold=0.05),
    }
    for name, drafter in drafters.items():
        engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(5), name=name)
        runs = []
        for prompt, tokens in zip(prompts, expected):
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == tokens, f"{name} diverged from plain decoding"
            runs.append(res)
        assert_drafted(runs, accepted=name in ("self", "noisy"), what=name)


def test_retrieval_adds_accepted_tokens(qwen_pair, prompts):
    """A one-node draft tree: what RASD accepts beyond OPT-Tree with the same tree comes from retrieval."""
    target_model, drafter_model = qwen_pair
    target, runner = ModelRunner(target_model), ModelRunner(drafter_model)

    def accepted(drafter):
        engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(6))
        return sum(engine.generate(p, MAX_NEW).stats.accepted_tokens for p in prompts)

    alone = accepted(OptTreeDrafter(runner, max_nodes=1, width=1))
    fused = accepted(rasd(runner, max_nodes=20, tree_nodes=1, width=1))
    assert fused > alone, (fused, alone)


# ------------------------------------------------------------------ config
def test_strategy_config():
    base = {"name": "r", "kind": "rasd", "drafter": "d"}
    cfg = KINDS["rasd"].model_validate(base)
    assert cfg.unavailable() is None and cfg.drafts_by_forward() and cfg.model_refs() == [("drafter", "d")]
    missing = KINDS["rasd"].model_validate({**base, "corpus": "no/such/corpus.pt"})
    assert "does not exist" in missing.unavailable()
    assert missing.corpus == str(Path.cwd() / "no/such/corpus.pt")      # read where the config is loaded
    assert KINDS["rasd"].model_validate({**base, "corpus": "no/such.pt", "sources": ["context"]}).unavailable() is None
    for bad in ({"max_nodes": 0}, {"prune_threshold": 1.5}, {"sources": ["context", "context"]},
                {"min_ngram": 4, "max_ngram": 2}, {"no_such_key": 1}):
        with pytest.raises(ValueError):
            KINDS["rasd"].model_validate({**base, **bad})


# ------------------------------------------------------------------ through Ray: a relative corpus path
RELATIVE_CORPUS = "rasd-corpus/table.pt"        # beside the YAML file, which is in the driver's directory
RAY_PROMPT = [3, 5, 3, 6, 2]
RAY_NEW = 16


@pytest.fixture(scope="module")
def ray_node():
    """A local Ray node of our own, started in the test's directory: its workers run there, not where
    the driver moves later."""
    import ray

    ray.init(num_cpus=12, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-rasd-test")
    yield ray
    ray.shutdown()


def ray_worker_directory(ray) -> Path:
    def working_directory() -> str:         # nested: pickled by value, run in a Ray worker
        return os.getcwd()
    return Path(ray.get(ray.remote(working_directory).remote()))


def relative_corpus_through_ray(ray, model_dir, monkeypatch, name: str) -> None:
    """A RASD strategy whose corpus is a path relative to the YAML file and the driver's directory, placed
    through Ray with the drafter in its actor (a Ray worker in another directory): the actor loads the
    corpus the driver checked, the output equals plain greedy decoding, and the corpus adds accepted
    tokens (it holds the target's own continuation) over the same strategy without one."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", torch_dtype=torch.float32).eval()
    expected = SpeculativeEngine(ModelRunner(target)).generate(RAY_PROMPT, RAY_NEW).tokens
    (model_dir / RELATIVE_CORPUS).parent.mkdir(exist_ok=True)
    save_corpus(build_corpus([RAY_PROMPT + expected], ngram_sizes=(3, 2, 1), continuation_tokens=4),
                model_dir / RELATIVE_CORPUS)
    worker_dir = ray_worker_directory(ray)
    assert worker_dir != model_dir and not (worker_dir / RELATIVE_CORPUS).exists()   # only the driver's resolves
    monkeypatch.chdir(model_dir)
    common = {"kind": "rasd", "drafter": "d", "sources": ["corpus"], "max_nodes": 8, "draft_nodes": 1, "width": 1,
              "min_ngram": 1, "prune_threshold": 0.0, "draft_length": {"policy": "fixed", "k": 4}}
    built, runtime = placed(model_dir, name, [{"name": "with-corpus", "corpus": RELATIVE_CORPUS, **common},
                                              {"name": "no-corpus", **common}])
    try:
        runs = {s: built.engines[s].generate(RAY_PROMPT, RAY_NEW) for s in ("plain", "with-corpus", "no-corpus")}
    finally:
        runtime.shutdown()
    for strategy, res in runs.items():
        assert res.tokens == expected, f"{strategy} through Ray diverged from plain greedy decoding"
    assert runs["with-corpus"].stats.accepted_tokens > runs["no-corpus"].stats.accepted_tokens


def test_ray_actor_reads_a_relative_corpus_as_the_driver_does(ray_node, model_dir, monkeypatch):
    relative_corpus_through_ray(ray_node, model_dir, monkeypatch, "rasd-relative")


def test_a_corpus_path_resolved_in_the_actor_is_caught(ray_node, model_dir, monkeypatch):
    """Broken: the driver ships the relative path, so the actor resolves it against its own directory."""
    monkeypatch.setattr(core.paths, "absolute_path", lambda path: path)
    read_there = ray_worker_directory(ray_node) / RELATIVE_CORPUS
    with pytest.raises(ray_node.exceptions.RayActorError, match=re.escape(f"corpus '{read_there}' does not exist")):
        relative_corpus_through_ray(ray_node, model_dir, monkeypatch, "rasd-relative-broken")
