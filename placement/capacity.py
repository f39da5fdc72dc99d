"""Capacity scenarios: (strategy, placement) -> simulated replica, swept over a workload; a plan.

Two sources of step times:
  - a measured profile of this machine (`launch.py profile`): MeasuredStep interpolates the
    target's forward times; drafts cost the profiled seconds per drafted token;
  - the roofline (placement/roofline.py) from the hardware table and model sizes, for
    clusters that are not this machine (8xA100.yaml).
Acceptance: a bench JSON's per-strategy mean accepted tokens and draft lengths (inverted to
alpha through Leviathan's formula), else the workload's `acceptance`, else --alpha.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import DraftModelStrategy, EasySpecStrategy, EngineConfig, PromptLookupStrategy
from placement.hardware import KNOWN_DEVICES
from placement.roofline import (Hardware, ModelShape, Row, draft_message_bytes, model_shape, step_time,
                                transfer_time)
from placement.simulate import Arrivals, Replica, Result, simulate, simulate_repeated
from placement.speculative_model import StrategyModel, alpha_for_mean_accepted
from placement.workload import ClosedLoopArrivals, Workload

RAY_HOP_S = 2.4e-3          # one small tensor between two Ray actors, measured (bench_out/transfer.json)
PCIE_BW = 25e9              # host <-> GPU, PCIe 4.0 x16 achievable (32 GB/s theoretical, PCI-SIG)


# ----------------------------------------------------------------------------- measured steps
class Curve:
    """Piecewise-linear y(x) through measured points; linear extrapolation past the ends' last two points."""

    def __init__(self, points: dict[int, float]):
        self.xs = sorted(points)
        self.ys = [points[x] for x in self.xs]

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1 or x <= xs[0]:
            return ys[0]
        i = next((i for i in range(1, len(xs)) if x <= xs[i]), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        return max(ys[0], ys[i - 1] + slope * (x - xs[i - 1]))


class MeasuredStep:
    """Target forward time from a profile: one request of T tokens, or B one-token requests batched."""

    def __init__(self, target: dict):
        self.tokens = Curve({int(k): v for k, v in target["tokens"].items()})
        self.batch = Curve({int(k): v for k, v in target["batch"].items()})

    def __call__(self, rows: list[Row]) -> float:
        b, t_max = len(rows), max(r.new for r in rows)
        if b == 1:
            return self.tokens(t_max)
        if t_max == 1:
            return self.batch(b)
        return max(self.tokens(b * t_max), self.batch(b))


# ----------------------------------------------------------------------------- acceptance
@dataclass(frozen=True)
class Measured:
    mean_accepted: float      # tokens per step (accepted + 1)
    mean_drafted: float       # draft length per step
    draft_s_per_step: float   # measured draft seconds per step (bench, batch 1)
    prompts: int

    @property
    def alpha(self) -> float:
        return alpha_for_mean_accepted(self.mean_accepted, self.mean_drafted) if self.mean_drafted else 0.0


def bench_acceptance(path: str | Path, categories: list[str] | None = None) -> dict[str, Measured]:
    """Per strategy, from `launch.py bench --out` records (optionally only some categories)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name, recs in data["records"].items():
        rs = [r for r in recs if "steps" in r and (not categories or r["category"] in categories)]
        steps = sum(r["steps"] for r in rs)
        if not steps or name == "plain":
            continue
        out[name] = Measured(sum(r["step_tokens"] for r in rs) / steps, sum(r["drafted"] for r in rs) / steps,
                             sum(r["draft_s"] for r in rs) / steps, len(rs))
    return out


def calibrate_profile(profile: dict, bench_path: str | Path, categories: list[str] | None,
                      measured: dict[str, "Measured"], how: str = "scale") -> dict:
    """A copy of `profile` whose absolute costs come from the batch-1 bench records: the target's
    curves scaled so one token costs plain decoding's verify seconds per step, and each strategy's
    draft cost per forward = its draft seconds per step / its mean draft length. The profile
    keeps only the *shape* of the target's cost against tokens and batch (for a profile taken on
    a loaded machine, or of a smaller model of the same family). how = "scale": every point
    times one factor (all costs grow with the model); "shift": every point plus one offset (the
    extra cost of more tokens or requests does not grow with the model: per-request attention
    and Python in forward_many)."""
    recs = [r for r in json.loads(Path(bench_path).read_text())["records"]["plain"]
            if not categories or r["category"] in categories]
    t1 = sum(r["verify_s"] for r in recs) / sum(r["steps"] for r in recs)
    base = profile["target"]["tokens"]["1"]
    scale = t1 / base
    adjust = (lambda v: v * scale) if how == "scale" else (lambda v: v - base + t1)
    out = dict(profile)
    out["target"] = {k: {n: adjust(v) for n, v in profile["target"][k].items()} for k in ("tokens", "batch")}
    out["draft_token_s"] = {name: m.draft_s_per_step / max(1, round(m.mean_drafted)) for name, m in measured.items()}
    out["calibration"] = {"bench": str(bench_path), "target_step_s": t1, "how": how, "scale": scale,
                          "shift_s": t1 - base}
    return out


def _family(s) -> str | None:
    """The step model's family of a configured strategy (None: a kind the simulator does not model)."""
    if isinstance(s, EasySpecStrategy):
        return "easyspec"
    if isinstance(s, PromptLookupStrategy):
        return "prompt_lookup"
    if isinstance(s, DraftModelStrategy):
        return "hybrid" if s.lookup_first is not None else "draft_model"
    return {"cascade": "cs_drafting", "duodecoding": "duodecoding"}.get(getattr(s, "kind", None))


