"""`kind: cross_vocab`: OmniDraft's cross-vocabulary drafting (workers/cross_vocab.py, core/cross_vocab.py,
docs/cross_vocab.md): a small model with a tokenizer of its own drafts text; the draft is spelled in the
target's tokens and verified as usual. Greedy drafts use the greedy rule, sampled ones go to the
verifier as deterministic (one-hot) drafts, so output keeps the target's distribution.

Through Ray it drafts in the drafter actor of its model (the default `ray_drafter`); the actor loads
both tokenizers. Not simulated by the capacity model. Before any drafter loads, `check_tokenizers` makes
sure the map is built from the target's real tokenizer and the drafter's own: a tokenizer missing or not
the target's is a ConfigError naming the key and the file, not a map that spells drafts wrong.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import ConfigError, DraftLength, FixedLength
from core.paths import ModelSource
from orchestrator.strategies.base import StrategyConfig


class CrossVocabStrategy(StrategyConfig):
    kind: Literal["cross_vocab"]
    drafter: str = Field(description="Key of models.drafters: a model whose tokenizer differs from the target's")
    target_tokenizer: ModelSource = Field(description=(
        "Model spec whose tokenizer the target uses (models.target.source: an embedded model name or a "
        "model directory, a relative one read from the working directory of the process that loads the "
        "config, also through Ray); the drafter turns target tokens into text with it and its drafts back"))
    max_pairs: int = Field(65536, ge=1, le=1 << 22, description=(
        "Most (draft n-gram, target n-gram) pairs the drafter's map keeps, least recently used out first"))
    max_n: int = Field(4, ge=1, le=16, description="Longest n-gram, on either side, of a pair the map learns")
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=4), description=(
        "Target tokens drafted per step: fixed, adaptive, goodput, heuristic, thompson or adl (draft_length.policy)"))

    def model_refs(self):
        return [("drafter", self.drafter)]

    def own_vocabulary(self):
        return True

    def check_tokenizers(self, config, target_tokenizer):
        from transformers import AutoConfig

        from workers.cross_vocab import tokenizer_difference

        where = f"strategy {self.name!r}"
        target = config.models.target
        if target_tokenizer is None:
            raise ConfigError(f"{where}: models.target.source {target.source} has no tokenizer; cross-vocabulary "
                              "drafting spells the target's tokens as text")
        key = f"{where}: target_tokenizer"
        named_dir = _resolved(key, self.target_tokenizer, target.dtype).resolve()
        if named_dir != _resolved("models.target.source", target.source, target.dtype).resolve():
            named, _ = _tokenizer_at(key, self.target_tokenizer, target.dtype)      # other files: compare them
            if why := tokenizer_difference(named, target_tokenizer):
                raise ConfigError(f"{key} {self.target_tokenizer} is not the tokenizer of models.target.source "
                                  f"{target.source} ({why})")
        spec = config.models.drafters[self.drafter]
        key = f"{where}: models.drafters.{self.drafter}.source"
        draft, path = _tokenizer_at(key, spec.source, spec.dtype)
        rows = AutoConfig.from_pretrained(path, local_files_only=True).vocab_size
        if draft.vocab_size > rows:      # the base vocabulary (transformers may add tokens the model never sees)
            raise ConfigError(f"{key} {spec.source}: its tokenizer has {draft.vocab_size} tokens, its model "
                              f"{rows}: not the model's own tokenizer")

    def make_drafter(self, runner, runners=None):
        from workers.cross_vocab import CrossVocabDrafter

        where = f"strategy {self.name!r}"
        draft, _ = _tokenizer_at(f"{where}: models.drafters.{self.drafter}.source", runner.model.name_or_path)
        target, _ = _tokenizer_at(f"{where}: target_tokenizer", self.target_tokenizer)
        return CrossVocabDrafter(runner, draft, target, name=self.name, max_pairs=self.max_pairs, max_n=self.max_n)


def _resolved(key: str, source: str, dtype: str):
    """The directory of model spec `source`; ConfigError naming `key` if it cannot be found or built."""
    from workers.loading import DTYPES
    from workers.model_store import ModelStoreError, resolve_model_path

    try:
        return resolve_model_path(source, DTYPES[dtype])
    except (ModelStoreError, OSError) as e:
        raise ConfigError(f"{key} {source}: {e}") from None


def _tokenizer_at(key: str, source: str, dtype: str = "bfloat16"):
    """(the tokenizer saved with model spec `source`, its directory); ConfigError naming `key` if there is none."""
    from workers.model_store import TOKENIZER_FILES, load_tokenizer

    path = _resolved(key, source, dtype)
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {source}: {e}") from None
    if tokenizer is None:
        raise ConfigError(f"{key} {source}: no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)})")
    return tokenizer, path
