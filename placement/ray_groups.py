"""Create (or reuse) the Ray placement group of a plan, in one place.

Each shard of `placement.plan.Plan` is one bundle; a node pool is pinned by the
custom resource `pool:<name>` that the pool's Ray nodes are started with (and
`accelerator_type:<device>` for GPUs). A plan that Ray cannot schedule fails
here, naming the bundles, before any actor starts.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import get_placement_group, placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from placement.plan import Plan, PlacementError


def node_resources(pool: str, accelerator: str | None = None) -> dict[str, float]:
    """Custom resources a node of `pool` must advertise (`ray start --resources=...`)."""
    res = {f"pool:{pool}": 1000.0}
    if accelerator:
        res[f"accelerator_type:{accelerator}"] = 1000.0
    return res


def create_placement_group(plan: Plan, name: str, timeout_s: float = 60.0):
    """The plan's placement group, created once and reused by name."""
    try:
        pg = get_placement_group(name)
    except ValueError:
        pg = placement_group(plan.bundles(), strategy="PACK", name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        wanted = ", ".join(f"{s.name}={b}" for s, b in zip(plan.shards, plan.bundles()))
        raise PlacementError(f"Ray could not place {name!r} within {timeout_s:.0f}s; bundles: {wanted}; "
                             f"cluster resources: {ray.available_resources()}") from None
    return pg


def shard_strategy(pg, plan: Plan, shard_name: str) -> PlacementGroupSchedulingStrategy:
    """Scheduling strategy that puts an actor into its shard's bundle."""
    index = [s.name for s in plan.shards].index(shard_name)
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def bundle_nodes(pg) -> dict[int, str]:
    """Bundle index -> Ray node id (for checks and the plan table)."""
    return dict(placement_group_table(pg)["bundles_to_node_id"])
