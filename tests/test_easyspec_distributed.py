"""EasySpec over two Ray actors joined by gloo drafts exactly what the in-process emulation drafts,
stays lossless through the engine, and leaves no actor or process group behind."""
from __future__ import annotations

import time

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from core.draft_length import FixedDraftLength  # noqa: E402
from core.sampling import SamplingParams, make_generator  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402
from workers.easyspec import Calibration, EasySpecDrafter  # noqa: E402
from workers.easyspec_workers import DistributedEasySpecDrafter, start_ranks, stop_ranks  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

GROUPS = [[0], [1, 2], [3]]
MODES = ["attn_only", "direct_mlp"]


def strategy(mode: str, calibration: Calibration) -> dict:
    return {"name": f"{mode}-{calibration.value}", "kind": "easyspec", "drafter": "d", "degree": 2, "mode": mode,
            "calibration": calibration.value, "groups": GROUPS, "workers": 2}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("easyspec") / "draft"
    tiny_model("llama", seed=0, layers=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ranks(draft_dir):
    ray.init(num_cpus=4, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-easyspec-test")
    handles = start_ranks({"source": str(draft_dir), "dtype": "float32"},
                          [strategy(m, c) for m in MODES for c in Calibration], world=2, device="cpu", threads=1)
    yield handles
    stop_ranks(handles)
    ray.shutdown()


def test_ranks_are_separate_processes(ranks):
    infos = ray.get([r.info.remote() for r in ranks])
    assert [i["rank"] for i in infos] == [0, 1] and infos[0]["pid"] != infos[1]["pid"]


def assert_same_drafts(local, remote, params, prompt):
    """Propose/update rounds with rejections; the remote drafts equal the local ones, q included."""
    a = local.start(prompt, params, make_generator(params.seed, role="drafter"))
    b = remote.start(prompt, params, None)
    a.update([7], 0)
    b.update([7], 0)
    # Rounds: all accepted, one accepted then a correction, none accepted, two accepted then a correction.
    for accept in [4, 1, 0, 2, 4, 0, 1]:
        da, db = a.propose(4), b.propose(4)
        assert db.tokens == da.tokens
        if params.greedy:
            assert da.probs is None and db.probs is None
        else:
            torch.testing.assert_close(db.probs, da.probs, rtol=1e-5, atol=1e-6)
        committed = da.tokens[:accept] + ([] if accept == 4 else [(da.tokens[accept] + 1) % 96])
        if accept == 4:
            committed.append(5)         # the target's bonus token
        a.update(committed, accept)
        b.update(committed, accept)
    b.close()


@pytest.mark.parametrize("calibration", list(Calibration))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=11)],
                         ids=["greedy", "sampled"])
def test_two_workers_draft_what_the_in_process_emulation_drafts(ranks, draft_dir, mode, calibration, params,
                                                                prompts):
    from transformers import AutoModelForCausalLM

    local = EasySpecDrafter(ModelRunner(AutoModelForCausalLM.from_pretrained(draft_dir).float().eval()),
                            mode=mode, calibration=calibration, groups=GROUPS)
    remote = DistributedEasySpecDrafter(ranks, strategy(mode, calibration)["name"], timeout=60)
    assert_same_drafts(local, remote, params, prompts[1])
    assert all(i["requests"] == 0 for i in ray.get([r.info.remote() for r in ranks]))


@pytest.mark.parametrize("mode", MODES)
def test_engine_output_over_two_workers_equals_plain_decoding(ranks, mode, prompts):
    target = ModelRunner(tiny_model("llama", seed=0, layers=3))
    plain = SpeculativeEngine(target)
    drafter = DistributedEasySpecDrafter(ranks, strategy(mode, Calibration.EVERY_MISMATCH)["name"], timeout=60)
    engine = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4))
    runs = []
    for prompt in prompts:
        res = engine.generate(prompt, 24)
        assert res.tokens == plain.generate(prompt, 24).tokens
        runs.append(res)
    assert_drafted(runs, accepted=True)      # the ranks' model starts like the target (same seed): drafts are kept
    params = SamplingParams(temperature=0.8, seed=4)
    assert engine.generate(prompts[0], 16, params).tokens == engine.generate(prompts[0], 16, params).tokens


