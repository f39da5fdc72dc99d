"""`kind: cross_vocab` checks its tokenizers before any drafter loads (CrossVocabStrategy.check_tokenizers):
`target_tokenizer` must load the tokenizer of models.target and the drafter's directory one of its own that
fits its model. A wrong or missing tokenizer is a ConfigError naming the key and the file; without the
check a wrong `target_tokenizer` builds a map that spells drafts in the wrong ids, output still equal to
plain decoding (verification is exact) and nothing reported: the broken version below.
(Through Ray, the same check before the actors start: tests/test_distribution_paths.py.)"""
from __future__ import annotations

import shutil

import pytest

from core.config import ConfigError
from orchestrator.build import build_engines
from orchestrator.strategies.cross_vocab import CrossVocabStrategy
from tests.conftest import VOCAB
from tests.drafting import assert_drafted
from tests.test_cross_vocab import (MERGES, PROMPTS, TARGET_TOKENS, cross_vocab_config, oracle, save_pair,  # noqa: F401
                                    target_model, tokenizer)
from workers.cross_vocab import tokenizer_difference

BPE = TARGET_TOKENS + [a + b for a, b in MERGES]


def test_tokenizer_difference_names_what_differs():
    chars = tokenizer(TARGET_TOKENS)
    assert tokenizer_difference(chars, tokenizer(TARGET_TOKENS)) is None
    swapped = TARGET_TOKENS[:3] + [TARGET_TOKENS[4], TARGET_TOKENS[3]] + TARGET_TOKENS[5:]
    assert tokenizer_difference(chars, tokenizer(swapped)) == f"2 of {VOCAB} tokens have other ids"
    assert tokenizer_difference(chars, tokenizer(TARGET_TOKENS[:-1])) == f"{VOCAB} tokens against {VOCAB - 1}"
    other_eos = tokenizer(TARGET_TOKENS, specials=["<pad>", "</s>", "<s>"])       # eos "<s>": id 1
    assert tokenizer_difference(chars, other_eos) == "end-of-sequence id 2 against 1"
    # one vocabulary, other merges: "!\"" spelled as one token by one, as two by the other
    assert tokenizer_difference(tokenizer(BPE, MERGES), tokenizer(BPE, MERGES[1:])) == "the same ids, another model"


@pytest.fixture
def pair_dir(tmp_path, target_model, oracle):
    save_pair(tmp_path, target_model, *oracle)        # target/ and draft/ (the oracle), each with its tokenizer
    return tmp_path


def with_target_tokenizer(root, spec: str):
    """The pair's config, its strategy's target_tokenizer set to `spec`."""
    cfg = cross_vocab_config(root)
    strategy = cfg.strategies[0].model_copy(update={"target_tokenizer": spec})
    return cfg.model_copy(update={"strategies": [strategy]})


def test_a_target_tokenizer_other_than_the_targets_is_a_config_error(pair_dir):
    cfg = with_target_tokenizer(pair_dir, str(pair_dir / "draft"))       # the drafter's own: other ids
    with pytest.raises(ConfigError, match=rf"strategy 'xv': target_tokenizer {pair_dir / 'draft'} is not the "
                                          rf"tokenizer of models.target.source {pair_dir / 'target'} \(\d+ of"):
        build_engines(cfg)


def test_without_the_check_a_wrong_target_tokenizer_spells_drafts_wrong_unreported(pair_dir, monkeypatch):
    """The broken version: the oracle's drafts, spelled with the wrong tokenizer, are mostly rejected."""
    def build_and_run(cfg):
        built = build_engines(cfg)
        results = [built.engines["xv"].generate(p, 16) for p in PROMPTS]
        assert [r.tokens for r in results] == [built.engines["plain"].generate(p, 16).tokens for p in PROMPTS]
        return results

    assert_drafted(build_and_run(cross_vocab_config(pair_dir)), all_accepted=True, what="the right tokenizer")
    monkeypatch.setattr(CrossVocabStrategy, "check_tokenizers", lambda self, config, target_tokenizer: None)
    wrong = build_and_run(with_target_tokenizer(pair_dir, str(pair_dir / "draft")))
    assert_drafted(wrong, what="no check")           # it runs, drafts, and says nothing
    with pytest.raises(AssertionError, match="acceptance rate"):
        assert_drafted(wrong, all_accepted=True)


def drop_tokenizer(model_dir) -> None:
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def test_missing_tokenizers_are_config_errors_naming_key_and_file(pair_dir):
    missing = pair_dir / "nowhere"
    with pytest.raises(ConfigError, match=rf"strategy 'xv': target_tokenizer {missing}: cannot resolve"):
        build_engines(with_target_tokenizer(pair_dir, str(missing)))
    shutil.copytree(pair_dir / "target", pair_dir / "bare")
    drop_tokenizer(pair_dir / "bare")                 # a model directory without a tokenizer
    with pytest.raises(ConfigError, match=rf"target_tokenizer {pair_dir / 'bare'}: no tokenizer in"):
        build_engines(with_target_tokenizer(pair_dir, str(pair_dir / "bare")))
    drop_tokenizer(pair_dir / "draft")
    with pytest.raises(ConfigError, match=rf"models.drafters.d.source {pair_dir / 'draft'}: no tokenizer in"):
        build_engines(cross_vocab_config(pair_dir))
    drop_tokenizer(pair_dir / "target")
    with pytest.raises(ConfigError, match=rf"models.target.source {pair_dir / 'target'} has no tokenizer"):
        build_engines(cross_vocab_config(pair_dir))


def test_a_drafter_tokenizer_larger_than_its_model_is_a_config_error(pair_dir):
    tokenizer(BPE, MERGES).save_pretrained(pair_dir / "draft")      # VOCAB + 20 tokens for a VOCAB-row model
    with pytest.raises(ConfigError, match=rf"models.drafters.d.source {pair_dir / 'draft'}: its tokenizer has "
                                          rf"{len(BPE)} tokens, its model {VOCAB}"):
        build_engines(cross_vocab_config(pair_dir))
