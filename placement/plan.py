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

from orchestrator.config import EngineConfig, ModelSpec, NodePool
from placement.hardware import KNOWN_DEVICES

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Embedded models' shapes, so planning needs no download (params include untied heads).
EMBEDDED_SHAPES = {
    "qwen2.5-coder-1.5b": (1_777_088_000, 28),
    "qwen2.5-coder-0.5b": (630_167_424, 24),
    "smollm2-135m": (134_515_008, 30),
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
    role: str                  # "target" or "drafter"
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


@dataclass
class Plan:
    shards: list[Shard] = field(default_factory=list)

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
        head = f"{'actor':<18} {'model':<20} {'pool/node':<14} {'device':<16} {'layers':<9} {'tp':<5} {'weights':>9}"
        rows = [head, "-" * len(head)]
        for s in self.shards:
            dev = f"{s.gpus}x {s.accelerator}" if s.gpus else f"{s.cpus} CPU"
            model = Path(s.model).name[:20]
            layers = f"{s.layers[0]}-{s.layers[1] - 1}"
            tp = f"{s.tp_rank}/{s.tp_size}"
            rows.append(f"{s.name:<18} {model:<20} {s.pool + '/' + str(s.node):<14} {dev:<16} "
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
    if config.placement is None:
        raise PlacementError("config has no placement section")
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
        gb = dfp.weight_bytes / 1e9
        if d.device == "gpu":
            if dpool.accelerators_per_node == 0:
                raise PlacementError(f"placement.drafters.{key}: pool {dpool.name!r} has no accelerators")
            if gb > _device_memory(dpool) * (1 - headroom):
                raise PlacementError(f"placement.drafters.{key}: {gb:.1f} GB does not fit one {dpool.accelerator}")
        for _ in range(d.replicas):
            n = counters.get(d.device, 0)
            counters[d.device] = n + 1
            name = f"drafter-{d.device}-{n}"
            gpus = 1 if d.device == "gpu" else 0
            node = take(dpool, name, gpus, d.cpus, gb)
            plan.shards.append(Shard(name, "drafter", key, dpool.name, node.index, d.device, gpus, d.cpus,
                                     (0, dfp.layers), 0, 1, gb, dpool.accelerator if gpus else None))

    # --- EasySpec with workers > 1: one actor per group member, each with the full draft weights,
    # placed like its drafter (workers/easyspec_workers.py)
    for st in config.strategies:
        if getattr(st, "kind", None) != "easyspec" or st.workers < 2:
            continue
        if st.drafter not in config.placement.drafters:
            raise PlacementError(f"strategy {st.name!r} (workers: {st.workers}): add placement.drafters.{st.drafter}")
        d = config.placement.drafters[st.drafter]
        dpool, gpus = pools[d.pool], 1 if d.device == "gpu" else 0
        dfp = footprint(config.models.drafters[st.drafter])
        for rank in range(st.workers):
            name = easyspec_rank_name(st.name, rank)
            node = take(dpool, name, gpus, d.cpus, dfp.weight_bytes / 1e9)
            plan.shards.append(Shard(name, "easyspec", st.drafter, dpool.name, node.index, d.device, gpus, d.cpus,
                                     (0, dfp.layers), rank, st.workers, dfp.weight_bytes / 1e9,
                                     dpool.accelerator if gpus else None))
    return plan


def easyspec_rank_name(strategy: str, rank: int) -> str:
    return f"easyspec-{strategy}-rank{rank}"
