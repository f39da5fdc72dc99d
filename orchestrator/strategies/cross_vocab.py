"""`kind: cross_vocab`: OmniDraft's cross-vocabulary drafting (workers/cross_vocab.py, core/cross_vocab.py,
docs/cross_vocab.md): a small model with a tokenizer of its own drafts text; the draft is spelled in the
target's tokens and verified as usual. Greedy drafts use the greedy rule, sampled ones go to the
verifier as deterministic (one-hot) drafts, so output keeps the target's distribution.

Through Ray it drafts in the drafter actor of its model (the default `ray_drafter`); the actor loads
both tokenizers. Not simulated by the capacity model.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import StrategyConfig


class CrossVocabStrategy(StrategyConfig):
    kind: Literal["cross_vocab"]
    drafter: str = Field(description="Key of models.drafters: a model whose tokenizer differs from the target's")
    target_tokenizer: str = Field(description=(
        "Model spec whose tokenizer the target uses (models.target.source: an embedded model name or a "
        "model directory); the drafter turns target tokens into text with it and its drafts back"))
    max_pairs: int = Field(65536, ge=1, le=1 << 22, description=(
        "Most (draft n-gram, target n-gram) pairs the drafter's map keeps, least recently used out first"))
    max_n: int = Field(4, ge=1, le=16, description="Longest n-gram, on either side, of a pair the map learns")
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=4), description=(
        "Target tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson or adl (draft_length.policy)"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def own_vocabulary(self):
        return True

    def make_drafter(self, runner, runners=None):
        from workers.cross_vocab import CrossVocabDrafter
        from workers.model_store import load_tokenizer, resolve_model_path

        return CrossVocabDrafter(runner, load_tokenizer(runner.model.name_or_path),
                                 load_tokenizer(resolve_model_path(self.target_tokenizer)), name=self.name,
                                 max_pairs=self.max_pairs, max_n=self.max_n)
