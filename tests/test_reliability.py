"""Reliability and security of the front door, in one process: malformed bytes, overload,
500 cancelled requests, bearer token, TLS, start-up checks, and a property-based fuzz of
the validator and of the live server."""
from __future__ import annotations

import datetime
import gc
import ipaddress
import threading
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import ConfigError, ServerSection
from core.draft_length import FixedDraftLength
from orchestrator.build import Built
from orchestrator.config import EngineConfig
from orchestrator.edge.client import Client, build_request
from orchestrator.edge.security import check_startup
from orchestrator.edge.validation import RequestError, validate_request
from orchestrator.engine import SpeculativeEngine
from proto import specorch_pb2 as pb
from tests.conftest import tiny_model
from tests.serving import ByteTokenizer, serve_in_thread, slow_drafter
from workers.drafters import PromptLookupDrafter
from workers.runner import ModelRunner

OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, layers=2)


def make_built(model, **server):
    target = ModelRunner(model)
    config = EngineConfig.model_validate({
        "models": {"target": {"source": "tiny"}},
        "strategies": [{"name": "pld", "kind": "prompt_lookup"}],
        "server": {"max_new_tokens": 64, "max_batch": 4, **server},
    })
    engines = {"plain": SpeculativeEngine(target),
               "pld": SpeculativeEngine(target, PromptLookupDrafter(), lambda: FixedDraftLength(4), name="pld"),
               # plain decoding's output, each step >= 0.1 s / 10 ms: requests still decoding when tested
               "slow": SpeculativeEngine(target, slow_drafter(0.1), lambda: FixedDraftLength(1), name="slow"),
               "slow-10ms": SpeculativeEngine(target, slow_drafter(0.01), lambda: FixedDraftLength(1),
                                              name="slow-10ms")}
    return Built(config, target.device, model, ByteTokenizer(), target, engines)


@pytest.fixture(scope="module")
def served(model):
    with serve_in_thread(make_built(model, concurrency=4)) as s:
        yield s


def raw_call(address: str, method: str, payload: bytes, streaming: bool):
    """Send bytes that no generated stub would produce."""
    with grpc.insecure_channel(address) as channel:
        path = f"/specorch.v1.SpecDecode/{method}"
        ident = lambda b: b  # noqa: E731
        if streaming:
            return list(channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)(
                payload, timeout=30))
        return channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)(payload, timeout=30)


def healthy(address: str, metadata=None) -> bool:
    with grpc.insecure_channel(address) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                         metadata=metadata)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method, message, bad, field", [
    ("Generate", pb.GenerateRequest(prompt="OKAY", max_new_tokens=3), b"\xff\xfe\xfd\xfc", "prompt"),
    ("Generate", pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="OKAY")]),
                                    max_new_tokens=3), b"\xc3\x28\xa0\xa1", "chat.messages[0].content"),
    ("GenerateBatch", pb.GenerateBatchRequest(requests=[pb.GenerateRequest(prompt="fine"),
                                                        pb.GenerateRequest(prompt="x", strategy="OKAY")]),
     b"\xed\xa0\x80\xff", "requests[1].strategy"),
])
def test_invalid_utf8_names_the_field(served, method, message, bad, field):
    payload = message.SerializeToString().replace(b"OKAY", bad)
    with pytest.raises(grpc.RpcError) as e:
        raw_call(served.address, method, payload, streaming=method == "Generate")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"{field}: is not valid UTF-8"


