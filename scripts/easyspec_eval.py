"""EasySpec accuracy (in-process mode): acceptance of layer-parallel drafts vs sequential drafts.

    .venv/bin/python scripts/easyspec_eval.py --limit 3 --max-new-tokens 64

Runs, on HumanEval dev prompts, plain speculative decoding with the 0.5B drafter and EasySpec
with the same drafter for each calibration policy and group degree (fixed k), and prints the
acceptance rate, mean accepted tokens and the relative drop vs sequential drafting. Outputs are
checked against plain decoding of the target. Draft-step time is not measured here: in-process
mode computes the group members one after another, so it is no faster than sequential drafting.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.draft_length import FixedDraftLength  # noqa: E402
from core.metrics import AggregateStats  # noqa: E402
from orchestrator.bench import encode, load_prompts  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from workers.drafters import DraftModelDrafter  # noqa: E402
from workers.easyspec import Calibration, EasySpecDrafter  # noqa: E402
from workers.loading import eos_ids, load_for_decoding  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/humaneval_dev.jsonl"))
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--degrees", type=int, nargs="*", default=[2, 3])
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    target_model, tok = load_for_decoding("qwen2.5-coder-1.5b", "bfloat16", cpu)
    draft_model, _ = load_for_decoding("qwen2.5-coder-0.5b", "bfloat16", cpu)
    target, drafter_runner = ModelRunner(target_model), ModelRunner(draft_model)
    eos = eos_ids(target_model, tok)
    prompts = [encode(tok, p) for p in load_prompts(args.data, args.limit)]
    policy = lambda: FixedDraftLength(args.k)  # noqa: E731

    plain = SpeculativeEngine(target, eos_token_ids=eos)
    reference = [plain.generate(ids, args.max_new_tokens).tokens for ids in prompts]
    rows = {"sequential (plain SD)": SpeculativeEngine(target, DraftModelDrafter(drafter_runner), policy, eos)}
    for degree in args.degrees:
        for cal in Calibration:
            rows[f"easyspec d={degree} {cal.value}"] = SpeculativeEngine(
                target, EasySpecDrafter(drafter_runner, degree=degree, calibration=cal), policy, eos)
    base = None
    print(f"| drafting | acceptance rate | mean accepted tokens | drop vs sequential | outputs = plain |")
    print("|---|---:|---:|---:|---:|")
    for name, engine in rows.items():
        agg, same = AggregateStats(), 0
        for ids, ref in zip(prompts, reference):
            res = engine.generate(ids, args.max_new_tokens)
            agg.add(res.stats)
            same += res.tokens == ref
        rate = agg.acceptance_rate
        base = rate if base is None else base
        print(f"| {name} | {rate:.3f} | {agg.mean_accepted_tokens:.2f} | {(base - rate) / base:+.1%} | "
              f"{same}/{len(prompts)} |", flush=True)


if __name__ == "__main__":
    main()
