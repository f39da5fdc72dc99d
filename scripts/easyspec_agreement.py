"""EasySpec accuracy: top-1 agreement of layer-parallel drafts with sequential drafts, per policy.

    .venv/bin/python scripts/easyspec_agreement.py --limit 2 2 --max-new-tokens 64 --out bench_out/easyspec_agreement.json

Greedy speculative decoding is replayed against the target's own greedy continuation (computed once
per prompt), so no target forward is needed per configuration: a round proposes k tokens, the
accepted ones are the prefix that matches the target's continuation, then the target's next token
(the bonus) is committed, exactly as greedy verification would do. Every configuration therefore
walks the KV states its calibration policy really produces. At each round start the sequential
drafter's greedy draft from the same (exact) context is computed too (cached by position: it
depends on the position only), and the two drafts are compared:

- agreement@1: the first draft token equals the sequential drafter's (one layer-parallel step on top
  of whatever KV the policy keeps: its top-1 agreement);
- agreement (all): over the draft positions where every earlier token agreed, the share that
  agrees too (conditional top-1 agreement, positions 1..k);
- acceptance: accepted / drafted against the target, and its relative drop vs sequential drafting
  replayed the same way (the paper reports at most 7%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.sampling import SamplingParams  # noqa: E402
from orchestrator.bench import encode, load_prompts  # noqa: E402
from orchestrator.engine import SpeculativeEngine  # noqa: E402
from workers.drafters import DraftModelDrafter  # noqa: E402
from workers.easyspec import Calibration, EasySpecDrafter  # noqa: E402
from workers.loading import eos_ids, load_for_decoding  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared/data"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def replay(drafter, prompt: list[int], reference: list[int], k: int, sequential_at) -> dict:
    """Greedy SD of `drafter` against the target's continuation `reference`; counts per round."""
    session = drafter.start(prompt, SamplingParams(), None)
    session.update(reference[:1], 0)            # the target's prefill commits the first token
    pos = 1
    rounds = drafted = accepted = agree1 = agree_num = agree_den = 0
    while pos < len(reference) - 1:
        want = min(k, len(reference) - 1 - pos)
        draft = session.propose(want).tokens
        seq = sequential_at(pos, want)
        rounds += 1
        agree1 += bool(draft) and draft[0] == seq[0]
        same = common_prefix(draft, seq)
        agree_num += same
        agree_den += min(same + 1, len(draft))      # positions compared: all agreeing ones and the first miss
        n = common_prefix(draft, reference[pos:])
        drafted += len(draft)
        accepted += n
        new = reference[pos:pos + n + 1]          # accepted tokens + the target's token after them
        session.update(new, n)
        pos += len(new)
    session.close()
    return {"rounds": rounds, "drafted": drafted, "accepted": accepted, "agree1": agree1,
            "agree_num": agree_num, "agree_den": agree_den}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="*", default=[str(DATA / "humaneval_dev.jsonl"), str(DATA / "spec_bench_dev.jsonl")])
    ap.add_argument("--limit", type=int, nargs="*", default=[2, 2])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--degrees", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench_out/easyspec_agreement.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    target_model, tok = load_for_decoding("qwen2.5-coder-1.5b", args.dtype, cpu)
    draft_model, _ = load_for_decoding("qwen2.5-coder-0.5b", args.dtype, cpu, with_tokenizer=False)
    target, runner = ModelRunner(target_model), ModelRunner(draft_model)
    plain = SpeculativeEngine(target, eos_token_ids=eos_ids(target_model, tok))
    prompts = []
    for path, limit in zip(args.data, args.limit):
        prompts += [encode(tok, p) for p in load_prompts(path, limit)]
    t0 = time.perf_counter()
    references = [plain.generate(ids, args.max_new_tokens).tokens for ids in prompts]
    print(f"target greedy references: {time.perf_counter() - t0:.0f} s", flush=True)

    sequential = DraftModelDrafter(runner)
    seq_cache: list[dict[int, list[int]]] = [{} for _ in prompts]

    def sequential_for(i: int):
        def at(pos: int, want: int) -> list[int]:
            if pos not in seq_cache[i]:
                context = prompts[i] + references[i][:pos]
                s = sequential.start(context[:-1], SamplingParams(), None)     # exact KV of the context
                s.update(context[-1:], 0)
                seq_cache[i][pos] = s.propose(args.k).tokens
                s.close()
            return seq_cache[i][pos][:want]
        return at

    configs = {"sequential": sequential}
    for degree in args.degrees:
        for cal in Calibration:
            configs[f"attn_only d={degree} {cal.value}"] = EasySpecDrafter(runner, degree, "attn_only", cal)
        configs[f"direct_mlp d={degree} every_mismatch"] = EasySpecDrafter(runner, degree, "direct_mlp",
                                                                          Calibration.EVERY_MISMATCH)
    rows = {}
    for name, drafter in configs.items():
        t0 = time.perf_counter()
        total: dict[str, int] = {}
        for i, (ids, ref) in enumerate(zip(prompts, references)):
            for key, v in replay(drafter, ids, ref, args.k, sequential_for(i)).items():
                total[key] = total.get(key, 0) + v
        rows[name] = {**total, "agreement_at_1": total["agree1"] / total["rounds"],
                      "agreement": total["agree_num"] / max(1, total["agree_den"]),
                      "acceptance": total["accepted"] / max(1, total["drafted"]),
                      "mean_accepted_tokens": (total["accepted"] + total["rounds"]) / total["rounds"]}
        base = rows["sequential"]["acceptance"]
        rows[name]["acceptance_drop"] = (base - rows[name]["acceptance"]) / base
        r = rows[name]
        print(f"| {name} | {r['agreement_at_1']:.3f} | {r['agreement']:.3f} | {r['acceptance']:.3f} | "
              f"{r['mean_accepted_tokens']:.2f} | {r['acceptance_drop']:+.1%} | {r['rounds']} | "
              f"{time.perf_counter() - t0:.0f} s |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": sys.argv, "k": args.k, "dtype": args.dtype,
                                         "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                                         "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
