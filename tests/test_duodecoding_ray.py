"""DuoDecoding with its drafter in a real Ray actor process, built from a `kind: duodecoding` config:
greedy output equals plain decoding, and seeded sampling equals the in-process (inline) engine's."""
from __future__ import annotations

import os

import pytest
import yaml

ray = pytest.importorskip("ray")

from core.sampling import SamplingParams  # noqa: E402
from orchestrator.build import build_engines  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402

PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 14, 15, 9, 3, 14, 40, 41]]
MAX_NEW = 20


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("duo-models")
    target, draft = tiny_model("qwen2", seed=0, layers=4), tiny_model("qwen2", seed=1, layers=2)
    for m in (target, draft):   # an end-of-sequence id these random models rarely produce
        m.config.eos_token_id = m.generation_config.eos_token_id = 95
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    # A fixed budget: seeded outputs then depend on the seeds only, not on measured times.
    duo = {"kind": "duodecoding", "drafter": "d", "gamma_init": 4, "gamma_min": 4, "gamma_max": 4,
           "calibration_steps": 2}
    cfg = {
        "name": "duo-ray",
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(root / "draft"), "dtype": "float32"}}},
        "strategies": [{"name": "duo-actor", "process": "actor", **duo},
                       {"name": "duo-inline", "process": "inline", **duo}],
        "runtime": {"device": "cpu", "threads": 1},
    }
    path = root / "duo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="specorch-duo-test")
    yield
    ray.shutdown()


def test_actor_drafter_decodes_like_plain_and_like_inline(config, ray_local):
    built = build_engines(config)
    actor, inline, plain = built.engines["duo-actor"], built.engines["duo-inline"], built.engines["plain"]
    assert type(actor.drafter).__name__ == "RayDrafterClient"
    pid = actor.drafter.call("pid").result()
    assert pid != os.getpid()            # the drafter really is another process
    for prompt in PROMPTS:
        res = actor.generate(prompt, MAX_NEW)
        assert res.tokens == plain.generate(prompt, MAX_NEW).tokens
        assert res.stats.speculative_drafts > 0 and res.stats.drafter_busy_s > 0
        assert_drafted(res)             # and no drafter failure: a dead actor falls back to target-only
        sampled = SamplingParams(temperature=0.8, seed=11)
        assert actor.generate(prompt, MAX_NEW, sampled).tokens == inline.generate(prompt, MAX_NEW, sampled).tokens
