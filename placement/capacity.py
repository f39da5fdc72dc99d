"""Capacity scenarios: (strategy, placement) -> simulated replica, swept over a workload; a plan.

Two sources of step times:
  - a measured profile of this machine (`launch.py profile`): MeasuredStep interpolates the
    target's forward times; drafts cost the profiled seconds per drafted token;
  - the roofline (placement/roofline.py) from the hardware table and model sizes, for
    clusters that are not this machine (8xA100.yaml).
Acceptance: a bench JSON's per-strategy mean accepted tokens and draft lengths (inverted to
alpha through Leviathan's formula), else the workload's `acceptance`, else --alpha. The bench
that calibrates the costs and the one that gives acceptance may differ (`--acceptance`).
On a CPU node the drafter actor and the target slow each other by factors derived from the
node's cores, each side's threads and the memory bus (`cpu_contention`); a drafter on its own
node (`drafter_node="separate"`) does not.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.config import EngineConfig
from placement.hardware import KNOWN_DEVICES
from placement.roofline import (Hardware, ModelShape, Row, draft_message_bytes, model_shape, step_time,
                                transfer_time)
from placement.simulate import Arrivals, Replica, Result, simulate, simulate_repeated
from placement.speculative_model import RequestTrace, StrategyModel, alpha_for_mean_accepted
from placement.workload import ClosedLoopArrivals, Workload

RAY_HOP_S = 2.4e-3          # one small tensor between two Ray actors, measured (bench_out/transfer.json)
CLIENT_STAGGER_S = 0.001    # closed-loop clients' first requests this far apart (simulate.Arrivals)
GATHER_S = 0.005             # the global verifier's least gathering wait (orchestrator/global_verifier.py)
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
    """Target forward time from a profile: one request of T tokens, B one-token requests batched, and
    (profiles with `batch_tokens`) B requests of T tokens batched. The last is batch(B) plus a
    multi-token surcharge interpolated over the measured (B, T) points, linearly in T and in B
    (extrapolated past the largest measured B); older profiles without it take max(tokens(B x T),
    batch(B)), which the grid showed to be low (docs/capacity.md)."""

    def __init__(self, target: dict):
        self.tokens = Curve({int(k): v for k, v in target["tokens"].items()})
        self.batch = Curve({int(k): v for k, v in target["batch"].items()})
        grid: dict[int, dict[int, float]] = {}
        for key, v in target.get("batch_tokens", {}).items():
            b, t = (int(x) for x in key.split("x"))
            grid.setdefault(b, {1: 0.0})[t] = max(0.0, v - self.batch(b))
        if grid:
            grid[1] = {int(t): max(0.0, v - self.tokens(1)) for t, v in target["tokens"].items()}
        self.surcharge = {b: Curve(pts) for b, pts in sorted(grid.items())}

    def _surcharge(self, b: int, t: int) -> float:
        bs = list(self.surcharge)
        lo = max([x for x in bs if x <= b], default=bs[0])
        hi = min([x for x in bs if x >= b], default=bs[-1])
        if lo == hi:                             # past the largest measured batch: extend the last slope
            if b > bs[-1] and len(bs) > 1:
                lo, hi = bs[-2], bs[-1]
            else:
                return self.surcharge[lo](t)
        ylo, yhi = self.surcharge[lo](t), self.surcharge[hi](t)
        return max(0.0, ylo + (yhi - ylo) * (b - lo) / (hi - lo))

    def __call__(self, rows: list[Row]) -> float:
        b, t_max = len(rows), max(r.new for r in rows)
        if b == 1:
            return self.tokens(t_max)
        if t_max == 1:
            return self.batch(b)
        if self.surcharge:
            return self.batch(b) + self._surcharge(b, t_max)
        return max(self.tokens(b * t_max), self.batch(b))


# ----------------------------------------------------------------------------- acceptance
@dataclass(frozen=True)
class Measured:
    mean_accepted: float      # tokens per step (accepted + 1)
    mean_drafted: float       # draft length per step (tokens)
    draft_s_per_step: float   # measured draft seconds per step (bench, batch 1)
    prompts: int
    # Model forwards per step by source, counted by the bench (`draft_forwards`: drafter key or
    # strategy name -> forwards); None when the records do not count them (older bench files).
    forwards_per_step: dict[str, float] | None = None
    # Share of steps with a non-empty draft (`draft_steps` / steps); None when not recorded.
    draft_step_share: float | None = None
    # Pipelined drafting (DuoDecoding records): the target's verify seconds per step and the drafter's
    # busy seconds per step, both measured while the two ran side by side with the strategy's own
    # thread split (`target_threads`), so contention is already in them. None for other records.
    pipelined_verify_s: float | None = None
    pipelined_draft_s: float | None = None
    # Each record's steps (drafted, accepted), in the records' order; empty when not recorded.
    requests: tuple[RequestTrace, ...] = ()

    @property
    def alpha(self) -> float:
        return alpha_for_mean_accepted(self.mean_accepted, self.mean_drafted) if self.mean_drafted else 0.0

    def model_forwards(self, drafter: str | None, name: str) -> float | None:
        """Counted forwards of the neural drafter per step (the MaG table or a lookup is not one)."""
        if self.forwards_per_step is None:
            return None
        return self.forwards_per_step.get(drafter or "", self.forwards_per_step.get(name, 0.0))


def bench_acceptance(path: str | Path, categories: list[str] | None = None) -> dict[str, Measured]:
    """Per strategy, from `launch.py bench --out` records (optionally only some categories)."""
    data = json.loads(Path(path).read_text())
    out = {}
    for name, recs in data["records"].items():
        rs = [r for r in recs if "steps" in r and (not categories or r["category"] in categories)]
        steps = sum(r["steps"] for r in rs)
        if not steps or name == "plain":
            continue
        forwards = None
        if all(isinstance(r.get("draft_forwards"), dict) for r in rs):
            forwards = {}
            for r in rs:
                for key, n in r["draft_forwards"].items():
                    forwards[key] = forwards.get(key, 0.0) + n / steps
        share = (sum(r["draft_steps"] for r in rs) / steps) if all("draft_steps" in r for r in rs) else None
        verify_s = draft_step_s = None
        if all("drafter_idle_fraction" in r for r in rs):
            busy = sum((1 - r["drafter_idle_fraction"]) * r["seconds"] for r in rs)       # drafter busy s
            verify_s, draft_step_s = sum(r["verify_s"] for r in rs) / steps, busy / steps
        traces = [RequestTrace.from_record(r) for r in rs]
        traces = tuple(traces) if all(traces) else ()
        out[name] = Measured(sum(r["step_tokens"] for r in rs) / steps, sum(r["drafted"] for r in rs) / steps,
                             sum(r["draft_s"] for r in rs) / steps, len(rs), forwards, share,
                             verify_s, draft_step_s, traces)
    return out


def calibrate_profile(profile: dict, bench_path: str | Path, categories: list[str] | None,
                      how: str = "scale") -> dict:
    """A copy of `profile` whose target costs come from the batch-1 bench records: the target's
    curves scaled so one token costs plain decoding's verify seconds per step. The profile keeps
    only the *shape* of the target's cost against tokens and batch (for a profile taken on a
    loaded machine, or of a smaller model of the same family). how = "scale": every point times
    one factor (all costs grow with the model); "shift": every point plus one offset (the extra
    cost of more tokens or requests does not grow with the model: per-request attention and
    Python in forward_many). Draft costs are calibrated per strategy model (`draft_costs`), since
    what one drafter forward costs depends on how many forwards a strategy's step makes."""
    recs = [r for r in json.loads(Path(bench_path).read_text())["records"]["plain"]
            if not categories or r["category"] in categories]
    t1 = sum(r["verify_s"] for r in recs) / sum(r["steps"] for r in recs)
    base = profile["target"]["tokens"]["1"]
    scale = t1 / base
    adjust = (lambda v: v * scale) if how == "scale" else (lambda v: v - base + t1)
    out = dict(profile)
    out["target"] = {k: {n: adjust(v) for n, v in profile["target"][k].items()}
                     for k in ("tokens", "batch", "batch_tokens") if k in profile["target"]}
    out["calibration"] = {"bench": str(bench_path), "target_step_s": t1, "how": how, "scale": scale,
                          "shift_s": t1 - base}
    return out


