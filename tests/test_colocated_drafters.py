"""Colocated drafters (placement.drafters.<key>.colocate): one DrafterWorker actor loads several draft
models and hosts the strategies of each; decoding through it equals one-process decoding (float32)."""
from __future__ import annotations

import pytest
import yaml

from core.sampling import SamplingParams
from orchestrator.config import load_config
from orchestrator.drafter_worker import DrafterWorker
from orchestrator.engine import SpeculativeEngine
from placement.plan import check_plan
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from workers.runner import ModelRunner

MAX_NEW = 16
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 14, 15, 9, 3, 14]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = tiny_model("qwen2", seed=0, layers=3)
    for name, seed in (("target", 0), ("draft-a", 1), ("draft-b", 2)):
        m = target if name == "target" else tiny_model("qwen2", seed=seed, layers=1)
        m.config.eos_token_id = m.generation_config.eos_token_id = 95    # rarely produced: full-length outputs
        m.save_pretrained(root / name)
    return root, target


def config(root):
    raw = {
        "name": "colocate",
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"a": {"source": str(root / "draft-a"), "dtype": "float32"},
                                "b": {"source": str(root / "draft-b"), "dtype": "float32"}}},
        "strategies": [
            {"name": "sd-a", "kind": "draft_model", "drafter": "a", "draft_length": {"policy": "fixed", "k": 3}},
            {"name": "sd-b", "kind": "draft_model", "drafter": "b", "draft_length": {"policy": "fixed", "k": 2}},
            {"name": "csd-b", "kind": "cascade", "drafters": ["b"], "k_matrix": [[2, 2], [0, 2]]},
        ],
        "runtime": {"device": "cpu", "threads": 1},
        "node_pools": [{"name": "local", "count": 1, "cpus": 2, "memory_gb": 8}],
        "placement": {"target": {"pool": "local", "device": "cpu"},
                      "drafters": {"a": {"pool": "local", "device": "cpu", "cpus": 1, "colocate": ["b"]}}},
    }
    path = root / "colocate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def test_one_drafter_worker_hosts_the_strategies_of_two_models(models):
    root, _ = models
    cfg = config(root)
    specs = {k: cfg.models.drafters[k].model_dump() for k in ("a", "b")}
    worker = DrafterWorker(specs, [s.model_dump() for s in cfg.strategies], "cpu", 1)
    assert set(worker.drafters) == {"sd-a", "sd-b", "csd-b"}
    assert worker.vocab_size("a") == worker.vocab_size("b") == worker.vocab_size()
    # each strategy drafts with its own model: greedy drafts equal those of a worker loading that model alone
    params = SamplingParams()
    for name, key in (("sd-a", "a"), ("sd-b", "b")):
        alone = DrafterWorker({key: specs[key]}, [cfg.strategy(name).model_dump()], "cpu", 1)
        worker.start("s", name, PROMPTS[0], params)
        alone.start("s", name, PROMPTS[0], params)
        first = [([7], 0)]          # the target's first token, fed with the first propose as the engine does
        assert worker.propose("s", 3, first).tokens == alone.propose("s", 3, first).tokens
        worker.close("s")


def test_colocated_drafters_share_one_actor_through_ray(models):
    ray = pytest.importorskip("ray")
    from orchestrator.ray_runtime import place

    root, target_model = models
    cfg = config(root)
    run = check_plan(cfg, None, log=None)
    drafters = [s for s in run.plan.shards if s.role == "drafter"]
    assert len(drafters) == 1 and drafters[0].models == ("a", "b") and sum(s.cpus for s in run.plan.shards) == 2
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    expected = [local.generate(p, MAX_NEW).tokens for p in PROMPTS]
    ray.init(num_cpus=2, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-test-colocate")
    try:
        built, runtime = place(cfg, run.plan, name="test-colocate")
        try:
            assert sorted(runtime.actors) == ["drafter-cpu-0", "target-shard-0"]
            for name in ("plain", "sd-a", "sd-b", "csd-b"):
                runs = [built.engines[name].generate(p, MAX_NEW) for p in PROMPTS]
                assert [r.tokens for r in runs] == expected, \
                    f"{name} through the shared drafter actor diverged from plain decoding"
                if name != "plain":          # a failed drafter actor falls back to target-only: same tokens
                    assert_drafted(runs, what=name)
            stats = built.engines["sd-b"].generate(PROMPTS[1], MAX_NEW).stats
            assert stats.drafted_tokens > 0
            # only strategy sd-a selected: the actor loads drafter a alone
            assert ray.get(runtime.actors["drafter-cpu-0"].vocab_size.remote("b"))
        finally:
            runtime.shutdown()
        built, runtime = place(cfg, check_plan(cfg, ["sd-a"], log=None).plan, only=["sd-a"], name="test-colocate-a")
        try:
            with pytest.raises(ray.exceptions.RayTaskError):
                ray.get(runtime.actors["drafter-cpu-0"].vocab_size.remote("b"))
            assert [built.engines["sd-a"].generate(PROMPTS[0], MAX_NEW).tokens] == expected[:1]
        finally:
            runtime.shutdown()
    finally:
        ray.shutdown()
