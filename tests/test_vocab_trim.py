"""The trimmed drafter head scores exactly the kept ids, dense or int8, and nothing else."""
from __future__ import annotations

import pytest
import torch

from workers.quantize import quantize_linear_int8
from workers.runner import _linear
from workers.vocab_trim import TrimmedHead, kept_token_ids


def test_kept_ids_are_low_ids_plus_prompt_tokens():
    ids = kept_token_ids(100, 10, [3, 50, 50, 99, 7, 200])
    assert ids.tolist() == list(range(10)) + [50, 99]   # 200 is outside the vocabulary


@pytest.mark.parametrize("int8", [False, True])
def test_trimmed_logits_equal_full_logits_on_kept_ids(int8):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    if int8:
        quantize_linear_int8(head)
    x = torch.randn(1, 3, 16, dtype=torch.bfloat16)
    full = _linear(x, head, kernel="weight_major").float()                                  # [1, 3, 40]
    trimmed = TrimmedHead(head, kept_token_ids(40, 8, [20, 33]))
    small = _linear(x, trimmed, kernel="weight_major").float()                              # [1, 3, 10]
    assert small.shape[-1] == 10
    expanded = trimmed.expand(small)                                            # [1, 3, 40]
    kept = torch.tensor(list(range(8)) + [20, 33])
    torch.testing.assert_close(expanded[..., kept], full[..., kept])
    dropped = torch.ones(40, dtype=torch.bool)
    dropped[kept] = False
    assert torch.isinf(expanded[..., dropped]).all() and (expanded[..., dropped] < 0).all()


# ------------------------------------------------------------------ frequency mode (VocabTrim as published)
import json  # noqa: E402
from collections import Counter  # noqa: E402

from core.draft_length import FixedDraftLength  # noqa: E402
from core.sampling import SamplingParams, make_generator, warp_probs  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from orchestrator.strategies.draft_model import DraftModelStrategy  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402
from tests.test_engine import noisy_copy  # noqa: E402
from workers.drafters import DraftModelDrafter  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.vocab_trim import count_tokens, load_frequency_table, save_frequency_table  # noqa: E402


def test_a_table_built_from_known_outputs_counts_right(tmp_path):
    outputs = [[5, 3, 5, 9, 40], [3, 5, 7, 7]]                     # 5 x3, 3 x2, 7 x2, 9 x1, 40 x1
    table = count_tokens(outputs)
    assert table.ids.tolist() == [5, 3, 7, 9, 40]                     # equal counts: lower id first
    assert table.counts.tolist() == [3, 2, 2, 1, 1] and table.meta["tokens"] == 9
    save_frequency_table(table, tmp_path / "t" / "table.pt")
    back = load_frequency_table(tmp_path / "t" / "table.pt")
    assert back.ids.tolist() == table.ids.tolist() and back.counts.tolist() == table.counts.tolist()
    torch.save({"ids": torch.tensor([1, 2]), "counts": torch.tensor([1, 3])}, tmp_path / "unsorted.pt")
    with pytest.raises(ValueError, match="unsorted.pt: not a VocabTrim frequency table"):
        load_frequency_table(tmp_path / "unsorted.pt")


def test_frequency_mode_keeps_the_tables_top_n_plus_prompt_tokens():
    ranking = torch.tensor([50, 7, 99, 3, 60])
    assert kept_token_ids(100, 3, [1, 50, 200], ranking).tolist() == [1, 7, 50, 99]
    # a table ranking fewer ids than kept: the lowest ids not in it fill up
    assert kept_token_ids(100, 4, [], torch.tensor([50, 2])).tolist() == [0, 1, 2, 50]
    assert kept_token_ids(100, 4, [], None).tolist() == [0, 1, 2, 3]            # the int form: lowest ids


def write_table(path, ranking: list[int]):
    """A table whose ranking is `ranking` (counts len..1)."""
    save_frequency_table(count_tokens([[t] * (len(ranking) - i) for i, t in enumerate(ranking)]), path)
    return str(path)


def frequency_strategy(table: str, size: int, **extra) -> DraftModelStrategy:
    return DraftModelStrategy(name="vt-freq", kind="draft_model", drafter="d",
                              draft_vocab={"size": size, "mode": "frequency", "table": table}, **extra)


