"""Pure placement planner: shards of the target and the drafters onto node pools.

No Ray import: the plan is computed from the config (and model sizes) alone, so
`launch.py --dry-run` works on a laptop and infeasible plans fail before anything
starts, naming what does not fit where. Creating Ray placement groups from
`Plan.bundles()` is placement/ray_groups.py's job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ModelSpec, NodePool
from orchestrator.config import EngineConfig
from placement.hardware import KNOWN_DEVICES

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Embedded models' shapes, so planning needs no download (params include untied heads).
EMBEDDED_SHAPES = {
    "qwen2.5-coder-1.5b": (1_777_088_000, 28),
    "qwen2.5-coder-0.5b": (630_167_424, 24),
    "smollm2-135m": (134_515_008, 30),
    "gemma3-270m": (268_098_176, 18),
}


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class ModelFootprint:
    params: int
    layers: int
    bytes_per_param: float

    @property
    def weight_bytes(self) -> float:
        return self.params * self.bytes_per_param


def footprint(spec: ModelSpec) -> ModelFootprint:
    """Parameter count and depth from the embedded table or a HF config.json."""
    bpp = 1.0 if spec.quantize == "int8" else BYTES[spec.dtype]
    if spec.size_hint is not None:
        return ModelFootprint(spec.size_hint[0], spec.size_hint[1], bpp)
    if spec.source in EMBEDDED_SHAPES:
        params, layers = EMBEDDED_SHAPES[spec.source]
        return ModelFootprint(params, layers, bpp)
    cfg_path = Path(spec.source) / "config.json"
    if not cfg_path.is_file():
        raise PlacementError(f"model {spec.source!r}: no config.json to size it from")
    c = json.loads(cfg_path.read_text())
    h, n, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * c.get("head_dim", h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    emb = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return ModelFootprint(n * per_layer + emb, n, bpp)


@dataclass(frozen=True)
class Shard:
    name: str                  # actor name, e.g. target-shard-0, drafter-cpu-0
    role: str                  # "target", "drafter", or the kind of a strategy with actors of its own
    model: str                 # models.target or a models.drafters key
    pool: str
    node: int                  # index of the node within its pool
    device: str                # "gpu" or "cpu"
    gpus: int
    cpus: int
    layers: tuple[int, int]    # [start, end) layer range held
    tp_rank: int
    tp_size: int
    memory_gb: float           # weights held by this shard
    accelerator: str | None
    colocated: tuple[str, ...] = ()   # drafters: other models.drafters keys loaded in the same actor

    @property
    def models(self) -> tuple[str, ...]:
        """Every model key this shard's actor loads (a drafter actor may load several: colocate)."""
        return (self.model,) + self.colocated


@dataclass
class Plan:
    shards: list[Shard] = field(default_factory=list)

    def shares_target_cores(self, drafter_key: str) -> bool:
        """Whether drafter `drafter_key`'s actors run on the CPU cores of a node that also runs a target
        shard on CPU: their prefills then compete for the same cores (Ray's CPU bundles reserve counts,
        not cores)."""
        cpu_nodes = {(s.pool, s.node) for s in self.shards if s.role == "target" and s.device == "cpu"}
        return any(s.role == "drafter" and drafter_key in (s.model, *s.colocated) and s.device == "cpu"
                   and (s.pool, s.node) in cpu_nodes for s in self.shards)

    def shared_cpu_nodes(self) -> set[tuple[str, int]]:
        """(pool, node) of every node whose CPU cores run a target shard and a drafter actor: there their
        forwards take turns (runtime.core_lease, workers/core_lease.py). Tensor-parallel target ranks are
        left out (their all-reduces would wait on the lease)."""
        targets = {(s.pool, s.node) for s in self.shards if s.role == "target" and s.device == "cpu" and s.tp_size == 1}
        return {(s.pool, s.node) for s in self.shards if s.role == "drafter" and s.device == "cpu"} & targets

    def bundles(self) -> list[dict[str, float]]:
        """One Ray placement-group bundle per shard (pool pinned by a custom resource)."""
        out = []
        for s in self.shards:
            b = {"CPU": float(s.cpus), f"pool:{s.pool}": 0.001}
            if s.gpus:
                b["GPU"] = float(s.gpus)
            if s.accelerator:
                b[f"accelerator_type:{s.accelerator}"] = 0.001
            out.append(b)
        return out

    def table(self) -> str:
        width = max([20] + [len("+".join(s.models)) for s in self.shards if s.colocated])
        head = (f"{'actor':<18} {'model':<{width}} {'pool/node':<14} {'device':<16} {'layers':<9} {'tp':<5} "
                f"{'weights':>9}")
        rows = [head, "-" * len(head)]
        for s in self.shards:
            dev = f"{s.gpus}x {s.accelerator}" if s.gpus else f"{s.cpus} CPU"
            model = "+".join(s.models) if s.colocated else Path(s.model).name[:20]
            layers = f"{s.layers[0]}-{s.layers[1] - 1}"
            tp = f"{s.tp_rank}/{s.tp_size}"
            rows.append(f"{s.name:<18} {model:<{width}} {s.pool + '/' + str(s.node):<14} {dev:<16} "
                        f"{layers:<9} {tp:<5} {s.memory_gb:>7.2f}GB")
        return "\n".join(rows)


