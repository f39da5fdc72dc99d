"""Workload files (cluster_configs/workloads/*.yaml): arrivals, length distributions, SLO.

Validated on load (unknown keys are errors; errors name the file and the dotted key).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.config import load_yaml_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fixed(_Strict):
    kind: Literal["fixed"]
    value: int = Field(ge=1, description="Every request has this many tokens")

    def sample(self, rng: random.Random) -> int:
        return self.value


class Uniform(_Strict):
    kind: Literal["uniform"]
    low: int = Field(ge=1)
    high: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class LogNormal(_Strict):
    kind: Literal["lognormal"]
    median: float = Field(gt=0, description="exp(mu)")
    sigma: float = Field(ge=0, description="Standard deviation of log(length)")
    max: int = Field(32768, ge=1, description="Lengths are clipped to this")

    def sample(self, rng: random.Random) -> int:
        return max(1, min(self.max, round(rng.lognormvariate(math.log(self.median), self.sigma))))


Simple = Annotated[Union[Fixed, Uniform, LogNormal], Field(discriminator="kind")]


class Component(_Strict):
    name: str
    weight: float = Field(gt=0, description="Relative share of requests")
    prompt_tokens: Simple
    output_tokens: Simple


class PoissonArrivals(_Strict):
    kind: Literal["poisson"]
    rates: list[float] = Field(min_length=1, description="Request rates to sweep (requests/s, whole cluster)")
    requests: int = Field(300, ge=1, description="Requests simulated per rate")

    @model_validator(mode="after")
    def _positive(self):
        if any(r <= 0 for r in self.rates):
            raise ValueError(f"rates must be > 0, got {self.rates}")
        return self


class ClosedLoopArrivals(_Strict):
    kind: Literal["closed_loop"]
    concurrency: list[int] = Field(min_length=1, description="Client concurrency levels to sweep")
    requests_per_client: int = Field(1, ge=1, description="Requests each client sends, one after another")
    requests: int | None = Field(None, ge=1, description=(
        "Requests in all at every level, sent by the c clients as each finishes (overrides "
        "requests_per_client; as scripts/capacity_validation.py sends its prompts)"))
    min_requests: int | None = Field(None, ge=1, description=(
        "Requests at a level: max(concurrency x requests_per_client, min_requests) (overrides `requests`; "
        "as scripts/serving_bench.py --min-requests and --requests-per-client send them, so p99 has more "
        "than one sample at low levels)"))


Arrivals = Annotated[Union[PoissonArrivals, ClosedLoopArrivals], Field(discriminator="kind")]


class Slo(_Strict):
    ttft_p99_s: float | None = Field(None, gt=0, description="99th percentile time to first token")
    tpot_p50_s: float | None = Field(None, gt=0, description="Median per-token latency after the first token")


class Workload(_Strict):
    name: str
    description: str = ""
    arrivals: Arrivals
    mix: list[Component] = Field(min_length=1, description="Request classes with their length distributions")
    temperature: float = Field(0.0, ge=0, description="> 0: drafts carry probabilities (bigger transfers)")
    slo: Slo = Field(default_factory=Slo)
    acceptance: dict[str, float] = Field(default_factory=dict, description=(
        "Per-token acceptance rate by strategy name or family (draft_model, easyspec, ...); "
        "overridden by --bench measurements and --alpha"))
    bench_categories: list[str] | None = Field(None, description=(
        "Bench categories whose records give the acceptance (None = all of the bench's prompts)"))
    seed: int = 0

    @model_validator(mode="after")
    def _alphas(self):
        for k, a in self.acceptance.items():
            if not 0 <= a <= 1:
                raise ValueError(f"acceptance.{k}: must be in [0, 1], got {a}")
        return self

    def sampler(self):
        """(prompt_len(rng), output_len(rng)) drawing the class first, then its lengths; one class per request."""
        weights = [c.weight for c in self.mix]
        chosen: list[Component] = []

        def prompt_len(rng: random.Random) -> int:
            chosen.append(rng.choices(self.mix, weights)[0])
            return chosen[-1].prompt_tokens.sample(rng)

        def output_len(rng: random.Random) -> int:
            return chosen[-1].output_tokens.sample(rng)
        return prompt_len, output_len


def load_workload(path: str | Path) -> Workload:
    return load_yaml_model(path, Workload, "workload")