def kept_by_strategy(strategy, draft_model, prompt):
    session = strategy.make_drafter(ModelRunner(draft_model)).start(prompt, SamplingParams(), None)
    return session.head.ids.tolist()


def test_the_strategy_keeps_the_tables_top_n(tmp_path, draft_model, monkeypatch):
    import orchestrator.strategies.draft_model as draft_model_module

    table = write_table(tmp_path / "table.pt", [90, 80, 70, 60, 50])
    prompt = [4, 5, 90]
    want = [4, 5, 70, 80, 90]
    assert kept_by_strategy(frequency_strategy(table, 3), draft_model, prompt) == want
    lowest = DraftModelStrategy(name="vt-low", kind="draft_model", drafter="d",
                                draft_vocab={"size": 3, "mode": "lowest"})
    assert kept_by_strategy(lowest, draft_model, prompt) == [0, 1, 2, 4, 5, 90]
    # broken: the table read but its ranking not passed on (lowest ids kept instead) is caught
    real = draft_model_module.vocab_trim_args
    monkeypatch.setattr(draft_model_module, "vocab_trim_args",
                        lambda spec, name: {"draft_vocab": real(spec, name)["draft_vocab"]})
    assert kept_by_strategy(frequency_strategy(table, 3), draft_model, prompt) != want


def test_config_forms_and_a_missing_table(tmp_path, draft_model):
    from orchestrator.config import load_config

    assert DraftModelStrategy(name="a", kind="draft_model", drafter="d", draft_vocab=40).draft_vocab == 40
    missing = frequency_strategy(str(tmp_path / "none.pt"), 8)
    assert "none.pt" in missing.unavailable() and "build-vocab-table" in missing.unavailable()
    with pytest.raises(ValueError, match="vt-freq.*build-vocab-table"):
        missing.make_drafter(ModelRunner(draft_model))
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({
        "models": {"target": {"source": "t"}, "drafters": {"d": {"source": "d"}}},
        "strategies": [{"name": "a", "kind": "draft_model", "drafter": "d",
                        "draft_vocab": {"size": 8, "mode": "frequency", "table": "x.pt", "tabel": "y"}},
                       {"name": "b", "kind": "opt_tree", "drafter": "d", "draft_vocab": {"size": 8, "mode": "frequency"}},
                       {"name": "c", "kind": "draft_model", "drafter": "d", "draft_vocab": -1}]}))
    with pytest.raises(ValueError) as err:
        load_config(path)
    text = str(err.value)
    assert "bad.yaml" in text and "strategies.0.draft_model.draft_vocab.mapping.tabel" in text
    assert "strategies.1.opt_tree.draft_vocab.mapping: Value error, table: mode frequency needs a table" in text
    assert "strategies.2.draft_model.draft_vocab.int" in text


def assert_q_is_the_full_models_on_kept_ids(draft_model, session, prompt, draft):
    """Each drafted position's q equals the untrimmed drafter's warped distribution with every id outside
    the kept set at -inf (the trimmed head's logits land on the ids they belong to), and the draft is
    made of kept ids only."""
    kept = session.head.ids
    outside = torch.ones(draft.probs.shape[-1], dtype=torch.bool)
    outside[kept] = False
    assert set(draft.tokens) <= set(kept.tolist()), "a drafted id outside the kept set"
    for i in range(len(draft.tokens)):
        with torch.inference_mode():
            logits = draft_model(torch.tensor([prompt + draft.tokens[:i]])).logits[0, -1]   # [vocab]
        want = warp_probs(logits.masked_fill(outside, float("-inf")), session.params)
        torch.testing.assert_close(draft.probs[i], want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"q at draft position {i} is not the kept ids' q: {m}")


def sampled_draft(draft_model, ranking, prompt):
    drafter = DraftModelDrafter(ModelRunner(draft_model), draft_vocab=24, vocab_ranking=ranking)
    session = drafter.start(prompt[:-1], SamplingParams(temperature=1.0), make_generator(3, role="drafter"))
    session.update(prompt[-1:], 0)
    return session, session.propose(5)


