"""Config validation: shipped configs load; errors name the file and the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import ConfigError
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["local.yaml", "ci-tiny.yaml", "local-gemma-xv.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "cluster_configs" / name)
    assert cfg.models.target.source
    assert cfg.strategies


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "models: {target: {source: x, dtpye: float32}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "models.target.dtpye" in str(e.value)


def test_bad_strategy_reference_is_named(tmp_path):
    p = write(tmp_path, """
models: {target: {source: x}}
strategies:
  - {name: a, kind: draft_model, drafter: missing}
""")
    with pytest.raises(ConfigError, match="strategies.0.drafter"):
        load_config(p)


def test_bad_values(tmp_path):
    p = write(tmp_path, """
models: {target: {source: x}}
strategies:
  - {name: a, kind: prompt_lookup, draft_length: {policy: fixed, k: 0}}
""")
    with pytest.raises(ConfigError, match=r"strategies\.0\.prompt_lookup\.draft_length\.fixed\.k"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(write(tmp_path, "models: [unclosed\n"))


def test_lookup_first_ngram_range_is_checked(tmp_path):
    p = write(tmp_path, """
models: {target: {source: x}, drafters: {d: {source: y}}}
strategies:
  - {name: a, kind: draft_model, drafter: d, lookup_first: {max_ngram: 2, min_ngram: 3}}
""")
    with pytest.raises(ConfigError, match=r"strategies\.0\.draft_model\.lookup_first"):
        load_config(p)


def test_strategies_missing_an_optional_extra_are_skipped_unless_asked_for(monkeypatch, capsys):
    import importlib.util

    from orchestrator.selection import runnable_strategies

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    cfg = load_config(ROOT / "cluster_configs/local.yaml")
    names = [s.name for s in runnable_strategies(cfg, None)]
    assert "duo-0.5b-llama" not in names and "duo-0.5b" in names
    assert "skipping strategy 'duo-0.5b-llama'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"duo-0.5b-llama.*\[llama\]"):
        runnable_strategies(cfg, ["duo-0.5b-llama"])


def test_strategy_registry_kinds_match_and_fields_are_described():
    """KINDS maps each kind to the model whose `kind` literal it is; every field of a strategy model has a
    description (the YAML's documentation)."""
    from typing import get_args

    from orchestrator.strategies import KINDS

    for kind, model in KINDS.items():
        assert get_args(model.model_fields["kind"].annotation) == (kind,)
        assert [n for n, f in model.model_fields.items() if not f.description and n != "kind"] == [], kind


def test_hf_universal_assisted_peer_needs_a_drafter_key(tmp_path):
    """bench.hf_peers universal_assisted (HF's universal assisted generation) names its model by a
    models.drafters key; without one, or with a wrong one, the error names the key and the file."""
    head = "models: {target: {source: x}, drafters: {small: {source: y}}}\n"
    with pytest.raises(ConfigError, match="bench.hf_universal_assistant") as e:
        load_config(write(tmp_path, head + "bench: {hf_peers: [universal_assisted]}\n"))
    assert "c.yaml" in str(e.value)
    with pytest.raises(ConfigError, match="bench.hf_universal_assistant: 'other'"):
        load_config(write(tmp_path, head + "bench: {hf_peers: [universal_assisted], hf_universal_assistant: other}\n"))
    cfg = load_config(write(tmp_path, head + "bench: {hf_peers: [universal_assisted], hf_universal_assistant: small}\n"))
    assert cfg.bench.hf_universal_assistant == "small"


def test_hf_universal_assisted_runner_hands_hf_both_tokenizers(monkeypatch):
    """The peer row calls the target's generate() with the assistant model and both tokenizers (what
    HF needs to re-tokenise between vocabularies)."""
    from types import SimpleNamespace

    import orchestrator.bench as bench

    loaded = (object(), "assistant-tokenizer")
    monkeypatch.setattr(bench, "load_for_decoding", lambda source, dtype, device: loaded)
    seen = {}

    class Target:
        def generate(self, x, **kwargs):
            seen.update(kwargs)
            return torch.cat([x, torch.tensor([[7, 8]])], dim=1)

    cfg = load_config(ROOT / "cluster_configs" / "local.yaml")
    built = SimpleNamespace(target_model=Target(), tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=1),
                            config=cfg, device=torch.device("cpu"), drafter_models={})
    tokens, _, _ = bench._hf_runner(built, "universal_assisted", 2)([3, 4, 5])
    assert tokens == [7, 8]
    assert seen["assistant_model"] is loaded[0] and seen["assistant_tokenizer"] == "assistant-tokenizer"
    assert seen["tokenizer"] is built.tokenizer and seen["do_sample"] is False
