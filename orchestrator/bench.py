"""Benchmark: every configured strategy, plain decoding, and Hugging Face peers, same prompts, same run.

Spec-Bench definitions: speedup = mean tokens/s of a method / mean tokens/s of
plain decoding over the same prompts; mean accepted tokens counts the target's
own token per step (plain = 1.00). Methods are interleaved prompt by prompt so
that drifting machine load affects every row alike. Greedy outputs are compared
with our plain decoding and mismatches are reported (bf16 multi-token forwards
can flip near-ties), never hidden.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from core.sampling import SamplingParams
from orchestrator.build import Built
from workers.loading import load_for_decoding


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    chat: bool        # Spec-Bench turns go through the chat template; HumanEval is a raw completion


def load_prompts(path: str | Path, limit: int | None, skip: int = 0) -> list[Prompt]:
    """Read HumanEval or Spec-Bench jsonl; `limit` prompts spread round-robin over categories, after the
    first `skip` of that order (the prompts `limit=skip` picks: e.g. a table built from other prompts
    than the ones benched)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[Prompt]] = defaultdict(list)
    for r in rows:
        if "task_id" in r:
            by_cat["humaneval"].append(Prompt(r["task_id"], "humaneval", r["prompt"], chat=False))
        elif "turns" in r:
            # First turn only: later MT-bench turns would need our own previous answer.
            by_cat[r["category"]].append(Prompt(f"spec_bench/{r['question_id']}", r["category"], r["turns"][0], True))
        else:
            raise ValueError(f"{path}: row has neither task_id nor turns: {sorted(r)}")
    queues = [list(v) for v in by_cat.values()]
    picked: list[Prompt] = []
    wanted = None if limit is None else skip + limit
    while any(queues) and (wanted is None or len(picked) < wanted):
        for q in queues:
            if q and (wanted is None or len(picked) < wanted):
                picked.append(q.pop(0))
    return picked[skip:]


def encode(tokenizer, prompt: Prompt) -> list[int]:
    if prompt.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt.text).input_ids


def _hf_runner(built: Built, kind: str, max_new: int):
    model, tok = built.target_model, built.tokenizer
    kwargs = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    if kind == "assisted":
        name = built.config.bench.hf_assistant or next(iter(built.config.models.drafters), None)
        if name is None:
            return None
        if name not in built.drafter_models:
            spec = built.config.models.drafters[name]
            built.drafter_models[name] = load_for_decoding(spec.source, spec.dtype, built.device)[0]
        kwargs["assistant_model"] = built.drafter_models[name]
    elif kind == "prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = built.config.bench.hf_prompt_lookup_tokens
    elif kind == "universal_assisted":     # a drafter with its own tokenizer: HF re-tokenises the text
        spec = built.config.models.drafters[built.config.bench.hf_universal_assistant]
        assistant, assistant_tokenizer = load_for_decoding(spec.source, spec.dtype, built.device)
        kwargs.update(assistant_model=assistant, tokenizer=tok, assistant_tokenizer=assistant_tokenizer)

    def run(ids: list[int]):
        x = torch.tensor([ids], device=built.device)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        seconds = time.perf_counter() - t0
        return out[0, len(ids):].tolist(), seconds, None
    return run


def _methods(built: Built, max_new_tokens: int) -> dict:
    """name -> run(ids) for our engines and the configured HF peers."""
    methods = {name: (lambda e: lambda ids: _engine_run(e, ids, max_new_tokens))(engine)
               for name, engine in built.engines.items()}
    for kind in built.config.bench.hf_peers:
        run = _hf_runner(built, kind, max_new_tokens)
        if run is not None:
            methods[f"hf-{kind}"] = run
    return methods


NEAR_TIE_LOGITS = 0.5     # two tokens whose target logits are closer than this count as a bf16 near-tie


