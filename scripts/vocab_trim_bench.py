"""Draft-step time of the trimmed drafter head (VocabTrim, docs/vocab_trim.md): lowest ids vs the most
frequent ids of a `launch.py build-vocab-table` table, at several sizes, vs the full vocabulary.

    flock /tmp/specorch_cpu.lock .venv/bin/python scripts/vocab_trim_bench.py \
        --table cluster_configs/vocab_tables/qwen2.5-coder-1.5b.pt --out bench_out/vocab_trim_steps.json

Times `propose(k)` of the drafter (default the int8 0.5B) through its ModelRunner on a few HumanEval and
Spec-Bench prompts, every draft accepted (scripts/easyspec_workers_bench.py: time_proposes); reports the
median ms per draft token per setup, the kept ids, and how much of the table's counted tokens the kept
set covers (the acceptance the trim can cost: a target token outside the set is never drafted).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.bench import encode, load_prompts  # noqa: E402
from scripts.easyspec_workers_bench import time_proposes  # noqa: E402
from workers.drafters import DraftModelDrafter  # noqa: E402
from workers.loading import load_for_decoding  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.vocab_trim import kept_token_ids, load_frequency_table  # noqa: E402


def table_mass_kept(table, kept: torch.Tensor) -> float:
    """Share of the table's counted tokens whose id is in `kept`."""
    inside = torch.isin(table.ids, kept)
    return float(table.counts[inside].sum() / table.counts.sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantize", default="int8", choices=["none", "int8"])
    ap.add_argument("--table", required=True, help="frequency table (.pt) from launch.py build-vocab-table")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--data", action="append", default=None, help="jsonl prompt file (repeatable)")
    ap.add_argument("--limit", type=int, default=2, help="prompts per data file")
    ap.add_argument("--k", type=int, default=4, help="tokens per propose")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_for_decoding(args.model, args.dtype, torch.device("cpu"), args.quantize)
    runner = ModelRunner(model)
    table = load_frequency_table(args.table)
    data = args.data or ["../shared/data/humaneval_dev.jsonl", "../shared/data/spec_bench_dev.jsonl"]
    prompts = [encode(tok, p) for path in data for p in load_prompts(path, args.limit)]
    setups = {"full": DraftModelDrafter(runner)}
    for n in args.sizes:
        setups[f"lowest {n}"] = DraftModelDrafter(runner, draft_vocab=n)
        setups[f"frequency {n}"] = DraftModelDrafter(runner, draft_vocab=n, vocab_ranking=table.ids)
    rows = {}
    for name, drafter in setups.items():
        ms = [time_proposes(drafter, ids, args.k, args.rounds, args.warmup)[0] / args.k for ids in prompts]
        ranking = drafter.vocab_ranking
        kept = ([kept_token_ids(runner.vocab_size, drafter.draft_vocab, ids, ranking) for ids in prompts]
                if drafter.draft_vocab else [torch.arange(runner.vocab_size)])
        rows[name] = {"ms_per_draft_token": statistics.median(ms), "per_prompt_ms": ms,
                      "kept_ids": statistics.mean(k.numel() for k in kept),
                      "table_mass_kept": statistics.mean(table_mass_kept(table, k) for k in kept)}
        print(f"{name:>16}: {rows[name]['ms_per_draft_token']:.1f} ms per draft token, "
              f"{rows[name]['kept_ids']:.0f} ids, {100 * rows[name]['table_mass_kept']:.1f}% of the table's tokens",
              flush=True)
    full = rows["full"]["ms_per_draft_token"]
    print(f"\n| drafter head | ids scored | ms per draft token | vs full | table tokens kept |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['kept_ids']:.0f} | {r['ms_per_draft_token']:.1f} | {full / r['ms_per_draft_token']:.2f}x "
              f"| {100 * r['table_mass_kept']:.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "table": str(args.table),
                                              "table_meta": table.meta, "k": args.k, "rounds": args.rounds,
                                              "prompts": len(prompts), "threads": args.threads, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
