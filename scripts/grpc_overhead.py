"""Tokens/s of the same strategy in-process vs through the gRPC server (batch 1, same prompts).

    .venv/bin/python scripts/grpc_overhead.py --strategies plain sd-0.5b-int8-adaptive --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import asyncio
import time
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import SAMPLE_PROMPTS  # noqa: E402
from orchestrator.bench import Prompt, encode  # noqa: E402
from orchestrator.build import build_engines  # noqa: E402
from orchestrator.client import Client  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.server import start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", default="cluster_configs/local.yaml")
    ap.add_argument("--strategies", nargs="+", default=["plain", "sd-0.5b-int8-adaptive"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    built = build_engines(load_config(args.cluster), only=args.strategies)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    def serve():
        asyncio.set_event_loop(loop)
        box["server"], box["port"], _ = loop.run_until_complete(start_server(built, "127.0.0.1", 0))
        ready.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    ready.wait(60)
    prompts = [Prompt(str(i), c, t, chat) for i, (c, chat, t) in enumerate(SAMPLE_PROMPTS)]
    print("| strategy | in-process tok/s | gRPC tok/s (client-side wall time) | gRPC / in-process |")
    print("|---|---:|---:|---:|")
    with Client(f"127.0.0.1:{box['port']}", timeout=3600) as client:
        for name in args.strategies:
            local, remote = [], []
            for p in prompts:   # alternate the two paths prompt by prompt
                ids = encode(built.tokenizer, p)
                res = built.engines[name].generate(ids, args.max_new_tokens)
                local.append(res.stats.tokens_per_s)

                t0 = time.perf_counter()
                out = client.generate([{"role": "user", "content": p.text}] if p.chat else p.text,
                                      max_new_tokens=args.max_new_tokens, strategy=name)
                remote.append(len(out.token_ids) / (time.perf_counter() - t0))
            a, b = sum(local) / len(local), sum(remote) / len(remote)
            print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |", flush=True)
    asyncio.run_coroutine_threadsafe(box["server"].stop(None), loop).result(10)


if __name__ == "__main__":
    main()
