"""Placement planner (pure): shipped cluster configs plan; infeasible plans name what does not fit."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, EngineConfig, load_config
from placement.plan import PlacementError, plan_placement

ROOT = Path(__file__).resolve().parents[1]


def test_8xa100_plan():
    plan = plan_placement(load_config(ROOT / "cluster_configs/8xA100.yaml"))
    targets = [s for s in plan.shards if s.role == "target"]
    assert [s.name for s in targets] == [f"target-shard-{i}" for i in range(4)]
    assert {s.tp_rank for s in targets} == {0, 1, 2, 3} and all(s.layers == (0, 64) for s in targets)
    gpus = sum(s.gpus for s in plan.shards)
    assert gpus == 6 and all(s.accelerator == "A100-80GB" for s in plan.shards if s.gpus)
    assert sum(s.cpus for s in plan.shards if s.device == "cpu") == 32
    assert len(plan.bundles()) == len(plan.shards)
    assert plan.bundles()[0] == {"CPU": 1.0, "pool:a100": 0.001, "GPU": 1.0, "accelerator_type:A100-80GB": 0.001}
    assert "target-shard-0" in plan.table()


def test_2node_hetero_plan_splits_layers_and_drafts_on_cpu_node():
    plan = plan_placement(load_config(ROOT / "cluster_configs/2node-hetero.yaml"))
    stages = sorted({s.layers for s in plan.shards if s.role == "target"})
    assert stages == [(0, 32), (32, 64)]
    drafters = [s for s in plan.shards if s.role == "drafter"]
    assert len(drafters) == 4 and all(s.pool == "cpu" and s.gpus == 0 for s in drafters)
    assert [s.name for s in drafters] == [f"drafter-cpu-{i}" for i in range(4)]


def base(**placement) -> dict:
    return {
        "models": {"target": {"source": "/m/big", "size_hint": [70_000_000_000, 80]},
                   "drafters": {"d": {"source": "qwen2.5-coder-0.5b"}}},
        "node_pools": [{"name": "g", "cpus": 8, "memory_gb": 64, "accelerator": "A100-40GB", "accelerators_per_node": 2},
                       {"name": "c", "cpus": 4, "memory_gb": 2}],
        "placement": placement,
    }


def test_target_too_big_names_device_and_fix():
    cfg = EngineConfig.model_validate(base(target={"pool": "g", "tensor_parallel": 2}))
    with pytest.raises(PlacementError, match=r"70\.0 GB per A100-40GB.*tensor_parallel or pipeline_parallel"):
        plan_placement(cfg)


def test_tensor_parallel_beyond_node():
    cfg = EngineConfig.model_validate(base(target={"pool": "g", "tensor_parallel": 4}))
    with pytest.raises(PlacementError, match="exceeds the 2 accelerators per node of pool 'g'"):
        plan_placement(cfg)


def test_drafter_host_memory_shortage_is_named():
    raw = base(target={"pool": "g", "tensor_parallel": 2}, drafters={"d": {"pool": "c", "cpus": 2, "replicas": 2}})
    raw["models"]["target"]["size_hint"] = [1_000_000_000, 16]
    cfg = EngineConfig.model_validate(raw)
    with pytest.raises(PlacementError, match=r"drafter-cpu-1 does not fit in pool 'c'"):
        plan_placement(cfg)


def test_unknown_pool_is_a_config_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("models: {target: {source: x}}\nnode_pools: [{name: a, cpus: 1, memory_gb: 1}]\n"
                 "placement: {target: {pool: b}}\n")
    with pytest.raises(ConfigError, match="placement.target.pool"):
        load_config(p)


def test_unknown_accelerator_is_named():
    cfg = base(target={"pool": "g", "tensor_parallel": 2})
    cfg["node_pools"][0]["accelerator"] = "TPU-v9"
    with pytest.raises(PlacementError, match="node_pools.g.accelerator"):
        plan_placement(EngineConfig.model_validate(cfg))


def test_dry_run_prints_plan_without_starting_anything():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "launch.py", "--cluster", "cluster_configs/8xA100.yaml", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "target-shard-3" in run.stdout and "drafter-cpu-3" in run.stdout and "bundles" in run.stdout
