#!/usr/bin/env python
"""Command line entry point.

  python launch.py --cluster cluster_configs/local.yaml            # main job: serve, submit a sample batch
                                                                   # through the client per strategy (main_job.strategies,
                                                                   # or --strategies NAME... / all), end with one table
  python launch.py --cluster cluster_configs/8xA100.yaml --dry-run # placement plan only
  python launch.py serve --cluster cluster_configs/local.yaml      # serve gRPC until SIGINT/SIGTERM
  python launch.py bench --cluster cluster_configs/local.yaml --data ../shared/data/humaneval_dev.jsonl \
      --limit 20 --max-new-tokens 128 --out result.json
  python launch.py mag-table --cluster cluster_configs/local.yaml --data ../shared/data/humaneval_dev.jsonl \
      --limit 40 --out mag_tables/qwen2.5-coder-1.5b.pt               # MaG table for cascade strategies
  python launch.py build-corpus --prompts cluster_configs/corpora/warmup_prompts.jsonl \
      --model qwen2.5-coder-1.5b --out corpora/qwen2.5-coder.pt       # corpus for hierarchy strategies
  python launch.py build-vocab-table --prompts cluster_configs/corpora/warmup_prompts.jsonl \
      --model qwen2.5-coder-1.5b --out cluster_configs/vocab_tables/qwen2.5-coder-1.5b.pt  # VocabTrim table
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


STRATEGIES_HELP = "configured strategy names, or 'all' (default: every configured strategy)"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, help="config file (cluster_configs/*.yaml)")
    p.add_argument("--strategies", nargs="*", default=None, help=STRATEGIES_HELP)


def selected(args, cfg, demo: bool) -> list[str] | None:
    """The strategies a run builds (None = every configured one): --strategies NAME... or all; without
    it, the main job runs main_job.strategies and serve every configured strategy."""
    from core.config import ConfigError

    if args.strategies is None:
        return cfg.main_job.strategies if demo else None
    if "all" in args.strategies:
        if len(args.strategies) > 1:
            raise ConfigError(f"--strategies: 'all' stands alone, got {args.strategies}")
        return None
    return list(args.strategies)


def check(args, demo: bool):
    """Load the config and make every check the run can fail before Ray starts or a model loads
    (placement/plan.py: check_plan). The config and the checked run."""
    from core.config import ConfigError
    from orchestrator.config import load_config
    from placement.plan import check_plan

    cfg = load_config(args.cluster)
    try:
        return cfg, check_plan(cfg, selected(args, cfg, demo), in_process=args.in_process)
    except ConfigError as e:      # (a PlacementError is reported with the file name by __main__ below)
        raise ConfigError(f"{args.cluster}: {e}") from None


def cmd_dry_run(args) -> int:
    """Check the run and print its placement plan; starts nothing (works on a laptop for any cluster config)."""
    cfg, run = check(args, demo=True)
    print(f"strategies: {', '.join(['plain'] + [s.name for s in run.strategies])}")
    if run.plan is None:
        print(f"{cfg.name} ({args.cluster}): every model in this process (--in-process), no placement")
        return 0
    print(f"placement plan for {cfg.name} ({args.cluster}):\n{run.plan.table()}")
    print(f"\n{len(run.plan.shards)} Ray placement-group bundles: {json.dumps(run.plan.bundles())}")
    return 0


def _encode(tokenizer, prompt) -> list[int]:
    """Prompt ids as the server encodes them (orchestrator/edge/server.py: _encode)."""
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(prompt).input_ids




def run_demo(address: str, engines: list[str], max_new_tokens: int, token: str | None = None,
             tls_root_cert: str | None = None, gap=None, tokenizer=None) -> tuple[str, bool]:
    """Submit each sample prompt through the gRPC client once per strategy (plain first), print plain
    decoding's outputs, and return the final table and whether every output equals plain decoding
    or differs from it at a bf16 near-tie (checked with `gap`: see orchestrator/bench.py logit_gap)."""
    from orchestrator.bench import NEAR_TIE_LOGITS
    from orchestrator.edge.client import Client

    prompts = [[{"role": "user", "content": text}] if chat else text for _, chat, text in SAMPLE_PROMPTS]
    results: dict[str, list] = {name: [] for name in engines}
    with Client(address, timeout=3600, token=token, tls_root_cert=tls_root_cert) as client:
        for j, prompt in enumerate(prompts):     # interleaved prompt by prompt: load changes hit every strategy
            took = []
            for name in engines:
                t0 = time.time()
                results[name].append(client.generate(prompt, strategy=name, max_new_tokens=max_new_tokens))
                took.append(f"{name} {time.time() - t0:.1f} s")
            print(f"[prompt {j + 1}/{len(prompts)}] {', '.join(took)}", flush=True)
            print(f"\n=== {SAMPLE_PROMPTS[j][0]} (plain decoding) ===\n{results['plain'][j].text}\n", flush=True)
    reference = [r.token_ids for r in results["plain"]]
    rows, notes, ok = [], [], True
    plain_tps = None
    for name in engines:
        same = ties = 0
        for j, (r, ref) in enumerate(zip(results[name], reference)):
            if r.token_ids == ref:
                same += 1
                continue
            n = min(len(ref), len(r.token_ids))
            p = next((t for t in range(n) if ref[t] != r.token_ids[t]), n)
            what = f"{name}, prompt {j + 1} ({SAMPLE_PROMPTS[j][0]}): first differs at new token {p + 1}"
            if p < n and gap is not None and tokenizer is not None:
                a, b = ref[p], r.token_ids[p]
                g = gap(_encode(tokenizer, prompts[j]) + ref[:p], a, b)
                what += (f": plain {tokenizer.decode([a])!r}, {name} {tokenizer.decode([b])!r}, target logits "
                         f"{abs(g):.3f} apart")
                if abs(g) <= NEAR_TIE_LOGITS:
                    ties += 1
                    notes.append(f"bf16 near-tie: {what}")
                    continue
            ok = False
            notes.append(f"MISMATCH (not a near-tie): {what}")
        tps = sum(r.stats.tokens_per_s for r in results[name]) / len(prompts)
        plain_tps = plain_tps or tps
        acc = sum(r.stats.mean_accepted_tokens for r in results[name]) / len(prompts)
        equal = f"{same}/{len(prompts)}" + (f" + {ties} bf16 near-tie{'s' * (ties > 1)}" if ties else "")
        rows.append((name, f"{tps:.2f}", f"{tps / plain_tps:.2f}x", f"{acc:.2f}", equal))
    head = ("strategy", "tokens/s", "speedup vs plain", "mean accepted tokens", "outputs = plain decoding")
    widths = [max(len(str(r[c])) for r in rows + [head]) for c in range(len(head))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    table = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    table.append(f"\n{len(prompts)} sample prompts x {max_new_tokens} new tokens, greedy, one request at a time "
                 "through the gRPC client, strategies interleaved prompt by prompt; tokens/s and mean accepted "
                 "tokens (the target's own token included, plain = 1.00) are the means of the requests' stats.")
    if notes:
        table.append("bf16: a multi-token verification forward can round differently from a one-token forward and "
                     f"flip a near-tie (target logits within {NEAR_TIE_LOGITS}); float32 is exact (tests).")
        table += [f"- {n}" for n in notes]
    return "\n".join(table), ok


def cmd_serve(args, demo: bool) -> int:
    import asyncio
    import signal

    from core.config import ConfigError
    from orchestrator.build import build_engines
    from orchestrator.edge.security import check_startup, load_auth_token
    from orchestrator.edge.server import start_server

    t_start = time.time()
    cfg, run = check(args, demo)                   # every plan / strategy check, before Ray or any model
    try:                                           # token and certificates: fail before anything starts
        check_startup(cfg.server)
    except ConfigError as e:
        raise ConfigError(f"{args.cluster}: {e}") from None
    only = [s.name for s in run.strategies]        # checked and runnable (skipped ones were noted)
    runtime, dashboard = None, None
    if args.in_process:
        built = build_engines(cfg, only=only)
    else:
        import ray

        from orchestrator.ray_runtime import place, start_ray

        print(f"placement plan for {cfg.name}:\n{run.plan.table()}", flush=True)
        dashboard = start_ray(cfg)
        try:
            built, runtime = place(cfg, run.plan, only=only)
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
            from orchestrator.bench import logit_gap

            tls = cfg.server.tls.cert_file if cfg.server.tls else None    # a self-signed certificate is its own root
            max_new = args.max_new_tokens or cfg.main_job.max_new_tokens
            task = loop.run_in_executor(None, run_demo, f"{host}:{bound}", list(built.engines), max_new,
                                        load_auth_token(cfg.server), tls,
                                        lambda ids, a, b: logit_gap(built.target, ids, a, b), built.tokenizer)
            task.add_done_callback(lambda _f: stop.set())
        await stop.wait()
        await server.stop(grace=5)
        service.close()
        print("server stopped", flush=True)
        return task.result() if demo else None

    try:
        outcome = asyncio.run(serve())
    finally:
        if runtime is not None:     # no orphaned actors: kill ours, then leave (or stop) Ray
            import ray

            runtime.shutdown()
            ray.shutdown()
            print("Ray actors stopped", flush=True)
    if outcome is not None:         # the main job: its table last
        table, ok = outcome
        print(f"\nmain job ({cfg.name}, {'in process' if args.in_process else 'Ray actors'}; "
              f"{time.time() - t_start:.0f} s in all):\n{table}", flush=True)
        return 0 if ok else 1
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
        limit = limits[i] if len(limits) > 1 else limits[0]
        prompts += load_prompts(path, limit, args.skip)
    built = build_engines(cfg, only=selected(args, cfg, demo=False))
    state_logs = {}
    if args.log_draft_states:
        from orchestrator.learned_length import log_draft_states
        state_logs = log_draft_states(built.engines)
    if args.no_hf or args.hf_peers is not None:
        peers = [] if args.no_hf else args.hf_peers
        if "universal_assisted" in peers and not cfg.bench.hf_universal_assistant:
            print(f"error: --hf-peers universal_assisted needs bench.hf_universal_assistant in {args.cluster} "
                  "(a models.drafters key whose tokenizer differs from the target's)", file=sys.stderr)
            return 2
        cfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"hf_peers": peers})})
        built.config = cfg
    print(f"{len(prompts)} prompts, methods: {', '.join(built.engines)} + HF {cfg.bench.hf_peers}", flush=True)
    t0 = time.time()
    warmup = []
    for i, path in enumerate(args.warmup_data or []):
        # The next prompts of the file after the measured ones (same round-robin over categories): disjoint.
        skip = args.skip + len(load_prompts(path, limits[i] if len(limits) > 1 else limits[0])) if path in args.data else 0
        warmup += load_prompts(path, args.warmup_limit, skip)
    result = run_bench(built, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True),
                       warmup=warmup, warmup_strategies=args.warmup_strategies)
    result["warmup"] = {"prompts": [p.id for p in warmup], "strategies": args.warmup_strategies}
    table = markdown(result["table"])
    print("\n" + table)
    result.update(command=" ".join(["python", "launch.py"] + sys.argv[1:]), config=cfg.model_dump(),
                  environment=environment(), wall_s=time.time() - t0, max_new_tokens=args.max_new_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(f"`{result['command']}`\n\n{table}\n")
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")
    for name, log in state_logs.items():
        path = Path(args.log_draft_states)
        path = path if len(state_logs) == 1 else path.with_name(f"{path.stem}.{name}{path.suffix}")
        log.save(path, meta={"strategy": name, "command": result["command"], "prompts": [p.id for p in prompts]})
        print(f"wrote {path}: {len(log.drafted)} draft steps of {name}")
    return 0


def cmd_train_draft_length(args) -> int:
    from orchestrator.learned_length import describe, train_from_logs

    report = train_from_logs(args.logs, args.out, k_max=args.k_max, hidden=args.hidden, epochs=args.epochs,
                             seed=args.seed)
    print(describe(report))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")
    return 0


def _table_prompts(parser) -> None:
    """Options of the commands that build a table from the target's outputs on a prompt set."""
    parser.add_argument("--skip", type=int, default=0,
                        help="leave out the first N prompts of each file (those a bench --limit N measures)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="prompts decoded at a time, their forwards batched (1: one after another)")


def cmd_mag_table(args) -> int:
    from orchestrator.bench import load_prompts
    from orchestrator.build import build_engines
    from orchestrator.config import load_config
    from orchestrator.mag_table import generate_outputs, table_from_outputs
    from workers.mag import save_table

    cfg = load_config(args.cluster)
    prompts = [p for path in args.data for p in load_prompts(path, args.limit, args.skip)]
    built = build_engines(cfg, only=[])          # the target alone
    outputs = generate_outputs(built, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True),
                               concurrency=args.concurrency)
    table = table_from_outputs(outputs)
    save_table(table, args.out, meta={"target": cfg.models.target.source, "prompts": len(prompts),
                                      "tokens": sum(map(len, outputs)), "data": args.data})
    print(f"wrote {args.out}: {len(table)} entries from {sum(map(len, outputs))} generated tokens")
    return 0


