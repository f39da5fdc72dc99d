"""Turn a validated config into loaded models and ready engines (one process, no Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from orchestrator.config import (AdaptiveLength, CascadeStrategy, DraftModelStrategy, DuoDecodingStrategy,
                                 EasySpecStrategy, EngineConfig, GoodputLength, PromptLookupStrategy)
from orchestrator.draft_length import AdaptiveDraftLength, FixedDraftLength
from orchestrator.duo import build_duo_engine
from orchestrator.engine import SpeculativeEngine
from orchestrator.goodput import GoodputDraftLength, GoodputScheduler
from orchestrator.selection import missing_backend, runnable_strategies  # noqa: F401 (re-exported)
from workers.hugepages import move_to_hugepages
from workers.quantize import quantize_model_int8
from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter
from workers.cascade import CascadeDrafter
from workers.easyspec import EasySpecDrafter
from workers.mag import MaGDrafter, load_table
from workers.model_store import load_model
from workers.runner import ModelRunner

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA device is available")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def load_for_decoding(source: str, dtype: str, device: torch.device, quantize: str = "none",
                      with_tokenizer: bool = True):
    model, tokenizer = load_model(source, DTYPES[dtype], device, with_tokenizer=with_tokenizer)
    if quantize == "int8":
        if device.type != "cpu":
            raise ValueError("quantize: int8 is implemented for CPU drafters only")
        quantize_model_int8(model)
    if device.type == "cpu":
        move_to_hugepages(model)   # see workers/hugepages.py: ~1.4x faster decode steps here
    return model, tokenizer


def policy_factory(spec, scheduler: GoodputScheduler | None = None):
    """A new request's draft-length policy; `goodput` policies of one process share `scheduler`."""
    if isinstance(spec, AdaptiveLength):
        return lambda: AdaptiveDraftLength(k_init=spec.k_init, k_max=spec.k_max)
    if isinstance(spec, GoodputLength):
        shared = scheduler or GoodputScheduler()
        return lambda: GoodputDraftLength(shared, k_max=spec.k_max)
    return lambda: FixedDraftLength(spec.k)


@dataclass
class Built:
    config: EngineConfig
    device: torch.device
    target_model: object
    tokenizer: object
    target: ModelRunner
    engines: dict[str, SpeculativeEngine]                 # "plain" plus one per configured strategy
    drafter_models: dict[str, object] = field(default_factory=dict)
    # Chooses the draft lengths of every `goodput` request together; the server's verifier feeds it.
    scheduler: GoodputScheduler = field(default_factory=GoodputScheduler)


def build_engines(config: EngineConfig, only: list[str] | None = None) -> Built:
    """Load the target and the drafters the selected strategies need; build one engine per strategy."""
    if config.runtime.threads:
        torch.set_num_threads(config.runtime.threads)
    device = pick_device(config.runtime.device)
    model, tokenizer = load_for_decoding(config.models.target.source, config.models.target.dtype, device)
    target = ModelRunner(model, device)
    eos = eos_ids(model, tokenizer)
    built = Built(config, device, model, tokenizer, target,
                  {"plain": SpeculativeEngine(target, None, eos_token_ids=eos, name="plain")})
    runners: dict[str, ModelRunner] = {}
    for s in runnable_strategies(config, only):
        if isinstance(s, DuoDecodingStrategy):   # its drafter lives on the CPU, in its own process
            built.engines[s.name] = build_duo_engine(s, config.models.drafters[s.drafter], target, eos)
            continue
        for key in strategy_drafters(s):
            if key not in runners:
                spec = config.models.drafters[key]
                dmodel, _ = load_for_decoding(spec.source, spec.dtype, device, spec.quantize)
                # Draft and target probabilities are compared index by index.
                if dmodel.get_output_embeddings().out_features != model.get_output_embeddings().out_features:
                    raise ValueError(f"models.drafters.{key}: vocabulary size differs from the target's")
                built.drafter_models[key] = dmodel
                runners[key] = ModelRunner(dmodel, device)
        keys = strategy_drafters(s)
        drafter = make_drafter(s, runners[keys[0]] if keys else None, runners)
        built.engines[s.name] = SpeculativeEngine(target, drafter, policy_factory(s.draft_length, built.scheduler),
                                                  eos_token_ids=eos, name=s.name)
    return built


def strategy_drafters(s) -> list[str]:
    """The models.drafters keys a strategy loads (a cascade: several, top-down)."""
    if isinstance(s, CascadeStrategy):
        return list(s.drafters)
    return [s.drafter] if isinstance(s, (DraftModelStrategy, EasySpecStrategy)) else []


def make_drafter(s, runner: ModelRunner | None, runners: dict[str, ModelRunner] | None = None):
    """The drafter a strategy config describes; `runner` runs its draft model (None for prompt lookup),
    `runners` (keyed by models.drafters) every model a cascade names."""
    if isinstance(s, CascadeStrategy):
        if runners is None:     # a drafter actor (workers/actors.py) hosting a one-drafter cascade
            runners = {s.drafters[0]: runner} if s.drafters and runner is not None else {}
        if s.mag.table and not Path(s.mag.table).is_file():
            raise ValueError(f"strategy {s.name!r}: mag.table {s.mag.table!r} does not exist "
                             "(build it with `python launch.py mag-table`, docs/cascade.md)")
        mag = MaGDrafter(load_table(s.mag.table) if s.mag.table else None, s.mag.max_ngram, s.mag.min_ngram)
        return CascadeDrafter([runners[k] for k in s.drafters], mag, s.k_matrix, s.leniency,
                              level_names=list(s.drafters), name=s.name)
    if isinstance(s, EasySpecStrategy):
        return EasySpecDrafter(runner, degree=s.degree, mode=s.mode, calibration=s.calibration, groups=s.groups,
                               name=s.name)
    if isinstance(s, DraftModelStrategy):
        drafter = DraftModelDrafter(runner, name=s.drafter, min_confidence=s.min_confidence,
                                    draft_vocab=s.draft_vocab)
        if s.lookup_first is not None:
            lf = s.lookup_first
            drafter = LookupThenModelDrafter(PromptLookupDrafter(lf.max_ngram, lf.min_ngram), drafter, lf.k)
        return drafter
    if isinstance(s, PromptLookupStrategy):
        return PromptLookupDrafter(max_ngram=s.max_ngram, min_ngram=s.min_ngram, num_candidates=s.num_candidates)
    raise TypeError(type(s))  # pragma: no cover - the config union is closed
