"""Tests for core.sampling and core.verification.

The statistical tests run a toy target and draft many times and check with a chi-square test that the
emitted tokens follow the target distribution (the lossless property). The same check is run on
deliberately wrong rules to show that it has the power to catch them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from core.sampling import SamplingParams, make_generator, sample, warp_probs
from core.verification import (
    ChainResult,
    TreeResult,
    verify_chain,
    verify_greedy,
    verify_greedy_batch,
    verify_siblings,
    verify_tree,
    verify_tree_greedy,
)

# ---------------------------------------------------------------------------------------------------
# Statistical helper, shared by the positive and the negative (power) tests
# ---------------------------------------------------------------------------------------------------

P_VALUE_THRESHOLD = 1e-3  # reject "samples follow expected_probs" below this
NUM_SAMPLES = 12_000  # the wrong rules below score p < 1e-100 at this size; keeps the file ~30 s
VOCAB = 6


def chi_square_p_value(samples: Tensor, expected_probs: Tensor) -> float:
    """Pearson goodness-of-fit p-value of category ids against expected probabilities.

    samples: [n] long category ids; expected_probs: [categories].
    Categories expected fewer than 5 times are pooled into one, as the chi-square approximation needs.
    """
    n = samples.numel()
    observed = torch.bincount(samples, minlength=expected_probs.numel()).double()  # [categories]
    expected = expected_probs.double() / expected_probs.double().sum() * n  # [categories]
    if (observed[expected == 0] > 0).any():
        return 0.0  # an impossible outcome happened
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = observed.numel() - 1
    # chi-square survival function: Q(dof / 2, statistic / 2), the regularised upper incomplete gamma
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def check_first_two_tokens(first_two: Tensor, p_first: Tensor, p_second: Tensor) -> tuple[float, float]:
    """p-values for the first emitted token and for the joint of the first two.

    first_two: [n, 2] long emitted tokens; p_first: [vocab] target at the first position;
    p_second: [vocab, vocab], row x = target for the second position after x.
    """
    vocab = p_first.numel()
    first = chi_square_p_value(first_two[:, 0], p_first)
    joint_probs = (p_first.unsqueeze(1) * p_second).reshape(-1)  # [vocab * vocab]
    joint = chi_square_p_value(first_two[:, 0] * vocab + first_two[:, 1], joint_probs)
    return first, joint


# ---------------------------------------------------------------------------------------------------
# Toy models: position-dependent Markov tables, p and q independent so they differ substantially
# ---------------------------------------------------------------------------------------------------

ROOT_TOKEN = 0


def random_tables(generator: torch.Generator, depth: int, sharpness: float = 2.0) -> Tensor:
    """[depth, vocab, vocab]: table[d, prev] = distribution after a token ``prev`` at depth d."""
    return (torch.randn(depth, VOCAB, VOCAB, generator=generator) * sharpness).softmax(dim=-1)


def gumbel_top_k(q: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """m tokens drawn without replacement from q, in draw order. q: [n, vocab] -> [n, m]."""
    u = torch.rand(q.shape, generator=generator).clamp(1e-12, 1 - 1e-12)
    return (q.log() - (-u.log()).log()).topk(m, dim=-1).indices


def draft_tree(
    parents: list[int], target: Tensor, drafts: list[Tensor], n: int, generator: torch.Generator,
    without_replacement: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw n draft trees of a fixed shape, vectorised over the n samples.

    target: [depth, vocab, vocab]; drafts: list of such tables, sibling j uses drafts[j % len(drafts)]
    (or drafts[0] for all siblings, drawn by Gumbel-top-k, when without_replacement).
    Returns tokens [n, nodes], draft_probs [n, nodes, vocab], target_probs [n, nodes+1, vocab].
    """
    nodes = len(parents)
    depth = [0] * nodes  # depth of the node's parent: 0 for the root's children
    for i, parent in enumerate(parents):
        depth[i] = 0 if parent < 0 else depth[parent] + 1
    tokens = torch.empty(n, nodes, dtype=torch.long)
    draft_probs = torch.empty(n, nodes, VOCAB)
    for parent in range(-1, nodes):  # parents come before their children
        kids = [i for i, par in enumerate(parents) if par == parent]
        if not kids:
            continue
        prev = torch.full((n,), ROOT_TOKEN) if parent < 0 else tokens[:, parent]  # [n]
        d = depth[kids[0]]
        if without_replacement:
            q = drafts[0][d, prev]  # [n, vocab]
            drawn = gumbel_top_k(q, len(kids), generator)  # [n, m]
            for j, kid in enumerate(kids):
                tokens[:, kid], draft_probs[:, kid] = drawn[:, j], q
        else:
            for j, kid in enumerate(kids):
                q = drafts[j % len(drafts)][d, prev]  # [n, vocab]
                tokens[:, kid] = torch.multinomial(q, 1, generator=generator).squeeze(1)
                draft_probs[:, kid] = q
    target_probs = torch.empty(n, nodes + 1, VOCAB)
    target_probs[:, 0] = target[0, ROOT_TOKEN]
    for i in range(nodes):
        target_probs[:, i + 1] = target[depth[i] + 1, tokens[:, i]]
    return tokens, draft_probs, target_probs


