"""Cross-vocabulary drafting beside its baselines, same prompts, same run (docs/cross_vocab.md):
plain decoding, our strategies (default: cross-vocab-smollm2 and the same-vocabulary sd-0.5b-int8-adaptive),
Hugging Face's plain generate() of the target and its universal assisted generation (UAG:
`generate(assistant_model=..., tokenizer=..., assistant_tokenizer=...)`) with the cross-vocabulary
strategy's drafter. Greedy; methods interleaved prompt by prompt; figures as `launch.py bench` reports them.

    python scripts/cross_vocab_bench.py --data ../shared/data/humaneval_dev.jsonl --limit 4 \\
        --max-new-tokens 64 --out bench_out/cross_vocab.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.bench import _engine_run, _hf_runner, encode, environment, load_prompts, markdown, summarise  # noqa: E402
from orchestrator.build import build_engines  # noqa: E402
from orchestrator.config import load_config  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default="cluster_configs/local.yaml")
    ap.add_argument("--cross-vocab", default="cross-vocab-smollm2", help="the cross_vocab strategy (its drafter is UAG's)")
    ap.add_argument("--others", nargs="*", default=["sd-0.5b-int8-adaptive"], help="more of our strategies")
    ap.add_argument("--data", required=True, help="jsonl prompts (HumanEval or Spec-Bench)")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON result path (a .md table beside it)")
    args = ap.parse_args(argv)

    built = build_engines(load_config(args.cluster), only=[args.cross_vocab, *args.others])
    methods = {name: (lambda e: lambda ids: _engine_run(e, ids, args.max_new_tokens))(engine)
               for name, engine in built.engines.items()}
    methods["hf-plain"] = _hf_runner(built, "plain", args.max_new_tokens)
    drafter = built.config.strategy(args.cross_vocab).drafter       # UAG drafts with the same model
    built.config = built.config.model_copy(update={"bench": built.config.bench.model_copy(
        update={"hf_universal_assistant": drafter})})
    methods["hf-uag"] = _hf_runner(built, "universal_assisted", args.max_new_tokens)
    prompts = [(p, encode(built.tokenizer, p)) for p in load_prompts(args.data, args.limit)]
    for run in methods.values():             # one-off costs (allocator, kernels) are no method's
        run(prompts[0][1][:32])
    records: dict[str, list[dict]] = defaultdict(list)
    for i, (p, ids) in enumerate(prompts):
        reference = None
        for name, run in methods.items():
            tokens, seconds, stats = run(ids)
            reference = tokens if name == "plain" else reference
            rec = {"id": p.id, "category": p.category, "new_tokens": len(tokens), "seconds": seconds,
                   "tokens_per_s": len(tokens) / seconds, "equals_plain": tokens == reference}
            if stats is not None:
                rec.update(steps=stats.steps, step_tokens=stats.step_tokens, drafted=stats.drafted_tokens,
                           accepted=stats.accepted_tokens)
            records[name].append(rec)
        print(f"[{i + 1}/{len(prompts)}] {p.id}: " + ", ".join(
            f"{n} {records[n][-1]['tokens_per_s']:.2f}" for n in methods) + " tok/s", flush=True)
    result = summarise(records)
    result["environment"] = environment()
    result["command"] = " ".join(sys.argv)
    table = markdown(result["table"])
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
