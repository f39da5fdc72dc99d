"""Hierarchy Drafting (workers/hierarchy.py): each database, the order they are read in, greedy output
equal to plain decoding, the recent generations helping a repeated request, concurrency through one
shared drafter and the global verifier, and the corpus command."""
from __future__ import annotations

import json
import threading

import pytest

from core.draft_length import AdaptiveDraftLength, FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.engine import SpeculativeEngine
from tests.drafting import assert_drafted
from workers.hierarchy import (CorpusTable, HierarchyDrafter, RecentGenerations, build_corpus, load_corpus,
                               save_corpus)
from workers.runner import ModelRunner

MAX_NEW = 40


def candidates(draft) -> list[list[int]]:
    """The root-to-leaf paths of a draft, in the order their leaves were added (a chain: itself)."""
    if draft.parents is None:
        return [list(draft.tokens)] if len(draft) else []
    children = {p for p in draft.parents if p >= 0}
    paths = []
    for leaf in (i for i in range(len(draft)) if i not in children):
        path, node = [], leaf
        while node >= 0:
            path.append(draft.tokens[node])
            node = draft.parents[node]
        paths.append(path[::-1])
    return paths


# ------------------------------------------------------------------ the databases
def test_recent_generations_keep_the_latest_distinct_continuations_per_key():
    recent = RecentGenerations(ngram_sizes=(2,), capacity=100, per_key=2, continuation_tokens=3)
    recent.add([1, 2, 10, 11, 12], start=2)
    recent.add([1, 2, 20, 21, 22], start=2)
    assert recent.lookup([7, 1, 2], limit=5) == [(20, 21, 22), (10, 11, 12)]      # most recent first
    recent.add([1, 2, 30, 31, 32], start=2)
    assert recent.lookup([1, 2], limit=5) == [(30, 31, 32), (20, 21, 22)]         # per_key bound
    recent.add([1, 2, 30, 31], start=2)                                           # a prefix adds nothing
    assert recent.lookup([1, 2], limit=5) == [(30, 31, 32), (20, 21, 22)]
    assert recent.lookup([1, 2], limit=1) == [(30, 31, 32)]
    recent.add([1, 2, 20, 21, 22], start=2)                                       # seen again: front
    assert recent.lookup([1, 2], limit=5) == [(20, 21, 22), (30, 31, 32)]
    assert recent.lookup([5, 6], limit=5) == []
    recent.add([3, 4, 5, 6], start=4)                                             # positions before start: none
    assert recent.lookup([3, 4], limit=5) == [] and recent.lookup([4, 5], limit=5) == []


def test_recent_generations_longest_key_first_and_bounded_in_keys():
    recent = RecentGenerations(ngram_sizes=(1, 2), capacity=8, per_key=4, continuation_tokens=2)
    recent.add([5, 1, 7, 8], start=2)        # keys (1,) and (5, 1) -> (7, 8); (7,) and (1, 7) -> (8,)
    recent.add([6, 1, 9, 9], start=2)        # (1,) gets (9, 9) first; (6, 1) -> (9, 9)
    assert recent.lookup([5, 1], limit=3) == [(7, 8), (9, 9)]       # (5, 1) first, then (1,)'s others
    assert len(recent) == 7
    for i in range(50):
        recent.add([100 + i, 200 + i, 300 + i], start=1)
    assert len(recent) == 8                                          # LRU: never over capacity
    assert recent.lookup([5, 1], limit=3) == []                      # evicted
    assert recent.lookup([149, 249], limit=3) == [(349,)]            # the newest stay


def test_corpus_keeps_the_most_frequent_continuations_and_round_trips(tmp_path):
    seqs = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5, 6], [9, 2, 3, 4]]
    corpus = build_corpus(seqs, ngram_sizes=(2, 1), continuation_tokens=2, per_key=2)
    assert corpus.lookup([0, 1, 2], limit=5) == [(3, 4), (5, 6)]     # (1, 2): 3 4 twice, 5 6 once
    assert corpus.lookup([0, 9, 2], limit=5) == [(3, 4), (5, 6)]     # (9, 2) -> (3, 4); then (2,) -> (5, 6)
    only_frequent = build_corpus(seqs, ngram_sizes=(2,), continuation_tokens=2, min_count=2)
    assert only_frequent.lookup([1, 2], limit=5) == [(3, 4)]
    path = tmp_path / "corpus.pt"
    save_corpus(corpus, path)
    loaded = load_corpus(path)
    assert loaded.table == corpus.table and loaded.ngram_sizes == (2, 1) and loaded.continuation_tokens == 2
    (tmp_path / "junk.pt").write_bytes(b"not a corpus")
    with pytest.raises(Exception):
        load_corpus(tmp_path / "junk.pt")


# ------------------------------------------------------------------ the order of the levels
PROMPT = [40, 41, 42, 43, 1, 2, 50, 51, 52, 60, 1, 2]      # the context has "1 2" -> 50 51 52


