"""`kind: token_recycling`: Token Recycling (workers/token_recycling.py). An adjacency matrix keeps the
target's top-`width` next tokens after every token it has verified (all tree nodes, rejected ones too);
each step fills a static tree template from it, starting at the last committed token, and the target
verifies the tree.

Where the state lives: the matrix belongs to the strategy's one drafter, so it is shared by every
request of the strategy and kept across requests, for the engine's one target model. It needs no
model, so through Ray it drafts beside the engine (the default `ray_drafter`: `make_drafter(None)`):
the matrix lives in the engine's process, fed by the logits the target actors send back there, and is
shared by all the requests that process serves. Memory: `V x width` int32 (Qwen2.5: 151,936 x 8 x 4 B
= 4.6 MiB), never more. Not simulated by the capacity model (its ~80-row tree verifications fit none
of placement/speculative_model.py's families).
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, model_validator

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import StrategyConfig


class TokenRecyclingStrategy(StrategyConfig):
    kind: Literal["token_recycling"]
    width: int = Field(8, ge=1, le=64, description=(
        "Top-k next tokens kept per token in the adjacency matrix (the paper's 8); the widest node of "
        "the tree takes at most this many children"))
    tree: Union[Literal["paper"], list[int]] = Field("paper", description=(
        '"paper": the authors\' static template (80 nodes, depth 6, wide near the root); or branching '
        "factors per depth, e.g. [4, 2, 1, 1] (every node at depth d takes its token's tree[d] "
        "top-ranked successors; each factor <= width, at most 512 nodes)"))
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=6), description=(
        "Tree depth per step (the most tokens one step can accept): fixed, adaptive, goodput, heuristic "
        "or thompson (draft_length.policy); depths beyond the tree's are cut to it"))

    @model_validator(mode="after")
    def _tree_shape(self):
        if self.tree == "paper":
            if self.width < 8:
                raise ValueError(f'tree "paper" takes up to 8 successors per token: width must be >= 8, '
                                 f"got {self.width}")
            return self
        if not self.tree or not all(1 <= f <= self.width for f in self.tree):
            raise ValueError(f"tree {self.tree}: branching factors must be 1..width ({self.width})")
        nodes, level = 0, 1
        for f in self.tree:
            level *= f
            nodes += level
        if nodes > 512:
            raise ValueError(f"tree {self.tree}: {nodes} nodes, more than 512")
        return self

    def make_drafter(self, runner=None, runners=None):
        from workers.token_recycling import TokenRecyclingDrafter, TreeTemplate

        template = TreeTemplate.paper() if self.tree == "paper" else TreeTemplate.branching(self.tree)
        return TokenRecyclingDrafter(width=self.width, template=template, name=self.name)
