"""Placement groups on a simulated multi-node Ray cluster (fake GPUs and pool resources)."""
from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from placement.plan import PlacementError, plan_placement  # noqa: E402
from placement.ray_groups import bundle_nodes, create_placement_group, node_resources, shard_strategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    gpu = c.add_node(num_cpus=32, num_gpus=4, resources=node_resources("gpu", "A100-80GB"))
    cpu = c.add_node(num_cpus=64, num_gpus=0, resources=node_resources("cpu"))
    a100 = c.add_node(num_cpus=64, num_gpus=8, resources=node_resources("a100", "A100-80GB"))
    ray.init(address=c.address, log_to_driver=False)
    yield c, gpu.node_id, cpu.node_id, a100.node_id
    ray.shutdown()
    c.shutdown()


def test_2node_hetero_bundles_land_on_their_pools(cluster):
    _, gpu_node, cpu_node, _ = cluster
    plan = plan_placement(load_config(ROOT / "cluster_configs/2node-hetero.yaml"))
    pg = create_placement_group(plan, "2node-hetero")
    nodes = bundle_nodes(pg)
    for i, shard in enumerate(plan.shards):
        assert nodes[i] == (gpu_node if shard.pool == "gpu" else cpu_node), shard.name
    assert create_placement_group(plan, "2node-hetero").id == pg.id      # reused by name

    @ray.remote(num_cpus=1)
    class Where:
        def node(self):
            return ray.get_runtime_context().get_node_id()

    actor = Where.options(name="drafter-cpu-2", scheduling_strategy=shard_strategy(pg, plan, "drafter-cpu-2")).remote()
    assert ray.get(actor.node.remote()) == cpu_node
    ray.kill(actor)
    ray.util.remove_placement_group(pg)


def test_8xa100_plan_fits_its_node(cluster):
    a100_node = cluster[3]
    plan = plan_placement(load_config(ROOT / "cluster_configs/8xA100.yaml"))
    pg = create_placement_group(plan, "8xA100")
    assert set(bundle_nodes(pg).values()) == {a100_node}
    ray.util.remove_placement_group(pg)


def test_unschedulable_plan_fails_naming_bundles(cluster):
    cfg = load_config(ROOT / "cluster_configs/8xA100.yaml")
    # same plan, but the 8 GPUs are asked of a pool no Ray node advertises
    pools = [p.model_copy(update={"name": "elsewhere"}) for p in cfg.node_pools]
    placement = cfg.placement.model_copy(update={
        "target": cfg.placement.target.model_copy(update={"pool": "elsewhere"}),
        "drafters": {k: d.model_copy(update={"pool": "elsewhere"}) for k, d in cfg.placement.drafters.items()}})
    plan = plan_placement(cfg.model_copy(update={"node_pools": pools, "placement": placement}))
    with pytest.raises(PlacementError, match="target-shard-0"):
        create_placement_group(plan, "nowhere", timeout_s=3)