def test_drafts_map_back_to_target_ids_and_a_wrong_mapping_is_caught(draft_model, prompts, monkeypatch):
    ranking = torch.randperm(96, generator=torch.Generator().manual_seed(1))
    prompt = prompts[0]
    session, draft = sampled_draft(draft_model, ranking, prompt)
    assert session.head.ids.tolist() == kept_token_ids(96, 24, prompt[:-1], ranking).tolist()
    assert_q_is_the_full_models_on_kept_ids(draft_model, session, prompt, draft)
    # broken: the trimmed logits scattered onto the neighbouring kept ids
    real_expand = TrimmedHead.expand
    monkeypatch.setattr(TrimmedHead, "expand", lambda self, logits: real_expand(self, logits.roll(1, -1)))
    session, draft = sampled_draft(draft_model, ranking, prompt)
    with pytest.raises(AssertionError, match="kept ids' q|outside the kept set"):
        assert_q_is_the_full_models_on_kept_ids(draft_model, session, prompt, draft)


def greedy_runs(target_model, drafter, prompts, max_new=32):
    """(plain outputs, speculative results) of every prompt."""
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4), name="vt-freq")
    return ([plain.generate(p, max_new).tokens for p in prompts], [engine.generate(p, max_new) for p in prompts])


def test_greedy_frequency_mode_equals_plain(target_model, prompts, tmp_path, monkeypatch):
    """A table from the target's own outputs on other prompts, 32 of 96 ids kept: float32 greedy output
    equals plain decoding, drafts accepted; a dead drafter (which also gives equal output) is caught."""
    plain = SpeculativeEngine(ModelRunner(target_model))
    other = [[(7 * i + j) % 90 + 3 for j in range(12)] for i in range(3)]
    table = write_table(tmp_path / "table.pt",
                        [t for t, _ in Counter(t for p in other for t in plain.generate(p, 32).tokens).most_common()])
    strategy = frequency_strategy(table, 32)
    drafter = strategy.make_drafter(ModelRunner(noisy_copy(target_model, 0.2, 5)))
    assert drafter.vocab_ranking.tolist() == load_frequency_table(table).ids.tolist()
    want, got = greedy_runs(target_model, drafter, prompts)
    assert [r.tokens for r in got] == want
    assert_drafted(got, accepted=True, what="frequency mode")
    monkeypatch.setattr(DraftModelDrafter, "start", lambda *a: (_ for _ in ()).throw(RuntimeError("dead")))
    want, got = greedy_runs(target_model, drafter, prompts[:1])
    assert [r.tokens for r in got] == want                       # fell back to the target alone: equal
    with pytest.raises(AssertionError, match="drafter failed"):
        assert_drafted(got, accepted=True, what="dead drafter")


def test_build_vocab_table_command_counts_the_targets_outputs(tmp_path, capsys):
    """launch.py build-vocab-table on a tiny target: the table holds the counts of the target's own
    greedy outputs (prompts excluded) on the prompts after the skipped ones, decoded two at a time
    through the global verifier (float32: the same outputs as one at a time), and a frequency strategy
    loads it."""
    import launch
    from orchestrator.bench import encode, load_prompts
    from tests.conftest import tiny_model
    from tests.test_hierarchy import tokenizer_dir
    from workers.loading import load_for_decoding

    model_dir = tokenizer_dir(tmp_path / "target")
    tiny_model("llama", seed=0, layers=2).save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"task_id": "t/0", "prompt": "def sum of x"},
        {"task_id": "t/1", "prompt": "return the list"},
        {"question_id": 1, "category": "qa", "turns": ["is the sum of x and y a value"]},
    ]) + "\n")
    out = tmp_path / "tables" / "tiny.pt"
    assert launch.main(["build-vocab-table", "--prompts", str(prompts), "--model", str(model_dir),
                        "--dtype", "float32", "--out", str(out), "--max-new-tokens", "12",
                        "--skip", "1", "--concurrency", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tokenizer = load_for_decoding(str(model_dir), "float32", torch.device("cpu"))
    plain = SpeculativeEngine(ModelRunner(model))
    kept = load_prompts(prompts, None, skip=1)         # round-robin over categories: t/0, 1, t/1
    assert [p.id for p in kept] == ["spec_bench/1", "t/1"]
    counts = Counter(t for p in kept for t in plain.generate(encode(tokenizer, p), 12).tokens)
    table = load_frequency_table(out)
    assert dict(zip(table.ids.tolist(), table.counts.tolist())) == dict(counts)
    assert table.meta["tokens"] == 24 and table.meta["prompts"] == 2 and table.meta["skip"] == 1
    assert frequency_strategy(str(out), 8).unavailable() is None
