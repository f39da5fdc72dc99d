"""What every strategy kind is: its config model (a `StrategyConfig` subclass with a `kind` literal)
and the hooks the rest of the code calls instead of testing for a kind.

Who calls which hook:
- `orchestrator/config.py` (EngineConfig): `model_refs` (every named drafter is a models.drafters key);
- `orchestrator/selection.py`: `unavailable` (an optional extra missing, a file not built);
- `orchestrator/build.py` (one process): `check_tokenizers`, then `make_engine`, else `drafter_models` +
  `make_drafter`;
- `placement/plan.py`: `actor_drafters`, `ray_problem`, `own_actors` (checks and shards before Ray);
- `orchestrator/ray_runtime.py`: `check_tokenizers` (before the actors start), then `make_engine`, else
  `ray_drafter`;
- `orchestrator/drafter_worker.py` (a drafter actor): `actor_drafters`, `drafts_by_forward`, `make_drafter`;
- `placement/capacity.py` (the simulator's step model): `capacity_family`, `capacity_gamma`,
  `review_chunk`, `model_every_step`, `drafter_threads`.
The defaults fit a strategy that drafts with the models it names, in a drafter actor through Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from pydantic import Field, model_validator

from core.config import Strict

if TYPE_CHECKING:     # the hooks import what they build when called: loading a config stays torch-free
    from workers.drafters import Drafter
    from workers.runner import ModelRunner


@dataclass
class RayContext:
    """What `ray_drafter` may use of the Ray runtime being built (orchestrator/ray_runtime.py)."""
    config: object                      # EngineConfig
    target: object                      # PipelineTarget: looks like a ModelRunner
    vocab: int                          # the target's vocabulary size
    threads: int | None                 # runtime.threads
    timeout: float | None               # cluster.actor_call_timeout_s
    # (models.drafters key, strategy name) -> a Drafter whose sessions live in that key's drafter actor
    remote_drafter: Callable[[str, str], Drafter]
    # strategy -> the plan's shards of its own actors (`own_actors`), rank order
    own_shards: Callable[[object], list]
    # a shard -> its ray actor options (name, resources, placement-group bundle)
    options: Callable[[object], dict]
    actors: dict = field(default_factory=dict)   # actor name -> handle; stopped with the runtime


class StrategyConfig(Strict):
    """Fields and hooks common to every strategy kind. A kind adds `kind: Literal["..."]`, its own
    fields (each with a description) and `draft_length`, and overrides the hooks that differ."""
    name: str = Field(description="Row name in reports and the value of a request's strategy override")

    @model_validator(mode="after")
    def _learned_length_needs_model_states(self):
        policy = getattr(getattr(self, "draft_length", None), "policy", None)
        if policy == "learned" and not self.reads_draft_states():
            raise ValueError(f"draft_length.policy learned: kind {getattr(self, 'kind', '?')} cannot use it; it "
                             "needs a drafter that drafts one token at a time with a model (kind draft_model, "
                             "without lookup_first), whose state the predictor reads each step")
        return self

    def reads_draft_states(self) -> bool:
        """Its drafter drafts one token at a time with a model and can read the drafter's state each step
        for the learned draft length (workers/draft_states.py)."""
        return False

    # ------------------------------------------------------------------ models
    def model_refs(self) -> list[tuple[str, str]]:
        """(dotted field, models.drafters key) of every drafter model the config names."""
        return []

    def drafter_models(self) -> list[str]:
        """The models.drafters keys loaded as ModelRunners for `make_drafter`, in its order."""
        return [key for _, key in self.model_refs()]

    def actor_drafters(self) -> list[str]:
        """Through Ray: the models.drafters keys it drafts with in a drafter actor (DrafterWorker),
        the first naming the actor; [] = its drafter needs no such actor."""
        return self.drafter_models()

    def own_vocabulary(self) -> bool:
        """Its drafter models tokenize text their own way (cross-vocabulary drafting): their vocabulary
        need not be the target's."""
        return False

    def drafts_by_forward(self) -> bool:
        """Its drafter only calls `forward()` of its runner, so a batching queue may stand in for it."""
        return False

    # ------------------------------------------------------------------ checks before anything loads
    def unavailable(self) -> str | None:
        """Why it cannot run on this machine (an optional extra not installed, a file not built), or None."""
        return None

    def ray_problem(self) -> str | None:
        """Why it cannot run through Ray (a placement it does not support), or None."""
        return None

    def check_tokenizers(self, config, target_tokenizer) -> None:
        """Once the target's tokenizer is loaded (None: its model has none), before any drafter model loads:
        raise ConfigError, naming the key and the file, when a tokenizer its drafter would read does not fit."""

    def own_actors(self) -> int:
        """Actors of its own (ranks) that the plan places like its first drafter model; 0 = none."""
        return 0

    # ------------------------------------------------------------------ building
    def make_drafter(self, runner: ModelRunner | None, runners: dict[str, ModelRunner] | None = None) -> Drafter:
        """Its drafter, in this process or a drafter actor: `runner` runs its first drafter model
        (None when it names none), `runners` every model it names (keyed by models.drafters)."""
        raise TypeError(f"strategy {self.name!r} ({type(self).__name__}) builds an engine of its own, no drafter")

    def make_engine(self, config, target, eos_token_ids: tuple[int, ...]):
        """An engine of its own over `target` (in process or through Ray), or None for the shared
        SpeculativeEngine around its drafter."""
        return None

    def ray_drafter(self, ctx: RayContext) -> Drafter:
        """Its drafter when the target runs in Ray actors: by default in the actor of its first drafter
        model, or beside the engine when it drafts without a model (a table scan)."""
        keys = self.actor_drafters()
        return ctx.remote_drafter(keys[0], self.name) if keys else self.make_drafter(None)

    # ------------------------------------------------------------------ capacity simulator
    def capacity_family(self) -> str | None:
        """Its step model's family (placement/speculative_model.FAMILIES); None = not simulated."""
        return None

    def capacity_gamma(self) -> int:
        """Tokens it drafts per step before anything is measured."""
        dl = self.draft_length
        if dl.policy == "fixed":
            return dl.k
        if dl.policy in ("adaptive", "heuristic", "adl"):
            return dl.k_init
        if dl.policy == "thompson":       # the expected run of prior draws above the threshold, at least 1
            import random
            rng = random.Random(0)
            p = sum(rng.betavariate(dl.prior_accepted, dl.prior_rejected) > dl.threshold for _ in range(2000)) / 2000
            return max(1, min(dl.k_max, round(p / (1 - p)) if p < 1 else dl.k_max))
        return dl.k_max   # goodput, learned: its longest draft; the simulation runs the scheduler (placement/simulate.py)

    def review_chunk(self) -> float:
        """Tokens of the bottom drafting level per review (a cascade's MaG); 1 otherwise."""
        return 1.0

    def model_every_step(self) -> bool:
        """It drafts every step with its model (a sibling that prices a hybrid's model forwards)."""
        return False

    def drafter_threads(self) -> int | None:
        """Threads of a drafter process of its own (None: a drafter actor's, from the placement)."""
        return None