def _drafter(s) -> str | None:
    return getattr(s, "drafter", None) or (getattr(s, "drafters", None) or [None])[0]


def _gamma(s) -> int:
    if getattr(s, "k_matrix", None):                 # a cascade: the target's row is the whole draft
        return sum(s.k_matrix[0])
    if getattr(s, "gamma_init", None):               # DuoDecoding's controller starts here
        return s.gamma_init
    dl = s.draft_length
    return dl.k if dl.policy == "fixed" else dl.k_init


def strategy_models(cfg: EngineConfig, workload: Workload, bench: dict[str, Measured],
                    alphas: dict[str, float], draft_token_s: dict[str, float] | None = None,
                    calibrated: bool = False) -> list[StrategyModel]:
    """The config's strategies (and plain) with gamma/alpha from the bench, else parameters."""
    out = [StrategyModel("plain", "plain", source="-")]
    for s in cfg.strategies:
        fam = _family(s)
        if fam is None:
            continue
        drafter = _drafter(s)
        gamma, source = _gamma(s), ""
        if s.name in bench:
            m = bench[s.name]
            gamma, alpha = max(1, round(m.mean_drafted)), m.alpha
            source = f"bench: {m.mean_accepted:.2f} tokens/step at {m.mean_drafted:.1f} drafted ({m.prompts} prompts)"
        else:
            alpha = next((table[k] for table in (alphas, workload.acceptance) for k in (s.name, drafter, fam)
                          if k is not None and k in table), None)
            if alpha is None:
                continue                      # nothing known about this strategy's acceptance: not simulated
            source = "parameter"
        model_share = 1.0
        if fam == "hybrid" and s.name in bench and draft_token_s and s.name in draft_token_s and not calibrated:
            # Fitted: the share of steps that drafted with the model, from the bench's draft seconds.
            model_share = min(1.0, bench[s.name].draft_s_per_step / (gamma * draft_token_s[s.name]))
            source += f"; model drafts {model_share:.0%} of steps (fit to the bench's draft time)"
        chunk = s.k_matrix[-1][-1] if getattr(s, "k_matrix", None) else 1.0   # MaG tokens per review
        out.append(StrategyModel(s.name, fam, gamma, alpha, drafter, model_share=model_share,
                                 review_chunk=chunk, source=source))
    return out


