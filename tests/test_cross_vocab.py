"""Cross-vocabulary drafting (core/cross_vocab.py, workers/cross_vocab.py, `kind: cross_vocab`): tiny random
models whose tokenizers differ (built offline with `tokenizers`), greedy output equal to plain decoding,
the drafter's text and tokenizations kept in step, its n-gram map right and bounded, sampled output
following the target's distribution, and broken versions caught.

The "oracle" drafter is the target itself behind a tokenizer whose ids are a permutation of the target's:
another vocabulary spelling the same text, so a right mapping gets every draft accepted and a wrong one
does not. The BPE drafter merges character pairs, so its tokens and the target's seldom align one to one.
"""
from __future__ import annotations

import copy
import random
import threading

import pytest
import torch
import yaml

from core.cross_vocab import NgramMap, shared_boundary_pairs
from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.build import build_engines
from orchestrator.config import load_config
from orchestrator.engine import SpeculativeEngine
from tests.conftest import VOCAB, tiny_model
from tests.drafting import assert_drafted
from tests.test_distribution_paths import PARAMS, PROMPT, V, assert_follows_target, exact_joint, sample_outputs, small_model
from workers.cross_vocab import CrossVocabDrafter, CrossVocabSession, Speller
from workers.drafters import Draft
from workers.runner import ModelRunner

SPECIALS = ["<pad>", "<s>", "</s>"]                       # ids 0, 1, 2 as in tests/conftest.py
CHARS = [chr(c) for c in range(33, 33 + VOCAB - len(SPECIALS))]
MERGES = [(CHARS[i], CHARS[i + 1]) for i in range(0, 40, 2)]   # 20 pairs the BPE drafter spells as one token


def tokenizer(tokens: list[str], merges: list[tuple[str, str]] | None = None, specials=SPECIALS):
    """A character-level tokenizer over `tokens` (id = position), or a BPE one with `merges`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
        tok = Tokenizer(models.WordLevel(vocab, unk_token=tokens[0]))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    else:
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[0]))
    tok.decoder = decoders.Fuse()
    named = dict(zip(["pad_token", "bos_token", "eos_token"], specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def permuted(model, perm: list[int]):
    """The model behind another vocabulary: its token i is the original's token perm[i]."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[perm])
        clone.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[perm])
    return clone


def shuffled_ids(n: int, fixed: int, seed: int = 0) -> list[int]:
    rest = list(range(fixed, n))
    random.Random(seed).shuffle(rest)
    return list(range(fixed)) + rest


TARGET_TOKENS = SPECIALS + CHARS
PERM = shuffled_ids(VOCAB, len(SPECIALS))


@pytest.fixture(scope="module")
def target_model():
    return tiny_model("qwen2", seed=0, layers=3)


@pytest.fixture(scope="module")
def oracle(target_model):
    """(drafter model, its tokenizer): the target behind permuted ids."""
    return permuted(target_model, PERM), tokenizer([TARGET_TOKENS[i] for i in PERM])


@pytest.fixture(scope="module")
def bpe_target():
    """(target model, its BPE tokenizer): characters plus merged pairs, which the drafter spells as two."""
    model = tiny_model("qwen2", seed=0, layers=3)
    model.resize_token_embeddings(VOCAB + len(MERGES), mean_resizing=False)
    with torch.no_grad():     # the merged tokens as likely as some characters (fresh rows would never win)
        for layer, scale in ((model.get_input_embeddings(), 1.0), (model.get_output_embeddings(), 1.2)):
            layer.weight[VOCAB:] = layer.weight[40:40 + len(MERGES)] * scale
    return model.float().eval(), tokenizer(TARGET_TOKENS + [a + b for a, b in MERGES], MERGES)


@pytest.fixture(scope="module")
def char_drafter():
    """A random character-level drafter (ids permuted against the target's characters)."""
    return ModelRunner(tiny_model("llama", seed=1, layers=1)), tokenizer([TARGET_TOKENS[i] for i in PERM])


PROMPTS = [[3 + (7 * i + j * j) % (VOCAB - 3) for j in range(n)] for i, n in enumerate((6, 19, 33))]


def run(target_model, drafter, prompts=PROMPTS, k: int = 4, max_new: int = 24):
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target, None, eos_token_ids=(2,))
    spec = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(k), eos_token_ids=(2,), name="cross-vocab")
    expected = [plain.generate(p, max_new).tokens for p in prompts]
    results = [spec.generate(p, max_new) for p in prompts]
    return expected, results


def spy_sessions(monkeypatch) -> list[CrossVocabSession]:
    """Every session the drafters open, kept for inspection after the requests."""
    sessions: list[CrossVocabSession] = []
    original = CrossVocabSession.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        sessions.append(self)
    monkeypatch.setattr(CrossVocabSession, "__init__", init)
    return sessions


