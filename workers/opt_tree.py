"""OPT-Tree drafting with a draft model: an adaptive draft tree per step (docs/opt_tree.md).

The tree's shape is core/opt_tree.py's `OptTreeGrowth`; this module runs the drafter forwards it needs:
one forward for the root (the committed tokens the drafter has not seen yet), then one batched tree
forward per layer over that layer's expandable nodes, each attending the committed context and its own
ancestors among the tree nodes fed before it (ModelRunner.forward's tree_mask over the cached window).

KV cache: a tree forward leaves tree nodes in the drafter's cache. `update` crops the cache back to the
committed tokens it held before the tree was fed; the next propose feeds the accepted tokens and the new
one in its root forward (one forward of a few tokens, as `_DraftModelSession._first_logits` does).
"""
from __future__ import annotations

import torch

from core.cost import parameter_count
from core.opt_tree import PAPER_MAX_DEPTH, PAPER_MAX_NODES, PAPER_THRESHOLD, OptTreeGrowth
from core.sampling import warp_probs
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, _DraftModelSession
from workers.runner import ModelRunner


class OptTreeDrafter(Drafter):
    """A small causal LM of the target's vocabulary drafting OPT-Tree's adaptive trees.

    Node weights come from the drafter's distribution warped like the target's (temperature, top-k,
    top-p; plain softmax when greedy). The nodes are then *chosen* deterministically (top-k), not
    sampled, so each draft's q is one-hot: drafts carry probs=None and the engine's tree rule
    (core/verification.py: verify_tree with draft_probs=None) keeps the output exactly the target's
    distribution at any temperature, and equal to plain decoding when greedy. (Not `deterministic` in
    the cost model's sense: its drafts cost model forwards, counted by the session.)
    """

    def __init__(self, runner: ModelRunner, name: str = "opt-tree", max_nodes: int = PAPER_MAX_NODES,
                 threshold: float = PAPER_THRESHOLD, max_depth: int = PAPER_MAX_DEPTH, width: int | None = None,
                 draft_vocab: int = 0, vocab_ranking: torch.Tensor | None = None):
        """max_nodes, threshold, max_depth, width: core/opt_tree.py's OptTreeGrowth (the paper's 60, 0.5,
        10, width = max_nodes); a step's `k` further bounds the depth. draft_vocab, vocab_ranking: as
        DraftModelDrafter's."""
        OptTreeGrowth(max_nodes, threshold, max_depth, width)       # validates the numbers now
        self.runner, self.name = runner, name
        self.max_nodes, self.threshold, self.max_depth, self.width = max_nodes, threshold, max_depth, width
        self.draft_vocab = draft_vocab
        self.vocab_ranking = vocab_ranking

    def start(self, prompt_ids, params, generator):
        return OptTreeSession(self, prompt_ids, params, generator)


class OptTreeSession(_DraftModelSession):
    """One request's drafter cache and its trees. `last_growth` is the last propose's OptTreeGrowth."""

    def __init__(self, drafter: OptTreeDrafter, prompt_ids, params, generator):
        super().__init__(drafter.runner, prompt_ids, params, generator, draft_vocab=drafter.draft_vocab,
                         vocab_ranking=drafter.vocab_ranking)
        self.drafter = drafter
        self.last_growth: OptTreeGrowth | None = None
        self.forwards = 0       # drafter forwards of the proposes (root + one per layer; prefill not counted)

    # cost reporting, read by the engine (core/cost.py: draft_cost): each forward streams the weights once
    @property
    def forward_params(self) -> int:
        runner = self.runner
        model = getattr(runner, "model", None) or getattr(getattr(runner, "runner", None), "model", None)
        return self.forwards * (parameter_count(model) or 0)

    @property
    def forwards_by_level(self) -> dict[str, int]:
        return {self.drafter.name: self.forwards}

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Node weights' factors: logits [..., vocab] -> probabilities [..., vocab]."""
        if self.params.greedy:
            return torch.softmax(logits.float(), dim=-1)
        return warp_probs(logits, self.params)

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        d = self.drafter
        growth = OptTreeGrowth(d.max_nodes, d.threshold, min(k, d.max_depth), d.width)
        self.last_growth = growth
        frontier = growth.start(self._probs(self._first_logits()))          # root: [vocab]
        self.forwards += 1
        committed = self.cache.lengths[0]                                   # = len(context)
        dev = self.runner.device
        # ancestors[j]: tree-node slots (relative to `committed`) node-in-slot j attends: itself and its ancestors
        ancestors = torch.zeros(0, 0, dtype=torch.bool, device=dev)         # [P, P]
        slot_of: dict[int, int] = {}                                        # node id -> slot (fed nodes only)
        while frontier.numel():
            fed = self.cache.lengths[0] - committed                         # P: tree nodes in the cache
            f = frontier.numel()
            nodes = frontier.tolist()
            parent_slots = torch.tensor([slot_of.get(int(growth.parents[n]), -1) for n in nodes], device=dev)
            # [F, P + F]: each node sees its parent's row (its ancestors) and itself
            rows = torch.zeros(f, fed + f, dtype=torch.bool, device=dev)
            has_parent = parent_slots >= 0
            if fed:
                rows[has_parent, :fed] = ancestors[parent_slots[has_parent]]
            rows[:, fed:] = torch.eye(f, dtype=torch.bool, device=dev)
            grown = torch.zeros(fed + f, fed + f, dtype=torch.bool, device=dev)
            grown[:fed, :fed] = ancestors
            grown[fed:] = rows
            ancestors = grown
            for i, n in enumerate(nodes):
                slot_of[n] = fed + i
            # positions: node at tree depth t sits at committed + t - 1; depths are offsets from the first slot
            depth = int(growth.depths[nodes[0]])                            # a frontier is one layer
            offsets = torch.full((1, f), committed + depth - 1 - self.cache.lengths[0], device=dev)
            ids = growth.tokens[frontier].to(dev).view(1, f)
            logits = self.runner.forward(self.cache, ids, depths=offsets, tree_mask=rows[None],
                                         lm_head=self.head)[0]              # [F, vocab']
            if self.head is not None:
                logits = self.head.expand(logits)
            self.forwards += 1
            frontier = growth.grow(self._probs(logits))
        tree = growth.result()
        return Draft(tokens=tree.tokens.tolist(), parents=tree.parents.tolist())

    def update(self, new_tokens, num_accepted):
        committed_before = len(self.context)
        self.context.extend(new_tokens)
        # The cache holds committed tokens, then (after a propose) tree nodes: keep the committed part.
        self.cache.crop(0, min(self.cache.lengths[0], committed_before))
