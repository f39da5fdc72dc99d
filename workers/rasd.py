"""RASD: retrieval-augmented speculative decoding with a draft model (ALGORITHMS.md section 4, docs/rasd.md).

Per step:
1. the draft model grows its own tree: OPT-Tree (workers/opt_tree.py), whose root forward also gives
   the drafter's next-token distribution after the committed context;
2. retrieval: continuations of the context found in the context itself, then in a static corpus
   (workers/hierarchy.py's levels, merged into a trie);
3. the retrieval tree is scored by the draft model: one tree forward over its inner nodes (a leaf's
   probability comes from its parent's row, so leaves are not fed; nor are branches whose first token
   the root's distribution already puts below the threshold), each attending the committed context
   and its own ancestors only, not the draft tree's nodes cached before it; nodes whose path probability
   is below `prune_threshold` are pruned (core/rasd.py: prune);
4. the two trees are fused by longest-prefix matching and capped at `max_nodes` by weight (core/rasd.py:
   fuse); the target verifies the fused tree in one forward.

Every node is chosen deterministically, so drafts carry probs=None (one-hot q) and the engine's tree rule
keeps the target's distribution at any temperature. The drafter's cache is OPT-Tree's: after a propose it
holds the committed tokens, the draft tree's nodes and the scored retrieval nodes; `update` crops it back
to the committed tokens.
"""
from __future__ import annotations

import torch

from core.opt_tree import TreeChoice, subtree
from core.rasd import ancestor_mask, fuse, path_weights, prune, tree_depths
from workers.drafters import EMPTY_DRAFT, Draft, Drafter
from workers.hierarchy import HierarchyDrafter
from workers.opt_tree import OptTreeDrafter, OptTreeSession

DEFAULT_MAX_NODES = 16
DEFAULT_PRUNE_THRESHOLD = 0.1


class RasdDrafter(Drafter):
    """The draft model's OPT-Tree fused with a retrieval tree it has scored and pruned.

    tree: the OPT-Tree drafter (its runner, node count, width, threshold, depth, draft_vocab);
    retrieval: a HierarchyDrafter whose levels are the retrieval sources (context first, then corpus);
    max_nodes: nodes of the fused tree the target verifies; prune_threshold: a retrieved node is kept
    when the drafter gives its whole path at least this probability.
    """

    def __init__(self, tree: OptTreeDrafter, retrieval: HierarchyDrafter, max_nodes: int = DEFAULT_MAX_NODES,
                 prune_threshold: float = DEFAULT_PRUNE_THRESHOLD, name: str = "rasd"):
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        if not 0.0 <= prune_threshold <= 1.0:
            raise ValueError(f"prune_threshold must be in [0, 1], got {prune_threshold}")
        self.tree, self.retrieval, self.name = tree, retrieval, name
        self.max_nodes, self.prune_threshold = max_nodes, prune_threshold

    def start(self, prompt_ids, params, generator):
        return RasdSession(self, prompt_ids, params, generator)


class RasdSession(OptTreeSession):
    """One request: the OPT-Tree session (drafter cache, tree growth) plus a retrieval session.
    After a propose, `last_trees` holds (draft tree, scored retrieval tree, pruned, fused) for tests
    and reports."""

    def __init__(self, drafter: RasdDrafter, prompt_ids, params, generator):
        super().__init__(drafter.tree, prompt_ids, params, generator)
        self.rasd = drafter
        self.retrieval = drafter.retrieval.start(prompt_ids, params, generator)
        self.last_trees: tuple[TreeChoice, ...] | None = None
        self._root_logits: torch.Tensor | None = None

    def _first_logits(self) -> torch.Tensor:
        # the root's distribution, kept: it scores the retrieval tree's first tokens too
        self._root_logits = super()._first_logits()
        return self._root_logits

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        super().propose(k)
        drafted = self.last_growth.result()
        retrieved = self.retrieval.propose(k)
        if not len(retrieved):
            scored = pruned = _tree([], [], [])
        else:
            scored = self._score(retrieved)
            pruned = prune(scored, self.rasd.prune_threshold)
        fused = fuse([drafted, pruned], self.rasd.max_nodes)
        self.last_trees = (drafted, scored, pruned, fused)
        return Draft(tokens=fused.tokens.tolist(), parents=fused.parents.tolist())

    def _score(self, retrieved: Draft) -> TreeChoice:
        """The retrieval tree with each node's weight under the draft model (one tree forward). A branch
        whose first token is below the threshold already is pruned whatever follows, so only its first
        token is kept (scored by the root's row) and the rest is not fed."""
        n = len(retrieved)
        parents = torch.tensor(retrieved.parents if retrieved.parents is not None else list(range(-1, n - 1)))
        tokens = torch.tensor(retrieved.tokens, dtype=torch.long)                 # [n]
        root = self._probs(self._root_logits)                                    # [vocab]
        first_of: list[int] = []                                                 # each node's depth-1 ancestor
        for i, p in enumerate(parents.tolist()):
            first_of.append(i if p < 0 else first_of[p])
        keep = (parents < 0) | (root.float().cpu()[tokens[first_of]] >= self.rasd.prune_threshold)   # [n]
        retrieved_tree = subtree(_tree(tokens, parents, torch.zeros(n)), keep)
        tokens, parents = retrieved_tree.tokens, retrieved_tree.parents
        inner = sorted({p for p in parents.tolist() if p >= 0})   # nodes with children: their rows are needed
        rows = [root[None]]                                                      # row 0: after the root
        if inner:
            rows.append(self._probs(self._feed(tokens[inner], parents, inner)))  # [m, vocab]
        probs = torch.cat(rows)                                                  # [1 + m, vocab]
        row_of = {node: 1 + i for i, node in enumerate(inner)}
        prob_rows = torch.tensor([row_of.get(p, 0) for p in parents.tolist()])  # [n]
        return _tree(tokens, parents, path_weights(tokens, parents, probs, prob_rows))

    def _feed(self, ids: torch.Tensor, parents: torch.Tensor, inner: list[int]) -> torch.Tensor:
        """Feed the retrieval tree's inner nodes (ids [m], an ancestor-closed set) after the draft tree's
        cached nodes; logits [m, vocab] of the distribution after each."""
        dev = self.runner.device
        committed = len(self.context)
        window = self.cache.lengths[0] - committed                 # draft tree nodes cached after the context
        local = {node: i for i, node in enumerate(inner)}
        inner_parents = torch.tensor([local.get(int(parents[node]), -1) for node in inner])
        m = len(inner)
        mask = torch.zeros(1, m, window + m, dtype=torch.bool)      # the draft tree's slots: not visible
        mask[0, :, window:] = ancestor_mask(inner_parents)
        # position of a node at depth t: committed + t - 1, as an offset from the next cache slot
        offsets = tree_depths(parents)[inner] + committed - 1 - self.cache.lengths[0]
        logits = self.runner.forward(self.cache, ids.to(dev).view(1, m), depths=offsets.to(dev).view(1, m),
                                     tree_mask=mask.to(dev), lm_head=self.head)[0]    # [m, vocab']
        self.forwards += 1
        return logits if self.head is None else self.head.expand(logits)

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        self.retrieval.update(new_tokens, num_accepted)

    def close(self):
        self.retrieval.close()
        super().close()


def _tree(tokens, parents, weights) -> TreeChoice:
    return TreeChoice(tokens=torch.as_tensor(tokens, dtype=torch.long),
                      parents=torch.as_tensor(parents, dtype=torch.long),
                      weights=torch.as_tensor(weights, dtype=torch.float32))