def draft_costs(models: list["StrategyModel"], calib: dict[str, Measured]) -> dict[str, tuple[float, str]]:
    """Seconds per drafter forward per strategy -> (seconds, where from), so that at batch 1 a
    simulated step drafts for the calibration bench's draft seconds per step:
    draft_s_per_step / (the model's drafter forwards per step). A strategy the calibration bench
    did not run takes the per-forward cost of a same-drafter strategy that did (its drafter's
    forward costs the same; the hybrid's lookups are not forwards)."""
    out: dict[str, tuple[float, str]] = {}
    by_drafter: dict[str, tuple[float, str]] = {}
    for m in models:
        if m.name in calib and calib[m.name].pipelined_draft_s and m.draft_forwards() > 0:
            # DuoDecoding: the target never waits, so draft_s says nothing of the drafter; its busy time
            # per step (a budget of several tokens, more than the accepted depth) does.
            out[m.name] = (calib[m.name].pipelined_draft_s / m.draft_forwards(),
                           f"bench {m.name} (drafter busy seconds per step)")
        elif m.name in calib and m.draft_forwards() > 0:
            out[m.name] = (calib[m.name].draft_s_per_step / m.draft_forwards(), f"bench {m.name}")
            if m.family == "draft_model" and m.drafter:
                by_drafter.setdefault(m.drafter, (out[m.name][0], f"bench {m.name} (same drafter)"))
    for m in models:
        if m.name not in out and m.draft_forwards() > 0 and m.drafter in by_drafter:
            out[m.name] = by_drafter[m.drafter]
    return out


