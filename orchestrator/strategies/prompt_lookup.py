"""`kind: prompt_lookup`: drafts by copying what followed the context's latest n-gram earlier in the
context (one match as a chain, several merged into a tree); no model, so it runs beside the engine
(workers/drafters.py: PromptLookupDrafter)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import StrategyConfig


class PromptLookupStrategy(StrategyConfig):
    kind: Literal["prompt_lookup"]
    max_ngram: int = Field(3, ge=1, le=16, description="Longest context n-gram to match")
    min_ngram: int = Field(1, ge=1, le=16, description="Shortest context n-gram to match")
    num_candidates: int = Field(1, ge=1, le=16, description="Matches merged into a tree draft (1 = a chain)")
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=8), description=(
        "Tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson or adl (draft_length.policy)"))

    def make_drafter(self, runner=None, runners=None):
        from workers.drafters import PromptLookupDrafter

        return PromptLookupDrafter(max_ngram=self.max_ngram, min_ngram=self.min_ngram,
                                   num_candidates=self.num_candidates)

    def capacity_family(self):
        return "prompt_lookup"
