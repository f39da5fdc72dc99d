#!/usr/bin/env python
"""Command line entry point.

  python launch.py --cluster cluster_configs/local.yaml            # main job: serve, submit a sample batch
                                                                   # through the client, print outputs + speedups
  python launch.py --cluster cluster_configs/8xA100.yaml --dry-run # placement plan only
  python launch.py serve --cluster cluster_configs/local.yaml      # serve gRPC until SIGINT/SIGTERM
  python launch.py bench --cluster cluster_configs/local.yaml --data ../shared/data/humaneval_dev.jsonl \
      --limit 20 --max-new-tokens 128 --out result.json
  python launch.py mag-table --cluster cluster_configs/local.yaml --data ../shared/data/humaneval_dev.jsonl \
      --limit 40 --out mag_tables/qwen2.5-coder-1.5b.pt               # MaG table for cascade strategies
  python launch.py simulate --cluster cluster_configs/8xA100.yaml \
      --workload cluster_configs/workloads/spec-bench-mix.yaml     # capacity plan (docs/capacity.md)
  python launch.py profile --cluster cluster_configs/local.yaml    # measure this machine for simulate --profile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SAMPLE_PROMPTS = [
    ("humaneval", False, 'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same backwards."""\n'),
    ("chat", True, "Write a Python function that returns the n-th Fibonacci number, with a docstring."),
    ("humaneval", False, "from typing import List\n\n\ndef running_max(numbers: List[int]) -> List[int]:\n"
                         '    """Return the running maximum of the list.\n    >>> running_max([1, 3, 2, 5])\n'
                         '    [1, 3, 3, 5]\n    """\n'),
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="config file (cluster_configs/*.yaml)")
    p.add_argument("--strategies", nargs="*", default=None, help="subset of configured strategy names")


def cmd_dry_run(args) -> int:
    """Print the placement plan and exit; starts nothing (works on a laptop for any cluster config)."""
    from orchestrator.config import load_config
    from placement.plan import plan_placement

    cfg = load_config(args.cluster)
    plan = plan_placement(cfg)
    print(f"placement plan for {cfg.name} ({args.cluster}):\n{plan.table()}")
    print(f"\n{len(plan.shards)} Ray placement-group bundles: {json.dumps(plan.bundles())}")
    return 0


def run_demo(address: str, engines: list[str], max_new_tokens: int, token: str | None = None,
             tls_root_cert: str | None = None) -> None:
    """Submit the sample batch through the gRPC client once per strategy; print outputs and speedups."""
    from orchestrator.client import Client

    prompts = [[{"role": "user", "content": text}] if chat else text for _, chat, text in SAMPLE_PROMPTS]
    means: dict[str, float] = {}
    reference = None
    with Client(address, timeout=3600, token=token, tls_root_cert=tls_root_cert) as client:
        for name in engines:
            results = client.generate_batch(prompts, strategy=name, max_new_tokens=max_new_tokens, concurrency=1)
            if name == "plain":
                reference = [r.token_ids for r in results]
                for (cat, _, _), r in zip(SAMPLE_PROMPTS, results):
                    print(f"\n=== {cat} ===\n{r.text}\n")
            same = sum(r.token_ids == ref for r, ref in zip(results, reference or []))
            means[name] = sum(r.stats.tokens_per_s for r in results) / len(results)
            acc = sum(r.stats.mean_accepted_tokens for r in results) / len(results)
            print(f"  {name:>24}: {means[name]:6.2f} tok/s, mean accepted {acc:.2f}, "
                  f"{same}/{len(results)} outputs equal plain decoding")
    print("\nspeedup vs plain decoding over the sample batch:")
    for name, tps in means.items():
        print(f"  {name:>24}: {tps / means['plain']:.2f}x")