class _NodeState:
    def __init__(self, pool: NodePool, index: int):
        self.pool, self.index = pool, index
        self.free_gpus = pool.accelerators_per_node
        self.free_cpus = pool.cpus
        self.free_mem = pool.memory_gb


def _device_memory(pool: NodePool) -> float:
    if pool.accelerator_memory_gb:
        return pool.accelerator_memory_gb
    if pool.accelerator not in KNOWN_DEVICES:
        raise PlacementError(f"node_pools.{pool.name}.accelerator: unknown device {pool.accelerator!r} "
                             f"(known: {sorted(KNOWN_DEVICES)}; or set accelerator_memory_gb)")
    return KNOWN_DEVICES[pool.accelerator].memory_gb


def plan_placement(config: EngineConfig) -> Plan:
    """Place the target's shards and every placement.drafters entry (its colocated drafters included).
    Callers that are about to run strategies go through `check_plan`, which makes the strategy checks too."""
    if config.placement is None:
        raise PlacementError("config has no placement section (add one to run through Ray, or run in one "
                             "process: launch.py serve --in-process / --in-process for the main job)")
    pools = {p.name: p for p in config.node_pools}
    nodes = {name: [_NodeState(p, i) for i in range(p.count)] for name, p in pools.items()}
    headroom = config.placement.memory_headroom
    plan = Plan()

    def take(pool: NodePool, name: str, gpus: int, cpus: int, mem_gb: float) -> _NodeState:
        """First node of the pool with room; the error says what is missing."""
        for node in nodes[pool.name]:
            if node.free_gpus >= gpus and node.free_cpus >= cpus and (gpus or node.free_mem >= mem_gb):
                node.free_gpus -= gpus
                node.free_cpus -= cpus
                if not gpus:
                    node.free_mem -= mem_gb
                return node
        best = max(nodes[pool.name], key=lambda n: (n.free_gpus, n.free_cpus, n.free_mem))
        raise PlacementError(
            f"{name} does not fit in pool {pool.name!r}: needs {gpus} GPU, {cpus} CPU"
            + ("" if gpus else f", {mem_gb:.1f} GB host memory")
            + f"; the roomiest node has {best.free_gpus} GPU, {best.free_cpus} CPU, {best.free_mem:.1f} GB left")

    # --- target: pipeline stages x tensor-parallel ranks
    t = config.placement.target
    pool = pools[t.pool]
    fp = footprint(config.models.target)
    if t.pipeline_parallel > fp.layers:
        raise PlacementError(f"placement.target.pipeline_parallel={t.pipeline_parallel} exceeds the target's {fp.layers} layers")
    per_shard_gb = fp.weight_bytes / (t.tensor_parallel * t.pipeline_parallel) / 1e9
    if t.device == "gpu":
        if pool.accelerators_per_node == 0:
            raise PlacementError(f"placement.target.pool {pool.name!r} has no accelerators but device is gpu")
        if t.tensor_parallel > pool.accelerators_per_node:
            raise PlacementError(f"placement.target.tensor_parallel={t.tensor_parallel} exceeds the "
                                 f"{pool.accelerators_per_node} accelerators per node of pool {pool.name!r}")
        usable = _device_memory(pool) * (1 - headroom)
        if per_shard_gb > usable:
            raise PlacementError(
                f"target shard needs {per_shard_gb:.1f} GB per {pool.accelerator} but only {usable:.1f} GB is usable "
                f"({headroom:.0%} kept for KV cache); raise tensor_parallel or pipeline_parallel")
    bounds = [round(i * fp.layers / t.pipeline_parallel) for i in range(t.pipeline_parallel + 1)]
    idx = 0
    for stage in range(t.pipeline_parallel):
        for rank in range(t.tensor_parallel):
            name = f"target-shard-{idx}"
            gpus = 1 if t.device == "gpu" else 0
            node = take(pool, name, gpus, 1, per_shard_gb)
            plan.shards.append(Shard(name, "target", config.models.target.source, pool.name, node.index, t.device,
                                     gpus, 1, (bounds[stage], bounds[stage + 1]), rank, t.tensor_parallel,
                                     per_shard_gb, pool.accelerator if gpus else None))
            idx += 1

    # --- drafters: whole model per replica
    counters: dict[str, int] = {}
    for key, d in config.placement.drafters.items():
        dpool = pools[d.pool]
        dfp = footprint(config.models.drafters[key])
        gb = sum(footprint(config.models.drafters[k]).weight_bytes for k in [key, *d.colocate]) / 1e9
        what = f"placement.drafters.{key}" + (f" (with {', '.join(d.colocate)})" if d.colocate else "")
        if d.device == "gpu":
            if dpool.accelerators_per_node == 0:
                raise PlacementError(f"{what}: pool {dpool.name!r} has no accelerators")
            if gb > _device_memory(dpool) * (1 - headroom):
                raise PlacementError(f"{what}: {gb:.1f} GB does not fit one {dpool.accelerator}")
        for _ in range(d.replicas):
            n = counters.get(d.device, 0)
            counters[d.device] = n + 1
            name = f"drafter-{d.device}-{n}"
            gpus = 1 if d.device == "gpu" else 0
            node = take(dpool, name, gpus, d.cpus, gb)
            plan.shards.append(Shard(name, "drafter", key, dpool.name, node.index, d.device, gpus, d.cpus,
                                     (0, dfp.layers), 0, 1, gb, dpool.accelerator if gpus else None,
                                     tuple(d.colocate)))

    # --- strategies with actors of their own (EasySpec with workers > 1: one rank per group member, each
    # with the full draft weights), placed like their first drafter model (workers/easyspec_workers.py)
    for st in config.strategies:
        n = st.own_actors()
        if not n:
            continue
        key = st.model_refs()[0][1]
        host = config.placement.host_of(key)
        if host is None:
            raise PlacementError(f"strategy {st.name!r} (workers: {n}): drafter {key!r} has no "
                                 f"placement; add placement.drafters.{key} (its ranks are placed like it)")
        d = config.placement.drafters[host]
        dpool, gpus = pools[d.pool], 1 if d.device == "gpu" else 0
        dfp = footprint(config.models.drafters[key])
        for rank in range(n):
            name = rank_name(st, rank)
            node = take(dpool, name, gpus, d.cpus, dfp.weight_bytes / 1e9)
            plan.shards.append(Shard(name, st.kind, key, dpool.name, node.index, d.device, gpus, d.cpus,
                                     (0, dfp.layers), rank, n, dfp.weight_bytes / 1e9,
                                     dpool.accelerator if gpus else None))
    return plan