# ----------------------------------------------------------------------------- local (profile)
def local_replicas(cfg: EngineConfig, profile: dict, models: list[StrategyModel], host_s: float,
                   in_process: bool = False, bus_contention: float = 1.0, drafter_batch: int = 1) -> dict:
    """This machine as measured: one verifier (the global verifier), drafter actors drafting
    `drafter_batch` requests at a time (1: as when the serving runs of docs/distributed.md were
    measured; in_process: the drafter runs beside the engine, no Ray hop per draft)."""
    verify = MeasuredStep(profile["target"])
    grow = Curve({int(k): v for k, v in profile["target"]["batch"].items()})   # batched drafts grow like this
    out = {}
    for m in models:
        tok_s = profile.get("draft_token_s", {}).get(m.name)
        if m.draft_forwards() > 0 and tok_s is None:
            continue
        replicas = 1
        if m.drafter and cfg.placement and m.drafter in cfg.placement.drafters:
            replicas = cfg.placement.drafters[m.drafter].replicas
        out[(m.name, "local")] = Replica(
            m, verify, max_batch=cfg.server.max_verify_batch, batch_wait_s=0.005,
            draft_step=(lambda rows, s=tok_s: s * grow(len(rows)) / grow(1)) if tok_s else None,
            drafter_servers=replicas,
            drafter_max_batch=drafter_batch, transfer_s=RAY_HOP_S if m.draft_forwards() > 0 and not in_process else 0.0,
            host_s=host_s, shared_bus=True, bus_contention=bus_contention, devices=1)
    return out


