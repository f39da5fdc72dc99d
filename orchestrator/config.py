"""The whole cluster config file's model: the schema's pieces (core/config.py) and every strategy
kind's own model (orchestrator/strategies/), with the checks across them. Errors name the file and
the dotted key; unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import Field, TypeAdapter, model_validator

from core.config import (BenchConfig, ClusterSection, MainJobSection, ModelsConfig, NodePool, PlacementSection,
                         RuntimeConfig, ServerSection, Strict, load_yaml_model)
from orchestrator.strategies import KINDS

# One strategies: entry, validated into its kind's model (the registry orchestrator/strategies.KINDS).
Strategy = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]
StrategyAdapter = TypeAdapter(Strategy)   # validates one strategy dict (e.g. inside a Ray actor)


class EngineConfig(Strict):
    name: str = "local"
    models: ModelsConfig
    strategies: list[Strategy] = Field(default_factory=list)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    node_pools: list[NodePool] = Field(default_factory=list)
    placement: PlacementSection | None = None
    server: ServerSection = Field(default_factory=ServerSection)
    main_job: MainJobSection = Field(default_factory=MainJobSection)

    @model_validator(mode="after")
    def _references(self):
        if self.models.target.quantize != "none":
            raise ValueError("models.target.quantize: only drafters may be quantized (the target defines the output)")
        names = [s.name for s in self.strategies]
        if "plain" in names or len(set(names)) != len(names):
            raise ValueError(f"strategy names must be unique and not 'plain': {names}")
        for i, s in enumerate(self.strategies):
            for where, key in s.model_refs():
                if key not in self.models.drafters:
                    raise ValueError(f"strategies.{i}.{where}: {key!r} is not a key of models.drafters "
                                     f"({sorted(self.models.drafters)})")
        for field in ("hf_assistant", "hf_universal_assistant"):
            key = getattr(self.bench, field)
            if key and key not in self.models.drafters:
                raise ValueError(f"bench.{field}: {key!r} is not a key of models.drafters")
        if "universal_assisted" in self.bench.hf_peers and not self.bench.hf_universal_assistant:
            raise ValueError("bench.hf_peers: universal_assisted needs bench.hf_universal_assistant "
                             "(a models.drafters key)")
        if self.server.default_strategy != "plain" and self.server.default_strategy not in names:
            raise ValueError(f"server.default_strategy: {self.server.default_strategy!r} is not a configured strategy")
        pools = {p.name for p in self.node_pools}
        if self.placement is not None:
            if self.placement.target.pool not in pools:
                raise ValueError(f"placement.target.pool: {self.placement.target.pool!r} is not in node_pools ({sorted(pools)})")
            for key, d in self.placement.drafters.items():
                if key not in self.models.drafters:
                    raise ValueError(f"placement.drafters.{key}: not a key of models.drafters")
                if d.pool not in pools:
                    raise ValueError(f"placement.drafters.{key}.pool: {d.pool!r} is not in node_pools ({sorted(pools)})")
            colocated: dict[str, str] = {}
            for key, d in self.placement.drafters.items():
                for j, other in enumerate(d.colocate):
                    where = f"placement.drafters.{key}.colocate.{j}"
                    if other not in self.models.drafters:
                        raise ValueError(f"{where}: {other!r} is not a key of models.drafters "
                                         f"({sorted(self.models.drafters)})")
                    if other == key:
                        raise ValueError(f"{where}: {other!r} is this entry's own drafter")
                    if other in self.placement.drafters:
                        raise ValueError(f"{where}: {other!r} has its own placement.drafters entry; "
                                         "a drafter is placed once (its own entry or one colocate list)")
                    if other in colocated:
                        raise ValueError(f"{where}: {other!r} is already colocated with {colocated[other]!r}")
                    colocated[other] = key
        for i, name in enumerate(self.main_job.strategies or []):
            if name not in names and name != "plain":
                raise ValueError(f"main_job.strategies.{i}: {name!r} is not a configured strategy ({names})")
        for field in ("hf_assistant", "hf_universal_assistant"):
            key = getattr(self.bench, field)
            if key and self.models.drafters[key].quantize != "none":
                raise ValueError(f"bench.{field}: HF generate() needs an unquantized drafter")
        return self

    def strategy(self, name: str):
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(f"unknown strategy {name!r} (configured: {['plain'] + [s.name for s in self.strategies]})")


def load_config(path: str | Path) -> EngineConfig:
    return load_yaml_model(path, EngineConfig)