def test_corrupt_bytes_and_oversized_messages(served):
    with pytest.raises(grpc.RpcError) as e:
        raw_call(served.address, "Generate", b"\x12\xff\xff\xff", streaming=True)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("request: ")
    limit = served.built.config.server.max_message_bytes
    with Client(served.address, timeout=30, max_message_bytes=2 * limit) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.generate("a" * (limit + 10), max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(client.generate("still fine", max_new_tokens=3).token_ids) == 3


def test_tiny_temperature_and_huge_top_k_are_served(served):
    with Client(served.address, timeout=30) as client:
        res = client.generate("abcabc", max_new_tokens=6, temperature=1e-30, top_k=2**32 - 1, seed=1)
        assert len(res.token_ids) == 6


# ------------------------------------------------------------------ overload
def test_overload_is_bounded_and_admitted_requests_finish(model):
    built = make_built(model, concurrency=1, max_queue=1, batch_verification=False)
    with serve_in_thread(built) as s, Client(s.address, timeout=60) as client:
        expected = built.engines["plain"].generate(ByteTokenizer()("hold on").input_ids, 20).tokens
        results: dict[int, object] = {}

        def submit(i):      # each admitted request decodes for >= 2 s (19 steps of 0.1 s), however fast this machine
            try:
                results[i] = client.generate("hold on", max_new_tokens=20, strategy="slow").token_ids
            except grpc.RpcError as exc:
                results[i] = exc.code()

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.02)
        assert healthy(s.address)                       # health stays SERVING under overload
        for t in threads:
            t.join(60)
        outcomes = list(results.values())
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
        finished = [o for o in outcomes if isinstance(o, list)]
        assert len(finished) >= 2 and all(o == expected for o in finished)
        assert len(finished) + outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 6
        stats = client.stats()
        assert stats.requests_rejected == outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert stats.requests_in_flight == 0


# ------------------------------------------------------------------ cancellation
def test_500_cancelled_requests_free_their_state(served):
    service, runner = served.service, served.built.target
    proc = psutil.Process()

    def cancel_batch(n):
        with Client(served.address, timeout=60) as client:
            for i in range(n):       # >= 10 ms per step: still decoding when the cancel lands, however fast this machine
                call = client.stub.Generate(build_request("abcdefg" * (1 + i % 3), max_new_tokens=64,
                                                          strategy="slow-10ms"), timeout=60)
                next(call)           # decoding has started: the request holds a KV cache
                call.cancel()

    cancel_batch(20)                  # warm up allocator and thread pool
    deadline = time.time() + 30
    while (service.in_flight or runner.live_caches()) and time.time() < deadline:
        time.sleep(0.05)
    gc.collect()
    rss_before, cancelled_before = proc.memory_info().rss, service.cancelled
    cancel_batch(500)
    deadline = time.time() + 60
    while (service.in_flight or runner.live_caches()) and time.time() < deadline:
        time.sleep(0.05)
    gc.collect()
    assert service.in_flight == 0 and runner.live_caches() == 0
    assert service.cancelled - cancelled_before >= 450   # a few may finish before the cancel lands
    growth_mb = (proc.memory_info().rss - rss_before) / 2**20
    assert growth_mb < 40, f"memory grew {growth_mb:.1f} MB over 500 cancelled requests"
    if service.verifier is not None:
        assert service.verifier._queue.qsize() == 0
    with Client(served.address, timeout=30) as client:
        assert len(client.generate("after the storm", max_new_tokens=4).token_ids) == 4


# ------------------------------------------------------------------ auth and TLS
def test_bearer_token_checked_on_every_rpc(model, monkeypatch):
    monkeypatch.setenv("SPECORCH_TEST_TOKEN", "s3cret-token")
    built = make_built(model, auth_token_env="SPECORCH_TEST_TOKEN")
    with serve_in_thread(built) as s:
        for token in (None, "wrong"):
            with Client(s.address, timeout=30, token=token) as client:
                for call in (lambda: client.generate("hi", max_new_tokens=2), client.stats,
                             lambda: client.generate_batch_rpc(["hi"], max_new_tokens=2)):
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "s3cret" not in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            healthy(s.address)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert healthy(s.address, metadata=(("authorization", "Bearer s3cret-token"),))
        with Client(s.address, timeout=30, token="s3cret-token") as client:
            assert len(client.generate("hi", max_new_tokens=2).token_ids) == 2
            assert client.stats().requests_total >= 1
    built = make_built(model, auth_token_env="SPECORCH_TEST_TOKEN", auth_health=False)
    with serve_in_thread(built) as s:
        assert healthy(s.address)                       # probes without the token
        with Client(s.address, timeout=30) as client, pytest.raises(grpc.RpcError) as e:
            client.stats()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_tls(model, tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    built = make_built(model, tls={"cert_file": str(cert_file), "key_file": str(key_file)})
    with serve_in_thread(built) as s:
        with Client(s.address, timeout=30, tls_root_cert=str(cert_file)) as client:
            assert len(client.generate("secure", max_new_tokens=3).token_ids) == 3
        with Client(s.address, timeout=5) as plaintext, pytest.raises(grpc.RpcError) as e:
            plaintext.stats()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_security_misconfiguration_fails_before_start(tmp_path, monkeypatch):
    monkeypatch.delenv("SPECORCH_MISSING_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"^server\.auth_token_env: .*SPECORCH_MISSING_TOKEN"):
        check_startup(ServerSection(auth_token_env="SPECORCH_MISSING_TOKEN"))
    with pytest.raises(ConfigError, match=r"^server\.tls\.key_file: cannot read"):
        check_startup(ServerSection(tls={"cert_file": __file__, "key_file": str(tmp_path / "nope.pem")}))
    assert ServerSection().host == "127.0.0.1"         # loopback unless the config says otherwise


# ------------------------------------------------------------------ fuzz
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", "   ", "\x00", "def f():\n", "ü" * 30]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 1e-30, 1.0, -0.0]))


@st.composite
def requests(draw):
    req = pb.GenerateRequest(request_id=draw(st.text(max_size=8)),
                             max_new_tokens=draw(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1))),
                             strategy=draw(st.sampled_from(["", "plain", "pld", "nope", "PLD"])))
    if draw(st.booleans()):
        req.prompt = draw(texts)
    elif draw(st.booleans()):
        for _ in range(draw(st.integers(0, 3))):
            req.chat.messages.add(role=draw(st.sampled_from(["user", "system", "assistant", "robot", ""])),
                                  content=draw(texts))
    s = req.sampling
    if draw(st.booleans()):
        s.temperature = draw(floats)
    if draw(st.booleans()):
        s.top_p = draw(floats)
    if draw(st.booleans()):
        s.top_k = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return req


