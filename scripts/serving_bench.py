"""Serving measurements through Ray + gRPC (issue: distributed runtime).

1. Batch-1 overhead: tokens/s of a strategy in-process (`build_engines`, no Ray, no gRPC)
   vs the same strategy served by `launch.py`'s path (Ray actors + gRPC + the global
   verifier), prompt by prompt, alternating the two.
2. Throughput at several client concurrencies through gRPC, closed loop (c clients, each sends its
   next request when its last one ends): total generated tokens / wall time, and each request's
   latency as its client saw it (p50, p99).

    .venv/bin/python scripts/serving_bench.py --strategies plain sd-0.5b-int8-goodput \
        --max-new-tokens 64 --concurrency 1 2 4 8 16 32 --skip 4 --out bench_out/serving.json

Prompts: HumanEval and Spec-Bench dev prompts interleaved; `--skip N` leaves out the first N of
each file (round-robin over its categories), so a bench of those N calibrates the simulator on
prompts this run does not use (`launch.py simulate ... --measured` compares per row).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from launch import SAMPLE_PROMPTS  # noqa: E402
from orchestrator.bench import Prompt, encode, load_prompts  # noqa: E402
from orchestrator.build import build_engines  # noqa: E402
from orchestrator.edge.client import Client  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.ray_runtime import place, start_ray  # noqa: E402
from orchestrator.edge.server import start_server  # noqa: E402
from placement.plan import plan_placement  # noqa: E402


def serve_in_thread(built):
    loop = asyncio.new_event_loop()
    ready, box = threading.Event(), {}

    def run():
        asyncio.set_event_loop(loop)
        box["server"], box["port"], box["service"] = loop.run_until_complete(start_server(built, "127.0.0.1", 0))
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(120)
    return loop, box


def stop_serving(loop, box, runtime) -> None:
    """Stop the gRPC server started by serve_in_thread, its verifier, the actors and Ray."""
    asyncio.run_coroutine_threadsafe(box["server"].stop(None), loop).result(30)
    box["service"].close()
    runtime.shutdown()
    ray.shutdown()


def as_request(p: Prompt):
    return [{"role": "user", "content": p.text}] if p.chat else p.text


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


def measure_wave(client: Client, verifier, name: str, requests: list, concurrency: int, max_new_tokens: int) -> dict:
    """Send `requests` through gRPC with `concurrency` in flight (a closed loop: a client sends its
    next request when one finishes); throughput = all generated tokens / wall time of the whole set;
    latency = each request's wall time as its client saw it."""
    before = (verifier.stats.batches, verifier.stats.rows, verifier.stats.busy_s) if verifier else (0, 0, 0.0)

    def one(prompt):
        t = time.perf_counter()
        r = client.generate(prompt, strategy=name, max_new_tokens=max_new_tokens)
        return r, time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        done = list(pool.map(one, requests))
    wall = time.perf_counter() - t0
    results, latencies = [r for r, _ in done], [s for _, s in done]
    tokens = sum(len(r.token_ids) for r in results)
    batches = verifier.stats.batches - before[0] if verifier else 0
    mean_batch = (verifier.stats.rows - before[1]) / max(1, batches) if verifier else 1.0
    # The global verifier's seconds per batched forward (the Ray round trip to the target shard included).
    forward_s = (verifier.stats.busy_s - before[2]) / batches if batches else None
    # Per-request stats from the server, so acceptance can be read from the run itself.
    per_request = [{"steps": r.stats.steps, "generated_tokens": r.stats.generated_tokens,
                    "mean_accepted_tokens": r.stats.mean_accepted_tokens,
                    "acceptance_rate": r.stats.acceptance_rate, "ttft_s": r.stats.ttft_s,
                    "total_s": r.stats.total_s, "draft_s": r.stats.draft_s, "verify_s": r.stats.verify_s}
                   for r in results if r.stats is not None]
    steps = sum(r["steps"] for r in per_request)
    return {"strategy": name, "concurrency": concurrency, "requests": len(requests), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "mean_verify_batch": mean_batch,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
            "latency_mean_s": statistics.fmean(latencies),
            "verifier_batches": batches, "verifier_forward_s": forward_s,
            # after the prefill's token: tokens per verification step
            "tokens_per_step": sum(r["generated_tokens"] - 1 for r in per_request) / steps if steps else None,
            "requests_stats": per_request, "token_ids": [list(r.token_ids) for r in results]}


