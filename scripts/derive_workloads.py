"""Derive length distributions for cluster_configs/workloads/{spec-bench-mix,code-humaneval}.yaml.

    .venv/bin/python scripts/derive_workloads.py    # prints the YAML `mix:` blocks

Prompt tokens: each prompt as the benchmark sends it (Spec-Bench: first turn through the Qwen
chat template; HumanEval: raw), tokenized with the Qwen2.5-Coder tokenizer, fitted per
category by a log-normal (median and standard deviation of log length).
Output tokens: the dev set's reference answers where a category has at least 10 (tokenized the
same way; medians floored at OUTPUT_FLOOR), else the stated assumption OUTPUT_DEFAULT (MT-bench
categories have no references).
References are shorter than what a chat model writes, so reference-derived outputs are a
lower bound; the file says so.
"""
from __future__ import annotations

import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.bench import encode, load_prompts  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUTPUT_DEFAULT = (256, 0.5)      # median tokens, sigma: an assumption for categories without references
OUTPUT_FLOOR = 32                # short-answer references (RAG: "Washington, DC") are shorter than any chat answer


def lognormal(lengths: list[int]) -> tuple[float, float]:
    logs = [math.log(max(1, n)) for n in lengths]
    return math.exp(statistics.median(logs)), statistics.pstdev(logs)


def main() -> None:
    import json

    from transformers import AutoTokenizer

    from workers.model_store import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("qwen2.5-coder-0.5b"))
    for name in ("spec_bench_dev.jsonl", "humaneval_dev.jsonl"):
        prompts = load_prompts(DATA / name, None)
        by_cat: dict[str, list[int]] = defaultdict(list)
        for p in prompts:
            by_cat[p.category].append(len(encode(tok, p)))
        refs: dict[str, list[int]] = defaultdict(list)
        for line in (DATA / name).read_text().splitlines():
            r = json.loads(line)
            for ans in r.get("reference") or []:
                refs[r.get("category", "humaneval")].append(len(tok(ans).input_ids))
                break                                   # first turn's reference only
            if "canonical_solution" in r:
                refs["humaneval"].append(len(tok(r["canonical_solution"]).input_ids))
        print(f"# {name}")
        print("mix:")
        for cat, lens in by_cat.items():
            pm, ps = lognormal(lens)
            om, os_ = lognormal(refs[cat]) if len(refs[cat]) >= 10 else OUTPUT_DEFAULT
            om = max(om, OUTPUT_FLOOR)
            why = f"{len(refs[cat])} references" if len(refs[cat]) >= 10 else "assumed (no references)"
            print(f"  - {{name: {cat}, weight: {len(lens)}, "
                  f"prompt_tokens: {{kind: lognormal, median: {pm:.0f}, sigma: {ps:.2f}}}, "
                  f"output_tokens: {{kind: lognormal, median: {om:.0f}, sigma: {os_:.2f}, max: 1024}}}}"
                  f"   # {len(lens)} prompts; output: {why}")


if __name__ == "__main__":
    main()