def complete_second_token(
    emitted: list[list[int]], target: Tensor, generator: torch.Generator
) -> Tensor:
    """[n, 2] first two output tokens. A step that emitted one token is continued by sampling the
    target directly: a fresh step's first token follows p (tested separately), so the joint then
    tests the second token conditional on the first inside one step."""
    first = torch.tensor([out[0] for out in emitted])
    second = torch.multinomial(target[1, first], 1, generator=generator).squeeze(1)  # [n]
    for s, out in enumerate(emitted):
        if len(out) > 1:
            second[s] = out[1]
    return torch.stack([first, second], dim=1)


# ---------------------------------------------------------------------------------------------------
# Deliberately wrong rules (must be rejected by the statistical check)
# ---------------------------------------------------------------------------------------------------


def wrong_chain_recovered_from_p(draft_tokens, draft_probs, target_probs, generator) -> ChainResult:
    """Bug: the recovered token is sampled from p instead of norm(max(0, p - q))."""
    k = draft_tokens.shape[0]
    u = torch.rand(k, generator=generator)
    for i in range(k):
        x = int(draft_tokens[i])
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if not u[i] * q_x < target_probs[i, x]:
            return ChainResult(i, int(sample(target_probs[i], generator)))
    return ChainResult(k, int(sample(target_probs[k], generator)))


def wrong_siblings_no_update(candidates, target_probs, draft_probs, generator, without_replacement=False):
    """Bug: p is not replaced by the residual after a rejection (each sibling tested against p)."""
    u = torch.rand(candidates.shape[0], generator=generator)
    for j, c in enumerate(candidates.tolist()):
        q_c = 1.0 if draft_probs is None else float(draft_probs[j, c])
        if u[j] * q_c < target_probs[c]:
            return j, target_probs
    last_q = draft_probs[-1]
    residual = (target_probs - last_q).clamp_min(0)
    return -1, residual / residual.sum()


def wrong_siblings_ignore_without_replacement(candidates, target_probs, draft_probs, generator,
                                              without_replacement=False):
    """Bug: Gumbel-top-k siblings verified as if drawn independently (q never loses drawn tokens)."""
    return verify_siblings(candidates, target_probs, draft_probs, generator, without_replacement=False)


# ---------------------------------------------------------------------------------------------------
# Statistical runs
# ---------------------------------------------------------------------------------------------------