def prompt_pool(files: list[str], skip: int, needed: int) -> list[Prompt]:
    """Prompts from every file, interleaved file by file, after the first `skip` of each."""
    per_file = [load_prompts(f, needed, skip) for f in files]
    pool = [p for group in zip(*per_file) for p in group]
    if len(pool) < needed:
        raise SystemExit(f"only {len(pool)} prompts in {files} after skipping {skip} per file; {needed} needed")
    return pool[:needed]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", default="cluster_configs/local.yaml")
    ap.add_argument("--strategies", nargs="+", default=["plain", "sd-0.5b-int8-hybrid"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--data", nargs="+", default=["../shared/data/humaneval_dev.jsonl",
                                                  "../shared/data/spec_bench_dev.jsonl"],
                    help="prompt files for the throughput runs (interleaved)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N prompts of each file (calibration's)")
    ap.add_argument("--min-requests", type=int, default=8,
                    help="requests per level: max(concurrency x --requests-per-client, this), so p99 has more "
                         "than one sample")
    ap.add_argument("--requests-per-client", type=int, default=1,
                    help="at least this many requests per client: with 1, a level of c >= --min-requests is "
                         "one wave that ends with its slowest request; with 2, a client whose request "
                         "ended early sends the next, closer to a server's steady state")
    ap.add_argument("--repeats", type=int, default=1,
                    help="waves per strategy and level, the strategies' order alternating: on a shared machine "
                         "a wave's forwards vary by several percent, so one wave each compares noise at high load")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = load_config(args.cluster)
    only = [s for s in args.strategies if s != "plain"]
    start_ray(cfg)
    built, runtime = place(cfg, plan_placement(cfg), only=only)
    loop, box = serve_in_thread(built)
    address = f"127.0.0.1:{box['port']}"
    out = {"overhead": [], "throughput": [], "server": cfg.server.model_dump()}
    try:
        if not args.skip_overhead:
            local = build_engines(cfg, only=only)
            prompts = [Prompt(str(i), c, t, chat) for i, (c, chat, t) in enumerate(SAMPLE_PROMPTS)]
            print("| strategy | in-process tok/s | Ray + gRPC tok/s (client wall time) | ratio |\n|---|---:|---:|---:|")
            with Client(address, timeout=3600) as client:
                for name in args.strategies:
                    a, b = [], []
                    for p in prompts:
                        res = local.engines[name].generate(encode(local.tokenizer, p), args.max_new_tokens)
                        a.append(res.stats.tokens_per_s)
                        t0 = time.perf_counter()
                        r = client.generate(as_request(p), max_new_tokens=args.max_new_tokens, strategy=name)
                        b.append(len(r.token_ids) / (time.perf_counter() - t0))
                    ia, rb = sum(a) / len(a), sum(b) / len(b)
                    out["overhead"].append({"strategy": name, "in_process": ia, "ray_grpc": rb, "ratio": rb / ia})
                    print(f"| {name} | {ia:.2f} | {rb:.2f} | {rb / ia:.3f} |", flush=True)
            del local

        per_level = {c: max(c * args.requests_per_client, args.min_requests) for c in args.concurrency}
        pool = prompt_pool(args.data, args.skip, max(per_level.values()))
        out["prompts"] = [p.id for p in pool]
        print("\n| strategy | concurrency | requests | tokens | wall s | tokens/s | latency p50 s | p99 s "
              "| mean verify batch |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        with Client(address, timeout=3600) as client:
            for c in args.concurrency:                 # strategies side by side at each level: same drift
                # Repeats alternate the order (A B, B A, ...): neither strategy always runs first after a level change.
                order = [list(args.strategies) if r % 2 == 0 else list(reversed(args.strategies))
                         for r in range(args.repeats)]
                for repeat, name in ((r, name) for r, names in enumerate(order) for name in names):
                    n = per_level[c]
                    row = measure_wave(client, box["service"].verifier, name, [as_request(p) for p in pool[:n]],
                                       c, args.max_new_tokens)
                    scheduler = getattr(box["service"].built, "scheduler", None)
                    if scheduler is not None:    # what the goodput scheduler's measured check held, after the wave
                        g = scheduler.guard.stats
                        row["scheduler_guard"] = {"mode": g.mode, "windows": g.windows, "rates": g.rates,
                                                  "predicted": g.predicted, "presumed_plain": g.presumed_plain,
                                                  "setup_s_per_token": g.setup_s_per_token,
                                                  "held_back": scheduler.stats.speculation_held_back}
                    row["repeat"] = repeat
                    out["throughput"].append(row)
                    print(f"| {name} | {c} | {row['requests']} | {row['tokens']} | {row['wall_s']:.1f} | "
                          f"{row['tokens_per_s']:.2f} | {row['latency_p50_s']:.2f} | {row['latency_p99_s']:.2f} "
                          f"| {row['mean_verify_batch']:.2f} |", flush=True)
    finally:
        stop_serving(loop, box, runtime)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