def _drafter(s) -> str | None:
    """The first drafter model a strategy names (its step model's drafter)."""
    return next((key for _, key in s.model_refs()), None)


def _hybrid_split(name: str, m: Measured, siblings: dict[str, Measured], drafter: str | None
                  ) -> tuple[float, float, str]:
    """(model_share, model_draft_len, how) of a hybrid from its bench record: the share of steps the
    model drafts, and the forwards of such a step. Forwards per step are counted when the records
    have `draft_forwards`; else estimated as the hybrid's draft seconds per step / the per-forward
    cost of a same-drafter draft-model strategy (`siblings`: same file, so same day and prompts).
    A model-drafted step is taken to draft that sibling's mean length (same draft-length policy)."""
    sib = next(iter(siblings.values()), None)
    model_len = sib.mean_drafted if sib else m.mean_drafted
    counted = m.model_forwards(drafter, name)
    if counted is not None:
        fwd, how = counted, "counted"
    elif sib is not None:
        per_fwd = sib.draft_s_per_step / (sib.model_forwards(drafter, "") or sib.mean_drafted)
        fwd, how = m.draft_s_per_step / per_fwd, f"estimated from draft seconds vs {next(iter(siblings))}"
    else:
        return 1.0, 0.0, "no per-source counts and no same-drafter strategy: every step drafts with the model"
    share = min(1.0, fwd / model_len) if model_len else 1.0
    return share, model_len, (f"model drafts {share:.0%} of steps, {model_len:.1f} forwards each "
                              f"({fwd:.2f} forwards/step {how})")