def run_chain(verify_fn, k: int, deterministic: bool, seed: int) -> tuple[float, float]:
    """Run a chain step NUM_SAMPLES times; p-values of first token and first-two joint."""
    generator = torch.Generator().manual_seed(seed)
    target = random_tables(generator, k + 1)
    draft = random_tables(generator, k)
    parents = [-1] + list(range(k - 1))  # a chain is a tree with one child per node
    tokens, draft_probs, target_probs = draft_tree(parents, target, [draft], NUM_SAMPLES, generator)
    emitted = []
    for s in range(NUM_SAMPLES):
        # Deterministic drafts: the rule is exact for any draft token chosen independently of the
        # verifier's randomness, so random drafts verified as one-hot cover many draft paths.
        result = verify_fn(tokens[s], None if deterministic else draft_probs[s], target_probs[s], generator)
        emitted.append(tokens[s, : result.num_accepted].tolist() + [result.next_token])
    first_two = complete_second_token(emitted, target, generator)
    return check_first_two_tokens(first_two, target[0, ROOT_TOKEN], target[1])


def run_tree(verify_fn, parents: list[int], without_replacement: bool, seed: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(seed)
    depth = len(parents) + 1
    target = random_tables(generator, depth)
    drafts = [random_tables(generator, depth) for _ in range(2)]
    tokens, draft_probs, target_probs = draft_tree(
        parents, target, drafts, NUM_SAMPLES, generator, without_replacement
    )
    parents_tensor = torch.tensor(parents)
    emitted = []
    for s in range(NUM_SAMPLES):
        result = verify_fn(tokens[s], parents_tensor, target_probs[s], draft_probs[s], generator,
                           without_replacement=without_replacement)
        emitted.append(tokens[s, result.accepted_nodes].tolist() + [result.next_token])
    first_two = complete_second_token(emitted, target, generator)
    return check_first_two_tokens(first_two, target[0, ROOT_TOKEN], target[1])


def run_siblings(verify_fn, mode: str, seed: int) -> float:
    """One node with m = 3 siblings; p-value of the emitted token against p.

    modes: "independent" (c_j ~ q_j), "one_hot" (fixed candidates with a duplicate, q = None),
    "mixed" (sampled siblings around a one-hot one, as in a fused tree),
    "without_replacement" (Gumbel-top-3 from one q).
    """
    generator = torch.Generator().manual_seed(seed)
    m, n = 3, NUM_SAMPLES
    p = (torch.randn(VOCAB, generator=generator) * 2).softmax(dim=-1)  # [vocab]
    qs = (torch.randn(m, VOCAB, generator=generator) * 2).softmax(dim=-1)  # [m, vocab]
    without_replacement = mode == "without_replacement"
    draft_probs = qs.expand(n, m, VOCAB).clone()  # [n, m, vocab]
    if mode == "without_replacement":
        draft_probs[:] = qs[0]
        candidates = gumbel_top_k(qs[0].expand(n, VOCAB), m, generator)  # [n, m]
    else:
        candidates = torch.multinomial(qs, n, replacement=True, generator=generator).T  # [n, m]
    if mode == "one_hot":
        candidates = torch.tensor([p.argmax(), p.argmin(), p.argmax()]).expand(n, m)
        draft_probs = None
    if mode == "mixed":
        fixed = int(p.argmin())  # a token p dislikes, to make errors visible
        candidates = candidates.clone()
        candidates[:, 1] = fixed
        draft_probs[:, 1] = torch.nn.functional.one_hot(torch.tensor(fixed), VOCAB).float()
    out = torch.empty(n, dtype=torch.long)
    for s in range(n):
        q = None if draft_probs is None else draft_probs[s]
        j, residual = verify_fn(candidates[s], p, q, generator, without_replacement)
        out[s] = candidates[s, j] if j >= 0 else sample(residual, generator)
    return chi_square_p_value(out, p)


TREE_PARENTS = [-1, -1, 0, 0, 1, 2]  # root -> {0, 1}; 0 -> {2, 3}; 1 -> {4}; 2 -> {5}


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled_drafts", "one_hot_drafts"])
def test_chain_matches_target_distribution(deterministic):
    first, joint = run_chain(verify_chain, k=3, deterministic=deterministic, seed=1)
    assert first >= P_VALUE_THRESHOLD and joint >= P_VALUE_THRESHOLD, (first, joint)


@pytest.mark.parametrize("mode", ["independent", "one_hot", "mixed", "without_replacement"])
def test_siblings_match_target_distribution(mode):
    p_value = run_siblings(verify_siblings, mode, seed=2)
    assert p_value >= P_VALUE_THRESHOLD, p_value


@pytest.mark.parametrize("without_replacement", [False, True], ids=["independent", "without_replacement"])
def test_tree_matches_target_distribution(without_replacement):
    first, joint = run_tree(verify_tree, TREE_PARENTS, without_replacement, seed=3)
    assert first >= P_VALUE_THRESHOLD and joint >= P_VALUE_THRESHOLD, (first, joint)


def test_check_catches_chain_recovered_from_p():
    first, joint = run_chain(wrong_chain_recovered_from_p, k=3, deterministic=False, seed=1)
    assert first < P_VALUE_THRESHOLD, first


@pytest.mark.parametrize(
    "wrong_rule, mode",
    [(wrong_siblings_no_update, "independent"),
     (wrong_siblings_ignore_without_replacement, "without_replacement")],
    ids=["no_p_update", "ignores_without_replacement"],
)
def test_check_catches_wrong_siblings_rules(wrong_rule, mode):
    p_value = run_siblings(wrong_rule, mode, seed=2)
    assert p_value < P_VALUE_THRESHOLD, p_value


def test_chi_square_p_value_sanity():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2])
    samples = torch.multinomial(probs, 30_000, replacement=True, generator=generator)
    assert chi_square_p_value(samples, probs) > 0.01
    assert chi_square_p_value(samples, torch.tensor([0.45, 0.35, 0.2])) < 1e-6
    assert chi_square_p_value(torch.tensor([0, 1, 2]), torch.tensor([0.5, 0.5, 0.0])) == 0.0


