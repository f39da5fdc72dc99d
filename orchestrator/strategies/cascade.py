"""`kind: cascade`: CS-Drafting (docs/cascade.md): target <- drafters (top-down) <- MaG, vertical and
horizontal cascades set by `k_matrix` (workers/cascade.py, workers/mag.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.config import DraftLength, FixedLength, NgramRange
from core.paths import LocalPath
from orchestrator.strategies.base import StrategyConfig


class MaGSpec(NgramRange):
    """CS-Drafting's statistical bottom level (workers/mag.py)."""
    table: LocalPath | None = Field(None, description=(
        "Bigram table from `launch.py mag-table` (None = bigrams of the request's own context); a relative "
        "path is read from the working directory of the process that loads the config (core/paths.py)"))
    max_ngram: int = Field(8, ge=1, le=64, description="Longest context suffix matched before copying")
    min_ngram: int = Field(1, ge=1, le=64, description="Shorter suffixes fall through to the bigram table")


class CascadeStrategy(StrategyConfig):
    kind: Literal["cascade"]
    drafters: list[str] = Field(default_factory=list, description=(
        "Keys of models.drafters, largest first; each reviews the level below ([] = MaG alone)"))
    mag: MaGSpec = Field(default_factory=MaGSpec, description="The statistical bottom level")
    k_matrix: list[list[int]] = Field(description=(
        "Square, one row per reviewer (the target, then each drafter), one column per drafting level "
        "(each drafter, then MaG); entries are draft-length increments, left of the diagonal 0"))
    leniency: list[float] | None = Field(None, description=(
        "Per drafter (>= 1): it accepts x with probability min(1, leniency * p(x) / q(x)); "
        "never applies to the target. None = all 1"))
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=64), description=(
        "Caps the k_matrix draft (the schedule sets its length)"))

    @model_validator(mode="after")
    def _shapes(self):
        from workers.cascade import validate_k_matrix

        validate_k_matrix(self.k_matrix, len(self.drafters) + 1)   # its errors start with "k_matrix"
        if self.leniency is not None and (len(self.leniency) != len(self.drafters)
                                          or any(x < 1 for x in self.leniency)):
            raise ValueError(f"leniency: one value >= 1 per drafter ({len(self.drafters)}), got {self.leniency}")
        return self

    def model_refs(self):
        return [(f"drafters.{j}", key) for j, key in enumerate(self.drafters)]

    def unavailable(self):
        if self.mag.table and not Path(self.mag.table).is_file():
            return (f"its mag.table {self.mag.table!r} does not exist (build it with `python launch.py mag-table`, "
                    "docs/cascade.md)")
        return None

    def ray_problem(self):
        if len(self.drafters) > 1:
            return ("cascades of several neural drafters run in process only for now (launch.py serve "
                    "--in-process, or bench); through Ray a cascade may name one drafter")
        return None

    def make_drafter(self, runner, runners=None):
        from workers.cascade import CascadeDrafter
        from workers.mag import MaGDrafter, load_table

        if runners is None:     # a drafter actor hosting a one-drafter cascade
            runners = {self.drafters[0]: runner} if self.drafters and runner is not None else {}
        if self.mag.table and not Path(self.mag.table).is_file():
            raise ValueError(f"strategy {self.name!r}: mag.table {self.mag.table!r} does not exist "
                             "(build it with `python launch.py mag-table`, docs/cascade.md)")
        mag = MaGDrafter(load_table(self.mag.table) if self.mag.table else None, self.mag.max_ngram,
                         self.mag.min_ngram)
        return CascadeDrafter([runners[k] for k in self.drafters], mag, self.k_matrix, self.leniency,
                              level_names=list(self.drafters), name=self.name)

    def capacity_family(self):
        return "cs_drafting"

    def capacity_gamma(self):
        return sum(self.k_matrix[0])     # the target's row is the whole draft

    def review_chunk(self):
        return self.k_matrix[-1][-1]     # MaG tokens per review