def cmd_serve(args, demo: bool) -> int:
    import asyncio
    import signal

    from orchestrator.build import build_engines
    from orchestrator.config import ConfigError, load_config
    from orchestrator.security import check_startup, load_auth_token
    from orchestrator.server import start_server

    cfg = load_config(args.cluster)
    try:                                           # token and certificates: fail before anything starts
        check_startup(cfg.server)
    except ConfigError as e:
        raise ConfigError(f"{args.cluster}: {e}") from None
    runtime, dashboard = None, None
    if args.in_process:
        built = build_engines(cfg, only=args.strategies)
    else:
        import ray

        from orchestrator.ray_runtime import place, start_ray
        from placement.plan import plan_placement

        plan = plan_placement(cfg)                 # an infeasible plan fails here, before Ray starts
        print(f"placement plan for {cfg.name}:\n{plan.table()}", flush=True)
        dashboard = start_ray(cfg)
        try:
            built, runtime = place(cfg, plan, only=args.strategies)
        except BaseException:
            ray.shutdown()
            raise
    host = cfg.server.host
    port = args.port if args.port is not None else (0 if demo else cfg.server.port)

    async def serve() -> None:
        server, bound, service = await start_server(built, host, port)
        print(f"gRPC endpoint: {host}:{bound}  (strategies: {', '.join(built.engines)})", flush=True)
        if runtime is not None:
            from orchestrator.ray_runtime import metrics_endpoints

            print(f"Ray dashboard: {dashboard or 'not started (joined an existing cluster: see its head)'}; "
                  f"actors: {', '.join(runtime.actors)}", flush=True)
            print(f"Prometheus metrics (ray_specorch_*): {', '.join(metrics_endpoints())}", flush=True)
        else:
            print("Ray: not used (--in-process: every model runs in this process)", flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if demo:
            tls = cfg.server.tls.cert_file if cfg.server.tls else None    # a self-signed certificate is its own root
            task = loop.run_in_executor(None, run_demo, f"{host}:{bound}", list(built.engines), args.max_new_tokens,
                                        load_auth_token(cfg.server), tls)
            task.add_done_callback(lambda _f: stop.set())
        await stop.wait()
        await server.stop(grace=5)
        service.close()
        if demo:
            task.result()
        print("server stopped", flush=True)

    try:
        asyncio.run(serve())
    finally:
        if runtime is not None:     # no orphaned actors: kill ours, then leave (or stop) Ray
            import ray

            runtime.shutdown()
            ray.shutdown()
            print("Ray actors stopped", flush=True)
    return 0


def cmd_bench(args) -> int:
    from orchestrator.bench import environment, load_prompts, markdown, run_bench
    from orchestrator.build import build_engines
    from orchestrator.config import load_config

    cfg = load_config(args.cluster)
    limits = args.limit or [None]
    if len(limits) not in (1, len(args.data)):
        print(f"error: --limit takes one value or one per --data file ({len(args.data)}), got {len(limits)}",
              file=sys.stderr)
        return 2
    prompts = []
    for i, path in enumerate(args.data):
        prompts += load_prompts(path, limits[i] if len(limits) > 1 else limits[0])
    built = build_engines(cfg, only=args.strategies)
    if args.no_hf or args.hf_peers is not None:
        peers = [] if args.no_hf else args.hf_peers
        cfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"hf_peers": peers})})
        built.config = cfg
    print(f"{len(prompts)} prompts, methods: {', '.join(built.engines)} + HF {cfg.bench.hf_peers}", flush=True)
    t0 = time.time()
    result = run_bench(built, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True))
    table = markdown(result["table"])
    print("\n" + table)
    result.update(command=" ".join(["python", "launch.py"] + sys.argv[1:]), config=cfg.model_dump(),
                  environment=environment(), wall_s=time.time() - t0, max_new_tokens=args.max_new_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(f"`{result['command']}`\n\n{table}\n")
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def cmd_mag_table(args) -> int:
    from orchestrator.bench import load_prompts
    from orchestrator.build import build_engines
    from orchestrator.config import load_config
    from orchestrator.mag_table import generate_outputs, table_from_outputs
    from workers.mag import save_table

    cfg = load_config(args.cluster)
    prompts = [p for path in args.data for p in load_prompts(path, args.limit)]
    built = build_engines(cfg, only=[])          # the target alone
    outputs = generate_outputs(built, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True))
    table = table_from_outputs(outputs)
    save_table(table, args.out, meta={"target": cfg.models.target.source, "prompts": len(prompts),
                                      "tokens": sum(map(len, outputs)), "data": args.data})
    print(f"wrote {args.out}: {len(table)} entries from {sum(map(len, outputs))} generated tokens")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="benchmark strategies vs plain decoding and HF generate()")
    _common(bench)
    bench.add_argument("--data", action="append", required=True, help="jsonl prompt file (repeatable)")
    bench.add_argument("--limit", type=int, nargs="+", default=None,
                       help="prompts per data file, spread over categories (one value, or one per --data)")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--out", default=None, help="JSON result path (a .md table is written beside it)")
    bench.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() rows")
    bench.add_argument("--hf-peers", nargs="*", choices=["plain", "assisted", "prompt_lookup"], default=None,
                       help="override bench.hf_peers (which HF generate() rows to measure)")
    bench.set_defaults(func=cmd_bench)
    mag = sub.add_parser("mag-table", help="MaG bigram table from the target's greedy outputs (docs/cascade.md)")
    mag.add_argument("--cluster", required=True, help="config file whose target generates the text")
    mag.add_argument("--data", action="append", required=True, help="jsonl prompt file (repeatable)")
    mag.add_argument("--limit", type=int, default=None, help="prompts per data file")
    mag.add_argument("--max-new-tokens", type=int, default=256)
    mag.add_argument("--out", required=True, help="table path (.pt), e.g. mag_tables/qwen2.5-coder-1.5b.pt")
    mag.set_defaults(func=cmd_mag_table)
    serve = sub.add_parser("serve", help="serve the gRPC front door until SIGINT/SIGTERM")
    _common(serve)
    serve.add_argument("--port", type=int, default=None, help="override server.port (0 = any free port)")
    serve.add_argument("--in-process", action="store_true",
                       help="run every model in this process instead of Ray actors")
    serve.set_defaults(func=lambda a: cmd_serve(a, demo=False))
    from orchestrator.capacity_cli import add_parsers as add_capacity_parsers
    add_capacity_parsers(sub)        # simulate, profile

    parser.add_argument("--cluster", help="config file for the main job")
    parser.add_argument("--strategies", nargs="*", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true", help="print the placement plan and exit")
    parser.add_argument("--port", type=int, default=None, help="gRPC port for the main job (default: any free port)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every model in this process instead of Ray actors")
    args = parser.parse_args(argv)
    if args.command is None:
        if not args.cluster:
            parser.error("--cluster is required")
        return cmd_dry_run(args) if args.dry_run else cmd_serve(args, demo=True)
    return args.func(args)


if __name__ == "__main__":
    from orchestrator.config import ConfigError
    from placement.plan import PlacementError

    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except PlacementError as e:
        print(f"placement error ({sys.argv[sys.argv.index('--cluster') + 1] if '--cluster' in sys.argv else ''}): {e}",
              file=sys.stderr)
        sys.exit(2)
