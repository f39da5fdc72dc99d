"""Real Ray actors: a target split over pipeline-stage actors decodes exactly like a one-process
target, drafters run in their own actor, cache edits reach every stage, and nothing is left behind."""
from __future__ import annotations

import threading

import pytest
import yaml

ray = pytest.importorskip("ray")

from core.sampling import SamplingParams  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from orchestrator.global_verifier import GlobalVerifier  # noqa: E402
from orchestrator.ray_runtime import PipelineTarget, place  # noqa: E402
from placement.plan import plan_placement  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

MAX_NEW = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = tiny_model("qwen2", seed=0, layers=4)
    draft = tiny_model("qwen2", seed=1, layers=2)
    for m in (target, draft):   # an end-of-sequence id these random models rarely produce
        m.config.eos_token_id = m.generation_config.eos_token_id = 95
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    return root, target


def config_file(root, stages: int, transport: str = "auto", tp: int = 1):
    cfg = {
        "name": f"pp{stages}",
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(root / "draft"), "dtype": "float32"}}},
        "strategies": [
            {"name": "sd-k3", "kind": "draft_model", "drafter": "d", "draft_length": {"policy": "fixed", "k": 3}},
            {"name": "pld-tree", "kind": "prompt_lookup", "max_ngram": 2, "num_candidates": 3,
             "draft_length": {"policy": "fixed", "k": 4}},
            # A hybrid: its lookup runs beside the engine, its model drafts in the drafter actor.
            {"name": "sd-hybrid", "kind": "draft_model", "drafter": "d",
             "lookup_first": {"max_ngram": 2, "min_ngram": 2, "k": 5}, "draft_length": {"policy": "fixed", "k": 3}},
        ],
        "runtime": {"device": "cpu", "threads": 1},
        "node_pools": [{"name": "local", "count": 1, "cpus": 4, "memory_gb": 8}],
        "placement": {"target": {"pool": "local", "device": "cpu", "pipeline_parallel": stages,
                                 "stage_transport": transport, "tensor_parallel": tp},
                      "drafters": {"d": {"pool": "local", "device": "cpu", "cpus": 1}}},
    }
    path = root / f"pp{stages}-{transport}-tp{tp}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-test")
    yield
    ray.shutdown()


PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 3, 14, 15, 9, 3, 14], [20, 21, 22, 23, 24, 20, 21, 22, 23]]


def test_pipeline_split_target_equals_one_process_target(models, ray_local):
    root, target_model = models
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    expected = [local.generate(p, MAX_NEW).tokens for p in PROMPTS]
    for stages, transport in ((1, "auto"), (2, "auto"), (2, "ray")):
        cfg = config_file(root, stages, transport)
        built, runtime = place(cfg, plan_placement(cfg), name=f"test-pp{stages}-{transport}")
        try:
            assert isinstance(built.target, PipelineTarget) and len(built.target.shards) == stages
            infos = ray.get([s.info.remote() for s in built.target.shards])
            assert [i["layers"] for i in infos] == ([(0, 4)] if stages == 1 else [(0, 2), (2, 4)])
            assert len({i["pid"] for i in infos}) == stages                     # separate processes
            for name in ("plain", "sd-k3", "pld-tree"):
                runs = [built.engines[name].generate(p, MAX_NEW) for p in PROMPTS]
                assert [r.tokens for r in runs] == expected, f"{name} over {stages} stage(s) diverged from one-process decoding"
                if name != "plain":     # a dead drafter actor would fall back to target-only, same tokens
                    assert_drafted(runs, what=f"{name} over {stages} stage(s)")
            res = built.engines["sd-k3"].generate(PROMPTS[0], MAX_NEW, SamplingParams(temperature=1.0, seed=3))
            again = built.engines["sd-k3"].generate(PROMPTS[0], MAX_NEW, SamplingParams(temperature=1.0, seed=3))
            assert res.tokens == again.tokens and len(res.tokens) == MAX_NEW    # seeded sampling reproduces
            # every request released its KV on every stage
            assert all(i["requests"] == 0 for i in ray.get([s.info.remote() for s in built.target.shards]))
            hops = built.target.hops
            if stages == 2:     # hidden states crossed by the transport asked for
                assert hops["link" if transport == "auto" else "ray"] > 0
                assert hops["ray" if transport == "auto" else "link"] == 0
        finally:
            runtime.shutdown()
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
        assert not names & set(runtime.actors), "actors left behind after shutdown"