def strategy_models(cfg: EngineConfig, workload: Workload, bench: dict[str, Measured],
                    alphas: dict[str, float], per_request: bool = False) -> list[StrategyModel]:
    """The config's strategies (and plain) with gamma/alpha from the bench (acceptance), else parameters.
    per_request: each simulated request replays one bench record's steps in turn (`request_mix`),
    for predicting runs of the same prompts; else the pooled alpha and draft length."""
    plain_sd = {s.name: _drafter(s) for s in cfg.strategies if s.model_every_step()}   # draft every step with the model
    out = [StrategyModel("plain", "plain", source="-")]
    for s in cfg.strategies:
        fam = s.capacity_family()     # the step model of its kind; None: a kind the simulator does not model
        if fam is None:
            continue
        drafter = _drafter(s)
        gamma, source = s.capacity_gamma(), ""
        model_share, model_len, draft_share, mix = 1.0, 0.0, 1.0, ()
        if s.name in bench:
            m = bench[s.name]
            gamma, alpha = max(1, round(m.mean_drafted)), m.alpha
            source = f"bench: {m.mean_accepted:.2f} tokens/step at {m.mean_drafted:.1f} drafted ({m.prompts} prompts)"
            if fam == "hybrid":
                siblings = {n: b for n, b in bench.items() if plain_sd.get(n) == drafter}
                model_share, model_len, how = _hybrid_split(s.name, m, siblings, drafter)
                source += "; " + how
            if m.draft_step_share:
                draft_share = min(1.0, m.draft_step_share)
                source += f"; {draft_share:.0%} of steps draft"
            if per_request and fam != "duodecoding" and m.requests:
                mix = m.requests                 # DuoDecoding's drafts overlap: its pooled step model stays
                source += f"; replaying the steps of {len(mix)} measured requests"
        else:
            alpha = next((table[k] for table in (alphas, workload.acceptance) for k in (s.name, drafter, fam)
                          if k is not None and k in table), None)
            if alpha is None:
                continue                      # nothing known about this strategy's acceptance: not simulated
            source = "parameter"
        out.append(StrategyModel(s.name, fam, gamma, alpha, drafter, model_share=model_share,
                                 model_draft_len=model_len, review_chunk=s.review_chunk(), source=source,
                                 draft_share=draft_share, request_mix=mix,
                                 goodput=getattr(getattr(s, "draft_length", None), "policy", "") == "goodput"))
    return out


# ----------------------------------------------------------------------------- CPU contention
class CpuNodeShare(BaseModel):
    """What a drafter actor and the target share on one CPU node (from the config and the profile)."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    cores: int = Field(ge=1, description="cores of the node (node_pools[].cpus)")
    target_threads: int = Field(ge=1, description="torch threads of the target actor")
    drafter_threads: int = Field(ge=1, description="torch threads of the drafter actor")
    bus_gbs: float = Field(gt=0, description="memory bandwidth of the node, GB/s (profile memory_bw_gbs)")
    target_gbs: float = Field(ge=0, description="bandwidth the target's one-token forward draws alone: "
                                                "weight bytes / its solo step, GB/s")
    drafter_gbs: float = Field(ge=0, description="the same for one drafter forward, GB/s")
    oversubscription: Literal["fair", "gang"] = Field("gang", description=(
        "while threads outnumber cores: 'fair' = each runnable thread gets cores / threads of a core "
        "(threads that wait sleep); 'gang' = a side progresses only while all its threads hold a core "
        "(OpenMP threads spin at each parallel region's barrier for the slowest one)"))


def cpu_contention(n: CpuNodeShare) -> tuple[float, float]:
    """(target, drafter) slowdown while both run: solo time x this. Per side x with T_x threads,
    N = target + drafter threads, C cores:
    - cores, when N > C: 'fair': the OS gives each runnable thread C / N of a core, so side x gets
      C * T_x / N core-equivalents against min(T_x, C) alone: min(T_x, C) * N / (C * T_x);
      'gang': x progresses only while all T_x threads run, which with C of the N threads running
      at a time (uniformly) happens with probability P = comb(N - T_x, C - T_x) / comb(N, C):
      slowdown 1 / P (2 + 2 threads on 2 cores: fair 2, gang 6);
    - bus: max-min fair shares of bus_gbs between the two demands (each capped at the bus; a side
      under half the bus keeps its demand, the other gets the rest): slowdown demand / share;
    the larger of the two."""
    threads = n.target_threads + n.drafter_threads
    over = threads > n.cores
    # A side alone draws at most the whole bus (a larger figure: the step is not all weight streaming,
    # or the profile's bandwidth was read under load).
    d_t, d_d = min(n.target_gbs, n.bus_gbs), min(n.drafter_gbs, n.bus_gbs)

    def one(t_x: int, d_x: float, d_other: float) -> float:
        compute = 1.0
        if over:
            compute = min(t_x, n.cores) * threads / (n.cores * t_x)
            if n.oversubscription == "gang" and t_x <= n.cores:
                compute = math.comb(threads, n.cores) / math.comb(threads - t_x, n.cores - t_x)
        fair = max(n.bus_gbs / 2, n.bus_gbs - d_other)           # max-min fair share of the bus (GB/s)
        bus = d_x / min(d_x, fair) if d_x + d_other > n.bus_gbs and d_x > 0 else 1.0
        return max(compute, bus)

    return one(n.target_threads, d_t, d_d), one(n.drafter_threads, d_d, d_t)


def _drafter_threads(cfg: EngineConfig, strategy_name: str, drafter: str | None) -> int:
    """Threads of the process that runs this strategy's drafts, as orchestrator/ray_runtime.py sets them:
    a DuoDecoding drafter its own `threads`; a drafter actor runtime.threads, else its placement's cpus."""
    st = next((s for s in cfg.strategies if s.name == strategy_name), None)
    if st is not None and st.drafter_threads() is not None:
        return st.drafter_threads()
    pl = cfg.placement.drafters.get(drafter) if cfg.placement and drafter else None
    return cfg.runtime.threads or (pl.cpus if pl else 1)


