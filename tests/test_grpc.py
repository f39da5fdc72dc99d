"""gRPC front door: streaming, batch, stats, health, reflection, validation codes, cancellation, deadlines."""
from __future__ import annotations

import ast
import asyncio
import gc
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

from core.draft_length import FixedDraftLength
from orchestrator.build import Built
from orchestrator.config import EngineConfig
from orchestrator.edge.client import Client, build_request
from orchestrator.edge.server import start_server
from orchestrator.engine import SpeculativeEngine
from proto import specorch_pb2 as pb
from tests.conftest import tiny_model
from tests.drafting import assert_drafted
from tests.serving import ByteTokenizer, serve_in_thread, slow_drafter
from workers.drafters import DraftModelDrafter, PromptLookupDrafter
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
               "pld": SpeculativeEngine(target, PromptLookupDrafter(), lambda: FixedDraftLength(4), name="pld"),
               # the target drafting for itself: every draft is accepted
               "self": SpeculativeEngine(target, DraftModelDrafter(ModelRunner(model)), lambda: FixedDraftLength(4),
                                         name="self"),
               "slow": SpeculativeEngine(target, slow_drafter(0.1), lambda: FixedDraftLength(1), name="slow")}
    with serve_in_thread(Built(config, target.device, model, ByteTokenizer(), target, engines)) as served:
        yield served


# ------------------------------------------------------------------ checked-in stubs
# The generated files embed the generator's versions (protobuf gencode, GRPC_GENERATED_VERSION) and its
# layout, and grpcio-tools is not pinned: compare what they define, not their bytes.
def file_descriptor(pb2_source: str):
    """The FileDescriptorProto a generated *_pb2.py registers (the AddSerializedFile literal)."""
    from google.protobuf import descriptor_pb2

    for node in ast.walk(ast.parse(pb2_source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError("no AddSerializedFile(...) in the generated module")


def grpc_methods(grpc_source: str) -> dict:
    """What a generated *_pb2_grpc.py wires up: per stub attribute, the client call (kind, path,
    serializers); per servicer registration, the handler (kind, servicer method, serializers)."""
    def dotted(node) -> str:
        return ast.unparse(node)

    out: dict = {}
    for node in ast.walk(ast.parse(grpc_source)):
        # self.Generate = channel.unary_stream('/pkg.Service/Generate', request_serializer=..., ...)
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute) and dotted(node.value.func.value) == "channel"):
            call = node.value
            out[("stub", dotted(node.targets[0]))] = (call.func.attr, ast.literal_eval(call.args[0]), tuple(
                sorted((k.arg, dotted(k.value)) for k in call.keywords if not k.arg.startswith("_"))))
        # rpc_method_handlers = {'Generate': grpc.unary_stream_rpc_method_handler(servicer.Generate, ...)}
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(value, ast.Call) and dotted(value.func).endswith("_rpc_method_handler"):
                    out[("handler", ast.literal_eval(key))] = (dotted(value.func), dotted(value.args[0]), tuple(
                        sorted((k.arg, dotted(k.value)) for k in value.keywords)))
        if isinstance(node, ast.Call) and dotted(node.func) == "grpc.method_handlers_generic_handler":
            out[("service",)] = ast.literal_eval(node.args[0])
    return out


def stub_messages(pyi_source: str) -> dict:
    """The message classes a generated *_pb2.pyi declares (nested ones by dotted name), with their fields."""
    out: dict = {}

    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef):
                name = prefix + node.name
                fields = [ast.literal_eval(n.value) for n in node.body if isinstance(n, ast.Assign)
                          and [ast.unparse(t) for t in n.targets] == ["__slots__"]]
                numbers = sorted(n.target.id for n in node.body
                                 if isinstance(n, ast.AnnAssign) and n.target.id.endswith("_FIELD_NUMBER"))
                out[name] = (tuple(fields[0]) if fields else None, numbers)
                visit(node.body, name + ".")

    visit(ast.parse(pyi_source).body, "")
    return out


def generated(directory: Path) -> dict[str, str]:
    return {name: (directory / name).read_text()
            for name in ("specorch_pb2.py", "specorch_pb2.pyi", "specorch_pb2_grpc.py")}


