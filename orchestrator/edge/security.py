"""Transport security for the gRPC front door: TLS credentials and a bearer token.

The token comes from the environment variable `server.auth_token_env` names, so it
is never in a config file, a command line or a log line. Every RPC must carry
`authorization: Bearer <token>` metadata; the comparison is constant-time.
Misconfiguration (a missing variable, unreadable certificate files) is a
`ConfigError` naming the key, raised before the server starts.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

from core.config import ConfigError, ServerSection

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def load_auth_token(cfg: ServerSection) -> str | None:
    if cfg.auth_token_env is None:
        return None
    token = os.environ.get(cfg.auth_token_env, "")
    if not token.strip():
        raise ConfigError(f"server.auth_token_env: environment variable {cfg.auth_token_env!r} is unset or empty")
    return token.strip()


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path!r} ({exc.strerror or exc})") from None


def server_credentials(cfg: ServerSection) -> grpc.ServerCredentials | None:
    if cfg.tls is None:
        return None
    t = cfg.tls
    pair = (_read(t.key_file, "server.tls.key_file"), _read(t.cert_file, "server.tls.cert_file"))
    ca = _read(t.client_ca_file, "server.tls.client_ca_file") if t.client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def check_startup(cfg: ServerSection) -> None:
    """Fail before anything starts if the security settings cannot be honoured."""
    load_auth_token(cfg)
    server_credentials(cfg)


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary_out(request_or_iterator, context):
        await context.abort(code, message)

    async def stream_out(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes the function an async generator

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_out, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_out, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_out, des, ser)
    return grpc.stream_stream_rpc_method_handler(stream_out, des, ser)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, exempt_health: bool = False):
        self._expected = f"Bearer {token}".encode()
        self._exempt_health = exempt_health

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or (self._exempt_health and details.method.startswith(HEALTH_PREFIX)):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return handler
        reason = "missing bearer token" if not given else "invalid bearer token"
        return _denying_handler(handler, f"authorization: {reason}")
