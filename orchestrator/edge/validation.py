"""Request validation at the edge: every error names the field (pure; no gRPC import).

Codes follow gRPC conventions: INVALID_ARGUMENT for malformed values,
OUT_OF_RANGE for values beyond a limit, RESOURCE_EXHAUSTED for batches too large.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.sampling import SamplingParams

ROLES = {"system", "user", "assistant"}


class RequestError(ValueError):
    def __init__(self, code: str, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.code, self.field = code, field


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt: str | None
    chat: list[dict] | None
    sampling: SamplingParams
    max_new_tokens: int
    strategy: str


def validate_request(req, *, strategies: set[str], default_strategy: str, max_new_tokens_limit: int,
                     prefix: str = "") -> ValidRequest:
    """req: a GenerateRequest message (or anything with the same attributes)."""
    f = lambda name: prefix + name  # noqa: E731
    which = req.WhichOneof("input")
    prompt = chat = None
    if which is None:
        raise RequestError("INVALID_ARGUMENT", f("input"), "set prompt or chat")
    if which == "prompt":
        if not req.prompt.strip():
            raise RequestError("INVALID_ARGUMENT", f("prompt"), "must not be empty")
        prompt = req.prompt
    else:
        if not req.chat.messages:
            raise RequestError("INVALID_ARGUMENT", f("chat.messages"), "must not be empty")
        chat = []
        for i, m in enumerate(req.chat.messages):
            if m.role not in ROLES:
                raise RequestError("INVALID_ARGUMENT", f(f"chat.messages[{i}].role"),
                                   f"{m.role!r} is not one of {sorted(ROLES)}")
            chat.append({"role": m.role, "content": m.content})
        if not any(m["content"].strip() for m in chat):
            raise RequestError("INVALID_ARGUMENT", f("chat.messages"), "all contents are empty")

    s = req.sampling
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError("INVALID_ARGUMENT", f("sampling.temperature"), f"must be finite and >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):
        raise RequestError("INVALID_ARGUMENT", f("sampling.top_p"), f"must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    seed = s.seed if s.HasField("seed") else None
    if seed is not None and seed >= 2 ** 63:
        raise RequestError("OUT_OF_RANGE", f("sampling.seed"), "must be < 2**63")

    if req.max_new_tokens < 1:
        raise RequestError("INVALID_ARGUMENT", f("max_new_tokens"), "must be >= 1")
    if req.max_new_tokens > max_new_tokens_limit:
        raise RequestError("OUT_OF_RANGE", f("max_new_tokens"),
                           f"{req.max_new_tokens} exceeds the server limit of {max_new_tokens_limit}")
    strategy = req.strategy or default_strategy
    if strategy not in strategies:
        raise RequestError("INVALID_ARGUMENT", f("strategy"), f"unknown {strategy!r} (available: {sorted(strategies)})")
    return ValidRequest(req.request_id, prompt, chat,
                        SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
                        req.max_new_tokens, strategy)