def levels_drafter(levels=("context", "recent", "corpus"), num_candidates=7) -> HierarchyDrafter:
    recent = RecentGenerations(ngram_sizes=(2, 1), continuation_tokens=3)
    recent.add([1, 2, 70, 71, 72], start=2)                         # the server once generated "1 2 70 71 72"
    corpus = CorpusTable({(1, 2): [(80, 81, 82)]}, ngram_sizes=(2,), continuation_tokens=3)
    return HierarchyDrafter(max_ngram=2, min_ngram=1, num_candidates=num_candidates, recent=recent,
                            corpus=corpus, levels=levels)


def assert_read_in_temporal_order(drafter: HierarchyDrafter) -> None:
    """The context's match first, then the recent generations', then the corpus'; fewer candidates
    allowed = the later levels left out."""
    session = drafter.start(PROMPT, SamplingParams(), None)
    paths = candidates(session.propose(3))
    assert paths[:3] == [[50, 51, 52], [70, 71, 72], [80, 81, 82]], f"levels read out of order: {paths}"
    drafter.num_candidates = 2
    assert candidates(session.propose(3)) == [[50, 51, 52], [70, 71, 72]], "a later level displaced an earlier one"
    drafter.num_candidates = 1
    assert session.propose(3).tokens == [50, 51, 52] and session.propose(3).parents is None


def test_levels_are_read_in_order_of_temporal_locality():
    assert_read_in_temporal_order(levels_drafter())
    drafter = levels_drafter()
    session = drafter.start(PROMPT, SamplingParams(), None)
    draft = session.propose(2)
    assert max(len(p) for p in candidates(draft)) == 2 and len(set(zip(draft.parents, draft.tokens))) == len(draft)
    session.close()
    assert drafter.candidates_by_level == {"context": 1, "recent": 1, "corpus": 1}


def test_a_wrong_order_is_caught():
    """Negative control: a drafter reading the corpus first fails `assert_read_in_temporal_order`'s first
    assertion ("levels read out of order")."""
    with pytest.raises(AssertionError, match="levels read out of order"):
        assert_read_in_temporal_order(levels_drafter(levels=("corpus", "recent", "context")))


def test_no_match_anywhere_is_an_empty_draft_and_k_zero_too():
    session = levels_drafter().start([90, 91, 92], SamplingParams(), None)
    assert len(session.propose(4)) == 0
    assert len(levels_drafter().start(PROMPT, SamplingParams(), None).propose(0)) == 0


# ------------------------------------------------------------------ through the engine
def test_greedy_equals_plain(target_model, prompts):
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    drafter = HierarchyDrafter(max_ngram=3, num_candidates=7)     # one drafter: recent fills across requests
    engines = {"k4": SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4), name="hierarchy"),
               "adaptive": SpeculativeEngine(target, drafter, lambda: AdaptiveDraftLength(k_init=3, k_max=8),
                                             name="hierarchy")}
    for name, engine in engines.items():
        runs = []
        for prompt in prompts + prompts:                        # the repeats draft from the recent generations
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == plain.generate(prompt, MAX_NEW).tokens, f"{name} diverged from plain decoding"
            runs.append(res)
        assert_drafted(runs, accepted=True, what=name)
    assert len(drafter.recent) > 0 and drafter.candidates_by_level["recent"] > 0


def accepted_on_repeat(target, drafter, prompt, max_new: int = 16) -> int:
    """Accepted draft tokens of the second of two identical requests through one drafter."""
    engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(6))
    first = engine.generate(prompt, max_new)
    second = engine.generate(prompt, max_new)
    assert second.tokens == first.tokens
    return second.stats.accepted_tokens


class _NeverUpdated(RecentGenerations):
    """Broken on purpose: the recent generations never learn anything."""

    def add(self, tokens, start, end=None):
        pass


def test_recent_generations_help_a_repeated_request():
    """A target whose 16 tokens after this prompt do not repeat themselves (the tiny Llama repeats one
    token at once, and then the context alone drafts it): only the recent generations can draft them."""
    from tests.conftest import tiny_model

    target = ModelRunner(tiny_model("qwen2", seed=0, layers=3))
    prompt = [70, 12, 55, 31, 90, 8, 44, 61, 27, 9]
    without = accepted_on_repeat(target, HierarchyDrafter(levels=("context",)), prompt)
    with_recent = accepted_on_repeat(target, HierarchyDrafter(), prompt)
    assert with_recent >= without + 8, f"recent generations did not help: {with_recent} vs {without} accepted"
    # Negative control: with a database never updated the assertion above fails.
    broken = accepted_on_repeat(target, HierarchyDrafter(recent=_NeverUpdated()), prompt)
    assert not broken >= without + 8, f"a never-updated database helped: {broken} vs {without}"