def test_hybrid_copies_beside_the_engine_and_drafts_in_the_actor(models, ray_local):
    """Through Ray a hybrid's context lookup runs in the engine's process and its model drafts in the
    drafter actor (a session opened at the first model draft); the output is plain decoding's."""
    root, target_model = models
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    prompts = PROMPTS + [[40, 41, 42, 43, 44, 45, 46, 47]]      # no repeated 2-gram: the model drafts
    expected = [local.generate(p, MAX_NEW).tokens for p in prompts]
    cfg = config_file(root, 1)
    built, runtime = place(cfg, plan_placement(cfg), name="test-hybrid")
    try:
        from orchestrator.ray_runtime import RemoteDrafter
        from workers.drafters import PromptLookupDrafter

        drafter = built.engines["sd-hybrid"].drafter
        assert isinstance(drafter.lookup, PromptLookupDrafter) and isinstance(drafter.model, RemoteDrafter)
        runs = [built.engines["sd-hybrid"].generate(p, MAX_NEW) for p in prompts]
        assert [r.tokens for r in runs] == expected
        assert_drafted(runs, accepted=True)
        assert ray.get(runtime.actors["drafter-cpu-0"].draft_batches.remote())["batches"] > 0, \
            "the drafter actor never drafted"
        lengths = {k for r in runs for k in r.stats.draft_lengths}
        assert lengths & {4, 5}, f"no lookup draft (up to 5 tokens; the model drafts 3): {lengths}"
    finally:
        runtime.shutdown()


def test_core_lease_target_and_drafter_take_turns_and_decode_the_same(models, ray_local):
    """runtime.core_lease: the target shard and the drafter actor on one CPU node both take the lease
    for their forwards (workers/core_lease.py), the output stays plain decoding's, and the lease file
    is removed at shutdown."""
    import os

    root, target_model = models
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    expected = [local.generate(p, MAX_NEW).tokens for p in PROMPTS]
    cfg = config_file(root, 1)
    cfg = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"core_lease": True})})
    built, runtime = place(cfg, plan_placement(cfg), name="test-lease")
    try:
        assert [built.engines["sd-k3"].generate(p, MAX_NEW).tokens for p in PROMPTS] == expected
        assert ray.get(runtime.actors["target-shard-0"].info.remote())["lease_turns"] > 0
        assert ray.get(runtime.actors["drafter-cpu-0"].core_lease.remote())["turns"] > 0
        assert len(runtime.lease_files) == 1 and os.path.exists(runtime.lease_files[0])
    finally:
        runtime.shutdown()
    assert not os.path.exists(runtime.lease_files[0])


def test_global_verifier_over_pipeline_actors(models, ray_local):
    root, target_model = models
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    expected = [local.generate(p, MAX_NEW).tokens for p in PROMPTS]
    cfg = config_file(root, 2)
    built, runtime = place(cfg, plan_placement(cfg), name="test-gv")
    verifier = GlobalVerifier(built.target, max_batch=4)
    try:
        engine = built.engines["sd-k3"]
        batched = engine.with_target(verifier)
        got = [None] * len(PROMPTS)

        def run(i):
            got[i] = batched.generate(PROMPTS[i], MAX_NEW)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.tokens for r in got] == expected
        assert_drafted(got)
        drafts = ray.get(runtime.actors["drafter-cpu-0"].draft_batches.remote())
        assert drafts["max_rows"] >= 2, f"concurrent requests' draft steps were not batched: {drafts}"
    finally:
        verifier.close()
        runtime.shutdown()


