"""Capacity simulator (pure): roofline, Leviathan's formula, the event simulation, workload files, the CLI."""
from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError
from placement.capacity import Curve, MeasuredStep
from placement.hardware import KNOWN_DEVICES
from placement.roofline import Hardware, ModelShape, Row, step_time
from placement.simulate import Arrivals, Replica, simulate
from placement.speculative_model import (StrategyModel, alpha_for_mean_accepted, expected_tokens,
                                         sample_emitted)
from placement.workload import load_workload

ROOT = Path(__file__).resolve().parents[1]

# 1e9 params in bf16, 10 layers, hidden 1000, KV width 100: numbers easy to follow by hand.
SHAPE = ModelShape(params=1_000_000_000, layers=10, hidden=1000, kv_width=100, vocab=1000, bytes_per_param=2)
HW = Hardware("test", peak_flops=100e12, mem_bw=1000e9, link_bw=100e9, link_latency_s=0.0, mem_eff=1, flops_eff=1)


def test_roofline_memory_bound_decode():
    # 2 GB of weights + 1000 tokens x (2 * 10 * 100 * 2 B = 4000 B) of KV at 1 TB/s; 2 GFLOP is far under.
    assert step_time(SHAPE, HW, [Row(1, 999)]) == pytest.approx((2e9 + 1000 * 4000) / 1e12)


def test_roofline_compute_bound_prefill_and_batching_shares_weights():
    # 4096 tokens: 2 * 1e9 * 4096 FLOPs + attention 4 * 10 * 1000 * 4096 * 4096 at 100 TFLOP/s.
    flops = 2e9 * 4096 + 4 * 10 * 1000 * 4096 * 4096
    assert step_time(SHAPE, HW, [Row(4096, 0)]) == pytest.approx(flops / 100e12)
    one = step_time(SHAPE, HW, [Row(1, 0)])
    eight = step_time(SHAPE, HW, [Row(1, 0)] * 8)
    assert eight < 1.01 * one          # weights streamed once per batched step


def test_roofline_tensor_parallel_adds_two_allreduces_per_layer():
    # TP 2: half the bytes (weights + the token's 4000 B of KV) per device, + 2 * 10 layers * a ring
    # all-reduce of 1 token x 1000 x 2 B.
    ring = 2 * (2 - 1) / 2 * 2000 / 100e9
    assert step_time(SHAPE, HW, [Row(1, 0)], tp=2) == pytest.approx((2e9 + 4000) / 2 / 1e12 + 20 * ring)


def test_leviathan_expected_tokens_and_inverse():
    assert expected_tokens(0.8, 4) == pytest.approx((1 - 0.8 ** 5) / 0.2)
    assert expected_tokens(0.0, 4) == 1.0 and expected_tokens(1.0, 4) == 5.0
    assert alpha_for_mean_accepted(expected_tokens(0.7, 6), 6) == pytest.approx(0.7, abs=1e-9)
    rng = random.Random(0)
    draws = [sample_emitted(0.8, 4, rng) for _ in range(40000)]
    assert statistics.mean(draws) == pytest.approx(expected_tokens(0.8, 4), rel=0.02)


def test_strategy_step_costs():
    sd = StrategyModel("sd", "draft_model", 4, 0.8, "d")
    duo = StrategyModel("duo", "duodecoding", 4, 0.8, "d")
    assert sd.step_time(0.01, 0.1) == pytest.approx(0.14)        # draft then verify
    assert duo.step_time(0.01, 0.1) == pytest.approx(0.1)        # overlapped: max
    es = StrategyModel("es", "easyspec", 4, 0.8, "d", easyspec_speedup=2.0, easyspec_alpha_penalty=0.1)
    assert es.draft_forwards() == 2.0 and es.effective_alpha == pytest.approx(0.72)
    assert StrategyModel("cs", "cs_drafting", 6, 0.8, "d", review_chunk=2).draft_forwards() == 3
    with pytest.raises(ValueError, match="unknown family"):
        StrategyModel("x", "nope")


def test_des_md1_mean_wait_matches_pollaczek_khinchine():
    # One-token requests, deterministic service D, no batching: an M/D/1 queue; W = rho D / (2 (1 - rho)).
    d, rho = 0.1, 0.7
    rep = Replica(StrategyModel("plain", "plain"), lambda rows: d, max_batch=1)
    res = simulate(rep, Arrivals("poisson", 20000, rate=rho / d), lambda r: 10, lambda r: 1, seed=3)
    wait = statistics.mean(q.first_token - q.arrival for q in res.requests) - d
    assert wait == pytest.approx(rho * d / (2 * (1 - rho)), rel=0.05)


@pytest.mark.parametrize("max_batch,expected", [(8, 4 / 0.1), (1, 1 / 0.1)])
def test_des_closed_loop_throughput_is_concurrency_over_step(max_batch, expected):
    rep = Replica(StrategyModel("plain", "plain"), lambda rows: 0.1, max_batch=max_batch)
    res = simulate(rep, Arrivals("closed", 40, concurrency=4), lambda r: 10, lambda r: 32)
    assert res.throughput == pytest.approx(expected, rel=0.01)


