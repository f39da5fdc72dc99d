"""`kind: rasd`: retrieval-augmented speculative decoding (workers/rasd.py, core/rasd.py, docs/rasd.md):
the draft model's OPT-Tree fused with a retrieval tree (continuations from the request's context, then
from an optional static corpus built by `launch.py build-corpus`), the retrieval tree scored by the
draft model and pruned below `prune_threshold`, fused by longest-prefix matching and capped at
`max_nodes`; the target verifies the fused tree.

The OPT-Tree fields (drafter, threshold, max_depth, width, draft_vocab, draft_length) are OptTreeStrategy's;
`max_nodes` here is the fused tree's size and `draft_nodes` the draft model's tree's. Its drafter only
calls `runner.forward`, so through Ray it drafts in its model's drafter actor (the corpus is loaded
there), as OPT-Tree does. A relative `corpus` path is made absolute where the config is read (a LocalPath,
core/paths.py): the actor rebuilds the strategy from its dump, in the Ray node's working directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config import NgramRange
from core.paths import LocalPath
from orchestrator.strategies.hierarchy import BUILD_HINT
from orchestrator.strategies.opt_tree import OptTreeStrategy


class RasdStrategy(OptTreeStrategy, NgramRange):
    kind: Literal["rasd"]
    max_nodes: int = Field(16, ge=1, le=512, description=(
        "Nodes of the verified tree: the fused tree's nodes of highest path probability"))
    draft_nodes: int = Field(10, ge=1, le=512, description=(
        "Nodes of the draft model's own tree (OPT-Tree's max_nodes)"))
    width: int | None = Field(4, ge=1, le=512, description=(
        "Draft model tree: candidates kept per layer, each node offering as many children (the rows of "
        "one drafter forward; None = draft_nodes)"))
    prune_threshold: float = Field(0.1, ge=0.0, le=1.0, description=(
        "A retrieved token is kept when the draft model gives its whole path from the root at least "
        "this probability (0 keeps every retrieved token)"))
    sources: list[Literal["context", "recent", "corpus"]] = Field(
        default_factory=lambda: ["context", "corpus"], description=(
            "Retrieval sources, read in this order: the request's context, the server's recent "
            "generations, the static corpus (used only when `corpus` is set)"))
    max_ngram: int = Field(3, ge=1, le=16, description="Longest suffix n-gram matched to retrieve")
    min_ngram: int = Field(2, ge=1, le=16, description="Shortest such n-gram")
    num_candidates: int = Field(4, ge=1, le=32, description=(
        "Retrieved continuations (each up to the step's k tokens) merged into the retrieval tree"))
    corpus: LocalPath | None = Field(None, description=(
        "Static corpus table from `launch.py build-corpus`, a relative path read from the working directory "
        "of the process that loads the config, also through Ray (None = the other sources only)"))

    @model_validator(mode="after")
    def _distinct_sources(self):
        if len(set(self.sources)) != len(self.sources) or not self.sources:
            raise ValueError(f"sources: one or more distinct names, got {self.sources}")
        return self

    def unavailable(self):
        if problem := super().unavailable():
            return problem
        if self.corpus and "corpus" in self.sources and not Path(self.corpus).is_file():
            return f"its corpus {self.corpus!r} does not exist ({BUILD_HINT})"
        return None

    def make_drafter(self, runner, runners=None):
        from workers.hierarchy import HierarchyDrafter, RecentGenerations, load_corpus
        from workers.rasd import RasdDrafter

        corpus = None
        if self.corpus and "corpus" in self.sources:
            if not Path(self.corpus).is_file():
                raise ValueError(f"strategy {self.name!r}: corpus {self.corpus!r} does not exist ({BUILD_HINT})")
            corpus = load_corpus(self.corpus)
        sizes = range(self.min_ngram, self.max_ngram + 1)
        # without the "recent" source the table is never read: keep it one key small
        recent = RecentGenerations(sizes) if "recent" in self.sources else RecentGenerations(sizes, capacity=1)
        retrieval = HierarchyDrafter(self.max_ngram, self.min_ngram, self.num_candidates, recent=recent,
                                     corpus=corpus, levels=tuple(self.sources), name=f"{self.name}-retrieval")
        # the draft model's tree is OPT-Tree's drafter as its kind builds it, with draft_nodes for max_nodes
        tree = OptTreeStrategy.make_drafter(self.model_copy(update={"max_nodes": self.draft_nodes}), runner)
        return RasdDrafter(tree, retrieval, max_nodes=self.max_nodes, prune_threshold=self.prune_threshold,
                           name=self.name)
