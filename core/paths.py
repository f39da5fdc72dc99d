"""File paths in the config, read where the config is loaded.

A strategy is validated on the driver and again in a drafter actor, from the driver's dump, in the Ray
worker's directory (the raylet's), not the driver's. A relative path is therefore made absolute by the
first validation, against the working directory of the process that loads the config (not the YAML
file's directory); the actor's validation finds it absolute and keeps it. On a multi-node cluster the
absolute path must exist on the drafter's node too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator


def absolute_path(path: str) -> str:
    """`path` against this process's working directory."""
    return str(Path(path).absolute())


def model_source(spec: str) -> str:
    """A model spec that names an existing file or directory, made absolute; anything else (an embedded
    model name) as written."""
    return absolute_path(spec) if Path(spec).exists() else spec


# Looked up when called, not bound when a config class is defined: a test replaces them to show the bug.
def _file_where_loaded(path: str) -> str:
    return absolute_path(path)


def _source_where_loaded(spec: str) -> str:
    return model_source(spec)


# A config field naming a file the drafter reads (a table, a corpus, weights); `LocalPath | None` keeps None.
LocalPath = Annotated[str, AfterValidator(_file_where_loaded)]
# A config field naming a model or tokenizer: an embedded name, or a directory / file read like a LocalPath.
ModelSource = Annotated[str, AfterValidator(_source_where_loaded)]