def test_bf16_logits_cross_actors_exactly(models, ray_local):
    """The last stage sends logits in the model dtype; widened again they equal in-process logits."""
    import torch

    from workers.loading import load_for_decoding

    root, _ = models
    cfg = config_file(root, 2)
    cfg = cfg.model_copy(update={"models": cfg.models.model_copy(update={
        "target": cfg.models.target.model_copy(update={"dtype": "bfloat16"})})})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the shards run (runtime.threads): the same stored bf16 kernel choice
    try:
        local = ModelRunner(load_for_decoding(str(root / "target"), "bfloat16", torch.device("cpu"),
                                              with_tokenizer=False)[0])
    finally:
        torch.set_num_threads(threads)
    built, runtime = place(cfg, plan_placement(cfg), only=[], name="test-bf16")
    try:
        ids = torch.tensor([PROMPTS[2]])
        remote = built.target.forward(built.target.new_cache(1, 64), ids)
        expected = local.forward(local.new_cache(1, 64), ids)
        assert remote.dtype == expected.dtype == torch.float32 and torch.equal(remote, expected)
    finally:
        runtime.shutdown()


def test_stage_link_reports_the_failing_stage_and_keeps_working(models, ray_local):
    import torch

    from core.errors import WorkerUnavailable

    root, target_model = models
    cfg = config_file(root, 2, "auto")
    built, runtime = place(cfg, plan_placement(cfg), only=[], name="test-link-fail")
    try:
        target = built.target
        cache = target.new_cache(1, 64)
        ray.get(target.shards[0].close.remote(cache.rid))      # stage 0 loses the request's state
        with pytest.raises(WorkerUnavailable, match="no KV state"):
            target.forward(cache, torch.tensor([PROMPTS[0]]))
        assert target.link_min_tokens is not None              # the link itself is fine
        local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
        assert built.engines["plain"].generate(PROMPTS[1], 8).tokens == local.generate(PROMPTS[1], 8).tokens
        assert target.hops["link"] >= 2
    finally:
        runtime.shutdown()


@pytest.mark.parametrize("stages, tp", [(1, 2), (2, 2)])
def test_tensor_parallel_target_decodes_like_one_process(models, ray_local, stages, tp):
    """Each stage's layers split over tp actors (heads and MLP units), all-reduced over gloo."""
    root, target_model = models
    local = SpeculativeEngine(ModelRunner(target_model), eos_token_ids=(95,))
    expected = [local.generate(p, MAX_NEW).tokens for p in PROMPTS]
    cfg = config_file(root, stages, tp=tp)
    only = None
    if stages * tp > 3:                              # 4 CPUs: no room for the drafter actor beside 4 ranks
        only = []
        cfg = cfg.model_copy(update={"strategies": [],
                                     "placement": cfg.placement.model_copy(update={"drafters": {}})})
    built, runtime = place(cfg, plan_placement(cfg), only=only, name=f"test-tp{tp}-pp{stages}")
    try:
        infos = ray.get([s.info.remote() for s in built.target.shards])
        assert sorted((i["layers"], i["tp_rank"]) for i in infos) == sorted(
            ((0, 4) if stages == 1 else ((0, 2), (2, 4))[st], r) for st in range(stages) for r in range(tp))
        for name in ["plain"] + (["sd-k3", "pld-tree"] if only is None else []):
            runs = [built.engines[name].generate(p, MAX_NEW) for p in PROMPTS]
            assert [r.tokens for r in runs] == expected, f"{name} with tensor_parallel {tp} x {stages} stage(s) diverged"
            if name != "plain":
                assert_drafted(runs, what=f"{name} with tensor_parallel {tp} x {stages} stage(s)")
        assert all(i["requests"] == 0 for i in ray.get([s.info.remote() for s in built.target.shards]))
    finally:
        runtime.shutdown()
