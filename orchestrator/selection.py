"""Which configured strategies a run builds (no torch, no Ray: `launch.py --dry-run` imports it)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from orchestrator.config import ConfigError, EngineConfig


def missing_backend(strategy) -> str | None:
    """Why a strategy cannot run here (an optional extra not installed), or None."""
    import importlib.util

    if getattr(strategy, "backend", None) == "llama_cpp" and importlib.util.find_spec("llama_cpp") is None:
        return "its llama.cpp drafter needs the optional extra: pip install -e '.[llama]'"
    return None


def unavailable(strategy) -> str | None:
    """Why a strategy cannot run here (an optional extra not installed, a MaG table not built), or None."""
    if why := missing_backend(strategy):
        return why
    table = getattr(getattr(strategy, "mag", None), "table", None)
    if table and not Path(table).is_file():
        return (f"its mag.table {table!r} does not exist (build it with `python launch.py mag-table`, "
                "docs/cascade.md)")
    return None


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
    the others skipped with a note (so the main job runs without optional extras or built tables)."""
    check_names(config, only)
    if only is not None:
        for i, s in enumerate(config.strategies):
            if s.name in only and (why := unavailable(s)):
                raise ConfigError(f"strategies.{i} ({s.name!r}): {why}")
        return [s for s in config.strategies if s.name in only]
    chosen = []
    for s in config.strategies:
        if why := unavailable(s):
            if log is not None:
                log(f"note: skipping strategy {s.name!r}: {why}")
        else:
            chosen.append(s)
    return chosen
