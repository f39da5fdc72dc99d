"""Faults in real Ray actors: a drafter killed mid-request (output unchanged, stats say so),
a target shard killed under the gRPC server (UNAVAILABLE in bounded time, health stays
SERVING, Ray restarts the shard and later requests succeed), and cancelled requests
free their state in every actor."""
from __future__ import annotations

import time

import grpc
import pytest
import yaml

ray = pytest.importorskip("ray")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.edge.client import Client, build_request  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from orchestrator.ray_runtime import place  # noqa: E402
from placement.plan import plan_placement  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.drafting import assert_drafted  # noqa: E402
from tests.serving import ByteTokenizer, serve_in_thread  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    target = tiny_model("qwen2", seed=0, layers=4)
    draft = tiny_model("qwen2", seed=1, layers=2)
    for m in (target, draft):   # an end-of-sequence id these random models rarely produce; long outputs
        m.config.eos_token_id = m.generation_config.eos_token_id = 95
        m.config.max_position_embeddings = 4096
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    cfg = {
        "name": "faults",
        "models": {"target": {"source": str(root / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(root / "draft"), "dtype": "float32"}}},
        "strategies": [{"name": "sd-k3", "kind": "draft_model", "drafter": "d",
                        "draft_length": {"policy": "fixed", "k": 3}}],
        "runtime": {"device": "cpu", "threads": 1},
        "cluster": {"actor_max_restarts": 2, "actor_call_timeout_s": 60},
        "node_pools": [{"name": "local", "count": 1, "cpus": 4, "memory_gb": 8}],
        "placement": {"target": {"pool": "local", "device": "cpu"},
                      "drafters": {"d": {"pool": "local", "device": "cpu", "cpus": 1}}},
        "server": {"concurrency": 4, "max_new_tokens": 4000},
    }
    (root / "faults.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(root / "faults.yaml")
    ray.init(num_cpus=4, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-faults")
    built, runtime = place(config, plan_placement(config), name="test-faults")
    built.tokenizer = ByteTokenizer()         # tiny models have none; the server needs one for text prompts
    local = SpeculativeEngine(ModelRunner(target), eos_token_ids=(95,))
    try:
        yield built, runtime, local
    finally:
        runtime.shutdown()
        ray.shutdown()


def wait_alive(handle, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(handle.vocab_size.remote(), timeout=timeout)
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError):
            if time.monotonic() > deadline:      # still restarting
                raise
            time.sleep(0.2)


def test_drafter_killed_mid_request_output_unchanged(setup):
    built, runtime, local = setup
    drafter = runtime.actors["drafter-cpu-0"]
    expected = local.generate(PROMPT, 60).tokens
    seen: list[int] = []

    def kill_after_a_few(tokens):
        if len(seen) < 8 <= len(seen) + len(tokens):
            ray.kill(drafter, no_restart=False)          # a crash, not a shutdown: Ray restarts it
        seen.extend(tokens)

    res = built.engines["sd-k3"].generate(PROMPT, 60, on_tokens=kill_after_a_few)
    assert res.tokens == expected
    assert any("drafter failed" in e for e in res.stats.events), res.stats.events
    wait_alive(drafter)
    again = built.engines["sd-k3"].generate(PROMPT, 60)        # the restarted drafter drafts again
    assert again.tokens == expected
    assert_drafted(again)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_target_shard_killed_under_the_server(setup):
    built, runtime, local = setup
    shard = runtime.actors["target-shard-0"]
    prompt = "abcabcab"
    expected = local.generate(ByteTokenizer()(prompt).input_ids, 40).tokens
    with serve_in_thread(built) as s, Client(s.address, timeout=120) as client:
        calls = [client.stub.Generate(build_request(prompt, max_new_tokens=3000, strategy=name), timeout=120)
                 for name in ("plain", "sd-k3")]
        for call in calls:
            next(call)                                   # both are decoding
        ray.kill(shard, no_restart=False)
        t_kill = time.monotonic()
        for call in calls:
            with pytest.raises(grpc.RpcError) as e:
                for _ in call:
                    pass
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert time.monotonic() - t_kill < 60                # bounded, no hang
        assert health(s.address) == health_pb2.HealthCheckResponse.SERVING
        wait_alive(shard)
        for name in ("plain", "sd-k3"):
            res = client.generate(prompt, max_new_tokens=40, strategy=name)
            assert res.token_ids == expected
            if name == "sd-k3":      # the drafter actor survived the target shard's restart
                assert_drafted(res.stats)
        assert client.stats().requests_failed == 2

        # cancelled requests free their KV in the shard and their session in the drafter
        for i in range(10):
            call = client.stub.Generate(build_request(prompt, max_new_tokens=500, strategy="sd-k3"), timeout=60)
            next(call)
            call.cancel()
        drafter = runtime.actors["drafter-cpu-0"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = (ray.get(shard.info.remote())["requests"], ray.get(drafter.live_requests.remote()))
            if left == (0, 0):
                break
            time.sleep(0.1)
        assert left == (0, 0), f"state left behind after cancellation (shard, drafter): {left}"
