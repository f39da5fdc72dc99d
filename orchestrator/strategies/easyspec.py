"""`kind: easyspec`: EasySpec layer-parallel drafting (docs/easyspec.md). The draft model's layers are
grouped and each group's members computed from the same input, in one process (workers/easyspec.py)
or, with `workers: N`, on N Ray actors of their own joined by torch.distributed
(workers/easyspec_workers.py), placed like the drafter."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import DraftLength, FixedLength
from orchestrator.strategies.base import RayContext, StrategyConfig


class EasySpecStrategy(StrategyConfig):
    kind: Literal["easyspec"]
    drafter: str = Field(description="Key of models.drafters: the model whose layers are grouped")
    degree: int = Field(2, ge=1, le=16, description="Layers per fused group (the parallel degree)")
    mode: Literal["attn_only", "direct_mlp"] = Field("attn_only", description=(
        "What each group member contributes from the group's input: its attention (attn_only) or attention "
        "+ MLP(h + attention) (direct_mlp); docs/easyspec.md"))
    calibration: Literal["never", "prefill_only", "every_round", "every_mismatch"] = Field(
        "every_mismatch", description=("When the drafter recomputes, exactly and in layer order, the KV of "
                                       "accepted tokens (workers/easyspec.py: Calibration)"))
    groups: list[list[int]] | None = Field(None, description="Explicit layer groups (default: the paper's)")
    workers: int = Field(1, ge=1, le=16, description="1 = group members computed one after another in one "
                         "process; N > 1 = N Ray actors with the full draft weights, joined by torch.distributed")
    draft_length: DraftLength = Field(default_factory=FixedLength, description=(
        "Tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson or adl (draft_length.policy)"))

    @model_validator(mode="after")
    def _workers_cover_groups(self):
        largest = max((len(g) for g in self.groups), default=1) if self.groups else self.degree
        if self.workers > 1 and self.workers != largest:
            raise ValueError(f"workers ({self.workers}) must be 1 (in process) or the largest layer group's size "
                             f"({largest}: {'groups' if self.groups else 'degree'}), one worker per group member")
        return self

    def model_refs(self):
        return [("drafter", self.drafter)]

    def actor_drafters(self):
        return [self.drafter] if self.workers == 1 else []    # workers > 1: its own ranks instead

    def own_actors(self):
        return self.workers if self.workers > 1 else 0

    def make_drafter(self, runner, runners=None):
        from workers.easyspec import EasySpecDrafter

        return EasySpecDrafter(runner, degree=self.degree, mode=self.mode, calibration=self.calibration,
                               groups=self.groups, name=self.name)

    def ray_drafter(self, ctx: RayContext):
        if self.workers == 1:
            return super().ray_drafter(ctx)
        import ray

        from workers.easyspec_workers import DistributedEasySpecDrafter, start_ranks

        shards = ctx.own_shards(self)
        # max_restarts 0: a restarted rank could not rejoin the process group
        ranks = start_ranks(ctx.config.models.drafters[self.drafter].model_dump(), [self.model_dump()], self.workers,
                            "cuda" if shards[0].device == "gpu" else "cpu", ctx.threads or shards[0].cpus,
                            [{**ctx.options(s), "max_restarts": 0} for s in shards], ctx.timeout or 300.0)
        ctx.actors.update({s.name: h for s, h in zip(shards, ranks)})
        if ray.get(ranks[0].vocab_size.remote()) != ctx.vocab:
            raise ValueError(f"models.drafters.{self.drafter}: vocabulary size differs from the target's")
        return DistributedEasySpecDrafter(ranks, self.name, ctx.timeout)

    def capacity_family(self):
        return "easyspec"