def test_place_starts_the_ranks_a_config_asks_for(draft_dir, ranks, prompts):
    from orchestrator.config import load_config
    from orchestrator.ray_runtime import place
    from placement.plan import plan_placement

    root = draft_dir.parent
    target_model = tiny_model("llama", seed=0, layers=3)
    target_model.save_pretrained(root / "target")
    cfg = {
        "name": "easyspec-workers",
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(draft_dir), "dtype": "float32"}}},
        "strategies": [{**strategy("attn_only", Calibration.EVERY_MISMATCH), "name": "es2",
                        "draft_length": {"policy": "fixed", "k": 4}}],
        "runtime": {"device": "cpu", "threads": 1},
        "node_pools": [{"name": "local", "count": 1, "cpus": 4, "memory_gb": 8}],
        "placement": {"target": {"pool": "local", "device": "cpu"},
                      "drafters": {"d": {"pool": "local", "device": "cpu", "cpus": 1}}},
    }
    (root / "es.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(root / "es.yaml")
    plan = plan_placement(config)
    assert [s.name for s in plan.shards if s.role == "easyspec"] == ["easyspec-es2-rank0", "easyspec-es2-rank1"]
    built, runtime = place(config, plan, name="test-easyspec")
    try:
        assert set(runtime.actors) >= {"easyspec-es2-rank0", "easyspec-es2-rank1"}
        assert "drafter-cpu-0" not in runtime.actors      # no strategy drafts in process on that drafter
        plain = SpeculativeEngine(ModelRunner(target_model))
        runs = [built.engines["es2"].generate(prompt, 16) for prompt in prompts[:2]]
        assert [r.tokens for r in runs] == [plain.generate(prompt, 16).tokens for prompt in prompts[:2]]
        assert_drafted(runs, accepted=True)
    finally:
        runtime.shutdown()
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert not names & set(runtime.actors), "actors left behind after shutdown"


@pytest.mark.parametrize("mode", MODES)
def test_a_group_smaller_than_the_world_leaves_a_rank_idle(tmp_path, ranks, mode, prompts):
    """Three ranks, groups of 3 and 2: rank 2 sits out the second group (it all-gathers zeros)."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama", seed=2, layers=6).save_pretrained(tmp_path / "six")
    groups = [[0], [1, 2, 3], [4, 5]]
    three = start_ranks({"source": str(tmp_path / "six"), "dtype": "float32"},
                        [{**strategy(mode, Calibration.EVERY_MISMATCH), "groups": groups, "workers": 3}],
                        world=3, device="cpu", threads=1)
    try:
        local = EasySpecDrafter(ModelRunner(AutoModelForCausalLM.from_pretrained(tmp_path / "six").float().eval()),
                                mode=mode, groups=groups)
        remote = DistributedEasySpecDrafter(three, strategy(mode, Calibration.EVERY_MISMATCH)["name"], timeout=60)
        assert_same_drafts(local, remote, SamplingParams(temperature=1.0, seed=5), prompts[0])
    finally:
        stop_ranks(three)


def test_stopping_ranks_leaves_nothing_behind(draft_dir, ranks):
    extra = start_ranks({"source": str(draft_dir), "dtype": "float32"},
                        [strategy("attn_only", Calibration.NEVER)], world=2, device="cpu", threads=1)
    assert ray.get([r.leave.remote() for r in extra]) == [True, True]    # process group destroyed
    stop_ranks(extra)
    for r in extra:        # ray.kill is asynchronous: a call may still be answered just after it
        assert actor_dies_within(r, 60), "a rank is still alive after stop_ranks"


def actor_dies_within(handle, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(handle.info.remote(), timeout=seconds)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            return False
        time.sleep(0.5)
    return False