# ---------------------------------------------------------------------------------------------------
# Greedy
# ---------------------------------------------------------------------------------------------------


def logits_for(targets: list[int], vocab: int = 8) -> Tensor:
    """[len(targets), vocab] logits whose argmax row i is targets[i]."""
    logits = torch.zeros(len(targets), vocab)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


@pytest.mark.parametrize(
    "draft, targets, expected",
    [
        ([3, 1, 4], [3, 1, 4, 7], ChainResult(3, 7)),  # all accepted -> bonus
        ([3, 1, 4], [2, 1, 4, 7], ChainResult(0, 2)),  # first rejected
        ([3, 1, 4], [3, 5, 4, 7], ChainResult(1, 5)),  # middle rejected; later match ignored
        ([3, 1, 4], [3, 1, 6, 7], ChainResult(2, 6)),  # last rejected
        ([], [5], ChainResult(0, 5)),  # k = 0: plain decoding
    ],
)
def test_verify_greedy(draft, targets, expected):
    assert verify_greedy(torch.tensor(draft, dtype=torch.long), logits_for(targets)) == expected


def test_verify_greedy_breaks_ties_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]])
    assert verify_greedy(torch.tensor([1]), logits) == ChainResult(1, 0)
    assert verify_greedy(torch.tensor([2]), logits) == ChainResult(0, 1)


def test_verify_greedy_batch_matches_per_row():
    generator = torch.Generator().manual_seed(0)
    batch, k, vocab = 64, 5, 4  # small vocab so prefixes match often
    logits = torch.randn(batch, k + 1, vocab, generator=generator)
    draft = logits[:, :k].argmax(-1)
    noise = torch.rand(batch, k, generator=generator) < 0.3  # break some matches
    draft = torch.where(noise, torch.randint(0, vocab, (batch, k), generator=generator), draft)
    draft_lens = torch.randint(0, k + 1, (batch,), generator=generator)
    draft = torch.where(torch.arange(k) < draft_lens[:, None], draft, -1)  # padding never matches anyway
    num_accepted, next_tokens = verify_greedy_batch(draft, draft_lens, logits)
    for b in range(batch):
        length = int(draft_lens[b])
        expected = verify_greedy(draft[b, :length], logits[b, : length + 1])
        assert (int(num_accepted[b]), int(next_tokens[b])) == (expected.num_accepted, expected.next_token)
    assert num_accepted.max() > 0 and (num_accepted < draft_lens).any()  # both cases exercised


