"""Shared fixtures: tiny random models shaped like the real families, in float32."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 96


def tiny_model(family: str, seed: int, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif family == "gemma3":
        # Gemma 3's layer shapes: sandwich norms, query/key norms, sliding-window layers (a window of 4
        # tokens, so the prompts cross it) beside a full-attention one, a rotary embedding per layer type;
        # an attention scale other than 1/sqrt(head_dim) and capped final logits, as Gemma models may have.
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        model = Gemma3ForCausalLM(Gemma3TextConfig(
            **common, head_dim=hidden // 4, query_pre_attn_scalar=24, sliding_window=4, final_logit_softcapping=5.0,
            layer_types=(["sliding_attention"] * (layers - 1) + ["full_attention"])[:layers],
            tie_word_embeddings=True))
        with torch.no_grad():           # Gemma's norms scale by (1 + w): random w makes them differ from 1
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    else:
        raise ValueError(family)
    # Random init gives near-uniform logits; scale the head so the distributions are peaked
    # like a trained model's (more acceptance, fewer near-ties).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not model.config.tie_word_embeddings else model.model.embed_tokens.weight.mul_(4.0)
    return model.float().eval()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def family(request):
    return request.param


@pytest.fixture(scope="session")
def target_model(family):
    return tiny_model(family, seed=0, layers=3)


@pytest.fixture(scope="session")
def draft_model(family):
    return tiny_model(family, seed=1, layers=1)


@pytest.fixture(scope="session")
def prompts():
    g = torch.Generator().manual_seed(123)
    out = []
    for length in (5, 17, 33):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append(ids + ids[: length // 2])  # some repetition so prompt lookup finds matches
    return out