def assert_in_step(session: CrossVocabSession) -> None:
    """The committed target tokens, the text and the drafter's tokens spell the same thing."""
    drafter = session.drafter
    assert session.spelled == len(session.context)
    assert drafter.target.decode(session.context) == session.text
    assert drafter.draft.decode(session.draft_ids) == session.text, "the drafter's tokens lost step with the text"


def assert_pairs_spell_alike(drafter: CrossVocabDrafter) -> None:
    """Every learned pair spells one text on both sides."""
    assert len(drafter.pairs), "no pair learned"
    for draft, target in drafter.pairs._pairs.items():
        assert drafter.draft.decode(list(draft)) == drafter.target.decode(list(target)), (draft, target)


def off_by_one_spell(monkeypatch, speller=Speller) -> None:
    """A broken boundary: every token of `speller` (a class: both tokenizers) said to end one character early."""
    original = speller.spell

    def spell(*args):
        text, ends = original(*args)
        return text, [None if e is None else max(e - 1, 0) for e in ends]
    monkeypatch.setattr(speller, "spell", spell)


# ------------------------------------------------------------------ the pure pieces
def test_shared_boundary_pairs_on_a_hand_example():
    # text "abcd": draft tokens "ab" "c" "d" (ids 10 11 12), target "a" "b" "cd" (ids 1 2 3)
    pairs = shared_boundary_pairs([10, 11, 12], [2, 3, 4], [1, 2, 3], [1, 2, 4], max_n=4)
    assert pairs == ([((10,), (1, 2)), ((11, 12), (3,))], [2, 4])
    assert shared_boundary_pairs([10, 11, 12], [2, 3, 4], [1, 2, 3], [1, 2, 4], max_n=1) == ([], [])
    # a token ending inside a character (None) is no boundary
    assert shared_boundary_pairs([10, 11], [None, 2], [5], [2], max_n=4) == ([((10, 11), (5,))], [2])


def test_map_converts_by_longest_pairs_and_stays_bounded():
    m = NgramMap(max_entries=3, max_n=2)
    m.learn([((1,), (7,)), ((1, 2), (8,)), ((3,), (9, 9))])
    assert m.convert([1, 2, 3, 1]) == [8, 9, 9, 7]
    assert m.convert([4]) is None and (m.hits, m.misses) == (1, 1)
    m.learn([((5,), (6,))])                          # (1,) was used last by convert; (1, 2) also: (3,) ... evicted
    assert len(m) == 3
    assert m.convert([5]) == [6]


def test_map_bound_holds_under_concurrent_learning():
    m = NgramMap(max_entries=64, max_n=2)
    errors: list[BaseException] = []

    def learn(seed: int):
        try:
            rng = random.Random(seed)
            for _ in range(500):
                m.learn([((rng.randrange(1000),), (rng.randrange(1000),))])
                m.convert([rng.randrange(1000)])
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=learn, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(m) == 64


# ------------------------------------------------------------------ greedy, through the engine
def test_oracle_drafter_of_another_vocabulary_gets_every_draft_accepted(target_model, oracle, monkeypatch):
    sessions = spy_sessions(monkeypatch)
    drafter = CrossVocabDrafter(ModelRunner(oracle[0]), oracle[1], tokenizer(TARGET_TOKENS))
    expected, results = run(target_model, drafter)
    assert [r.tokens for r in results] == expected
    assert_drafted(results, all_accepted=True, what="oracle")
    assert sum(r.stats.drafted_tokens for r in results) > len(results) * 24 // 2
    for s in sessions:
        assert_in_step(s)
    assert_pairs_spell_alike(drafter)


def test_off_by_one_boundary_is_caught(target_model, oracle, monkeypatch):
    off_by_one_spell(monkeypatch)
    sessions = spy_sessions(monkeypatch)
    drafter = CrossVocabDrafter(ModelRunner(oracle[0]), oracle[1], tokenizer(TARGET_TOKENS))
    expected, results = run(target_model, drafter)
    assert [r.tokens for r in results] == expected                   # lossless whatever the mapping
    with pytest.raises(AssertionError):
        assert_drafted(results, all_accepted=True)
    with pytest.raises(AssertionError):
        for s in sessions:
            assert_in_step(s)


