"""File paths in strategy configs and model specs (core/paths.py): each is made absolute where the config is
loaded, against that process's working directory, so a drafter actor, which rebuilds the strategy (and its
models' specs) from the driver's dump in the Ray worker's own directory, reads the file the driver checked.

- every str field of every strategy kind and of a model spec is a path (LocalPath / ModelSource) or a name
  (NOT_PATHS): a new path field written as a plain `str` is caught;
- every path field comes out absolute from a relative value, in a config of its kind; a loader that keeps
  the relative path (core.paths.absolute_path replaced) is caught;
- through Ray, VocabTrim's frequency table given relative to the driver's directory is loaded by the
  drafter actor (elsewhere) and greedy output equals plain decoding; the driver shipping the relative path
  is caught (the actor's error names the path under its own directory). RASD's corpus: tests/test_rasd.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

import pytest
import torch
from pydantic import BaseModel, Field

import core.paths
from core.config import ModelSpec
from core.paths import LocalPath, ModelSource
from orchestrator.engine import SpeculativeEngine
from orchestrator.strategies import KINDS, StrategyConfig
from tests.drafting import assert_drafted
from tests.test_distribution_paths import model_dir, placed  # noqa: F401 (model_dir: a fixture)
from tests.test_rasd import ray_node, ray_worker_directory  # noqa: F401 (ray_node: a fixture)
from workers.runner import ModelRunner

# str fields that name no file: field name -> what it names
NOT_PATHS = {"name": "the strategy's row name", "drafter": "a models.drafters key",
             "drafters": "models.drafters keys"}
MARKS = {LocalPath.__metadata__[0]: "file", ModelSource.__metadata__[0]: "source"}
# what a drafter actor rebuilds from the driver's dump: a strategy of each kind, and the specs of its models
SCHEMAS = {**KINDS, "model": ModelSpec}


# ------------------------------------------------------------------ the schema's str fields
def _str_leaves(annotation, metadata=()):
    """For each str the annotation can hold, the metadata around it; for each model, the model."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *more = get_args(annotation)
        yield from _str_leaves(base, metadata + tuple(more))
    elif origin in (Union, UnionType, list, tuple, dict):
        for arg in get_args(annotation):
            yield from _str_leaves(arg, metadata)
    elif annotation is str:
        yield metadata
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation


def str_fields(kinds) -> dict[tuple[str, str], str | None]:
    """(model class, field) -> "file" / "source" (how core/paths.py resolves it) or None (a plain str), over
    every model reachable from the strategy kinds' fields."""
    found, seen, todo = {}, set(), list(kinds.values())
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            for leaf in _str_leaves(annotation):
                if isinstance(leaf, type):
                    todo.append(leaf)
                else:
                    found[(model.__name__, name)] = next((MARKS[m] for m in leaf if m in MARKS), None)
    return found


def unclassified(kinds) -> list[tuple[str, str]]:
    return sorted(key for key, mark in str_fields(kinds).items() if mark is None and key[1] not in NOT_PATHS)


def test_every_str_field_is_a_path_or_a_name():
    assert not unclassified(SCHEMAS), "a str field neither resolved as a path (core/paths.py) nor in NOT_PATHS"


def test_a_path_field_written_as_plain_str_is_caught():
    class PlainPathStrategy(StrategyConfig):      # broken: a file the drafter reads, left relative
        kind: Literal["plain_path"]
        table: str | None = Field(None, description="A table the drafter reads")

    assert unclassified({**SCHEMAS, "plain_path": PlainPathStrategy}) == [("PlainPathStrategy", "table")]


# ------------------------------------------------------------------ every path field comes out absolute
FILES = ["tables/vocab.pt", "tables/mag.pt", "corpora/hierarchy.pt", "corpora/rasd.pt", "weights/length.pt",
         "models/target-tokenizer/tokenizer.json"]
EXAMPLES = [     # every path field of every schema, relative to the directory the config is loaded in
    {"name": "sd", "kind": "draft_model", "drafter": "d",
     "draft_vocab": {"size": 8, "mode": "frequency", "table": "tables/vocab.pt"},
     "draft_length": {"policy": "learned", "weights": "weights/length.pt"}},
    {"name": "tree", "kind": "opt_tree", "drafter": "d",
     "draft_vocab": {"size": 8, "mode": "frequency", "table": "tables/vocab.pt"}},
    {"name": "cascade", "kind": "cascade", "drafters": [], "k_matrix": [[2]], "mag": {"table": "tables/mag.pt"}},
    {"name": "hierarchy", "kind": "hierarchy", "corpus": "corpora/hierarchy.pt"},
    {"name": "rasd", "kind": "rasd", "drafter": "d", "corpus": "corpora/rasd.pt",
     "draft_vocab": {"size": 8, "mode": "frequency", "table": "tables/vocab.pt"}},
    {"name": "cross", "kind": "cross_vocab", "drafter": "d", "target_tokenizer": "models/target-tokenizer"},
    {"source": "models/target-tokenizer"},                # a model spec: models.target / models.drafters.<key>
]