@settings(max_examples=300, deadline=None)
@given(requests())
def test_fuzz_validator_accepts_or_names_a_field(req):
    try:
        v = validate_request(req, strategies={"plain", "pld"}, default_strategy="plain", max_new_tokens_limit=64)
    except RequestError as err:
        assert err.code in {"INVALID_ARGUMENT", "OUT_OF_RANGE"} and err.field and str(err).startswith(err.field)
        return
    assert 1 <= v.max_new_tokens <= 64 and v.strategy in {"plain", "pld"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(requests().map(lambda r: ("Generate", r.SerializeToString())),
                 st.lists(requests(), min_size=0, max_size=5).map(
                     lambda rs: ("GenerateBatch", pb.GenerateBatchRequest(requests=rs).SerializeToString())),
                 st.binary(max_size=64).map(lambda b: ("Generate", b))))
def test_fuzz_live_server_never_crashes(served, call):
    method, payload = call
    try:
        raw_call(served.address, method, payload, streaming=method == "Generate")
    except grpc.RpcError as exc:
        assert exc.code() in OK_CODES, f"{exc.code()}: {exc.details()}"


def test_server_is_fine_after_fuzzing(served):
    # Runs after the fuzz tests above (file order): well-formed requests still succeed.
    assert healthy(served.address)
    with Client(served.address, timeout=30) as client:
        assert len(client.generate("def f(x):", max_new_tokens=5, strategy="pld").token_ids) == 5
        assert client.stats().requests_in_flight == 0


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["server"].update(auth_token_env="SPECORCH_UNSET_TOKEN_VAR"), "server.auth_token_env"),
    (lambda c: c["server"].update(bogus=1), "server.bogus"),
    (lambda c: c["placement"]["target"].update(pool="nowhere"), "placement.target.pool"),
])
def test_launch_reports_config_errors_before_starting_anything(tmp_path, edit, key):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "cluster_configs/ci-tiny.yaml").read_text())
    cfg.setdefault("server", {})
    edit(cfg)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "SPECORCH_UNSET_TOKEN_VAR"}

    def serve(cluster):
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "launch.py", "serve", "--cluster", str(cluster)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
        return run, time.monotonic() - t0

    # Baseline on this machine now: the earliest failure there is (no config file at all).
    missing, baseline_s = serve(tmp_path / "missing.yaml")
    assert missing.returncode == 2 and "file not found" in missing.stderr, missing.stderr[-2000:]
    run, elapsed_s = serve(path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert str(path) in run.stderr and key in run.stderr, run.stderr[-2000:]
    assert "Started a local Ray instance" not in run.stderr + run.stdout and "gRPC endpoint" not in run.stdout
    assert elapsed_s < 3 * baseline_s + 10, (elapsed_s, baseline_s)     # reported before anything starts