def test_bpe_target_equals_plain_and_pairs_spell_alike(bpe_target, char_drafter, monkeypatch):
    sessions = spy_sessions(monkeypatch)
    drafter = CrossVocabDrafter(*char_drafter, bpe_target[1])
    expected, results = run(bpe_target[0], drafter, k=3)
    assert [r.tokens for r in results] == expected
    assert_drafted(results, what="bpe target")
    for s in sessions:
        assert_in_step(s)
    assert sum(len(s.draft_ids) - len(s.context) for s in sessions) > 0, "the target merged nothing"
    assert_pairs_spell_alike(drafter)
    assert any(len(d) != len(t) for d, t in drafter.pairs._pairs.items()), "only one-to-one pairs"


def test_bpe_off_by_one_target_boundary_is_caught(bpe_target, char_drafter, monkeypatch):
    drafter = CrossVocabDrafter(*char_drafter, bpe_target[1])
    off_by_one_spell(monkeypatch, drafter.target)          # the target's ends only: wrong pairs
    expected, results = run(bpe_target[0], drafter, k=3)
    assert [r.tokens for r in results] == expected
    with pytest.raises(AssertionError):
        assert_pairs_spell_alike(drafter)


def test_pair_map_stays_bounded_over_requests(bpe_target, char_drafter, monkeypatch):
    def check(drafter):
        learned = []
        original = drafter.pairs.learn
        drafter.pairs.learn = lambda pairs: (learned.extend(pairs), original(pairs))
        expected, results = run(bpe_target[0], drafter, k=3)
        assert [r.tokens for r in results] == expected
        assert len(set(learned)) > 8, "too few pairs offered to test the bound"
        assert len(drafter.pairs) <= 8
    check(CrossVocabDrafter(*char_drafter, bpe_target[1], max_pairs=8))
    # broken: a map that never evicts
    monkeypatch.setattr(NgramMap, "learn", lambda self, pairs: self._pairs.update(dict(pairs)))
    with pytest.raises(AssertionError):
        check(CrossVocabDrafter(*char_drafter, bpe_target[1], max_pairs=8))


# ------------------------------------------------------------------ the strategy, built from a config
def save_pair(root, target_model, oracle_model, oracle_tokenizer):
    target_model.save_pretrained(root / "target")
    tokenizer(TARGET_TOKENS).save_pretrained(root / "target")
    oracle_model.save_pretrained(root / "draft")
    oracle_tokenizer.save_pretrained(root / "draft")


def cross_vocab_config(root, k: int = 3):
    cfg = {"name": "xv", "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                                    "drafters": {"d": {"source": str(root / "draft"), "dtype": "float32"}}},
           "strategies": [{"name": "xv", "kind": "cross_vocab", "drafter": "d",
                           "target_tokenizer": str(root / "target"), "draft_length": {"policy": "fixed", "k": k}}],
           "runtime": {"device": "cpu", "threads": 1}}
    (root / "xv.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(root / "xv.yaml")


def test_strategy_builds_from_config_and_equals_plain(tmp_path, target_model, oracle):
    save_pair(tmp_path, target_model, *oracle)
    built = build_engines(cross_vocab_config(tmp_path))
    for prompt in PROMPTS:
        expected = built.engines["plain"].generate(prompt, 16).tokens
        res = built.engines["xv"].generate(prompt, 16)
        assert res.tokens == expected
        assert_drafted(res, accepted=True, what="xv from config")


# ------------------------------------------------------------------ sampling keeps the target's distribution
LETTERS = list("abcdefgh")[:V]


@pytest.fixture(scope="module")
def sampled_engine():
    target = small_model(0, layers=2)
    perm = shuffled_ids(V, 0, seed=3)
    drafter = CrossVocabDrafter(ModelRunner(permuted(target, perm)), tokenizer([LETTERS[i] for i in perm], specials=[]),
                                tokenizer(LETTERS, specials=[]))
    engine = SpeculativeEngine(ModelRunner(target), drafter, lambda: FixedDraftLength(3), name="cross-vocab")
    return engine, exact_joint(target, PROMPT, PARAMS)


def test_sampled_output_follows_the_target(sampled_engine):
    engine, exact = sampled_engine
    outs, stats = sample_outputs(engine)
    assert_follows_target(outs, stats, exact, "cross_vocab")


def test_sampled_drafts_claiming_a_wrong_q_are_caught(sampled_engine, monkeypatch):
    engine, exact = sampled_engine
    original = CrossVocabSession.propose

    def propose(self, k):       # broken: the drafts claim to come from a uniform q over target tokens
        draft = original(self, k)
        return Draft(tokens=draft.tokens, probs=torch.full((len(draft), V), 1.0 / V) if len(draft) else None)
    monkeypatch.setattr(CrossVocabSession, "propose", propose)
    outs, stats = sample_outputs(engine, samples=200)      # caught with p-values far below ALPHA
    with pytest.raises(AssertionError, match="deviate"):
        assert_follows_target(outs, stats, exact, "broken cross_vocab")
