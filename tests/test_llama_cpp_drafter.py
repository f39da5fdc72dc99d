"""DuoDecoding with the llama.cpp drafter backend (optional extra `llama`), on the embedded SmolLM2 GGUF:
the target is the same model converted to torch float32, the drafter llama.cpp reading the GGUF.
Skipped where llama-cpp-python is not installed."""
from __future__ import annotations

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from core.duo_policy import DraftBudgetController  # noqa: E402
from core.sampling import SamplingParams  # noqa: E402
from orchestrator.duo import DuoEngine, InProcessDrafterClient  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402
from workers.duo_drafter import DuoDrafterSide  # noqa: E402
from workers.llama_cpp_drafter import LlamaCppDraftModel  # noqa: E402
from workers.model_store import load_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = load_model("smollm2-135m", torch.float32)
    return ModelRunner(model), tokenizer


@pytest.fixture(scope="module")
def llama_model(smol):
    return LlamaCppDraftModel("smollm2-135m", smol[0].vocab_size, threads=1, n_ctx=1024)


def test_llama_cpp_logits_follow_the_torch_model_and_roll_back_exactly(smol, llama_model):
    runner, tokenizer = smol
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors=None)["input_ids"]
    kv = llama_model.new_kv(len(ids))
    kv.truncate(0)
    full = kv.feed(ids)                                                    # [vocab]
    reference = runner.forward(runner.new_cache(1, len(ids) + 4), torch.tensor([ids]))[0, -1]
    assert full.shape == reference.shape
    assert full.argmax() == reference.argmax()     # Q4 GGUF weights in both; kernels differ slightly
    # Rollback: the last prompt token fed alone after a speculative continuation was truncated gives
    # exactly what it gives fed alone right after the prefix (same kernels, same KV).
    kv.truncate(len(ids) - 1)
    expected = kv.feed(ids[-1:])
    kv.feed([int(expected.argmax()), 5, 6])
    assert not torch.allclose(kv.feed(ids[-1:]), expected, atol=1e-3)   # stale KV would show
    kv.truncate(len(ids) - 1)
    assert kv.fed == ids[:-1]
    assert torch.allclose(kv.feed(ids[-1:]), expected, atol=1e-5)


def llama_duo(runner, llama_model) -> DuoEngine:
    return DuoEngine(runner, InProcessDrafterClient(DuoDrafterSide(llama_model), overlap=True),
                     DraftBudgetController(4, 2, 8), calibration_steps=2)


def test_duodecoding_with_the_llama_cpp_drafter_is_lossless(smol, llama_model):
    """Greedy: exactly the target's own greedy decoding, with llama.cpp really drafting (a failed drafter
    would fall back to target-only decoding, which gives the same tokens)."""
    runner, tokenizer = smol
    ids = tokenizer("def quicksort(xs):\n", return_tensors=None)["input_ids"]
    res = llama_duo(runner, llama_model).generate(ids, 32)
    assert res.tokens == SpeculativeEngine(runner, None).generate(ids, 32).tokens
    assert_drafted(res, accepted=True)          # the same model in GGUF: its drafts are mostly kept
    assert res.stats.speculative_used > 0


def test_sampling_with_the_llama_cpp_drafter_drafts_from_its_q(smol, llama_model):
    """T > 0 goes through llama.cpp's distributions (q) in verification; the output's law is checked on
    every path by tests/test_distribution_paths.py, here that this path drafts and keeps drafts."""
    runner, tokenizer = smol
    ids = tokenizer("def quicksort(xs):\n", return_tensors=None)["input_ids"]
    res = llama_duo(runner, llama_model).generate(ids, 32, SamplingParams(temperature=0.8, seed=3))
    assert len(res.tokens) == 32 or res.finish_reason == "stop"
    assert_drafted(res, accepted=True)


@pytest.mark.parametrize("process", ["thread", "actor"])
def test_config_builds_a_llama_cpp_drafter(tmp_path, smol, process):
    import yaml

    from orchestrator.build import build_engines
    from orchestrator.config import load_config

    cfg = {"models": {"target": {"source": "smollm2-135m", "dtype": "float32"},
                      "drafters": {"smol": {"source": "smollm2-135m", "dtype": "float32"}}},
           "strategies": [{"name": "duo-llama", "kind": "duodecoding", "drafter": "smol", "backend": "llama_cpp",
                           "process": process, "calibration_steps": 2}],
           "runtime": {"device": "cpu", "threads": 1}}
    path = tmp_path / "duo-llama.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if process == "actor":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="specorch-llama-test")
    try:
        built = build_engines(load_config(path))
        engine = built.engines["duo-llama"]
        if process == "thread":
            assert type(engine.drafter.side.model).__name__ == "LlamaCppDraftModel"
        ids = smol[1]("print('hello", return_tensors=None)["input_ids"]
        res = engine.generate(ids, 16)
        assert res.tokens == built.engines["plain"].generate(ids, 16).tokens
        assert res.stats.speculative_used > 0
        assert_drafted(res)
    finally:
        if process == "actor":
            ray.shutdown()
