"""Strategy kinds, one module each (how to add one: docs/architecture.md).

A module holds its kind's config model (a `StrategyConfig` subclass with a `kind` literal; YAML
`strategies:` entries are validated into it) and the hooks of orchestrator/strategies/base.py: which
drafter models it needs, how its drafter (or engine) is built in process and through Ray, its placement
checks and what the capacity simulator needs to know of it. `KINDS` below is the registry: the rest of
the code reaches a kind only through these hooks, never by testing for its type.
"""
from __future__ import annotations

from orchestrator.strategies.base import RayContext, StrategyConfig
from orchestrator.strategies.cascade import CascadeStrategy
from orchestrator.strategies.cross_vocab import CrossVocabStrategy
from orchestrator.strategies.draft_model import DraftModelStrategy
from orchestrator.strategies.duodecoding import DuoDecodingStrategy
from orchestrator.strategies.easyspec import EasySpecStrategy
from orchestrator.strategies.hierarchy import HierarchyStrategy
from orchestrator.strategies.opt_tree import OptTreeStrategy
from orchestrator.strategies.ouroboros import OuroborosStrategy
from orchestrator.strategies.prompt_lookup import PromptLookupStrategy
from orchestrator.strategies.rasd import RasdStrategy
from orchestrator.strategies.token_recycling import TokenRecyclingStrategy

# kind -> config model; one line per kind
KINDS: dict[str, type[StrategyConfig]] = {
    "draft_model": DraftModelStrategy,
    "prompt_lookup": PromptLookupStrategy,
    "easyspec": EasySpecStrategy,
    "cascade": CascadeStrategy,
    "duodecoding": DuoDecodingStrategy,
    "token_recycling": TokenRecyclingStrategy,
    "hierarchy": HierarchyStrategy,
    "opt_tree": OptTreeStrategy,
    "cross_vocab": CrossVocabStrategy,
    "ouroboros": OuroborosStrategy,
    "rasd": RasdStrategy,
}

__all__ = ["KINDS", "RayContext", "StrategyConfig"]