def path_values(config: BaseModel, marks: dict) -> dict[tuple[str, str], str]:
    """(model class, field) -> value of each path field set in a validated config, sub-models included."""
    found = {}
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            found.update(path_values(value, marks))
        elif isinstance(value, str) and marks.get((type(config).__name__, name)):
            found[(type(config).__name__, name)] = value
    return found


def relative_paths_left(directory: Path) -> list[str]:
    """Each path field of each kind validated from EXAMPLES in `directory`: those not resolved to the file
    there, and the path fields no example sets."""
    marks = str_fields(SCHEMAS)
    left, covered = [], set()
    for example in EXAMPLES:
        kind = example.get("kind", "model")
        config = SCHEMAS[kind].model_validate(example)
        assert getattr(config, "unavailable", lambda: None)() is None, config.unavailable()
        for key, value in path_values(config, marks).items():
            covered.add(key)
            if not (Path(value).is_absolute() and Path(value).is_relative_to(directory) and Path(value).exists()):
                left.append(f"{kind}: {key[0]}.{key[1]} = {value}")
    return left + [f"no example sets {c}.{f}" for (c, f), mark in marks.items() if mark and (c, f) not in covered]


@pytest.fixture
def config_directory(tmp_path, monkeypatch):
    for relative in FILES:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_path_field_comes_out_absolute(config_directory):
    assert relative_paths_left(config_directory) == []
    embedded = "qwen2.5-coder-1.5b"                 # a model spec that names no file stays as written
    assert KINDS["cross_vocab"].model_validate({**EXAMPLES[-2], "target_tokenizer": embedded}).target_tokenizer == embedded
    assert ModelSpec.model_validate({"source": embedded}).source == embedded


def test_a_loader_keeping_relative_paths_is_caught(config_directory, monkeypatch):
    monkeypatch.setattr(core.paths, "absolute_path", lambda path: path)
    left = relative_paths_left(config_directory)
    marked = [key for key, mark in str_fields(SCHEMAS).items() if mark]
    assert {line.split(": ", 1)[1].split(" = ")[0] for line in left} == {f"{c}.{f}" for c, f in marked}


# ------------------------------------------------------------------ through Ray: VocabTrim's table
RELATIVE_TABLE = "vocab-table.pt"     # model_dir's frequency table, beside the YAML in the driver's directory
PROMPTS = [[3, 5, 3, 5, 3], [1, 2, 3], [6, 2, 6, 2]]
NEW_TOKENS = 12


def relative_table_through_ray(ray, model_dir, monkeypatch, name: str) -> None:
    """A VocabTrim strategy whose frequency table is given relative to the driver's directory, its drafter
    in a drafter actor (a Ray worker in another directory): greedy output equals plain decoding, drafted."""
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_dir / "target", torch_dtype=torch.float32).eval()
    expected = [SpeculativeEngine(ModelRunner(target)).generate(p, NEW_TOKENS).tokens for p in PROMPTS]
    worker_dir = ray_worker_directory(ray)
    assert worker_dir != model_dir and not (worker_dir / RELATIVE_TABLE).exists()   # only the driver's resolves
    monkeypatch.chdir(model_dir)
    strategy = {"name": "sd-vocab-relative", "kind": "draft_model", "drafter": "d",
                "draft_vocab": {"size": 2, "mode": "frequency", "table": RELATIVE_TABLE},
                "draft_length": {"policy": "fixed", "k": 2}}
    built, runtime = placed(model_dir, name, [strategy])
    try:
        results = [built.engines["sd-vocab-relative"].generate(p, NEW_TOKENS) for p in PROMPTS]
    finally:
        runtime.shutdown()
    assert [r.tokens for r in results] == expected, "through Ray, VocabTrim diverged from plain greedy decoding"
    assert_drafted(results, what="Ray, sd-vocab-relative")


def test_ray_actor_reads_a_relative_vocab_table_as_the_driver_does(ray_node, model_dir, monkeypatch):
    relative_table_through_ray(ray_node, model_dir, monkeypatch, "vocab-relative")


def test_a_vocab_table_resolved_in_the_actor_is_caught(ray_node, model_dir, monkeypatch):
    """Broken: the driver ships the relative path, so the actor resolves it against its own directory."""
    monkeypatch.setattr(core.paths, "absolute_path", lambda path: path)
    read_there = ray_worker_directory(ray_node) / RELATIVE_TABLE
    with pytest.raises(ray_node.exceptions.RayActorError,
                       match=re.escape(f"draft_vocab.table '{read_there}' does not exist")):
        relative_table_through_ray(ray_node, model_dir, monkeypatch, "vocab-relative-broken")
