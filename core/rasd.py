"""RASD's tree pieces (retrieval-augmented speculative decoding, ALGORITHMS.md section 4; abstract only,
the details are ours, docs/rasd.md), as pure functions over trees.

A retrieval tree (continuations found in the context or a corpus, merged into a trie) is scored by the
draft model: a node's weight is the product of the drafter's probabilities along its path, as OPT-Tree's
(core/opt_tree.py). Nodes below `threshold` are pruned with their descendants. The pruned retrieval
tree is then fused with the draft model's own tree by longest-prefix matching: a path both trees share
becomes one node per token, a retrieval branch is grafted where it leaves the draft tree. The fused tree
keeps its `max_nodes` nodes of highest weight (core/opt_tree.py: top_subtree), every kept node's
ancestors with it. Every node is a deterministic draft (one-hot q): verify with `draft_probs=None`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.opt_tree import TreeChoice, subtree, top_subtree


def ancestor_mask(parents: Tensor) -> Tensor:
    """parents [n] long (-1 = child of the root, else an earlier index) -> [n, n] bool: node i attends
    node j when j is i or one of its ancestors."""
    n = parents.numel()
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents.tolist()):      # parents first, so a parent's row is complete
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def tree_depths(parents: Tensor) -> Tensor:
    """parents [n] long -> depths [n] long (1 = child of the root)."""
    depths: list[int] = []
    for p in parents.tolist():
        depths.append(1 if p < 0 else depths[p] + 1)
    return torch.tensor(depths, dtype=torch.long)


def path_weights(tokens: Tensor, parents: Tensor, probs: Tensor, prob_rows: Tensor) -> Tensor:
    """Each node's weight: the product of the drafter's probabilities of the tokens along its path.

    tokens:    [n] long
    parents:   [n] long, parents before children
    probs:     [r, vocab] the drafter's next-token distributions
    prob_rows: [n] long, row of `probs` a node's token is drawn after (its parent's, or the root's)
    Returns [n] float32.
    """
    step = probs.float().cpu()[prob_rows, tokens]                         # [n]: p(token | its path)
    weights = step.clone()
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            weights[i] = weights[p] * step[i]
    return weights


def prune(tree: TreeChoice, threshold: float) -> TreeChoice:
    """The nodes of weight >= threshold whose ancestors all are too (weights fall along a path, so
    that is the whole set above the threshold), re-indexed parents first."""
    keep = tree.weights >= threshold                                      # [n] bool
    for i, p in enumerate(tree.parents.tolist()):
        if p >= 0:
            keep[i] &= keep[p]
    return subtree(tree, keep)


def fuse(trees: list[TreeChoice], max_nodes: int) -> TreeChoice:
    """Merge trees by longest-prefix matching into one trie and keep its `max_nodes` nodes of highest weight.

    A node of a later tree whose path (tokens from the root) exists already is that node (its weight the
    larger of the two); otherwise it is grafted under the fused node of its parent's path. Siblings
    therefore carry distinct tokens and parents come before children. Ties in weight go to the earlier
    node: the first tree's nodes, then parents (a child's weight is clamped to its parent's, as the
    two trees' weights may come from forwards of different shapes and differ in the last bits).
    """
    index: dict[tuple[int, int], int] = {}          # (fused parent, token) -> fused node
    tokens: list[int] = []
    parents: list[int] = []
    weights: list[float] = []
    for tree in trees:
        fused_ids: list[int] = []                   # this tree's node i -> its fused node
        for tok, parent, weight in zip(tree.tokens.tolist(), tree.parents.tolist(), tree.weights.tolist()):
            key = (fused_ids[parent] if parent >= 0 else -1, tok)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(tok)
                parents.append(key[0])
                weights.append(weight)
            else:
                weights[node] = max(weights[node], weight)
            fused_ids.append(node)
    for i, p in enumerate(parents):
        if p >= 0:
            weights[i] = min(weights[i], weights[p])
    return top_subtree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                       torch.tensor(weights, dtype=torch.float32), max_nodes)
