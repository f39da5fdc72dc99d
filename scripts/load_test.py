"""Bounded loopback load / soak test of the gRPC front door (not run in CI).

N client threads send requests for a set time: mostly well-formed generations over
the configured strategies, plus malformed requests, requests cancelled after their
first chunk, and requests with a short deadline. Reports requests, outcomes by
status code, p50/p99 latency of the successful ones, and health during the run.

    # against a running server (launch.py serve ...):
    .venv/bin/python scripts/load_test.py --address 127.0.0.1:50051 --clients 16 --duration 60
    # or start `launch.py serve --in-process` on the config (its own process), with a small admission queue:
    .venv/bin/python scripts/load_test.py --cluster cluster_configs/ci-tiny.yaml --clients 16 \
        --duration 60 --server-concurrency 4 --max-queue 4 --out bench_out/load.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from orchestrator.edge.client import Client, build_request  # noqa: E402

PROMPTS = ["def fibonacci(n):\n", "Write a haiku about the sea.", "import numpy as np\n\ndef normalize(x):\n",
           "The capital of France is", "class Stack:\n    def __init__(self):\n"]
BAD = [dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0), dict(strategy="no-such-strategy")]


def strategy_names(message: str) -> list[str]:
    """The strategy names in "strategy: unknown '?' (available: ['a', 'b'])" (parsed, not evaluated)."""
    inside = message[message.index("[") + 1: message.rindex("]")]
    return [part.strip().strip("'") for part in inside.split(",") if part.strip()]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def client_loop(address, token, stop_at, strategies, max_new, mix, seed, out, lock):
    rng = random.Random(seed)
    with Client(address, timeout=300, token=token) as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(["ok", "bad", "cancel", "deadline"], weights=mix)[0]
            args = dict(max_new_tokens=rng.randint(max_new // 2, max_new), strategy=rng.choice(strategies),
                        temperature=rng.choice([0.0, 0.0, 0.7]), seed=rng.randint(0, 1000))
            if kind == "bad":
                args.update(rng.choice(BAD))
            t0 = time.perf_counter()
            code, tokens = "OK", 0
            try:
                if kind == "cancel":
                    call = client.stub.Generate(build_request(rng.choice(PROMPTS), **args), timeout=300,
                                                metadata=client.metadata)
                    next(call)
                    call.cancel()
                    code = "CANCELLED (by client)"
                elif kind == "deadline":
                    short = Client(address, timeout=0.05, token=token)
                    try:
                        tokens = len(short.generate(rng.choice(PROMPTS), **args).token_ids)
                    finally:
                        short.close()
                else:
                    tokens = len(client.generate(rng.choice(PROMPTS), **args).token_ids)
            except grpc.RpcError as exc:
                code = exc.code().name
            latency = time.perf_counter() - t0
            with lock:
                out.append({"kind": kind, "code": code, "latency_s": latency, "tokens": tokens})
            if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                time.sleep(rng.uniform(0.05, 0.25))      # back off, as a well-behaved client does


def health_loop(address, token, stop_at, out):
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < stop_at:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata).status
                out.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as exc:
                out.append(exc.code().name)
            time.sleep(0.5)


def start_server_process(cluster: str, concurrency: int | None, max_queue: int | None):
    """`launch.py serve --in-process` on a copy of the config with the overrides, in its own process
    (so the load generator's threads do not share the server's interpreter). Returns (process, address)."""
    import subprocess
    import tempfile

    import yaml

    raw = yaml.safe_load(Path(cluster).read_text())
    server = raw.setdefault("server", {})
    server.update({k: v for k, v in (("concurrency", concurrency), ("max_queue", max_queue)) if v is not None})
    tmp = Path(tempfile.mkdtemp()) / Path(cluster).name
    tmp.write_text(yaml.safe_dump(raw))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "launch.py", "serve", "--cluster", str(tmp), "--port", "0",
                             "--in-process"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        if line.startswith("gRPC endpoint:"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()   # keep draining
            return proc, line.split()[2]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", help="host:port of a running server")
    ap.add_argument("--cluster", help="start this config's engines in-process instead")
    ap.add_argument("--server-concurrency", type=int, help="with --cluster: override server.concurrency")
    ap.add_argument("--max-queue", type=int, help="with --cluster: override server.max_queue")
    ap.add_argument("--token", help="bearer token (or set SPECORCH_TOKEN)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (bounded)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--strategies", nargs="*", help="default: every strategy the server reports")
    ap.add_argument("--mix", type=float, nargs=4, default=[0.7, 0.1, 0.1, 0.1],
                    metavar=("OK", "BAD", "CANCEL", "DEADLINE"), help="request kind weights")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args()
    if bool(args.address) == bool(args.cluster):
        ap.error("give exactly one of --address and --cluster")
    token = args.token or __import__("os").environ.get("SPECORCH_TOKEN")

    server = None
    if args.cluster:
        server, address = start_server_process(args.cluster, args.server_concurrency, args.max_queue)
    else:
        address = args.address
    try:
        if args.strategies:
            strategies = args.strategies
        else:       # the server names its strategies in INVALID_ARGUMENT's message for an unknown one
            with Client(address, timeout=60, token=token) as client:
                try:
                    client.generate("x", max_new_tokens=1, strategy="?")
                except grpc.RpcError as exc:
                    strategies = strategy_names(exc.details())
        results: list[dict] = []
        healths: list[str] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + args.duration
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop, args=(address, token, stop_at, strategies,
                                                               args.max_new_tokens, args.mix, i, results, lock))
                   for i in range(args.clients)]
        threads.append(threading.Thread(target=health_loop, args=(address, token, stop_at, healths)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        with Client(address, timeout=60, token=token) as client:
            final = client.stats()
            ok_after = len(client.generate("def ok():", max_new_tokens=4).token_ids) == 4
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)

    ok_lat = [r["latency_s"] for r in results if r["code"] == "OK" and r["kind"] == "ok"]
    report = {
        "address": address, "clients": args.clients, "duration_s": round(wall, 1),
        "max_new_tokens": args.max_new_tokens, "strategies": strategies, "mix": args.mix,
        "requests": len(results),
        "by_kind_and_code": {f"{k}/{c}": n for (k, c), n in sorted(Counter((r["kind"], r["code"])
                                                                          for r in results).items())},
        "ok_latency_p50_s": percentile(ok_lat, 50), "ok_latency_p99_s": percentile(ok_lat, 99),
        "generated_tokens": sum(r["tokens"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "health_checks": dict(Counter(healths)),
        "server_stats": {"requests_total": final.requests_total, "failed": final.requests_failed,
                         "cancelled": final.requests_cancelled, "rejected": final.requests_rejected,
                         "in_flight_after": final.requests_in_flight},
        "well_formed_request_after": ok_after,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
