"""`kind: ouroboros`: Ouroboros (workers/ouroboros.py, docs/ouroboros.md). The draft model drafts a chain;
phrases the target produced in earlier verifications (a pool keyed by token, filled from the target's
argmax at every verified position and from the committed output) extend it into several candidates,
verified together as one tree whose common prefix is the chain, so a step can accept more tokens than
the chain holds.

Where the state lives: the phrase pool belongs to the strategy's one drafter, so it is shared by every
request of the strategy and kept across requests (per target model). Through Ray the drafter lives in
the drafter actor of its model (the default `ray_drafter`), the pool with it; there it is filled from the
committed output the engine sends with each propose (the target's argmax rows are not forwarded to
actors). Memory: at most pool_keys x phrases_per_key x phrase_len tokens. Not simulated by the
capacity model (its tree verifications fit none of placement/speculative_model.py's families).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import StrategyConfig


class OuroborosStrategy(StrategyConfig):
    kind: Literal["ouroboros"]
    drafter: str = Field(description="Key of models.drafters: the model that drafts the chain")
    pool_keys: int = Field(32768, ge=1, le=1 << 20, description=(
        "Most keys (tokens) in the phrase pool; the least recently used key is evicted beyond it"))
    phrases_per_key: int = Field(8, ge=1, le=64, description=(
        "Most phrases kept per key; the oldest is evicted beyond it"))
    phrase_len: int = Field(4, ge=1, le=32, description=(
        "Tokens per phrase: how far one phrase can extend a chain"))
    candidates: int = Field(4, ge=0, le=32, description=(
        "Phrases added to the chain per step (keyed by its last token first, then earlier ones, then "
        "the last committed token); 0 = the plain chain"))
    draft_vocab: int = Field(0, ge=0, description=(
        "> 0: the drafter scores only the draft_vocab lowest token ids plus the prompt's tokens "
        "(a cheaper output head; output unchanged). 0 = full vocabulary"))
    draft_length: DraftLength = Field(default_factory=FixedLength, description=(
        "Chain tokens the model drafts per step (phrases extend beyond it): fixed, adaptive, goodput, "
        "heuristic, thompson or adl (draft_length.policy)"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def drafts_by_forward(self):
        return True

    def make_drafter(self, runner, runners=None):
        from workers.ouroboros import OuroborosDrafter, PhrasePool

        pool = PhrasePool(self.pool_keys, self.phrases_per_key, self.phrase_len)
        return OuroborosDrafter(runner, name=self.name, candidates=self.candidates, pool=pool,
                                draft_vocab=self.draft_vocab)