def test_verify_chain_greedy_equals_verify_greedy():
    generator = torch.Generator().manual_seed(1)
    greedy = SamplingParams()
    for _ in range(50):
        k = int(torch.randint(0, 5, (1,), generator=generator))
        logits = torch.randn(k + 1, 3, generator=generator)
        draft = torch.randint(0, 3, (k,), generator=generator)
        draft_probs = warp_probs(torch.randn(k, 3, generator=generator), SamplingParams(temperature=1.0))
        draft_probs[torch.arange(k), draft] += 0.1  # drafts must have q > 0 under their q
        expected = verify_greedy(draft, logits)
        target_probs = warp_probs(logits, greedy)
        assert verify_chain(draft, None, target_probs, generator) == expected
        assert verify_chain(draft, draft_probs / draft_probs.sum(-1, keepdim=True), target_probs,
                            generator) == expected


def random_tree(generator: torch.Generator, n: int, vocab: int) -> tuple[Tensor, Tensor]:
    """tokens [n], parents [n] of a random trie (siblings carry distinct tokens)."""
    parents, tokens, used = [], [], {}
    for i in range(n):
        while True:
            parent = int(torch.randint(-1, i, (1,), generator=generator))
            free = [t for t in range(vocab) if t not in used.get(parent, set())]
            if free:
                break
        token = free[int(torch.randint(0, len(free), (1,), generator=generator))]
        used.setdefault(parent, set()).add(token)
        parents.append(parent)
        tokens.append(token)
    return torch.tensor(tokens), torch.tensor(parents)


def brute_force_greedy_tree(tokens: Tensor, parents: Tensor, target_logits: Tensor) -> TreeResult:
    """Longest root path whose every token equals the target argmax at its parent, + the target token."""
    targets = target_logits.argmax(-1).tolist()
    best: list[int] = []
    for node in range(len(tokens)):
        path, cur = [], node
        while cur >= 0:
            path.append(cur)
            cur = int(parents[cur])
        path.reverse()
        if all(int(tokens[i]) == targets[int(parents[i]) + 1] for i in path) and len(path) > len(best):
            best = path
    last = best[-1] + 1 if best else 0
    return TreeResult(best, targets[last])


def test_greedy_tree_rules_agree_with_brute_force():
    generator = torch.Generator().manual_seed(4)
    vocab = 4
    greedy = SamplingParams()
    for _ in range(200):
        n = int(torch.randint(0, 12, (1,), generator=generator))
        tokens, parents = random_tree(generator, n, vocab)
        logits = torch.randn(n + 1, vocab, generator=generator)
        # Make matches likely: row (parent + 1) often prefers this node's token.
        for i in range(n):
            if torch.rand(1, generator=generator) < 0.6:
                logits[int(parents[i]) + 1, int(tokens[i])] += 10
        expected = brute_force_greedy_tree(tokens, parents, logits)
        assert verify_tree_greedy(tokens, parents, logits) == expected
        target_probs = warp_probs(logits, greedy)
        assert verify_tree(tokens, parents, target_probs, None, generator) == expected
        draft_probs = torch.full((n, vocab), 1.0 / vocab)
        assert verify_tree(tokens, parents, target_probs, draft_probs, generator) == expected


def test_verify_tree_rejects_bad_parents():
    with pytest.raises(ValueError, match="parents"):
        verify_tree_greedy(torch.tensor([1, 2]), torch.tensor([-1, 1]), torch.zeros(3, 4))


# ---------------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------------