def cmd_build_corpus(args) -> int:
    from orchestrator.hierarchy_corpus import corpus_from_texts, corpus_texts
    from workers.hierarchy import save_corpus
    from workers.model_store import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(args.model))
    if tokenizer is None:
        print(f"error: --model {args.model!r} has no tokenizer", file=sys.stderr)
        return 2
    texts = corpus_texts(args.prompts, args.limit)
    corpus = corpus_from_texts(texts, tokenizer, range(args.min_ngram, args.max_ngram + 1),
                               args.continuation_tokens, args.per_key, args.min_count,
                               meta={"model": args.model, "prompts": args.prompts})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_corpus(corpus, args.out)
    print(f"wrote {args.out}: {len(corpus)} n-gram keys from {corpus.meta['tokens']} tokens of {len(texts)} texts")
    return 0


def cmd_build_vocab_table(args) -> int:
    from orchestrator.vocab_table import build_vocab_table
    from workers.vocab_trim import save_frequency_table

    table = build_vocab_table(args.model, args.dtype, args.prompts, args.limit, args.max_new_tokens,
                              log=lambda s: print(s, flush=True), skip=args.skip, concurrency=args.concurrency)
    save_frequency_table(table, args.out)
    print(f"wrote {args.out}: {len(table)} distinct tokens from {table.meta['tokens']} generated tokens")
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
    bench.add_argument("--warmup-data", action="append", default=None,
                       help="jsonl file whose next --warmup-limit prompts after the measured ones (repeatable) "
                            "the --warmup-strategies decode before measuring (state kept across requests)")
    bench.add_argument("--warmup-limit", type=int, default=4, help="warm-up prompts per --warmup-data file")
    bench.add_argument("--warmup-strategies", nargs="*", default=None,
                       help="strategies that warm up (default: all of ours)")
    bench.add_argument("--hf-peers", nargs="*", choices=["plain", "assisted", "prompt_lookup", "universal_assisted"],
                       default=None,
                       help="override bench.hf_peers (which HF generate() rows to measure)")
    bench.add_argument("--skip", type=int, default=0,
                       help="skip the first N prompts of each --data file (same order), e.g. to log on others")
    bench.add_argument("--log-draft-states", default=None, metavar="PATH",
                       help="log (drafter features, accepted tokens) per step of plain draft_model strategies "
                            "(.pt; one file per strategy when several): training data of the learned draft length")
    bench.set_defaults(func=cmd_bench)
    train = sub.add_parser("train-draft-length",
                           help="train the learned draft length's predictor from --log-draft-states logs (docs/draft_length.md)")
    train.add_argument("--logs", nargs="+", required=True, help="draft-state logs (.pt)")
    train.add_argument("--out", required=True, help="weights path (.pt), named by draft_length.weights")
    train.add_argument("--k-max", type=int, default=None, help="longest draft length (default: the longest logged)")
    train.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    train.add_argument("--epochs", type=int, default=300, help="full-batch optimiser steps")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train_draft_length)
    mag = sub.add_parser("mag-table", help="MaG bigram table from the target's greedy outputs (docs/cascade.md)")
    mag.add_argument("--cluster", required=True, help="config file whose target generates the text")
    mag.add_argument("--data", action="append", required=True, help="jsonl prompt file (repeatable)")
    mag.add_argument("--limit", type=int, default=None, help="prompts per data file")
    mag.add_argument("--max-new-tokens", type=int, default=256)
    _table_prompts(mag)
    mag.add_argument("--out", required=True, help="table path (.pt), e.g. mag_tables/qwen2.5-coder-1.5b.pt")
    mag.set_defaults(func=cmd_mag_table)
    corpus = sub.add_parser("build-corpus", help="Hierarchy Drafting's static corpus from a prompt set (docs/hierarchy.md)")
    corpus.add_argument("--prompts", action="append", required=True,
                        help="jsonl file (repeatable): prompt/text/turns, optional output/completion fields")
    corpus.add_argument("--model", required=True, help="model whose tokenizer to use (the target's: an embedded name or a directory)")
    corpus.add_argument("--out", required=True, help="corpus path (.pt), named by the strategy's corpus field")
    corpus.add_argument("--limit", type=int, default=None, help="rows per prompt file")
    corpus.add_argument("--max-ngram", type=int, default=3, help="longest key n-gram")
    corpus.add_argument("--min-ngram", type=int, default=1, help="shortest key n-gram")
    corpus.add_argument("--continuation-tokens", type=int, default=8, help="tokens stored per continuation")
    corpus.add_argument("--per-key", type=int, default=4, help="most frequent continuations kept per key")
    corpus.add_argument("--min-count", type=int, default=1, help="drop continuations seen fewer times")
    corpus.set_defaults(func=cmd_build_corpus)
    vocab = sub.add_parser("build-vocab-table",
                           help="VocabTrim's token frequency table from the target's greedy outputs (docs/vocab_trim.md)")
    vocab.add_argument("--prompts", action="append", required=True, help="jsonl prompt file (repeatable)")
    vocab.add_argument("--model", required=True, help="the target: an embedded name (e.g. qwen2.5-coder-1.5b) or a directory")
    vocab.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    vocab.add_argument("--out", required=True, help="table path (.pt), named by a strategy's draft_vocab.table")
    vocab.add_argument("--limit", type=int, default=None, help="prompts per file")
    vocab.add_argument("--max-new-tokens", type=int, default=128)
    _table_prompts(vocab)
    vocab.set_defaults(func=cmd_build_vocab_table)
    serve = sub.add_parser("serve", help="serve the gRPC front door until SIGINT/SIGTERM")
    _common(serve)
    serve.add_argument("--port", type=int, default=None, help="override server.port (0 = any free port)")
    serve.add_argument("--in-process", action="store_true",
                       help="run every model in this process instead of Ray actors")
    serve.set_defaults(func=lambda a: cmd_serve(a, demo=False))
    from orchestrator.capacity_cli import add_parsers as add_capacity_parsers
    add_capacity_parsers(sub)        # simulate, profile

    parser.add_argument("--cluster", help="config file for the main job")
    parser.add_argument("--strategies", nargs="*", default=None,
                        help="configured strategy names, or 'all' (default: the config's main_job.strategies)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per sample prompt (default: the config's main_job.max_new_tokens)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the run (strategies, placement) and print the plan; starts nothing")
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
    from core.config import ConfigError
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
