"""Lossless accept/reject rules for speculative decoding (ALGORITHMS.md section 0), as pure functions.

Vocabulary, used everywhere:
- ``draft_probs`` (q): the distribution each draft token was drawn from; None means the drafts are
  deterministic (one-hot q), e.g. prompt lookup or a greedy drafter.
- ``target_probs`` (p): the target's distribution at the same positions, warped like q.
- accepted tokens: draft tokens that pass the test; the recovered token is sampled after a rejection,
  the bonus token when every draft token was accepted. A step outputs accepted + one recovered-or-bonus.

Acceptance test: ``u < min(1, p(x) / q(x))`` is evaluated as ``u * q(x) < p(x)`` (u in [0, 1)), which is
the same for q(x) > 0 and needs no division; a one-hot q gives ``u < p(x)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.sampling import sample


@dataclass
class ChainResult:
    num_accepted: int  # accepted draft tokens
    next_token: int  # recovered token (after a rejection) or bonus token (all accepted)
    # output tokens of the step = draft_tokens[:num_accepted] + [next_token]


@dataclass
class TreeResult:
    accepted_nodes: list[int]  # node indices along the accepted path, root-to-leaf order
    next_token: int  # recovered or bonus token
    # output tokens of the step = [tokens[i] for i in accepted_nodes] + [next_token]


def _residual(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)). p, q: [vocab] -> [vocab].

    When nothing is left (p <= q everywhere, i.e. p == q up to rounding) a rejection had probability 0;
    fall back to p rather than divide by zero.
    """
    leftover = (p - q).clamp_min(0)
    total = leftover.sum()
    return torch.where(total > 0, leftover / total.clamp_min(torch.finfo(leftover.dtype).tiny), p)


def _remove_token(q: Tensor, token: int) -> Tensor:
    """q with ``token`` zeroed and renormalised (sampling without replacement). q: [vocab] -> [vocab]."""
    q = q.clone()
    q[token] = 0
    total = q.sum()
    return torch.where(total > 0, q / total.clamp_min(torch.finfo(q.dtype).tiny), q)


def _one_hot(token: Tensor | int, like: Tensor) -> Tensor:
    """One-hot [vocab] row with the dtype and device of ``like`` ([..., vocab])."""
    row = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    row[token] = 1
    return row