def logit_gap(target, prompt_ids: list[int], a: int, b: int) -> float:
    """The target's logit of token a minus that of token b after `prompt_ids` (one forward, no drafter)."""
    cache = target.new_cache(1, capacity=len(prompt_ids) + 8)
    try:
        logits = target.prefill(cache, 0, prompt_ids)
    finally:
        if hasattr(cache, "release"):
            cache.release()
    return float(logits[a].float() - logits[b].float())


def run_bench(built: Built, prompts: list[Prompt], max_new_tokens: int, log=print,
              warmup: list[Prompt] = (), warmup_strategies: list[str] | None = None) -> dict:
    """warmup: prompts (other than the measured ones) that warmup_strategies (None = all of ours) decode
    first, unmeasured: what a drafter keeps across requests (Token Recycling's matrix, Hierarchy
    Drafting's recent generations) is then what a server that has been serving would have."""
    methods = _methods(built, max_new_tokens)
    encoded = [(p, encode(built.tokenizer, p)) for p in prompts]
    # Warm-up: first calls pay one-off costs (allocator, kernels) that are not the method's.
    for run in _methods(built, 8).values():
        run(encoded[0][1][:32])
    for name in (warmup_strategies if warmup_strategies is not None else list(built.engines)) if warmup else ():
        if name not in built.engines:
            raise ValueError(f"--warmup-strategies: {name!r} is not a strategy of this run ({', '.join(built.engines)})")
        t0 = time.perf_counter()
        for p in warmup:
            _engine_run(built.engines[name], encode(built.tokenizer, p), max_new_tokens)
        log(f"warm-up: {name} over {len(warmup)} prompts in {time.perf_counter() - t0:.1f} s")

    records: dict[str, list[dict]] = defaultdict(list)
    for i, (p, ids) in enumerate(encoded):
        reference = None
        for name, run in methods.items():
            tokens, seconds, stats = run(ids)
            if name == "plain":
                reference = tokens
            rec = {"id": p.id, "category": p.category, "prompt_tokens": len(ids), "new_tokens": len(tokens),
                   "seconds": seconds, "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
                   "equals_plain": tokens == reference,
                   "first_divergence": _first_divergence(tokens, reference)}
            p_div = rec["first_divergence"]
            if p_div is not None and p_div < min(len(tokens), len(reference)):
                # bf16 outputs may part at a near-tie (ALGORITHMS.md): the target's own logits there say which.
                rec["divergence_logit_gap"] = logit_gap(built.target, ids + reference[:p_div], reference[p_div],
                                                        tokens[p_div])
            if stats is not None:
                rec.update(steps=stats.steps, step_tokens=stats.step_tokens, drafted=stats.drafted_tokens,
                           accepted=stats.accepted_tokens, draft_s=stats.draft_s, verify_s=stats.verify_s,
                           ttft_s=stats.ttft_s, mean_accepted_tokens=stats.mean_accepted_tokens,
                           draft_cost=stats.draft_cost, draft_forwards=stats.draft_forwards,
                           cost_speedup=stats.cost_speedup,
                           # steps whose draft was not empty (a lookup miss drafts nothing)
                           draft_steps=stats.drafted_per_position[0] if stats.drafted_per_position else 0,
                           # each step's (drafted, accepted): the capacity simulator replays them
                           draft_lengths=stats.draft_lengths, accepted_lengths=stats.accepted_lengths)
                if stats.drafter_busy_s:    # pipelined drafting (orchestrator/duo.py)
                    rec.update(drafter_idle_fraction=stats.drafter_idle_fraction,
                               target_idle_fraction=stats.target_idle_fraction, draft_budgets=stats.draft_budgets,
                               speculative_drafts=stats.speculative_drafts, speculative_used=stats.speculative_used)
            records[name].append(rec)
        log(f"[{i + 1}/{len(encoded)}] {p.id} ({p.category}): " + ", ".join(
            f"{n} {records[n][-1]['tokens_per_s']:.2f}" for n in methods) + " tok/s")
    return summarise(records)


def _engine_run(engine, ids, max_new):
    res = engine.generate(ids, max_new, SamplingParams())
    return res.tokens, res.stats.total_s, res.stats


