"""`launch.py profile`: measure this machine for the capacity simulator.

Memory bandwidth (a large tensor copy), matmul rate (float32, bfloat16), and per-model step
times: the target's forward of T = 1..16 new tokens for one request, prefills, and B requests
of one token batched through `forward_many` (the global verifier's call), B requests of T tokens
each batched the same way (verifying concurrent requests' drafts); each drafter's
one-token step, and each configured drafting strategy's cost per drafted token through its
real `DraftSession` (propose, then accept everything), which includes the sampling and
Python work a bare forward leaves out. The fastest of a few repetitions (other processes on a
shared machine only add time); the JSON records the load average before and after.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

VERIFY_TOKENS = (1, 2, 4, 6, 8, 12, 16)
PREFILL_TOKENS = (32, 128)
BATCHES = (1, 2, 4, 8, 16, 32)
# B requests of T tokens each in one forward_many: what batched verification of drafts (T <= 12) and
# batched prefills (T = 128) cost. Neither curve above predicts it (measured here: 4 rows x 8 tokens
# cost more than 32 tokens of one request or 4 one-token rows).
GRID = ((2, 4), (2, 8), (2, 12), (2, 128), (4, 4), (4, 8), (4, 12), (4, 128))


def _best_time(fn, reps: int) -> float:
    """Fastest of reps: other processes on a shared machine only ever add time."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def memory_bandwidth_gbs(mb: int = 512, reps: int = 5) -> float:
    """Bytes read + written per second copying a `mb` MB tensor (best of reps)."""
    src = torch.ones(mb * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_best_time(lambda: dst.copy_(src), 1) for _ in range(reps))
    return 2 * src.numel() / best / 1e9


def matmul_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    return 2 * n**3 / _best_time(lambda: a @ b, reps) / 1e12


def _paired(fn, base, reps: int) -> tuple[float, float]:
    """Fastest of reps for fn and for a baseline, alternated, so both see the same load."""
    a, b = [], []
    for _ in range(reps):
        a.append(_best_time(fn, 1))
        b.append(_best_time(base, 1))
    return min(a), min(b)