def _children(parents: list[int]) -> list[list[int]]:
    """children[0] = the root's children, children[i + 1] = node i's children, each in index order."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        if not -1 <= parent < node:
            raise ValueError(f"parents[{node}] = {parent}: must be -1 (root) or an earlier node index")
        children[parent + 1].append(node)
    return children


# ---------------------------------------------------------------------------------------------------
# Greedy (temperature 0)
# ---------------------------------------------------------------------------------------------------


def verify_greedy(draft_tokens: Tensor, target_logits: Tensor) -> ChainResult:
    """Longest draft prefix equal to the target argmax, plus the target argmax after it.

    draft_tokens:  [k] long (k may be 0)
    target_logits: [k+1, vocab]; row i = target at draft i's position, row k = after all drafts
    """
    k = draft_tokens.shape[0]
    target_tokens = target_logits.argmax(dim=-1)  # [k+1]
    matches = (draft_tokens == target_tokens[:k]).long()  # [k]
    num_accepted = matches.cumprod(dim=0).sum()  # [] length of the all-match prefix
    next_token = target_tokens[num_accepted]  # [] recovered at the first mismatch, or bonus
    num_accepted_, next_token_ = torch.stack([num_accepted, next_token]).tolist()  # the one host sync
    return ChainResult(num_accepted=num_accepted_, next_token=next_token_)


def verify_greedy_batch(
    draft_tokens: Tensor, draft_lens: Tensor, target_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """Batched :func:`verify_greedy` over padded drafts, no host sync.

    draft_tokens:  [batch, k] long, row b valid in [:draft_lens[b]]
    draft_lens:    [batch] long
    target_logits: [batch, k+1, vocab]; row b's bonus position is draft_lens[b]
    Returns num_accepted [batch] long, next_tokens [batch] long.
    """
    k = draft_tokens.shape[1]
    target_tokens = target_logits.argmax(dim=-1)  # [batch, k+1]
    valid = torch.arange(k, device=draft_tokens.device) < draft_lens.unsqueeze(1)  # [batch, k]
    matches = (draft_tokens == target_tokens[:, :k]) & valid  # [batch, k]
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)  # [batch]
    next_tokens = target_tokens.gather(1, num_accepted.unsqueeze(1)).squeeze(1)  # [batch]
    return num_accepted, next_tokens


# ---------------------------------------------------------------------------------------------------
# Sampling (temperature > 0); also exact at temperature 0 when fed one-hot target_probs
# ---------------------------------------------------------------------------------------------------


def verify_chain(
    draft_tokens: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    generator: torch.Generator | None,
) -> ChainResult:
    """Speculative sampling of a draft chain (Leviathan et al.; Chen et al.).

    draft_tokens: [k] long
    draft_probs:  [k, vocab], row i = q that draft i was sampled from;
                  None = deterministic (one-hot) drafts
    target_probs: [k+1, vocab] warped p; row k gives the bonus token
    """
    k = draft_tokens.shape[0]
    positions = torch.arange(k, device=target_probs.device)
    p_draft = target_probs[positions, draft_tokens]  # [k] p_i(x_i)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # [k] one-hot q: accept with probability p_i(x_i)
    else:
        q_draft = draft_probs[positions, draft_tokens]  # [k] q_i(x_i)
    u = torch.rand(k, generator=generator, device=target_probs.device)  # [k] all uniforms in one call
    accepted = u * q_draft < p_draft  # [k]
    num_accepted = int(accepted.long().cumprod(dim=0).sum().item())

    if num_accepted == k:
        bonus = sample(target_probs[k], generator)
        return ChainResult(num_accepted=k, next_token=int(bonus.item()))

    i = num_accepted  # first rejected draft
    q_i = _one_hot(draft_tokens[i], target_probs) if draft_probs is None else draft_probs[i]
    recovered = sample(_residual(target_probs[i], q_i), generator)
    return ChainResult(num_accepted=i, next_token=int(recovered.item()))


def verify_siblings(
    candidates: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None,
    without_replacement: bool = False,
) -> tuple[int, Tensor]:
    """One node of a tree: try sibling candidates in order (SpecInfer multi-candidate rule).

    candidates:   [m] long, the sibling tokens in the order they are tried
    target_probs: [vocab] p at the parent
    draft_probs:  [m, vocab], row j = q_j that candidate j was drawn from; None = all one-hot
                  (deterministic candidates). A row may itself be one-hot (fused trees).
                  With without_replacement=True all siblings were drawn without replacement from one q
                  (e.g. Gumbel-top-k), read from row 0; after each rejection that q loses the candidate.
    Returns (index of the accepted candidate, target_probs) or, when all are rejected,
    (-1, residual [vocab]) to sample the recovered token from.

    p¹ = p; candidate j is accepted if u < min(1, pʲ(c_j)/qʲ(c_j)),
    else pʲ⁺¹ = norm(max(0, pʲ - qʲ)). For a one-hot qʲ a rejection zeroes c_j in p,
    so a duplicate of a rejected candidate is always rejected.
    """
    m = candidates.shape[0]
    u = torch.rand(m, generator=generator, device=target_probs.device)  # [m] all uniforms in one call
    shared_q = draft_probs[0] if (without_replacement and draft_probs is not None and m > 0) else None
    p = target_probs  # [vocab] pʲ
    for j, token in enumerate(candidates.tolist()):
        if draft_probs is None:
            q = _one_hot(token, p)
        elif shared_q is not None:
            q = shared_q
        else:
            q = draft_probs[j]
        if bool(u[j] * q[token] < p[token]):
            return j, target_probs
        p = _residual(p, q)
        if shared_q is not None:
            shared_q = _remove_token(shared_q, token)
    return -1, p


def verify_tree(
    tokens: Tensor,
    parents: Tensor,
    target_probs: Tensor,
    draft_probs: Tensor | None,
    generator: torch.Generator | None,
    without_replacement: bool = False,
) -> TreeResult:
    """Walk a draft tree from the root, applying :func:`verify_siblings` at each node.

    tokens:       [n] long
    parents:      [n] long, -1 = child of the root (the last committed token), else an index < the node's
    target_probs: [n+1, vocab]; row 0 = p after the root, row i+1 = p after node i
    draft_probs:  [n, vocab], row i = q node i was drawn from; None = all one-hot.
                  With without_replacement=True siblings share one q (the first sibling's row is used).
    Descends into the accepted child; stops on a rejection (recovered token from the residual) or at a
    leaf (bonus token from that node's p). With one-hot target_probs this is the greedy longest
    matching path; siblings should carry distinct tokens (merge drafts into a trie first), otherwise
    the first matching one wins.
    """
    children = _children(parents.tolist())
    accepted: list[int] = []
    node = -1  # the root
    while True:
        p = target_probs[node + 1]  # [vocab]
        kids = children[node + 1]
        if not kids:
            bonus = sample(p, generator)
            return TreeResult(accepted_nodes=accepted, next_token=int(bonus.item()))
        kid_q = None if draft_probs is None else draft_probs[kids]  # [m, vocab]
        j, residual = verify_siblings(tokens[kids], p, kid_q, generator, without_replacement)
        if j < 0:
            recovered = sample(residual, generator)
            return TreeResult(accepted_nodes=accepted, next_token=int(recovered.item()))
        node = kids[j]
        accepted.append(node)


def verify_tree_greedy(tokens: Tensor, parents: Tensor, target_logits: Tensor) -> TreeResult:
    """Greedy tree verification: follow the child whose token equals the target argmax.

    tokens:        [n] long
    parents:       [n] long, as in :func:`verify_tree`
    target_logits: [n+1, vocab]; row 0 = after the root, row i+1 = after node i
    """
    target_tokens = target_logits.argmax(dim=-1).tolist()  # [n+1]
    node_tokens = tokens.tolist()
    children = _children(parents.tolist())
    accepted: list[int] = []
    node = -1
    while True:
        wanted = target_tokens[node + 1]
        match = next((c for c in children[node + 1] if node_tokens[c] == wanted), None)
        if match is None:
            return TreeResult(accepted_nodes=accepted, next_token=wanted)
        accepted.append(match)
        node = match