# ----------------------------------------------------------------------------- cluster (roofline)
def cluster_replicas(cfg: EngineConfig, workload: Workload, alphas: dict[str, float], cpu_device: str,
                     overhead_s: float = 0.0) -> dict:
    """Strategy families x placements of one GPU node pool, from the roofline; key (strategy, placement)."""
    pool = next(p for p in cfg.node_pools if p.name == cfg.placement.target.pool)
    gpu = KNOWN_DEVICES[pool.accelerator]
    hw = Hardware.from_profile(gpu, step_overhead_s=overhead_s)
    target = model_shape(cfg.models.target)
    drafters = {k: model_shape(v) for k, v in cfg.models.drafters.items()}
    gpus = pool.accelerators_per_node
    usable = gpu.memory_gb * (1 - cfg.placement.memory_headroom) * 1e9
    probs = workload.temperature > 0

    def alpha(*keys) -> float | None:
        return next((t[k] for t in (alphas, workload.acceptance) for k in keys if k in t), None)

    def gpu_step(shape: ModelShape, tp: int):
        return lambda rows: step_time(shape, hw, rows, tp=tp)

    families = []
    for key, shape in drafters.items():
        a = alpha(f"draft_model:{key}", key, "draft_model")
        if a is None:
            continue
        families += [
            StrategyModel(f"sd-{key}", "draft_model", 4, a, key, source="parameter"),
            StrategyModel(f"easyspec-{key}", "easyspec", 4, a, key, easyspec_speedup=1.6,
                          easyspec_alpha_penalty=0.05, source="parameter; layer-parallel speedup 1.6, alpha -5%"),
            StrategyModel(f"cs-drafting-{key}", "cs_drafting", 6, alpha(f"cs_drafting:{key}", "cs_drafting") or a,
                          key, review_chunk=2.0, source="parameter; MaG reviewed 2 tokens per drafter forward"),
        ]
    a_pl = alpha("prompt_lookup")
    if a_pl is not None:
        families.append(StrategyModel("pld", "prompt_lookup", 8, a_pl, source="parameter"))

    out = {}
    for tp in (1, 2, 4, 8):
        if tp > gpus or target.weight_bytes / tp > usable:
            continue
        replicas = gpus // tp
        verify = gpu_step(target, tp)
        name = f"tp{tp}x{replicas}"
        out[("plain", name)] = Replica(StrategyModel("plain", "plain"), verify, max_batch=64, devices=tp)
        for m in families:
            # Drafter on the replica's own GPUs: its steps queue with verification, batched like it.
            out[(m.name, name)] = Replica(m, verify, max_batch=64, draft_step=gpu_step(drafters[m.drafter], 1)
                                          if m.drafter else None, drafter_shared=True, devices=tp)
        # DuoDecoding: the smallest drafter on CPU cores next to the GPUs, drafting while the target verifies.
        if cfg.placement.drafters:
            key = min(drafters, key=lambda k: drafters[k].weight_bytes)
            cpu_pl = cfg.placement.drafters.get(key)
            a = alpha(f"duodecoding:{key}", "duodecoding", key)
            if cpu_pl is not None and a is not None:
                cpu = KNOWN_DEVICES[cpu_device]
                share = cpu_pl.cpus / max(pool.cpus, 1)      # its cores' share of the socket's bandwidth
                chw = Hardware.from_profile(cpu, share=share, step_overhead_s=overhead_s)
                n_cpu = max(1, cpu_pl.replicas // replicas)
                m = StrategyModel(f"duodecoding-{key}", "duodecoding", 4, a, key,
                                  source=f"parameter; {n_cpu} drafter(s) of {cpu_pl.cpus} {cpu.name} cores per replica")
                out[(m.name, name + "+cpu")] = Replica(
                    m, verify, max_batch=64, draft_step=lambda rows, s=drafters[key], h=chw: step_time(s, h, rows),
                    drafter_servers=n_cpu, drafter_max_batch=8,
                    transfer_s=transfer_time(draft_message_bytes(4, target.vocab, probs), PCIE_BW, 20e-6),
                    devices=tp)
    # The config's own placement: target TP group(s) plus drafters on dedicated GPUs.
    t = cfg.placement.target
    for key, d in cfg.placement.drafters.items():
        if d.device != "gpu" or key not in drafters:
            continue
        a = alpha(f"draft_model:{key}", key, "draft_model")
        if a is None:
            continue
        held = t.tensor_parallel * t.pipeline_parallel + d.replicas
        m = StrategyModel(f"sd-{key}", "draft_model", 4, a, key, source="parameter")
        out[(m.name, f"config:tp{t.tensor_parallel}+{d.replicas}gpu-drafters")] = Replica(
            m, gpu_step(target, t.tensor_parallel), max_batch=64, draft_step=gpu_step(drafters[key], 1),
            drafter_servers=d.replicas, drafter_max_batch=64,
            transfer_s=transfer_time(draft_message_bytes(4, target.vocab, probs), hw.link_bw, hw.link_latency_s),
            devices=held)
    return out, gpus * pool.count          # replicas spread over every node of the pool; TP stays in a node


# ----------------------------------------------------------------------------- sweep + plan
@dataclass
class Point:
    strategy: str
    placement: str
    level: float               # request rate (req/s, whole pool) or concurrency
    result: Result
    replicas: int

    @property
    def throughput(self) -> float:
        return self.result.throughput * self.replicas

    def row(self) -> dict:
        r = self.result
        return {"strategy": self.strategy, "placement": self.placement, "level": self.level,
                "replicas": self.replicas, "throughput_tok_s": self.throughput, "ttft_p50_s": r.ttft_p50,
                "ttft_p99_s": r.ttft_p99, "tpot_p50_s": r.tpot_p50, "tpot_p99_s": r.tpot_p99,
                "device_hours_per_mtok": r.device_hours_per_mtok, "mean_verify_batch": r.mean_verify_batch}


def sweep(replicas: dict, workload: Workload, pool_devices: int | None = None, requests: int | None = None) -> list[Point]:
    """Every (strategy, placement) at every arrival level. With pool_devices, a placement of
    `devices` per replica runs pool_devices // devices replicas, each taking an equal share of the rate."""
    prompt_len, output_len = workload.sampler()
    arr = workload.arrivals
    points = []
    for (strategy, placement), rep in replicas.items():
        n_rep = max(1, (pool_devices or rep.devices) // rep.devices) if pool_devices else 1
        if pool_devices and placement.startswith("config:"):
            n_rep = 1
        if isinstance(arr, ClosedLoopArrivals):
            for c in arr.concurrency:
                a = Arrivals("closed", requests or c * arr.requests_per_client, concurrency=c)
                seeds = range(workload.seed, workload.seed + max(1, 64 // a.requests))
                points.append(Point(strategy, placement, c,
                                    simulate_repeated(rep, a, prompt_len, output_len, seeds), 1))
        else:
            for rate in arr.rates:
                a = Arrivals("poisson", requests or arr.requests, rate=rate / n_rep)
                points.append(Point(strategy, placement, rate,
                                    simulate(rep, a, prompt_len, output_len, workload.seed), n_rep))
    return points


def meets(p: Point, workload: Workload) -> bool:
    slo = workload.slo
    return ((slo.ttft_p99_s is None or p.result.ttft_p99 <= slo.ttft_p99_s)
            and (slo.tpot_p50_s is None or p.result.tpot_p50 <= slo.tpot_p50_s))


def recommend(points: list[Point], workload: Workload) -> tuple[Point, list[str]]:
    """Cheapest (device-hours per million tokens) point meeting the SLO; else the highest throughput."""
    ok = [p for p in points if meets(p, workload)]
    reasons = []
    if ok:
        # At one offered load every plan emits the same tokens, so costs within 3% are a tie
        # (simulation noise); the tie goes to the lowest per-token latency.
        cheapest = min(p.result.device_hours_per_mtok for p in ok)
        tied = [p for p in ok if p.result.device_hours_per_mtok <= 1.03 * cheapest]
        best = min(tied, key=lambda p: p.result.tpot_p50)
        reasons.append(f"cheapest of {len(ok)}/{len(points)} simulated points meeting the SLO "
                       f"(ttft_p99 <= {workload.slo.ttft_p99_s} s, tpot_p50 <= {workload.slo.tpot_p50_s} s); "
                       f"of the {len(tied)} within 3% of the lowest cost, the lowest per-token latency")
    else:
        best = max(points, key=lambda p: p.throughput)
        reasons.append("no point meets the SLO: highest throughput instead")
    r = best.result
    reasons.append(f"{best.strategy} on {best.placement} ({best.replicas} replica(s)) at {best.level:g}: "
                   f"{best.throughput:.0f} tok/s, TTFT p99 {r.ttft_p99 * 1e3:.0f} ms, per-token p50 "
                   f"{r.tpot_p50 * 1e3:.1f} ms, {r.device_hours_per_mtok:.3f} device-h per Mtok")
    plain = [p for p in ok if p.strategy == "plain"] if ok else [p for p in points if p.strategy == "plain"]
    if plain and best.strategy != "plain":
        bp = min(plain, key=lambda p: p.result.device_hours_per_mtok) if ok else max(plain, key=lambda p: p.throughput)
        reasons.append(f"best plain decoding ({bp.placement} at {bp.level:g}): {bp.throughput:.0f} tok/s, "
                       f"per-token p50 {bp.result.tpot_p50 * 1e3:.1f} ms, "
                       f"{bp.result.device_hours_per_mtok:.3f} device-h per Mtok")
    others = sorted({(p.strategy, p.placement) for p in ok} - {(best.strategy, best.placement)})
    if ok and others:
        runner = min((p for p in ok if (p.strategy, p.placement) != (best.strategy, best.placement)),
                     key=lambda p: p.result.device_hours_per_mtok)
        reasons.append(f"runner-up: {runner.strategy} on {runner.placement} at {runner.level:g}, "
                       f"{runner.result.device_hours_per_mtok:.3f} device-h per Mtok")
    if math.isinf(r.device_hours_per_mtok):
        reasons.append("warning: the recommended point generated no tokens")
    return best, reasons
