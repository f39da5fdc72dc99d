"""Draft-step time of EasySpec with the layer group on 2 workers vs 1 (ALGORITHMS.md section 1).

    .venv/bin/python scripts/easyspec_workers_bench.py --rounds 30 --out bench_out/easyspec_workers.json

Times `propose(k)` of the 0.5B drafter on one HumanEval prompt, every round fully accepted
(so no calibration pass; each propose is k layer-parallel forwards), in three setups:
  sequential   plain draft-model drafting, in process, for each of --threads
  emulation    EasySpec in process (group members one after another), for each of --threads
  2 workers    EasySpec over 2 Ray actors x 1 thread, group outputs all-gathered with gloo
for both group modes (attn_only parallelises only the members' attention, direct_mlp whole layers).
With --e2e-prompts N, also tokens/s end to end on the 1.5B target: plain, sequential SD, the emulation
and the workers, through SpeculativeEngine, interleaved prompt by prompt.
Median ms per propose over --rounds rounds after --warmup. The drafts of the emulation and of
the 2 workers are checked to be identical (greedy). Also timed: one gloo all_gather and one
broadcast of a hidden state [1, 1, hidden] between two bare actors (what a fused group, or a
single-layer group computed on rank 0 and broadcast, would add per layer group).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.sampling import SamplingParams  # noqa: E402
from orchestrator.bench import encode, load_prompts  # noqa: E402
from workers.drafters import DraftModelDrafter  # noqa: E402
from workers.easyspec import EasySpecDrafter  # noqa: E402
from workers.loading import load_for_decoding  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402


MODES = ("attn_only", "direct_mlp")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_proposes(drafter, prompt: list[int], k: int, rounds: int, warmup: int) -> tuple[float, list[list[int]]]:
    session = drafter.start(prompt, SamplingParams(), None)
    session.update([prompt[-1]], 0)
    times, drafts = [], []
    for i in range(warmup + rounds):
        t0 = time.perf_counter()
        draft = session.propose(k)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        drafts.append(draft.tokens)
        session.update(draft.tokens + [draft.tokens[-1]], len(draft))   # all accepted, plus a bonus token
    session.close()
    return statistics.median(times) * 1e3, drafts


def end_to_end(args, ranks, prompts_text) -> dict:
    """tokens/s through SpeculativeEngine (greedy, fixed k) on the 1.5B target in this process: plain,
    sequential SD, the EasySpec emulation and EasySpec on the ranks, interleaved prompt by prompt."""
    from core.draft_length import FixedDraftLength
    from orchestrator.engine import SpeculativeEngine
    from workers.easyspec_workers import DistributedEasySpecDrafter
    from workers.loading import eos_ids

    torch.set_num_threads(args.threads[0])
    target_model, tok = load_for_decoding(args.target, args.dtype, torch.device("cpu"))
    draft_model, _ = load_for_decoding(args.model, args.dtype, torch.device("cpu"), with_tokenizer=False)
    target, runner = ModelRunner(target_model), ModelRunner(draft_model)
    eos = eos_ids(target_model, tok)
    policy = lambda: FixedDraftLength(args.k)  # noqa: E731
    engines = {
        "plain": SpeculativeEngine(target, eos_token_ids=eos),
        "sequential SD": SpeculativeEngine(target, DraftModelDrafter(runner), policy, eos),
        "EasySpec emulation (attn_only)": SpeculativeEngine(
            target, EasySpecDrafter(runner, degree=args.degree), policy, eos),
        f"EasySpec {args.degree} workers (attn_only)": SpeculativeEngine(
            target, DistributedEasySpecDrafter(ranks, "attn_only"), policy, eos),
    }
    prompts = [encode(tok, p) for p in prompts_text]
    totals = {name: [0, 0.0, 0, 0] for name in engines}       # tokens, seconds, steps, equal to plain
    for ids in prompts:
        reference = None
        for name, engine in engines.items():
            res = engine.generate(ids, args.e2e_tokens)
            reference = res.tokens if reference is None else reference
            t = totals[name]
            t[0] += len(res.tokens)
            t[1] += res.stats.total_s
            t[2] += res.stats.steps
            t[3] += res.tokens == reference
    plain_tps = totals["plain"][0] / totals["plain"][1]
    sd_tps = totals["sequential SD"][0] / totals["sequential SD"][1]
    out = {}
    for name, (tokens, seconds, steps, same) in totals.items():
        tps = tokens / seconds
        out[name] = {"tokens_per_s": tps, "vs_plain": tps / plain_tps, "vs_sequential_sd": tps / sd_tps,
                     "mean_accepted_tokens": (tokens - len(prompts)) / max(1, steps), "equal_to_plain": same}
    return out


class CollectivePeer:
    def join(self, init_method: str, rank: int) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)

    def collectives_ms(self, hidden: int, dtype: str, reps: int) -> dict:
        import torch.distributed as dist

        x = torch.ones(1, 1, hidden, dtype=getattr(torch, dtype))
        out = {}
        for name, op in [("all_gather", lambda: dist.all_gather([torch.empty_like(x) for _ in range(2)], x)),
                         ("broadcast", lambda: dist.broadcast(x, src=0))]:
            op()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
            out[name] = (time.perf_counter() - t0) / reps * 1e3
        dist.destroy_process_group()
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/humaneval_dev.jsonl"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--degree", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="threads of the in-process setups")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--e2e-prompts", type=int, default=0, help="also run end to end on this many prompts")
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_for_decoding(args.model, args.dtype, torch.device("cpu"))
    prompt = encode(tok, load_prompts(args.data, 1)[0])
    runner = ModelRunner(model)
    rows, emulated = {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows[f"sequential, {threads} thread(s)"], _ = time_proposes(DraftModelDrafter(runner), prompt, args.k,
                                                                    args.rounds, args.warmup)
        for mode in MODES:
            emulation = EasySpecDrafter(runner, degree=args.degree, mode=mode)
            rows[f"emulation {mode}, {threads} thread(s)"], emulated[mode] = time_proposes(
                emulation, prompt, args.k, args.rounds, args.warmup)
    groups, hidden = emulation.groups, model.config.hidden_size
    del runner, model, emulation

    import ray

    from workers.easyspec_workers import DistributedEasySpecDrafter, start_ranks, stop_ranks

    ray.init(num_cpus=args.degree, include_dashboard=False, log_to_driver=False)
    strategies = [{"name": mode, "kind": "easyspec", "drafter": "d", "degree": args.degree, "mode": mode,
                   "workers": args.degree} for mode in MODES]
    ranks = start_ranks({"source": args.model, "dtype": args.dtype}, strategies, args.degree, "cpu", threads=1)
    same = {}
    try:
        for mode in MODES:
            rows[f"{args.degree} workers x 1 thread {mode}"], drafts = time_proposes(
                DistributedEasySpecDrafter(ranks, mode), prompt, args.k, args.rounds, args.warmup)
            same[mode] = drafts == emulated[mode]
        e2e = end_to_end(args, ranks, load_prompts(args.data, args.e2e_prompts)) if args.e2e_prompts else {}
        stop_ranks(ranks)
        peers = [ray.remote(num_cpus=1)(CollectivePeer).remote() for _ in range(2)]
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ray.get([p.join.remote(init_method, r) for r, p in enumerate(peers)])
        collectives = ray.get([p.collectives_ms.remote(hidden, args.dtype, 200) for p in peers])[0]
    finally:
        ray.shutdown()
    print(f"{args.model} {args.dtype}, k={args.k}, prompt {len(prompt)} tokens, groups {groups}")
    base_name = f"sequential, {args.threads[0]} thread(s)"
    print(f"| setup | ms per propose(k={args.k}) | vs {base_name} |\n|---|---:|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} | {rows[base_name] / ms:.2f}x |")
    print(f"greedy drafts of the workers equal the emulation's: {same}")
    print("gloo between 2 actors, one hidden state [1, 1, %d] %s: " % (hidden, args.dtype)
          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in collectives.items()))
    if e2e:
        print(f"\nend to end: {args.e2e_prompts} prompts x {args.e2e_tokens} tokens, greedy, k={args.k}, "
              f"target {args.target} on {args.threads[0]} thread(s)")
        print("| setup | tokens/s | vs plain | vs sequential SD | mean accepted | = plain |\n|---|---:|---:|---:|---:|---:|")
        for name, r in e2e.items():
            print(f"| {name} | {r['tokens_per_s']:.2f} | {r['vs_plain']:.2f}x | {r['vs_sequential_sd']:.2f}x | "
                  f"{r['mean_accepted_tokens']:.2f} | {r['equal_to_plain']}/{args.e2e_prompts} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "ms_per_propose": rows, "groups": groups,
                                              "drafts_equal": same, "gloo_ms": collectives, "end_to_end": e2e},
                                             indent=1))


if __name__ == "__main__":
    main()