def target_steps(runner, vocab: int, reps: int = 5, log=print) -> dict:
    """Forward times; each point is measured alternately with the one-token forward and scaled by
    (best one-token time overall / best one-token time beside it): a shared machine's load drifts,
    and the ratio to a neighbouring baseline drifts less than either time."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 64), generator=g)
    cache = runner.new_cache(1, 512)
    runner.prefill(cache, 0, prompt[0].tolist())

    def forward(t: int):
        ids = torch.randint(0, vocab, (1, t), generator=g)

        def fwd():
            runner.forward(cache, ids)
            cache.crop(0, 64)
        return fwd
    one = forward(1)
    one()
    raw = {}
    for t in VERIFY_TOKENS[1:]:
        raw[t] = _paired(forward(t), one, reps)
    for p in PREFILL_TOKENS:
        ids = torch.randint(0, vocab, (p,), generator=g).tolist()
        c = runner.new_cache(1, p + 8)
        raw[p] = _paired(lambda: runner.prefill(c, 0, ids), one, 3)
    batch_raw = {}
    for b in BATCHES[1:]:
        caches = []
        for _ in range(b):
            c = runner.new_cache(1, 128)
            runner.prefill(c, 0, torch.randint(0, vocab, (32,), generator=g).tolist())
            caches.append(c)
        ids = torch.randint(0, vocab, (1, 1), generator=g)

        def many():
            runner.forward_many([(c, ids, None, None, None) for c in caches])
            for c in caches:
                c.crop(0, 32)
        many()
        batch_raw[b] = _paired(many, one, reps)
    grid_raw = {}
    for b, t in GRID:
        caches = []
        for _ in range(b):
            c = runner.new_cache(1, 32 + t + 8)
            runner.prefill(c, 0, torch.randint(0, vocab, (32,), generator=g).tolist())
            caches.append(c)
        ids = torch.randint(0, vocab, (1, t), generator=g)

        def many_tokens():
            runner.forward_many([(c, ids, None, None, None) for c in caches])
            for c in caches:
                c.crop(0, 32)
        many_tokens()
        grid_raw[f"{b}x{t}"] = _paired(many_tokens, one, reps)
    t1 = min(base for _, base in list(raw.values()) + list(batch_raw.values()) + list(grid_raw.values()))
    tokens = {1: t1, **{t: x * t1 / base for t, (x, base) in raw.items()}}
    batch = {1: t1, **{b: x * t1 / base for b, (x, base) in batch_raw.items()}}
    grid = {k: x * t1 / base for k, (x, base) in grid_raw.items()}
    for t, v in tokens.items():
        log(f"  target forward of {t} tokens: {v * 1e3:.1f} ms (raw {raw.get(t, (t1,))[0] * 1e3:.1f})")
    for b, v in batch.items():
        log(f"  target forward_many of {b} one-token requests: {v * 1e3:.1f} ms (raw {batch_raw.get(b, (t1,))[0] * 1e3:.1f})")
    for k, v in grid.items():
        log(f"  target forward_many of {k.replace('x', ' requests x ')} tokens: {v * 1e3:.1f} ms "
            f"(raw {grid_raw[k][0] * 1e3:.1f})")
    return {"tokens": tokens, "batch": batch, "batch_tokens": grid,
            "raw_pairs": {"tokens": {t: list(v) for t, v in raw.items()}, "batch": {b: list(v) for b, v in batch_raw.items()},
                          "batch_tokens": {k: list(v) for k, v in grid_raw.items()}}}


def draft_token_s(drafter, vocab: int, k: int = 8, rounds: int = 5) -> float:
    """Seconds per drafted token through the strategy's own session (fastest round); every draft
    accepted, + a bonus token."""
    from core.sampling import SamplingParams

    g = torch.Generator().manual_seed(1)
    session = drafter.start(torch.randint(0, vocab, (64,), generator=g).tolist(), SamplingParams(), None)
    bonus = lambda: int(torch.randint(0, vocab, (1,), generator=g))  # noqa: E731
    session.update([bonus()], 0)                    # the target's first token, as the engine does
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        draft = session.propose(k)
        dt = time.perf_counter() - t0
        tokens = [int(x) for x in draft.tokens]
        best = min(best, dt / max(1, len(tokens)))
        session.update(tokens + [bonus()], len(tokens))
    session.close()
    return best


def served_overhead_s(cfg, in_process_batch: dict, rows=(1, 4, 16, 32), reps: int = 3, log=print) -> dict:
    """Seconds a served step adds to the target's batched forward, per batch size: the same one-token
    forward_many through the served path (the target in its Ray actor, orchestrator/ray_runtime.py
    PipelineTarget: the call, the actor's bookkeeping, the logits back in the model dtype) minus the
    in-process time measured above. The simulator adds it to every verification of a served run."""
    import ray

    from orchestrator.ray_runtime import place, start_ray
    from placement.plan import plan_placement

    started = not ray.is_initialized()
    start_ray(cfg)
    built, runtime = place(cfg, plan_placement(cfg), only=[], name="profile")
    out = {}
    try:
        target, vocab = built.target, built.target.vocab_size
        g = torch.Generator().manual_seed(3)
        caches = []
        for _ in range(max(rows)):
            c = target.new_cache(1, 128)
            target.prefill(c, 0, torch.randint(0, vocab, (64,), generator=g).tolist())
            caches.append(c)
        ids = torch.randint(0, vocab, (1, 1), generator=g)
        for b in rows:
            def step(b=b):
                target.forward_many([(c, ids, None, None, None) for c in caches[:b]])
                for c in caches[:b]:
                    c.crop(0, 64)            # the shards roll back with the next call's edits
            step()
            served = _best_time(step, reps)
            base = in_process_batch.get(b)
            out[b] = max(0.0, served - base) if base is not None else served
            log(f"  served forward_many of {b} one-token requests: {served * 1e3:.1f} ms "
                f"(+{out[b] * 1e3:.1f} ms over in-process)")
        for c in caches:
            c.release()
    finally:
        runtime.shutdown()
        if started:
            ray.shutdown()
    return out


def profile_machine(cfg, log=print) -> dict:
    from workers.loading import load_for_decoding, pick_device
    from workers.runner import ModelRunner

    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = pick_device(cfg.runtime.device)
    out = {"config": cfg.name, "machine": platform.machine(), "processor": platform.processor(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
           "loadavg_before": os.getloadavg(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["memory_bw_gbs"] = memory_bandwidth_gbs()
    out["matmul_tflops"] = {"float32": matmul_tflops(torch.float32), "bfloat16": matmul_tflops(torch.bfloat16)}
    log(f"memory bandwidth {out['memory_bw_gbs']:.1f} GB/s; matmul {out['matmul_tflops']}")
    t = cfg.models.target
    t0 = time.perf_counter()
    model, _ = load_for_decoding(t.source, t.dtype, device, with_tokenizer=False)
    log(f"target {t.source} loaded in {time.perf_counter() - t0:.1f} s")
    vocab = model.config.vocab_size
    out["target"] = {"source": t.source, "dtype": t.dtype, **target_steps(ModelRunner(model, device), vocab, log=log)}
    del model
    out["drafters"], out["draft_token_s"] = {}, {}
    for key, spec in cfg.models.drafters.items():
        # Strategies that draft token by token with this one model (the simulator's per-token draft cost).
        users = [s for s in cfg.strategies if s.drafter_models() == [key]
                 and s.capacity_family() in ("draft_model", "hybrid", "easyspec")]
        if not users:
            continue
        dmodel, _ = load_for_decoding(spec.source, spec.dtype, device, spec.quantize, with_tokenizer=False)
        runner = ModelRunner(dmodel, device)
        cache = runner.new_cache(1, 256)
        runner.prefill(cache, 0, list(range(64)))
        ids = torch.zeros(1, 1, dtype=torch.long)

        def step():
            runner.forward(cache, ids)
            cache.crop(0, 64)
        step()
        out["drafters"][key] = {"source": spec.source, "quantize": spec.quantize, "step_s": _best_time(step, 5)}
        log(f"drafter {key}: forward T=1 {out['drafters'][key]['step_s'] * 1e3:.1f} ms")
        for s in users:
            out["draft_token_s"][s.name] = draft_token_s(s.make_drafter(runner), vocab)
            log(f"  strategy {s.name}: {out['draft_token_s'][s.name] * 1e3:.1f} ms per drafted token")
        del dmodel, runner
    # Last: the served path loads the target again, in its actor (the models above are freed).
    out["served_overhead_s"] = served_overhead_s(cfg, {int(k): v for k, v in out["target"]["batch"].items()}, log=log)
    out["loadavg_after"] = os.getloadavg()
    return out


def default_profile_path(cfg) -> Path:
    return Path.home() / ".cache" / "specorch" / f"profile-{cfg.name}.json"


from orchestrator.goodput import STEP_COST_SHAPES  # noqa: E402  (requests, tokens each) of a decode step


def profile_step_cost(target, vocab: int, shapes=STEP_COST_SHAPES, context: int = 32,
                      reps: int = 2) -> "StepCostModel":
    """The goodput scheduler's start-up profile (orchestrator/goodput.py): best-of-`reps` seconds of
    batched forwards of decode-step shapes on this deployment's target (a ModelRunner or a
    PipelineTarget), fitted as a + b * tokens + c * requests + d * [tokens > 1] plus the residuals'
    shape in tokens (StepCostModel.fitted). The scheduler corrects the line online."""
    from orchestrator.goodput import StepCostModel

    g = torch.Generator().manual_seed(2)
    samples = []
    caches = []
    try:
        for _ in range(max(b for b, _ in shapes)):
            c = target.new_cache(1, context + 16)
            target.prefill(c, 0, torch.randint(0, vocab, (context,), generator=g).tolist())
            caches.append(c)
        for b, t in shapes:
            ids = torch.randint(0, vocab, (1, t), generator=g)

            def step():
                target.forward_many([(c, ids, None, None, None) for c in caches[:b]])
                for c in caches[:b]:
                    c.crop(0, context)
            step()                                     # warm-up (kernel choice, allocation)
            samples.append((b, b * t, _best_time(step, reps)))
    finally:
        for c in caches:
            release = getattr(c, "release", None)      # KV held by remote shards
            if release:
                release()
    return StepCostModel.fitted(samples)