def _first_divergence(a, b):
    if b is None or a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def summarise(records: dict[str, list[dict]]) -> dict:
    cats = sorted({r["category"] for recs in records.values() for r in recs})
    table = []
    for scope in cats + ["overall"]:
        sel = {m: [r for r in recs if scope == "overall" or r["category"] == scope] for m, recs in records.items()}
        mean_tps = {m: statistics.fmean(r["tokens_per_s"] for r in rs) for m, rs in sel.items() if rs}
        for m, rs in sel.items():
            if not rs:
                continue
            steps = sum(r.get("steps", 0) for r in rs)
            table.append({
                "scope": scope, "method": m, "prompts": len(rs),
                "tokens_per_s": mean_tps[m],
                "speedup_vs_plain": mean_tps[m] / mean_tps["plain"] if "plain" in mean_tps else None,
                "speedup_vs_hf_plain": mean_tps[m] / mean_tps["hf-plain"] if "hf-plain" in mean_tps else None,
                "mean_accepted_tokens": (sum(r["step_tokens"] for r in rs) / steps) if steps else None,
                "acceptance_rate": (sum(r["accepted"] for r in rs) / max(1, sum(r["drafted"] for r in rs)))
                if steps else None,
                # tokens drafted per verification step, the steps with an empty draft included
                "mean_draft_length": (sum(r["drafted"] for r in rs) / steps) if steps else None,
                "outputs_equal_plain": sum(r["equals_plain"] for r in rs),
                "bf16_near_ties": sum(abs(r.get("divergence_logit_gap", 1e9)) <= NEAR_TIE_LOGITS for r in rs),
                "cost_speedup": _cost_speedup(rs),
                "mean_ttft_s": _mean(rs, "ttft_s"),
                "drafter_idle_fraction": _mean(rs, "drafter_idle_fraction"),
                "target_idle_fraction": _mean(rs, "target_idle_fraction"),
                "mean_draft_budget": _mean([{"b": b} for r in rs for b in r.get("draft_budgets", [])], "b"),
            })
    return {"records": records, "table": table}


def _mean(rs: list[dict], key: str) -> float | None:
    """Mean of a field over the records that have it (None when none do)."""
    values = [r[key] for r in rs if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _cost_speedup(rs: list[dict]) -> float | None:
    """CS-Drafting's cost model (core/cost.py) over a set of requests: plain decoding's target
    forwards for the same tokens / (target forwards + parameter-weighted drafter forwards); plain = 1."""
    if not rs or any(r.get("draft_cost") is None for r in rs):
        return None
    cost = sum(r["steps"] + r["draft_cost"] for r in rs)
    return sum(r["step_tokens"] for r in rs) / cost if cost else None


def markdown(table: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| scope | method | prompts | tokens/s | vs plain | vs HF plain | mean accepted | mean draft length "
             "| acceptance | = plain "
             "| cost speedup | TTFT s | drafter idle | target idle | mean budget |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['scope']} | {r['method']} | {r['prompts']} | {r['tokens_per_s']:.2f} | "
                     f"{fmt(r['speedup_vs_plain'], '.2f')}x | {fmt(r['speedup_vs_hf_plain'], '.2f')}x | "
                     f"{fmt(r['mean_accepted_tokens'], '.2f')} | {fmt(r.get('mean_draft_length'), '.2f')} | "
                     f"{fmt(r['acceptance_rate'], '.2f')} | "
                     f"{r['outputs_equal_plain']}/{r['prompts']}"
                     + (f" + {r['bf16_near_ties']} near-tie" if r.get("bf16_near_ties") else "")
                     + f" | {fmt(r.get('cost_speedup'), '.2f')} | "
                     f"{fmt(r.get('mean_ttft_s'), '.3f')} | {fmt(r.get('drafter_idle_fraction'), '.2f')} | "
                     f"{fmt(r.get('target_idle_fraction'), '.2f')} | {fmt(r.get('mean_draft_budget'), '.1f')} |")
    return "\n".join(lines)


def environment() -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