def test_concurrent_requests_through_one_drafter_and_the_global_verifier(target_model, prompts):
    from orchestrator.global_verifier import GlobalVerifier
    from tests.test_global_verifier import SlowRunner

    plain_runner = ModelRunner(target_model)
    drafter = HierarchyDrafter(num_candidates=5)
    jobs = [prompts[i % len(prompts)] for i in range(8)]        # repeats: requests draft from each other
    expected = [SpeculativeEngine(plain_runner).generate(p, 32).tokens for p in jobs]
    verifier = GlobalVerifier(SlowRunner(target_model), max_batch=8)
    runs: list = [None] * len(jobs)
    try:
        engine = SpeculativeEngine(verifier, drafter, lambda: FixedDraftLength(4))

        def run(i):
            runs[i] = engine.generate(jobs[i], 32)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        verifier.close()
    assert [r.tokens for r in runs] == expected
    assert_drafted(runs, accepted=True, what="hierarchy, 8 concurrent requests")
    assert verifier.stats.max_rows >= 2, "no two requests were ever verified in one forward"


def test_the_recent_table_survives_threads_hammering_it():
    recent = RecentGenerations(ngram_sizes=(2, 1), capacity=64, per_key=2, continuation_tokens=4)
    errors = []

    def work(seed):
        try:
            for i in range(300):
                toks = [(seed * 7 + i * j) % 50 for j in range(12)]
                recent.add(toks, start=2)
                recent.lookup(toks[:5], limit=4)
        except Exception as exc:      # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(recent) <= 64


# ------------------------------------------------------------------ the corpus command and the config
def tokenizer_dir(path):
    """A model directory with only a config and a word-level tokenizer (ids < 96, like the tiny models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "def return the a of in is to and if for x y list sum value".split()
    tok = Tokenizer(models.WordLevel({w: i + 3 for i, w in enumerate(words)} | {"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    (path / "config.json").write_text("{}")
    return path


def test_build_corpus_command_writes_a_file_the_strategy_loads(tmp_path, capsys):
    import launch
    from orchestrator.strategies.hierarchy import HierarchyStrategy
    from workers.hierarchy import HierarchySession

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"task_id": "t/0", "prompt": "def sum of x", "output": "return the sum of x and y"},
        {"question_id": 1, "category": "qa", "turns": ["is the sum of x and y a value"]},
    ]) + "\n")
    out = tmp_path / "corpora" / "tiny.pt"
    model = tokenizer_dir(tmp_path / "tok")
    assert launch.main(["build-corpus", "--prompts", str(prompts), "--model", str(model), "--out", str(out),
                        "--max-ngram", "2", "--continuation-tokens", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    corpus = load_corpus(out)
    assert corpus.ngram_sizes == (2, 1) and corpus.meta["texts"] == 3
    strategy = HierarchyStrategy(name="h", kind="hierarchy", corpus=str(out), levels=["corpus"])
    assert strategy.unavailable() is None
    drafter = strategy.make_drafter(None)
    ids = {w: i + 3 for i, w in enumerate("def return the a of in is to and if for x y list sum value".split())}
    session = drafter.start([ids["def"], ids["sum"], ids["of"]], SamplingParams(), None)
    assert isinstance(session, HierarchySession)
    assert [ids["x"], ids["and"], ids["y"]] in candidates(session.propose(3))
    missing = HierarchyStrategy(name="h", kind="hierarchy", corpus=str(tmp_path / "none.pt"))
    assert "build-corpus" in missing.unavailable()


def test_config_fields_and_levels():
    from pydantic import ValidationError

    from orchestrator.strategies.hierarchy import HierarchyStrategy

    s = HierarchyStrategy(name="h", kind="hierarchy")
    assert s.num_candidates == 7 and s.draft_length.k == 8 and s.corpus is None and s.unavailable() is None
    assert s.capacity_family() == "prompt_lookup"
    d = s.make_drafter(None)
    assert d.deterministic and d.corpus is None and d.recent.capacity == 32768
    for bad in ({"levels": ["context", "context"]}, {"min_ngram": 4, "max_ngram": 2}, {"levels": ["web"]},
                {"num_candidates": 0}):
        with pytest.raises(ValidationError):
            HierarchyStrategy(name="h", kind="hierarchy", **bad)


def test_recent_generations_memory_stays_within_the_documented_bound():
    """The worst case of the default shape: every key holds 4 continuations of 8 token ids of a 150k
    vocabulary, none shared with another (real text shares them: ~200-350 B per key). Documented:
    < 64 MB for the default 32768 keys; measured here on 4096."""
    import random
    import tracemalloc

    rng = random.Random(0)
    recent = RecentGenerations(capacity=4096)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(4096 + 100):                  # past capacity: the oldest keys go
        key = [rng.randrange(150_000) for _ in range(3)]
        for _ in range(4):
            recent.add(key + [rng.randrange(150_000) for _ in range(8)], start=3, end=4)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(recent) == 4096
    assert used * 32768 / 4096 < 64e6, f"{used / 4096:.0f} bytes per key"