def _takes_turns(cfg: EngineConfig, strategy_name: str) -> bool:
    """Whether this strategy drafts in a drafter actor, whose forwards take turns with the target's on a
    shared node (runtime.core_lease; orchestrator/ray_runtime.py): not a drafter process of its own."""
    st = next((s for s in cfg.strategies if s.name == strategy_name), None)
    return st is None or st.drafter_threads() is None


def _target_threads(cfg: EngineConfig) -> int:
    pool = next((p for p in cfg.node_pools if cfg.placement and p.name == cfg.placement.target.pool), None)
    return cfg.runtime.threads or (pool.cpus if pool else 1)


def node_share(cfg: EngineConfig, profile: dict, m: StrategyModel, draft_forward_s: float,
               oversubscription: str = "gang") -> CpuNodeShare:
    """The CPU node's share inputs for strategy `m` (target and its drafter on the target's node)."""
    from placement.plan import footprint

    pool = next(p for p in cfg.node_pools if p.name == cfg.placement.target.pool)
    t1 = profile["target"]["tokens"]["1"]                                  # s, one-token forward alone
    target_bytes = footprint(cfg.models.target).weight_bytes
    drafter_bytes = footprint(cfg.models.drafters[m.drafter]).weight_bytes if m.drafter else 0.0
    return CpuNodeShare(cores=pool.cpus, target_threads=_target_threads(cfg),
                        drafter_threads=_drafter_threads(cfg, m.name, m.drafter),
                        bus_gbs=profile["memory_bw_gbs"], target_gbs=target_bytes / t1 / 1e9,
                        drafter_gbs=drafter_bytes / draft_forward_s / 1e9 if draft_forward_s else 0.0,
                        oversubscription=oversubscription)


# ----------------------------------------------------------------------------- local (profile)
DRAFTER_NODES = ("shared", "separate")


