"""Which configured strategies a run builds (no torch, no Ray: `launch.py --dry-run` imports it)."""
from __future__ import annotations

from typing import Callable

from core.config import ConfigError
from orchestrator.config import EngineConfig


def check_names(config: EngineConfig, only: list[str] | None) -> None:
    """Every name in `only` (e.g. --strategies) is 'plain' or a configured strategy."""
    names = [s.name for s in config.strategies]
    for name in only or []:
        if name != "plain" and name not in names:
            raise ConfigError(f"--strategies: {name!r} is not a configured strategy "
                              f"(configured: {', '.join(['plain'] + names)}; or 'all')")


def _print(line: str) -> None:
    print(line, flush=True)


def runnable_strategies(config: EngineConfig, only: list[str] | None,
                        log: Callable[[str], None] | None = _print):
    """The strategies to build: `only` (all must be runnable), or every configured one that is,
    the others skipped with a note (so the main job runs without optional extras or built tables;
    each kind's `unavailable` says why)."""
    check_names(config, only)
    if only is not None:
        for i, s in enumerate(config.strategies):
            if s.name in only and (why := s.unavailable()):
                raise ConfigError(f"strategies.{i} ({s.name!r}): {why}")
        return [s for s in config.strategies if s.name in only]
    chosen = []
    for s in config.strategies:
        if why := s.unavailable():
            if log is not None:
                log(f"note: skipping strategy {s.name!r}: {why}")
        else:
            chosen.append(s)
    return chosen
