"""OPT-Tree's draft-tree construction (Wang et al., "OPT-Tree: Speculative Decoding with Adaptive Draft
Tree Structure", ALGORITHMS.md section 4; authors' code github Jikai0Wang/OPT-Tree), as a pure piece.

A node's *weight* is the product of the drafter's probabilities along its path from the root (the last
committed token): the drafter's estimate of the chance that the target accepts every token down to it.
The sum of a tree's weights is then its expected number of accepted tokens, E(T), and the tree of
`max_nodes` nodes that maximises E is the global top-`max_nodes` nodes by weight (an ancestor's weight is
>= its descendants', so that set is closed under taking parents, i.e. a valid tree).

The tree grows one layer (depth) per drafter forward:
  - layer 1: the root's `width` most probable tokens;
  - layer d+1: every expandable node of layer d offers its `width` most probable next tokens (one batched
    drafter forward over those nodes, not one per node); the new layer keeps the `width` candidates of
    highest weight;
  - expandable = the nodes of the newest layer that are among the global top `max_nodes` so far: a node
    outside it can have no descendant inside it (weights only fall along a path), so skipping it
    changes nothing but the forward's size;
  - stop when the layer just added raised E(top `max_nodes`) by less than `threshold` (the paper's
    E(T_{d+1}) - E(T_d) < delta), at `max_depth` layers, or when no node is expandable.
The draft is the global top `max_nodes` (ties broken towards shallower nodes, so parents always come
first), listed parents before children, siblings with distinct tokens (each parent's top-k ids are
distinct), which is what core/verification.py's tree rule needs.

Nodes are chosen deterministically from the drafter's (warped) distribution, so the tree's q is one-hot:
verify it with `draft_probs=None`, which is lossless at any temperature.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PAPER_MAX_NODES = 60
PAPER_THRESHOLD = 0.5
PAPER_MAX_DEPTH = 10


@dataclass
class TreeChoice:
    """The chosen tree, parents before children."""

    tokens: Tensor    # [n] long
    parents: Tensor   # [n] long, -1 = child of the root, else an index < the node's
    weights: Tensor   # [n] float, product of draft probabilities along the path

    def __len__(self) -> int:
        return int(self.tokens.numel())


class OptTreeGrowth:
    """One tree being grown. Usage:

        growth = OptTreeGrowth(max_nodes, threshold, max_depth)
        frontier = growth.start(root_probs)            # [F] node ids to feed the drafter next
        while frontier.numel():
            frontier = growth.grow(probs_after(frontier))   # probs [F, vocab], one row per frontier node
        tree = growth.result()

    Node ids are the order nodes were made in (layer by layer), so a parent's id is below its children's.
    """

    def __init__(self, max_nodes: int = PAPER_MAX_NODES, threshold: float = PAPER_THRESHOLD,
                 max_depth: int = PAPER_MAX_DEPTH, width: int | None = None):
        """width: candidates kept per layer and children offered per node (None: max_nodes, the paper's)."""
        if max_nodes < 1 or max_depth < 1:
            raise ValueError(f"need max_nodes >= 1 and max_depth >= 1, got {max_nodes}, {max_depth}")
        if width is not None and width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.max_nodes, self.threshold, self.max_depth = max_nodes, threshold, max_depth
        self.width = width or max_nodes
        self.tokens = torch.empty(0, dtype=torch.long)    # [N]
        self.parents = torch.empty(0, dtype=torch.long)   # [N]
        self.weights = torch.empty(0)                     # [N] float32
        self.depths = torch.empty(0, dtype=torch.long)    # [N] 1 = child of the root
        self.layers = 0
        self.expected = 0.0          # E(top max_nodes) of the tree so far
        self.gains: list[float] = []  # E's rise from each layer (for tests and reports)
        self._frontier = torch.empty(0, dtype=torch.long)

    # ------------------------------------------------------------------ growing
    def start(self, probs: Tensor) -> Tensor:
        """Layer 1 from the root's next-token distribution probs [vocab]; returns the frontier [F]."""
        if self.layers:
            raise RuntimeError("start() called twice")
        return self.grow(probs.unsqueeze(0), _root=True)

    def grow(self, probs: Tensor, _root: bool = False) -> Tensor:
        """Add the next layer from the drafter's distributions after the current frontier's nodes
        (probs [F, vocab], row i after node frontier[i]); returns the new frontier [F'] (empty: stop)."""
        if not _root and probs.shape[0] != self._frontier.numel():
            raise ValueError(f"{probs.shape[0]} rows of probabilities for {self._frontier.numel()} frontier nodes")
        k = min(self.width, probs.shape[-1])
        top_p, top_ids = probs.detach().float().topk(k, dim=-1)            # [F, k] each, on probs' device
        top_p, top_ids = top_p.cpu(), top_ids.cpu()
        base = torch.ones(1) if _root else self.weights[self._frontier]     # [F]
        cand = (base.unsqueeze(1) * top_p).reshape(-1)                      # [F * k]
        keep = min(self.width, cand.numel())
        # stable: among equal weights the earlier (higher-ranked parent, then child) candidate wins
        order = torch.sort(cand, descending=True, stable=True).indices[:keep]
        order = order[cand[order] > 0]                                     # a zero-probability token never helps
        new_weights = cand[order]
        new_tokens = top_ids.reshape(-1)[order]
        parent_rows = order // k
        new_parents = (torch.full_like(parent_rows, -1) if _root else self._frontier[parent_rows])
        first_new = self.tokens.numel()
        self.tokens = torch.cat([self.tokens, new_tokens])
        self.parents = torch.cat([self.parents, new_parents])
        self.weights = torch.cat([self.weights, new_weights])
        self.depths = torch.cat([self.depths, torch.full_like(new_tokens, self.layers + 1)])
        self.layers += 1

        top = self._top()
        expected = float(self.weights[top].sum())
        gain = expected - self.expected
        self.expected = expected
        self.gains.append(gain)
        if gain < self.threshold or self.layers >= self.max_depth:
            self._frontier = torch.empty(0, dtype=torch.long)
        else:      # the new layer's nodes inside the global top: the only ones whose children can count
            self._frontier = top[top >= first_new]
        return self._frontier

    # ------------------------------------------------------------------ the draft
    def result(self) -> TreeChoice:
        """The global top `max_nodes` nodes by weight, parents before children, parents re-indexed."""
        return top_subtree(self.tokens, self.parents, self.weights, self.max_nodes)

    def _top(self) -> Tensor:
        return top_node_ids(self.weights, self.max_nodes)


def top_node_ids(weights: Tensor, max_nodes: int) -> Tensor:
    """Ids of the global top `max_nodes` nodes by weight [n], ties to the lower id; ascending ids."""
    order = torch.sort(weights, descending=True, stable=True).indices
    return order[:max_nodes].sort().values


def top_subtree(tokens: Tensor, parents: Tensor, weights: Tensor, max_nodes: int) -> TreeChoice:
    """The top `max_nodes` nodes by weight of a tree (tokens, parents, weights: [n] each, parents before
    children), every kept node's ancestors kept, listed parents first with parents re-indexed."""
    chosen = top_node_ids(weights, max_nodes)
    keep = torch.zeros(tokens.numel(), dtype=torch.bool)
    keep[chosen] = True
    # Ties are broken towards the earlier (shallower) node, so every parent is kept; make sure anyway.
    for node in chosen.tolist():
        parent = int(parents[node])
        while parent >= 0 and not keep[parent]:
            keep[parent] = True
            parent = int(parents[parent])
    return subtree(TreeChoice(tokens=tokens, parents=parents, weights=weights), keep)


def subtree(tree: TreeChoice, keep: Tensor) -> TreeChoice:
    """The nodes of `keep` ([n] bool, closed under taking parents), in order, parents re-indexed."""
    ids = keep.nonzero().flatten()                                        # ascending: parents first
    remap = torch.full((keep.numel(),), -1, dtype=torch.long)
    remap[ids] = torch.arange(ids.numel())
    old_parents = tree.parents[ids]
    parents = torch.where(old_parents >= 0, remap[old_parents.clamp_min(0)], old_parents)
    return TreeChoice(tokens=tree.tokens[ids], parents=parents, weights=tree.weights[ids])