def test_checked_in_stubs_match_proto(tmp_path):
    (tmp_path / "proto").mkdir()
    (tmp_path / "proto" / "specorch.proto").write_text((ROOT / "proto/specorch.proto").read_text())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "proto/specorch.proto"], cwd=tmp_path, check=True)
    fresh, checked_in = generated(tmp_path / "proto"), generated(ROOT / "proto")
    stale = "is stale: run scripts/gen_proto.sh"
    want = file_descriptor(fresh["specorch_pb2.py"])
    assert file_descriptor(checked_in["specorch_pb2.py"]) == want, f"proto/specorch_pb2.py {stale}"
    assert type(want).FromString(pb.DESCRIPTOR.serialized_pb) == want     # what the server imports
    methods = grpc_methods(fresh["specorch_pb2_grpc.py"])
    assert grpc_methods(checked_in["specorch_pb2_grpc.py"]) == methods, f"proto/specorch_pb2_grpc.py {stale}"
    assert stub_messages(checked_in["specorch_pb2.pyi"]) == stub_messages(fresh["specorch_pb2.pyi"]), \
        f"proto/specorch_pb2.pyi {stale}"
    # The comparison sees the service: every rpc of the proto, with its streaming kind, on both sides.
    (service,) = want.service
    kinds = {m.name: f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
             for m in service.method}
    assert kinds == {"Generate": "unary_stream", "GenerateBatch": "unary_unary", "GetStats": "unary_unary"}
    assert methods[("service",)] == f"{want.package}.{service.name}"
    for name, kind in kinds.items():
        assert methods[("stub", f"self.{name}")][:2] == (kind, f"/{want.package}.{service.name}/{name}")
        assert methods[("handler", name)][:2] == (f"grpc.{kind}_rpc_method_handler", f"servicer.{name}")
    assert set(stub_messages(fresh["specorch_pb2.pyi"])) >= {m.name for m in want.message_type}


def test_generate_streams_plain_decoding_tokens(served):
    tok = served.built.tokenizer
    prompt = "abcabcabc"
    expected = served.built.engines["plain"].generate(tok(prompt).input_ids, 20).tokens
    with Client(served.address, timeout=60) as client:
        for strategy in ("plain", "pld", "self", ""):
            chunks = list(client.stream(prompt, max_new_tokens=20, strategy=strategy))
            assert [t for c in chunks for t in c.token_ids] == expected
            assert "".join(c.text for c in chunks) == tok.decode(expected)
            stats = client.last_stats
            assert stats.generated_tokens == 20 and stats.strategy == (strategy or "plain")
            if strategy in ("plain", ""):
                assert stats.mean_accepted_tokens == 1.0 and not stats.accepted_per_position
            elif strategy == "pld":      # "abcabcabc": the context's own n-grams give drafts from step 1
                assert_drafted(stats, what=strategy)
            else:                        # a dead drafter (target-only fallback) would score 1.0
                assert_drafted(stats, all_accepted=True, what=strategy)
                assert stats.mean_accepted_tokens > 3.0, stats.mean_accepted_tokens
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
        # The slow strategy (>= 0.1 s per step): the request is still decoding when the cancel lands,
        # however fast this machine decodes.
        call = client.stub.Generate(build_request("abcabc", max_new_tokens=60, strategy="slow"), timeout=60)
        next(call)
        call.cancel()
        deadline = time.time() + 10
        while service.cancelled == cancelled and time.time() < deadline:
            time.sleep(0.05)
        assert service.cancelled == cancelled + 1
        # A deadline that lets the request reach the server and start decoding (a few round trips of a
        # short request, measured now) but falls far short of its decoding (the slow strategy: 59 steps
        # of >= 0.1 s): the client gets DEADLINE_EXCEEDED and the server stops decoding at its next step.
        t0 = time.perf_counter()
        assert len(client.generate("abc", max_new_tokens=2).token_ids) == 2
        timeout = min(1.5, 0.3 + 3 * (time.perf_counter() - t0))
        cancelled, runner = service.cancelled, served.built.target
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            Client(served.address, timeout=timeout).generate("abc", max_new_tokens=60, strategy="slow")
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        while (service.decoding or service.cancelled == cancelled) and time.perf_counter() - t0 < timeout + 3.0:
            time.sleep(0.05)
        assert service.cancelled == cancelled + 1, "the request never reached the server"
        assert service.decoding == 0, \
            f"still decoding {time.perf_counter() - t0 - timeout:.1f} s after the deadline (timeout {timeout:.2f} s)"
        deadline = time.time() + 30         # its KV cache is freed (the failed call's traceback may hold it a while)
        while runner.live_caches() and time.time() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert runner.live_caches() == 0
        assert len(client.generate("abc", max_new_tokens=4).token_ids) == 4


def test_async_client(served):
    from orchestrator.edge.client import AsyncClient

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
    from orchestrator.edge.server import _TextStream

    class CharTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    tok = CharTokenizer()
    ids = [ord(c) for c in "def f(x):\n    return x\n\nprint(f(1))"]
    stream = _TextStream(tok)
    pieces = [stream.push(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [stream.push([], final=True)]
    assert "".join(pieces) == tok.decode(ids)
    assert len(stream.window) < len(ids)          # the decode window restarted at a line end
