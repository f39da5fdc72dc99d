"""`kind: opt_tree`: OPT-Tree (workers/opt_tree.py, core/opt_tree.py, docs/opt_tree.md): the draft model
grows an adaptive tree each step, layer by layer, keeping the nodes of highest path probability, until a
layer adds less than `threshold` to the expected number of accepted tokens; the target verifies the
global top `max_nodes` nodes as one tree.

Its drafter only calls `runner.forward`, so through Ray it drafts in the drafter actor of its model like
`draft_model` does (the default `ray_drafter`), batched with other requests' forwards when the actor's
batch_drafting is on. Not simulated by the capacity model (its tree verifications of up to `max_nodes`
rows fit none of placement/speculative_model.py's families).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import StrategyConfig
from orchestrator.strategies.draft_model import DRAFT_VOCAB_HELP, TrimmedVocab, vocab_trim_args

# The paper's defaults (core/opt_tree.py has them too; not imported here: loading a config stays torch-free)
PAPER_MAX_NODES, PAPER_THRESHOLD, PAPER_MAX_DEPTH = 60, 0.5, 10


class OptTreeStrategy(StrategyConfig):
    kind: Literal["opt_tree"]
    drafter: str = Field(description="Key of models.drafters")
    max_nodes: int = Field(PAPER_MAX_NODES, ge=1, le=512, description=(
        "Nodes of the verified tree: the global top max_nodes by path probability (the paper's 60)"))
    threshold: float = Field(PAPER_THRESHOLD, ge=0.0, description=(
        "Stop growing once a layer raises the tree's expected accepted tokens by less than this (the paper's 0.5)"))
    max_depth: int = Field(PAPER_MAX_DEPTH, ge=1, le=64, description=(
        "Most layers per tree (the paper's 10); draft_length's k bounds it further each step"))
    width: int | None = Field(None, ge=1, le=512, description=(
        "Candidates kept per layer, each node offering as many children: the rows of one drafter "
        "forward (None = max_nodes, the paper's); smaller is cheaper on a CPU"))
    draft_vocab: TrimmedVocab = Field(0, description=DRAFT_VOCAB_HELP)
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=PAPER_MAX_DEPTH), description=(
        "Tree depth bound per step (the most tokens one step can accept): fixed, adaptive, goodput, "
        "heuristic or thompson (draft_length.policy); OPT-Tree stops earlier when a layer gains too little"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def drafts_by_forward(self):
        return True

    def unavailable(self):
        return None if isinstance(self.draft_vocab, int) else self.draft_vocab.missing_table()

    def make_drafter(self, runner, runners=None):
        from workers.opt_tree import OptTreeDrafter

        return OptTreeDrafter(runner, name=self.name, max_nodes=self.max_nodes, threshold=self.threshold,
                              max_depth=self.max_depth, width=self.width,
                              **vocab_trim_args(self.draft_vocab, self.name))
