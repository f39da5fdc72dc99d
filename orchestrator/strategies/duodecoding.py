"""`kind: duodecoding`: DuoDecoding (docs/duodecoding.md, orchestrator/duo.py): the drafter drafts round
i+1 in its own process (on the CPU, torch or llama.cpp) while the target verifies round i; dynamic
multi-sequence drafts; a draft budget matched to measured times. It runs an engine of its own."""
from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import Field, model_validator

from orchestrator.strategies.base import StrategyConfig


class DuoDecodingStrategy(StrategyConfig):
    kind: Literal["duodecoding"]
    drafter: str = Field(description="Key of models.drafters")
    backend: Literal["torch", "llama_cpp"] = Field("torch", description=(
        "Drafter runtime: torch (transformers weights via the model store) or llama_cpp (llama-cpp-python "
        "reading the GGUF directly; the optional extra `llama`)"))
    process: Literal["actor", "thread", "inline"] = Field("actor", description=(
        "Where the drafter runs: its own Ray actor process with its own torch threads (pipelined), a thread "
        "of this process (pipelined, one shared torch pool), or inline (sequential, same outputs; tests)"))
    threads: int = Field(1, ge=1, le=256, description="torch threads of the drafter actor's process")
    target_threads: int | None = Field(None, ge=1, le=256, description=(
        "torch threads of the target while a DuoDecoding request decodes (None: runtime.threads). When the "
        "drafter shares the target's cores, target + drafter threads should not exceed them. Process-wide: "
        "requests of other strategies decoding in this process at the same time run with it too"))
    gamma_init: int = Field(4, ge=1, le=64, description="Draft budget (tokens per round) before any measurement")
    gamma_min: int = Field(1, ge=1, le=64, description="Smallest budget the controller may choose")
    gamma_max: int = Field(16, ge=1, le=64, description="Largest budget the controller may choose")
    multi_sequence: bool = Field(True, description=(
        "Dynamic multi-sequence drafting (k sequences of budget/k tokens; False = one chain)"))
    top_alternatives: int = Field(8, ge=1, le=32, description=(
        "First-token candidates considered, x1 included (at most this many sequences)"))
    calibration_steps: int = Field(4, ge=0, le=64, description=(
        "Timed drafter/target steps at start-up that seed the budget (0 = start from gamma_init)"))

    @model_validator(mode="after")
    def _gamma_range(self):
        if not self.gamma_min <= self.gamma_init <= self.gamma_max:
            raise ValueError(f"need gamma_min <= gamma_init <= gamma_max, got {self.gamma_min}, "
                             f"{self.gamma_init}, {self.gamma_max}")
        return self

    def model_refs(self):
        return [("drafter", self.drafter)]

    def drafter_models(self):
        return []      # its drafter side loads its own model, on the CPU (a Ray actor or this process)

    def unavailable(self):
        if self.backend == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
            return "its llama.cpp drafter needs the optional extra: pip install -e '.[llama]'"
        return None

    def make_engine(self, config, target, eos_token_ids):
        from orchestrator.duo import build_duo_engine

        return build_duo_engine(self, config.models.drafters[self.drafter], target, eos_token_ids)

    def capacity_family(self):
        return "duodecoding"

    def capacity_gamma(self):
        return self.gamma_init      # its budget controller starts here

    def drafter_threads(self):
        return self.threads
