"""gRPC front door: streaming, batch, stats, health, reflection, validation codes, cancellation, deadlines."""
from __future__ import annotations

import asyncio
import filecmp
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.build import Built
from orchestrator.client import Client, build_request
from orchestrator.config import EngineConfig
from orchestrator.draft_length import FixedDraftLength
from orchestrator.engine import SpeculativeEngine
from orchestrator.server import start_server
from proto import specorch_pb2 as pb
from tests.conftest import tiny_model
from tests.serving import ByteTokenizer, serve_in_thread
from workers.drafters import PromptLookupDrafter
from workers.runner import ModelRunner

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served():
    model = tiny_model("llama", seed=0, layers=2)
    target = ModelRunner(model)
    config = EngineConfig.model_validate({
        "models": {"target": {"source": "tiny"}},
        "strategies": [{"name": "pld", "kind": "prompt_lookup"}],
        "server": {"max_new_tokens": 64, "max_batch": 4},
    })
    engines = {"plain": SpeculativeEngine(target),
               "pld": SpeculativeEngine(target, PromptLookupDrafter(), lambda: FixedDraftLength(4), name="pld")}
    with serve_in_thread(Built(config, target.device, model, ByteTokenizer(), target, engines)) as served:
        yield served


def test_checked_in_stubs_match_proto(tmp_path):
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "specorch.proto").write_text((ROOT / "proto/specorch.proto").read_text())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "proto/specorch.proto"], cwd=tmp_path, check=True)
    for name in ("specorch_pb2.py", "specorch_pb2.pyi", "specorch_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "proto" / name, ROOT / "proto" / name, shallow=False), \
            f"proto/{name} is stale: run scripts/gen_proto.sh"


def test_generate_streams_plain_decoding_tokens(served):
    tok = served.built.tokenizer
    prompt = "abcabcabc"
    expected = served.built.engines["plain"].generate(tok(prompt).input_ids, 20).tokens
    with Client(served.address, timeout=60) as client:
        for strategy in ("plain", "pld", ""):
            chunks = list(client.stream(prompt, max_new_tokens=20, strategy=strategy))
            assert [t for c in chunks for t in c.token_ids] == expected
            assert "".join(c.text for c in chunks) == tok.decode(expected)
            stats = client.last_stats
            assert stats.generated_tokens == 20 and stats.mean_accepted_tokens >= 1.0
            assert stats.strategy == (strategy or "plain")
        chat = client.generate([{"role": "user", "content": "hi"}], max_new_tokens=5)
        assert len(chat.token_ids) == 5
        sampled = [client.generate(prompt, max_new_tokens=12, temperature=0.8, seed=3, strategy="pld").token_ids
                   for _ in range(2)]
        assert sampled[0] == sampled[1]


def test_batch_and_stats(served):
    with Client(served.address, timeout=60) as client:
        before = client.stats().requests_total
        results = client.generate_batch(["abab", "xyzxyz", "hello"], max_new_tokens=8, progress=False)
        assert [len(r.token_ids) for r in results] == [8, 8, 8]
        rpc = client.generate_batch_rpc(["abab", "xyzxyz"], max_new_tokens=8, strategy="pld")
        assert rpc[0].token_ids == results[0].token_ids and rpc[1].request_id == "1"
        stats = client.stats()
        assert stats.requests_total == before + 5
        assert {s.strategy for s in stats.strategies} >= {"plain", "pld"}


@pytest.mark.parametrize("kwargs, code, field", [
    (dict(prompt="   "), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (dict(max_new_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (dict(max_new_tokens=10_000), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
    (dict(strategy="warp-drive"), grpc.StatusCode.INVALID_ARGUMENT, "strategy"),
    (dict(prompt="x" * 600), grpc.StatusCode.OUT_OF_RANGE, "prompt"),
])
def test_bad_requests_get_codes_naming_the_field(served, kwargs, code, field):
    args = dict(prompt="hello", max_new_tokens=4)
    args.update(kwargs)
    prompt = args.pop("prompt")
    with Client(served.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(prompt, **args)
        assert e.value.code() == code
        assert e.value.details().startswith(field + ":"), e.value.details()
        assert len(client.generate("hello", max_new_tokens=3).token_ids) == 3    # server still fine


def test_batch_limits_and_missing_input(served):
    with Client(served.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.generate_batch_rpc(["a"] * 5, max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.generate_batch_rpc(["ok", ""], max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("requests[1].prompt")
        with pytest.raises(grpc.RpcError) as e:
            client.stub.Generate(pb.GenerateRequest(max_new_tokens=3), timeout=10).next()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("input")


def test_health_and_reflection(served):
    with grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "specorch.v1.SpecDecode"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "specorch.v1.SpecDecode" in names and "grpc.health.v1.Health" in names


def test_cancel_and_deadline_free_the_request(served):
    service = served.service
    with Client(served.address, timeout=60) as client:
        cancelled = service.cancelled
        call = client.stub.Generate(build_request("abcabc", max_new_tokens=60), timeout=60)
        next(call)
        call.cancel()
        deadline = time.time() + 10
        while service.cancelled == cancelled and time.time() < deadline:
            time.sleep(0.05)
        assert service.cancelled == cancelled + 1
        with pytest.raises(grpc.RpcError) as e:
            Client(served.address, timeout=0.001).generate("abc", max_new_tokens=60)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(client.generate("abc", max_new_tokens=4).token_ids) == 4


def test_async_client(served):
    from orchestrator.client import AsyncClient

    async def go():
        async with AsyncClient(served.address, timeout=60) as client:
            res = await client.generate("abcabc", max_new_tokens=10, strategy="pld")
            streamed = [t async for c in client.stream("abcabc", max_new_tokens=10) for t in c.token_ids]
            return res, streamed, await client.stats()

    res, streamed, stats = asyncio.run(go())
    with Client(served.address, timeout=60) as client:
        assert res.token_ids == client.generate("abcabc", max_new_tokens=10).token_ids == streamed
    assert res.stats.strategy == "pld" and stats.requests_total >= 2


def test_text_stream_equals_full_decode_across_line_ends():
    from orchestrator.server import _TextStream

    class CharTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    tok = CharTokenizer()
    ids = [ord(c) for c in "def f(x):\n    return x\n\nprint(f(1))"]
    stream = _TextStream(tok)
    pieces = [stream.push(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [stream.push([], final=True)]
    assert "".join(pieces) == tok.decode(ids)
    assert len(stream.window) < len(ids)          # the decode window restarted at a line end
