"""`kind: hierarchy`: Hierarchy Drafting (workers/hierarchy.py, docs/hierarchy.md): up to
`num_candidates` continuations from three token databases read in order of temporal locality (the
request's context, the server's recent generations, an optional static corpus from
`launch.py build-corpus`), merged into one tree draft.

It needs no model, so it drafts beside the engine, in process and through Ray alike (the default
`ray_drafter` calls `make_drafter(None)`): one `HierarchyDrafter` per strategy in the engine's process,
and with it the recent-generations table, shared by every request of that strategy (bounded by
`recent_capacity` keys; a lock makes it safe under the concurrent requests of the global verifier).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config import DraftLength, FixedLength, NgramRange
from core.paths import LocalPath
from orchestrator.strategies.base import StrategyConfig

BUILD_HINT = "build it with `python launch.py build-corpus`, docs/hierarchy.md"


class HierarchyStrategy(StrategyConfig, NgramRange):
    kind: Literal["hierarchy"]
    max_ngram: int = Field(3, ge=1, le=16, description=(
        "Longest n-gram matched in the context and used as a key of the recent generations"))
    min_ngram: int = Field(1, ge=1, le=16, description="Shortest such n-gram")
    num_candidates: int = Field(7, ge=1, le=32, description=(
        "Continuations merged into the tree draft, taken from the levels in order (the paper's 7)"))
    levels: list[Literal["context", "recent", "corpus"]] = Field(
        default_factory=lambda: ["context", "recent", "corpus"], description=(
            "Databases read, in this order (the paper's: context, recent generations, corpus); "
            "leave one out to switch it off"))
    recent_capacity: int = Field(32768, ge=1, le=10_000_000, description=(
        "Keys (n-grams) the recent-generations table holds, least recently used evicted first "
        "(< 64 MB with the default 32768 x 4 x 8 tokens, ~10 MB on generated text)"))
    recent_per_key: int = Field(4, ge=1, le=64, description="Latest distinct continuations kept per key")
    continuation_tokens: int = Field(8, ge=1, le=64, description=(
        "Tokens stored per recent continuation (a draft from that level is at most this long)"))
    corpus: LocalPath | None = Field(None, description=(
        "Static corpus table from `launch.py build-corpus`, a relative path read from the working directory "
        "of the process that loads the config (None = context and recent generations only)"))
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=8), description=(
        "Tokens per candidate continuation: fixed, adaptive, goodput, heuristic or thompson"))

    @model_validator(mode="after")
    def _distinct_levels(self):
        if len(set(self.levels)) != len(self.levels) or not self.levels:
            raise ValueError(f"levels: one or more distinct names, got {self.levels}")
        return self

    def unavailable(self):
        if self.corpus and "corpus" in self.levels and not Path(self.corpus).is_file():
            return f"its corpus {self.corpus!r} does not exist ({BUILD_HINT})"
        return None

    def make_drafter(self, runner=None, runners=None):
        from workers.hierarchy import HierarchyDrafter, RecentGenerations, load_corpus

        corpus = None
        if self.corpus and "corpus" in self.levels:
            if not Path(self.corpus).is_file():
                raise ValueError(f"strategy {self.name!r}: corpus {self.corpus!r} does not exist ({BUILD_HINT})")
            corpus = load_corpus(self.corpus)
        recent = RecentGenerations(range(self.min_ngram, self.max_ngram + 1), self.recent_capacity,
                                   self.recent_per_key, self.continuation_tokens)
        return HierarchyDrafter(self.max_ngram, self.min_ngram, self.num_candidates, recent=recent,
                                corpus=corpus, levels=tuple(self.levels), name=self.name)

    def capacity_family(self):
        return "prompt_lookup"     # drafting is table lookups (free); its alpha comes from a bench
