"""`kind: draft_model`: a smaller model of the target's vocabulary drafts a chain (optionally stopping
at a low-confidence token, scoring a trimmed vocabulary, or copying from the prompt first: a hybrid).
The drafter is workers/drafters.py's DraftModelDrafter (LookupThenModelDrafter for the hybrid)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import DraftLength, FixedLength, NgramRange
from orchestrator.strategies.base import StrategyConfig


class LookupFirst(NgramRange):
    """Copy from the context when its suffix n-gram occurred before; draft with the model otherwise."""
    max_ngram: int = Field(3, ge=1, le=16, description="Longest context n-gram to match")
    min_ngram: int = Field(2, ge=1, le=16, description="Shorter matches fall through to the model")
    k: int = Field(10, ge=1, le=64, description="Tokens copied per lookup draft")


class DraftModelStrategy(StrategyConfig):
    kind: Literal["draft_model"]
    drafter: str = Field(description="Key of models.drafters")
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Stop a draft after a token the drafter gave less than this probability (0 = off)"))
    draft_vocab: int = Field(0, ge=0, description=(
        "> 0: the drafter scores only the draft_vocab lowest token ids plus the prompt's tokens "
        "(a cheaper output head; output unchanged, acceptance may drop). 0 = full vocabulary"))
    lookup_first: LookupFirst | None = Field(None, description="Prompt lookup before the model (a hybrid)")
    draft_length: DraftLength = Field(default_factory=FixedLength, description=(
        "Tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson or adl (draft_length.policy)"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def drafts_by_forward(self):
        return True

    def make_drafter(self, runner, runners=None):
        from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter

        drafter = DraftModelDrafter(runner, name=self.drafter, min_confidence=self.min_confidence,
                                    draft_vocab=self.draft_vocab)
        if self.lookup_first is not None:
            lf = self.lookup_first
            drafter = LookupThenModelDrafter(PromptLookupDrafter(lf.max_ngram, lf.min_ngram), drafter, lf.k)
        return drafter

    def ray_drafter(self, ctx):
        """The model drafts in its actor; a hybrid's context lookup runs beside the engine, so a step that
        copies (or, under the goodput scheduler, drafts nothing) makes no round trip to the actor. The
        actor's session runs the same lookup first and finds nothing where this one found nothing."""
        remote = super().ray_drafter(ctx)
        if self.lookup_first is None:
            return remote
        from workers.drafters import LookupThenModelDrafter, PromptLookupDrafter

        lf = self.lookup_first
        return LookupThenModelDrafter(PromptLookupDrafter(lf.max_ngram, lf.min_ngram), remote, lf.k)

    def capacity_family(self):
        return "hybrid" if self.lookup_first is not None else "draft_model"

    def model_every_step(self):
        return self.lookup_first is None and not self.min_confidence