@dataclass
class RunPlan:
    """A run checked before Ray starts or any model loads (`check_plan`)."""
    plan: Plan | None          # None: every model in one process (--in-process)
    strategies: list           # the selected, runnable strategies (config objects; plain is implicit)
    hosts: dict[str, str]      # models.drafters key -> placement.drafters key whose actors load it (Ray)


def _say(line: str) -> None:
    print(line, flush=True)


def check_strategies(config: EngineConfig, only: list[str] | None = None, in_process: bool = False,
                     log=_say) -> RunPlan:
    """The strategy checks of `check_plan`, without planning (`orchestrator/ray_runtime.place` repeats them)."""
    from orchestrator.selection import runnable_strategies

    chosen = runnable_strategies(config, only, log)   # unknown names, optional extras, MaG tables
    hosts: dict[str, str] = {}
    if in_process or config.placement is None:
        return RunPlan(None, chosen, hosts)
    placed = config.placement
    for st in chosen:
        if why := st.ray_problem():
            raise PlacementError(f"strategy {st.name!r}: {why}")
        for key in st.actor_drafters():
            host = placed.host_of(key)
            if host is None:
                raise PlacementError(f"strategy {st.name!r}: drafter {key!r} has no placement; "
                                     + _placement_fix(config, key))
            hosts[key] = host
    return RunPlan(None, chosen, hosts)


def _placement_fix(config: EngineConfig, key: str) -> str:
    """How to place drafter `key`: in the actor of a placed variant of the same model, or an entry of its own."""
    src = config.models.drafters[key].source
    same = [k for k in config.placement.drafters if config.models.drafters[k].source == src]
    own = f"add placement.drafters.{key}: {{pool: ..., device: cpu}} (an actor of its own)"
    if same:
        return (f"load it in the actor of its variant {same[0]!r} (placement.drafters.{same[0]}.colocate: [{key}]),"
                f" or {own}")
    if config.placement.drafters:
        first = next(iter(config.placement.drafters))
        return f"{own}, or load it beside another drafter (placement.drafters.{first}.colocate: [{key}])"
    return own


def check_plan(config: EngineConfig, only: list[str] | None = None, in_process: bool = False,
               log=_say) -> RunPlan:
    """Every check a run can fail that the config (and the files it names) can answer, before Ray starts
    or any model loads: `--dry-run`, `serve` and the main job call it.

    `only`: the selected strategies (--strategies; None = every configured one). Checks: the names are
    configured; an explicitly named strategy can run here (its optional extra installed, its MaG table
    built; with `only` None such strategies are skipped with a note); through Ray, every selected
    strategy's drafter is placed (its own placement.drafters entry or another entry's `colocate`) and a
    cascade names at most one neural drafter; and the placement plan fits the node pools (`plan_placement`).
    """
    run = check_strategies(config, only, in_process, log)
    if not in_process:
        run.plan = plan_placement(config)
    return run


def rank_name(strategy, rank: int) -> str:
    """The actor name of rank `rank` of a strategy's own actors (`own_actors`), e.g. easyspec-es2-rank0."""
    return f"{strategy.kind}-{strategy.name}-rank{rank}"