def test_des_single_drafter_serializes_concurrent_requests():
    # Draft 4 x 0.1 s on one drafter that drafts one request at a time: 4 requests cannot beat 1/0.4 steps/s.
    sd = StrategyModel("sd", "draft_model", 4, 1.0, "d")
    rep = Replica(sd, lambda rows: 0.01, max_batch=8, draft_step=lambda rows: 0.1)
    res = simulate(rep, Arrivals("closed", 4, concurrency=4), lambda r: 10, lambda r: 101)
    assert res.throughput == pytest.approx(5 / 0.41, rel=0.05)      # 5 tokens per step, steps one after another


def test_measured_step_interpolates_and_extrapolates():
    c = Curve({1: 0.2, 8: 0.2, 16: 0.3})
    assert c(4) == pytest.approx(0.2) and c(12) == pytest.approx(0.25) and c(32) == pytest.approx(0.5)
    m = MeasuredStep({"tokens": {"1": 0.2, "16": 0.3}, "batch": {"1": 0.2, "4": 0.24}})
    assert m([Row(16, 5)]) == pytest.approx(0.3) and m([Row(1, 5)] * 4) == pytest.approx(0.24)


def test_workload_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "w.yaml"
    bad.write_text("name: w\narrivals: {kind: poisson, rates: [1]}\n"
                   "mix: [{name: a, weight: 1, prompt_tokens: {kind: fixed, value: 10}, "
                   "output_tokens: {kind: uniform, low: 9, high: 3}}]\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_workload(bad)
    msg = str(e.value)
    assert str(bad) in msg and "bogus" in msg and "mix.0.output_tokens.uniform" in msg


def test_shipped_workloads_load():
    names = sorted(p.name for p in (ROOT / "cluster_configs/workloads").glob("*.yaml"))
    assert {"spec-bench-mix.yaml", "local-closed-loop.yaml", "chat-poisson.yaml", "code-humaneval.yaml"} <= set(names)
    for n in names:
        load_workload(ROOT / "cluster_configs/workloads" / n)


def test_every_hardware_figure_has_a_source():
    assert {"A100-40GB", "A100-80GB", "H100-80GB", "H200"} <= set(KNOWN_DEVICES)
    assert any(d.kind == "cpu" for d in KNOWN_DEVICES.values())
    assert all(len(d.source) > 20 for d in KNOWN_DEVICES.values())


def test_simulate_cli_8xa100_recommends_a_plan(tmp_path):
    out = subprocess.run(
        [sys.executable, "launch.py", "simulate", "--cluster", "cluster_configs/8xA100.yaml",
         "--workload", "cluster_configs/workloads/spec-bench-mix.yaml", "--requests", "20", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "recommended plan:" in out.stdout and "device-h per Mtok" in out.stdout
    for png in ("throughput_vs_latency.png", "speedup_vs_concurrency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "simulation.json").read_text())
    strategies = {p["strategy"] for p in result["points"]}
    assert {"plain", "pld"} <= strategies and any(s.startswith("duodecoding") for s in strategies)
    assert any(s.startswith("cs-drafting") for s in strategies) and any(s.startswith("easyspec") for s in strategies)


def test_shared_bus_halves_speed_while_both_run():
    # Drafter and verifier on one memory bus: two 1 s jobs started together both end at 2 s.
    from placement.simulate import BatchServer, SharedBus, Sim
    from placement.simulate import Job

    sim = Sim()
    bus = SharedBus(sim)
    ends = []
    a = BatchServer(sim, lambda rows: 1.0, 1, bus=bus)
    b = BatchServer(sim, lambda rows: 0.5, 1, bus=bus)
    a.submit(Job("verify", Row(1, 0), 1, lambda: ends.append(("a", sim.now))))
    b.submit(Job("draft", Row(1, 0), 1, lambda: ends.append(("b", sim.now))))
    sim.run()
    # b needs 0.5 s alone: 1 s at half speed; a then has 0.5 s left at full speed: ends at 1.5 s.
    assert ends == [("b", pytest.approx(1.0)), ("a", pytest.approx(1.5))]


def test_drafter_sharing_the_verifiers_devices_runs_its_own_model_there():
    # Co-located drafter: each step is a draft (4 x 0.01 s, the drafter's step) then a verify (0.1 s), in series.
    sd = StrategyModel("sd", "draft_model", 4, 1.0, "d")
    rep = Replica(sd, lambda rows: 0.1, max_batch=8, draft_step=lambda rows: 0.01, drafter_shared=True)
    res = simulate(rep, Arrivals("closed", 1, concurrency=1), lambda r: 10, lambda r: 51)
    assert res.makespan == pytest.approx(0.1 + 10 * (0.04 + 0.1))


def test_open_loop_throughput_is_the_offered_load_below_capacity_and_capacity_above():
    rep = Replica(StrategyModel("plain", "plain"), lambda rows: 0.01, max_batch=1)
    stable = simulate(rep, Arrivals("poisson", 2000, rate=5.0), lambda r: 10, lambda r: 10, seed=1)
    assert stable.throughput == pytest.approx(5.0 * 10, rel=0.05)           # offered: 5 req/s x 10 tokens
    overloaded = simulate(rep, Arrivals("poisson", 2000, rate=200.0), lambda r: 10, lambda r: 10, seed=1)
    assert overloaded.throughput == pytest.approx(1 / 0.01, rel=0.05)       # one token per 10 ms step
