"""Turn a validated config into loaded models and ready engines (one process, no Ray)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.config import AdaptiveLength, AdlLength, GoodputLength, HeuristicLength, LearnedLength, ThompsonLength
from core.draft_length import (AdaptiveDraftLength, AdaptiveDraftLengthADL, FixedDraftLength, HeuristicDraftLength,
                               ThompsonDraftLength)
from orchestrator.config import EngineConfig
from orchestrator.engine import SpeculativeEngine
from orchestrator.goodput import GoodputDraftLength, GoodputScheduler
from orchestrator.selection import runnable_strategies
from workers.loading import eos_ids, load_for_decoding, pick_device
from workers.runner import ModelRunner


def policy_factory(spec, scheduler: GoodputScheduler | None = None, group: str = ""):
    """A new request's draft-length policy; `goodput` policies of one process share `scheduler`, and
    those of one strategy (`group`, its name) pool their acceptance."""
    if isinstance(spec, AdaptiveLength):
        return lambda: AdaptiveDraftLength(k_init=spec.k_init, k_max=spec.k_max)
    if isinstance(spec, GoodputLength):
        shared = scheduler or GoodputScheduler()
        return lambda: GoodputDraftLength(shared, k_max=spec.k_max, group=group)
    if isinstance(spec, HeuristicLength):
        return lambda: HeuristicDraftLength(k_init=spec.k_init, k_max=spec.k_max)
    if isinstance(spec, ThompsonLength):
        return lambda: ThompsonDraftLength(k_max=spec.k_max, threshold=spec.threshold,
                                           prior=(spec.prior_accepted, spec.prior_rejected))
    if isinstance(spec, AdlLength):
        return lambda: AdaptiveDraftLengthADL(k_init=spec.k_init, k_min=spec.k_min, k_max=spec.k_max,
                                              delta=spec.delta, beta=spec.beta)
    if isinstance(spec, LearnedLength):   # k_max bounds it; the drafter's predictor cuts each draft (draft_states.py)
        return lambda: FixedDraftLength(spec.k_max)
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
    chosen = runnable_strategies(config, only)
    for s in chosen:               # every tokenizer check before the first drafter model loads
        s.check_tokenizers(config, tokenizer)
    for s in chosen:
        engine = s.make_engine(config, target, eos)    # an engine of its own (DuoDecoding), else None
        if engine is None:
            keys = s.drafter_models()
            for key in keys:
                if key not in runners:
                    spec = config.models.drafters[key]
                    dmodel, _ = load_for_decoding(spec.source, spec.dtype, device, spec.quantize)
                    # Draft and target probabilities are compared index by index.
                    if (not s.own_vocabulary() and
                            dmodel.get_output_embeddings().out_features != model.get_output_embeddings().out_features):
                        raise ValueError(f"models.drafters.{key}: vocabulary size differs from the target's")
                    built.drafter_models[key] = dmodel
                    runners[key] = ModelRunner(dmodel, device)
            drafter = s.make_drafter(runners[keys[0]] if keys else None, {k: runners[k] for k in keys})
            drafter.open_at_first_draft()     # in this process: a request that never drafts prefills nothing
            engine = SpeculativeEngine(target, drafter, policy_factory(s.draft_length, built.scheduler, s.name),
                                       eos_token_ids=eos, name=s.name)
        built.engines[s.name] = engine
    return built