def local_replicas(cfg: EngineConfig, profile: dict, models: list[StrategyModel], host_s: float,
                   draft_forward_s: dict[str, float], in_process: bool = False,
                   oversubscription: str = "gang", drafter_batch: int = 1,
                   drafter_nodes: tuple[str, ...] = ("shared",),
                   own_verify_s: dict[str, float] | None = None) -> dict:
    """This machine as measured: one verifier (the global verifier), drafter actors drafting
    `drafter_batch` requests at a time (1: as when the serving runs of docs/distributed.md were
    measured; in_process: the drafter runs beside the engine, no Ray hop per draft).
    draft_forward_s: seconds per drafter forward per strategy (alone, batch 1).
    drafter_nodes: "shared" = the drafter actor on the target's node (placement "local"; they slow
    each other, `cpu_contention`); "separate" = on a CPU node of its own with the same per-forward
    cost (placement "local+drafter-node"; no contention, a Ray hop per draft either way).
    own_verify_s: per strategy, verify seconds per step measured with its own thread split while its
    drafter ran beside it (DuoDecoding's `target_threads`): that strategy's verify curve is scaled to
    it and no contention factor is added on the shared node (it is already in the measurement)."""
    measured = MeasuredStep(profile["target"])
    # A served run's target is a Ray actor: each forward adds the call, the actor's bookkeeping and the
    # logits' way back (profile "served_overhead_s", by batch size; older profiles lack it and predict
    # in-process forwards).
    hop = Curve({int(k): v for k, v in profile.get("served_overhead_s", {}).items()}) if (
        profile.get("served_overhead_s") and not in_process) else None

    def verify(rows, measured=measured, hop=hop):
        return measured(rows) + (hop(len(rows)) if hop else 0.0)
    grow = Curve({int(k): v for k, v in profile["target"]["batch"].items()})   # batched drafts grow like this
    out = {}
    for m in models:
        tok_s = draft_forward_s.get(m.name)
        if m.draft_forwards() > 0 and tok_s is None:
            continue
        replicas = 1
        if m.drafter and cfg.placement and m.drafter in cfg.placement.drafters:
            replicas = cfg.placement.drafters[m.drafter].replicas
        slow_t, slow_d = (cpu_contention(node_share(cfg, profile, m, tok_s, oversubscription))
                          if m.draft_forwards() > 0 and cfg.placement else (1.0, 1.0))
        verify_m = verify
        if own_verify_s and m.name in own_verify_s:
            scale = own_verify_s[m.name] / verify([Row(m.verify_tokens, 100)])
            verify_m = lambda rows, scale=scale: verify(rows) * scale   # noqa: E731
            slow_t = slow_d = 1.0
        for node in drafter_nodes if m.draft_forwards() > 0 else ("shared",):
            if node not in DRAFTER_NODES:
                raise ValueError(f"drafter node {node!r}: expected one of {DRAFTER_NODES}")
            shared = node == "shared"
            out[(m.name, "local" if shared else "local+drafter-node")] = Replica(
                m, verify_m, max_batch=cfg.server.max_verify_batch, batch_wait_s=GATHER_S,
                gather_fraction=cfg.server.verify_gather_factor, verify_cohorts=cfg.server.verify_cohorts,
                draft_step=(lambda rows, s=tok_s: s * grow(len(rows)) / grow(1)) if tok_s else None,
                # Not profiled: the drafter's prompt prefill, taken to grow with tokens like the target's
                # forward (one drafter forward x target(prompt tokens) / target(1 token)).
                draft_prefill_step=(lambda rows, s=tok_s: s * measured(rows) / measured([Row(1, 0)])) if tok_s else None,
                drafter_servers=replicas, drafter_max_batch=drafter_batch,
                transfer_s=RAY_HOP_S if m.draft_forwards() > 0 and not in_process else 0.0,
                host_s=host_s, shared_bus=shared, verify_shared_slowdown=slow_t, draft_shared_slowdown=slow_d,
                # a drafter actor's forwards take turns with the target's (a DuoDecoding drafter process's do not)
                shared_turns=cfg.runtime.core_lease and _takes_turns(cfg, m.name),
                wait_for_drafting=cfg.server.wait_for_drafting == "on" or (
                    cfg.server.wait_for_drafting == "auto" and shared and m.draft_forwards() > 0),
                devices=1 if shared else 2, concurrency=cfg.server.concurrency)
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
            StrategyModel(f"sd-{key}-goodput", "draft_model", 8, a, key, goodput=True,
                          source="parameter; draft lengths 0-8 from the goodput scheduler"),
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
                per_level = max(c * arr.requests_per_client, arr.min_requests) if arr.min_requests else None
                a = Arrivals("closed", requests or per_level or arr.requests or c * arr.requests_per_client,
                             concurrency=c,
                             stagger_s=CLIENT_STAGGER_S)
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
