#!/usr/bin/env python
"""Command line entry point.

  python launch.py --cluster cluster_configs/local.yaml            # main job: sample batch, outputs + speedups
  python launch.py bench --cluster cluster_configs/local.yaml --data ../shared/data/humaneval_dev.jsonl \
      --limit 20 --max-new-tokens 128 --out result.json
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


def cmd_main(args) -> int:
    from orchestrator.bench import Prompt, encode
    from orchestrator.build import build_engines
    from orchestrator.config import load_config

    cfg = load_config(args.cluster)
    built = build_engines(cfg, only=args.strategies)
    print(f"target {cfg.models.target.source} on {built.device}; strategies: {', '.join(built.engines)}")
    prompts = [Prompt(f"sample-{i}", cat, text, chat) for i, (cat, chat, text) in enumerate(SAMPLE_PROMPTS)]
    totals: dict[str, list[float]] = {name: [] for name in built.engines}
    for p in prompts:
        ids = encode(built.tokenizer, p)
        reference = None
        for name, engine in built.engines.items():
            res = engine.generate(ids, args.max_new_tokens)
            totals[name].append(res.stats.tokens_per_s)
            if name == "plain":
                reference = res.tokens
                print(f"\n=== {p.id} ({p.category}) ===\n{built.tokenizer.decode(res.tokens)}\n")
            same = "same as plain" if res.tokens == reference else "DIFFERS from plain (see docs/benchmarks.md)"
            print(f"  {name:>24}: {res.stats.tokens_per_s:6.2f} tok/s, mean accepted "
                  f"{res.stats.mean_accepted_tokens:.2f}, {same}")
    plain = sum(totals["plain"]) / len(totals["plain"])
    print("\nmean over the sample batch:")
    for name, tps in totals.items():
        mean = sum(tps) / len(tps)
        print(f"  {name:>24}: {mean:6.2f} tok/s  speedup vs plain {mean / plain:.2f}x")
    return 0


def cmd_bench(args) -> int:
    from orchestrator.bench import environment, load_prompts, markdown, run_bench
    from orchestrator.build import build_engines
    from orchestrator.config import load_config

    cfg = load_config(args.cluster)
    prompts = []
    for path in args.data:
        prompts += load_prompts(path, args.limit)
    built = build_engines(cfg, only=args.strategies)
    if args.no_hf:
        cfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"hf_peers": []})})
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="benchmark strategies vs plain decoding and HF generate()")
    _common(bench)
    bench.add_argument("--data", action="append", required=True, help="jsonl prompt file (repeatable)")
    bench.add_argument("--limit", type=int, default=None, help="prompts per data file, spread over categories")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--out", default=None, help="JSON result path (a .md table is written beside it)")
    bench.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() rows")
    bench.set_defaults(func=cmd_bench)

    parser.add_argument("--cluster", help="config file for the main job")
    parser.add_argument("--strategies", nargs="*", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dry-run", action="store_true", help="print the placement plan and exit")
    args = parser.parse_args(argv)
    if args.command is None:
        if not args.cluster:
            parser.error("--cluster is required")
        return cmd_dry_run(args) if args.dry_run else cmd_main(args)
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
