"""Python client for the gRPC front door.

    with Client("127.0.0.1:50051") as client:
        for chunk in client.stream("def fib(n):", max_new_tokens=64):
            print(chunk.text, end="")
        results = client.generate_batch(["def a():", "def b():"], max_new_tokens=64)   # progress bar
        print(results[0].text, results[0].stats.mean_accepted_tokens)

`AsyncClient` offers the same calls for asyncio code.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import grpc
from tqdm import tqdm

from proto import specorch_pb2 as pb
from proto import specorch_pb2_grpc as pb_grpc


@dataclass
class Result:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: pb.RequestStats | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        """Fold one streamed response (a token chunk or the final stats) into the result."""
        self.request_id = response.request_id
        if response.HasField("chunk"):
            self.token_ids.extend(response.chunk.token_ids)
            self.text += response.chunk.text
        else:
            self.stats = response.stats


def build_request(prompt: str | list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, strategy: str = "",
                  request_id: str = "") -> pb.GenerateRequest:
    """A string is a raw prompt; a list of {"role", "content"} dicts goes through the chat template."""
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, sampling=sampling, max_new_tokens=max_new_tokens,
                             strategy=strategy)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    return req


def _channel_args(address: str, max_message_bytes: int, tls_root_cert: bytes | str | None):
    """(address, credentials or None, options) for a plaintext or TLS channel."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_root_cert is None:
        return address, None, options
    pem = tls_root_cert if isinstance(tls_root_cert, bytes) else open(tls_root_cert, "rb").read()
    return address, grpc.ssl_channel_credentials(root_certificates=pem), options


def _collect(responses) -> Result:
    res = Result(request_id="")
    for r in responses:
        res.add(r)
    return res


class Client:
    """token: the server's bearer token (sent on every call); tls_root_cert: PEM bytes or a file
    path of the CA that signed the server's certificate (None = plaintext)."""

    def __init__(self, address: str, timeout: float | None = None, max_message_bytes: int = 4 * 1024 * 1024,
                 token: str | None = None, tls_root_cert: bytes | str | None = None):
        self.timeout = timeout
        address, creds, options = _channel_args(address, max_message_bytes, tls_root_cert)
        self.channel = (grpc.secure_channel(address, creds, options=options) if creds
                        else grpc.insecure_channel(address, options=options))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.SpecDecodeStub(self.channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(self, prompt, **kwargs) -> Iterator[pb.TokenChunk]:
        """Yield token chunks as they are accepted; the final stats are on `.last_stats`."""
        self.last_stats = None
        for r in self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout, metadata=self.metadata):
            if r.HasField("chunk"):
                yield r.chunk
            else:
                self.last_stats = r.stats

    def generate(self, prompt, **kwargs) -> Result:
        return _collect(self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout,
                                           metadata=self.metadata))

    def generate_batch(self, prompts: list, progress: bool = True, concurrency: int = 4, **kwargs) -> list[Result]:
        """Submit many prompts (each as its own streaming call, `concurrency` in flight), in order."""
        def one(i_prompt):
            i, p = i_prompt
            return _collect(self.stub.Generate(build_request(p, request_id=str(i), **kwargs), timeout=self.timeout,
                                               metadata=self.metadata))

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            it = pool.map(one, enumerate(prompts))
            return list(tqdm(it, total=len(prompts), desc="generate", disable=not progress))

    def generate_batch_rpc(self, prompts: list, **kwargs) -> list[Result]:
        """One GenerateBatch call (validated as a whole; all-or-nothing)."""
        reqs = [build_request(p, request_id=str(i), **kwargs) for i, p in enumerate(prompts)]
        out = self.stub.GenerateBatch(pb.GenerateBatchRequest(requests=reqs), timeout=self.timeout,
                                      metadata=self.metadata)
        return [Result(r.request_id, list(r.token_ids), r.text, r.stats) for r in out.results]

    def stats(self) -> pb.GetStatsResponse:
        return self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout, metadata=self.metadata)


class AsyncClient:
    """The same calls for asyncio code; arguments as for `Client`."""

    def __init__(self, address: str, timeout: float | None = None, max_message_bytes: int = 4 * 1024 * 1024,
                 token: str | None = None, tls_root_cert: bytes | str | None = None):
        self.timeout = timeout
        address, creds, options = _channel_args(address, max_message_bytes, tls_root_cert)
        self.channel = (grpc.aio.secure_channel(address, creds, options=options) if creds
                        else grpc.aio.insecure_channel(address, options=options))
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb_grpc.SpecDecodeStub(self.channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()

    async def stream(self, prompt, **kwargs):
        async for r in self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout,
                                          metadata=self.metadata):
            if r.HasField("chunk"):
                yield r.chunk

    async def generate(self, prompt, **kwargs) -> Result:
        res = Result(request_id="")
        async for r in self.stub.Generate(build_request(prompt, **kwargs), timeout=self.timeout,
                                          metadata=self.metadata):
            res.add(r)
        return res

    async def stats(self) -> pb.GetStatsResponse:
        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout, metadata=self.metadata)