def test_same_seed_same_outputs():
    def run(seed: int) -> list:
        generator = make_generator(seed, role="verifier")
        setup = torch.Generator().manual_seed(0)  # fixed inputs, only the verifier's seed varies
        target = random_tables(setup, len(TREE_PARENTS) + 1)
        tokens, draft_probs, target_probs = draft_tree(TREE_PARENTS, target, [target.flip(-1)], 30, setup)
        chain_tokens, chain_q, chain_p = draft_tree([-1, 0, 1], target, [target.flip(-1)], 30, setup)
        outputs = []
        for s in range(30):
            outputs.append(verify_tree(tokens[s], torch.tensor(TREE_PARENTS), target_probs[s],
                                       draft_probs[s], generator))
            outputs.append(verify_chain(chain_tokens[s], chain_q[s], chain_p[s], generator))
        outputs.append(sample(target_probs[:, 0], generator).tolist())
        return outputs

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_make_generator_one_independent_stream_per_role():
    assert make_generator(None, role="drafter") is None
    a, b = make_generator(3, role="verifier"), make_generator(3, role="verifier")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))       # reproducible
    v, d = make_generator(3, role="verifier"), make_generator(3, role="drafter")
    assert not torch.equal(torch.rand(5, generator=v), torch.rand(5, generator=d))   # never the same stream
    plain = torch.Generator().manual_seed(3)      # nor the stream a bare manual_seed(seed) gives
    assert not torch.equal(torch.rand(5, generator=make_generator(3, role="drafter")), torch.rand(5, generator=plain))
    with pytest.raises(ValueError):
        make_generator(3, role="no-such-role")


# ---------------------------------------------------------------------------------------------------
# Sampling parameters and warping
# ---------------------------------------------------------------------------------------------------


def test_warp_temperature():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    probs = warp_probs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(probs, (logits / 2.0).softmax(-1))
    assert probs.dtype == torch.float32


def test_warp_top_k():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = torch.zeros(4)
    expected[[1, 2]] = torch.tensor([3.0, 2.0]).softmax(-1)
    torch.testing.assert_close(probs, expected)
    # k >= vocab is no filtering
    full = warp_probs(logits, SamplingParams(temperature=1.0, top_k=10))
    torch.testing.assert_close(full, logits.softmax(-1))


def test_warp_top_k_ties_keep_lowest_index():
    probs = warp_probs(torch.tensor([1.0, 2.0, 2.0, 2.0]), SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5, 0.5, 0.0]))


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.3, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])],
)
def test_warp_top_p(top_p, kept):
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = base.log()[[2, 0, 3, 1]]  # shuffled so sorting matters: vocab order [0.15, 0.5, 0.05, 0.3]
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    expected[kept] = base[kept] / base[kept].sum()
    torch.testing.assert_close(probs, expected[[2, 0, 3, 1]])


def test_warp_top_p_applies_after_top_k():
    # After top-2 the distribution is [0.625, 0.375]; top_p = 0.6 then keeps only the top token,
    # while on the unfiltered distribution (0.5 < 0.6) it would keep two.
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.6))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_warp_greedy_one_hot_with_ties():
    logits = torch.tensor([[0.0, 4.0, 4.0], [9.0, 1.0, 9.0]], dtype=torch.bfloat16)
    probs = warp_probs(logits, SamplingParams(temperature=0.0, top_k=1, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert probs.dtype == torch.float32


def test_warp_leading_dims_match_rows():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 10, generator=generator)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8)
    batched = warp_probs(logits, params)
    rows = torch.stack([warp_probs(row, params) for row in logits.reshape(-1, 10)]).reshape(2, 3, 10)
    torch.testing.assert_close(batched, rows)
    torch.testing.assert_close(batched.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_greedy():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_sample_shapes():
    probs = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]] * 3)  # [3, 2, 2]
    tokens = sample(probs, make_generator(0, role="verifier"))
    assert tokens.shape == (3, 2) and tokens.dtype == torch.long
    assert tokens.tolist() == [[1, 0]] * 3
    assert sample(torch.tensor([0.0, 0.0, 1.0]), None).shape == ()
