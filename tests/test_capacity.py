"""Capacity simulator (pure): roofline, Leviathan's formula, the event simulation, workload files, the CLI."""
from __future__ import annotations

import dataclasses
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError
from placement.capacity import Curve, MeasuredStep
from placement.hardware import KNOWN_DEVICES
from placement.roofline import Hardware, ModelShape, Row, step_time
import placement.simulate
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


def test_lookup_misses_draft_nothing_and_long_hits_pad_the_batch():
    """A lookup strategy whose steps draft 16 tokens a quarter of the time and none otherwise has the
    same mean draft as one drafting 4 every step, but a batched forward pads to its longest row."""
    rng = random.Random(0)
    sparse = StrategyModel("pld", "prompt_lookup", 4, 0.0, draft_share=0.25)
    samples = [sparse.sample_verify_tokens(rng) for _ in range(4000)]
    assert set(samples) == {1, 17}
    assert statistics.mean(samples) == pytest.approx(5, rel=0.05)
    assert StrategyModel("pld", "prompt_lookup", 4, 0.0).sample_verify_tokens(rng) == 5
    with pytest.raises(ValueError, match="draft_share"):
        StrategyModel("pld", "prompt_lookup", 4, 0.0, draft_share=0.0)
    padded = lambda rows: 0.1 + 0.01 * len(rows) * max(r.new for r in rows)   # noqa: E731
    even, uneven = (simulate(Replica(m, padded, max_batch=8), Arrivals("closed", 8, concurrency=8),
                             lambda r: 10, lambda r: 40, seed=2)
                    for m in (StrategyModel("pld", "prompt_lookup", 4, 0.0), sparse))
    assert uneven.throughput < 0.8 * even.throughput


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


def test_shared_node_slows_each_side_by_its_own_factor_while_both_run():
    # Drafter and verifier on one node, each 2x slower while the other runs: two jobs started together.
    from placement.simulate import BatchServer, Job, SharedNode, Sim

    sim = Sim()
    bus = SharedNode(sim)
    ends = []
    a = BatchServer(sim, lambda rows: 1.0, 1, bus=bus, shared_slowdown=2.0)
    b = BatchServer(sim, lambda rows: 0.5, 1, bus=bus, shared_slowdown=4.0)
    a.submit(Job("verify", Row(1, 0), 1, lambda: ends.append(("a", sim.now))))
    b.submit(Job("draft", Row(1, 0), 1, lambda: ends.append(("b", sim.now))))
    sim.run()
    # b needs 0.5 s alone: 2 s at 1/4 speed; meanwhile a did 2 s / 2 = 1 s of its 1 s: both end at 2 s.
    assert sorted(ends) == [("a", pytest.approx(2.0)), ("b", pytest.approx(2.0))]
    sim2, ends2 = Sim(), []
    bus2 = SharedNode(sim2)
    a2 = BatchServer(sim2, lambda rows: 1.0, 1, bus=bus2, shared_slowdown=2.0)
    b2 = BatchServer(sim2, lambda rows: 0.25, 1, bus=bus2, shared_slowdown=2.0)
    a2.submit(Job("verify", Row(1, 0), 1, lambda: ends2.append(("a", sim2.now))))
    b2.submit(Job("draft", Row(1, 0), 1, lambda: ends2.append(("b", sim2.now))))
    sim2.run()
    # b: 0.25 s alone -> 0.5 s at half speed; a has done 0.25 s, its last 0.75 s alone: ends at 1.25 s.
    assert ends2 == [("b", pytest.approx(0.5)), ("a", pytest.approx(1.25))]


def test_shared_node_forwards_take_turns_with_the_core_lease():
    # runtime.core_lease: a job that finds the other server's running waits for it, then runs at full speed.
    from placement.simulate import BatchServer, Job, SharedNode, Sim

    sim, ends = Sim(), []
    bus = SharedNode(sim, turns=True)
    a = BatchServer(sim, lambda rows: 1.0, 1, bus=bus, shared_slowdown=6.0)
    b = BatchServer(sim, lambda rows: 0.5, 1, bus=bus, shared_slowdown=6.0)
    a.submit(Job("verify", Row(1, 0), 1, lambda: ends.append(("a", sim.now))))
    b.submit(Job("draft", Row(1, 0), 1, lambda: ends.append(("b", sim.now))))
    a.submit(Job("verify", Row(1, 0), 1, lambda: ends.append(("a2", sim.now))))
    sim.run()
    # a runs 0-1 s; b waited and runs 1-1.5 s; a's second job waited behind b (first come): 1.5-2.5 s.
    assert ends == [("a", pytest.approx(1.0)), ("b", pytest.approx(1.5)), ("a2", pytest.approx(2.5))]


def _share(**kw):
    from placement.capacity import CpuNodeShare
    base = dict(cores=2, target_threads=2, drafter_threads=2, bus_gbs=20.0, target_gbs=10.0, drafter_gbs=5.0)
    return CpuNodeShare(**{**base, **kw})


def test_cpu_contention_from_cores_threads_and_bus():
    from placement.capacity import cpu_contention
    # 2 + 2 threads on 2 cores, bus not saturated (10 + 5 < 20): fair 4/2 = 2 each; gang: all of a
    # side's 2 threads are the 2 running of 4 in 1 of comb(4, 2) = 6 cases -> 6 each.
    assert cpu_contention(_share(oversubscription="fair")) == pytest.approx((2.0, 2.0))
    assert cpu_contention(_share(oversubscription="gang")) == pytest.approx((6.0, 6.0))
    # 2 + 1 threads on 2 cores, gang: target needs both running threads (1 of comb(3, 2) = 3) -> 3;
    # the drafter's one thread runs in 2 of 3 -> 1.5.
    assert cpu_contention(_share(drafter_threads=1)) == pytest.approx((3.0, 1.5))
    # 8 cores, no oversubscription, bus 20 GB/s against demands 16 + 8: max-min fair shares give the
    # drafter its 8 and the target 12: target x 16/12, drafter x 1.
    assert cpu_contention(_share(cores=8, target_gbs=16.0, drafter_gbs=8.0)) == pytest.approx((16 / 12, 1.0))
    # A demand above the bus is capped at it: both saturate it alone and get half each -> 2.
    assert cpu_contention(_share(cores=8, target_gbs=50.0, drafter_gbs=30.0)) == pytest.approx((2.0, 2.0))
    with pytest.raises(Exception, match="extra"):
        _share(bogus=1)


def _local_models_and_profile():
    from orchestrator.config import load_config
    cfg = load_config(ROOT / "cluster_configs/local.yaml")
    profile = {"memory_bw_gbs": 20.0, "target": {"tokens": {"1": 0.2, "8": 0.22, "128": 0.6},
                                                 "batch": {"1": 0.2, "16": 0.5}}}
    # A hybrid: lookup hits skip the drafter, so requests fall out of step and drafts overlap verifies.
    hybrid = StrategyModel("sd-0.5b-int8-hybrid", "hybrid", 6, 0.8, "qwen-0.5b-int8", model_share=0.5,
                           model_draft_len=4)
    return cfg, profile, [StrategyModel("plain", "plain"), hybrid]


def test_simulated_verifier_waits_for_drafting_requests_on_a_shared_node():
    """server.wait_for_drafting (auto: on a shared node): the simulated verifier, like the global verifier,
    waits for requests drafting now, so a hybrid's requests (lookup hits skip the drafter) verify together
    instead of one beside the other's drafting; off, they split and share the cores."""
    import dataclasses

    from placement.capacity import local_replicas

    cfg, profile, models = _local_models_and_profile()
    rep = local_replicas(cfg, profile, models, 0.0, {"sd-0.5b-int8-hybrid": 0.08})[("sd-0.5b-int8-hybrid", "local")]
    assert rep.wait_for_drafting
    off = dataclasses.replace(rep, wait_for_drafting=False)
    a = Arrivals("closed", 16, concurrency=4)
    p_len, o_len = (lambda r: 100), (lambda r: 64)
    on_run, off_run = simulate(rep, a, p_len, o_len, seed=3), simulate(off, a, p_len, o_len, seed=3)
    assert on_run.mean_verify_batch > off_run.mean_verify_batch + 0.5
    assert on_run.throughput > 1.1 * off_run.throughput
    plain = local_replicas(cfg, profile, models, 0.0, {})[("plain", "local")]
    assert not plain.wait_for_drafting           # nothing drafts


def test_drafter_on_a_separate_node_has_no_contention_and_is_faster_under_load():
    from placement.capacity import local_replicas
    from placement.workload import load_workload

    cfg, profile, models = _local_models_and_profile()
    reps = local_replicas(cfg, profile, models, 0.0, {"sd-0.5b-int8-hybrid": 0.08}, drafter_batch=16,
                          drafter_nodes=("shared", "separate"))
    shared, separate = reps[("sd-0.5b-int8-hybrid", "local")], reps[("sd-0.5b-int8-hybrid", "local+drafter-node")]
    assert shared.shared_bus and not separate.shared_bus
    assert shared.shared_turns          # runtime.core_lease (default): the drafter actor's forwards take turns
    unleased = local_replicas(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"core_lease": False})}),
                              profile, models, 0.0, {"sd-0.5b-int8-hybrid": 0.08})[("sd-0.5b-int8-hybrid", "local")]
    assert not unleased.shared_turns    # off: the contention model
    shared = unleased                   # this test: contention on a shared node against none on a node of its own
    assert (shared.verify_shared_slowdown, shared.draft_shared_slowdown) == pytest.approx((6.0, 6.0))  # 2+2 threads, 2 cores
    assert ("plain", "local+drafter-node") not in reps                  # nothing to place for plain
    wl = load_workload(ROOT / "cluster_configs/workloads/local-closed-loop.yaml")
    p_len, o_len = wl.sampler()
    a = Arrivals("closed", 8, concurrency=8)
    # the contention itself: the shared node's verifier not waiting for drafting requests (as the separate one)
    unsynced = dataclasses.replace(shared, wait_for_drafting=False)
    slow, fast = simulate(unsynced, a, p_len, o_len, seed=1), simulate(separate, a, p_len, o_len, seed=1)
    assert fast.throughput > 1.3 * slow.throughput
    assert fast.throughput > simulate(shared, a, p_len, o_len, seed=1).throughput    # lockstep there (auto) too
    one = Arrivals("closed", 1, concurrency=1)     # one request: drafter and target alternate, nothing to share
    assert simulate(separate, one, p_len, o_len, seed=1).throughput == pytest.approx(
        simulate(shared, one, p_len, o_len, seed=1).throughput, rel=1e-9)


def test_served_forwards_pay_the_profiled_serving_overhead_and_in_process_ones_do_not():
    from placement.capacity import local_replicas

    cfg, profile, models = _local_models_and_profile()
    rows = [Row(1, 100)] * 4
    bare = local_replicas(cfg, profile, models[:1], 0.0, {})[("plain", "local")].verify_step(rows)
    profile["served_overhead_s"] = {"1": 0.02, "16": 0.05}     # as launch.py profile writes it (JSON keys)
    served = local_replicas(cfg, profile, models[:1], 0.0, {})[("plain", "local")].verify_step(rows)
    in_process = local_replicas(cfg, profile, models[:1], 0.0, {}, in_process=True)[("plain", "local")].verify_step(rows)
    assert served == pytest.approx(bare + 0.02 + 0.03 * 3 / 15) and in_process == bare


def _bench_file(tmp_path, with_counts: bool):
    def rec(steps, step_tokens, drafted, draft_s, forwards):
        r = {"category": "humaneval", "steps": steps, "step_tokens": step_tokens, "drafted": drafted,
             "draft_s": draft_s, "verify_s": 0.2 * steps}
        if with_counts:
            r["draft_forwards"] = forwards
        return r
    data = {"records": {
        "plain": [rec(10, 10, 0, 0.0, {})],
        "sd-0.5b-int8-adaptive": [rec(10, 40, 40, 4.0, {"qwen-0.5b-int8": 40})],    # 0.1 s per forward
        # hybrid: 10 steps, 8 tokens drafted per step; 12 model forwards (3 steps of 4), the rest lookup
        "sd-0.5b-int8-hybrid": [rec(10, 50, 80, 1.5, {"qwen-0.5b-int8": 12})],
    }}
    path = tmp_path / ("counted.json" if with_counts else "uncounted.json")
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("with_counts,share", [(True, 12 / 40), (False, 15 / 40)])
def test_hybrid_model_share_from_counts_or_draft_seconds(tmp_path, with_counts, share):
    # Counted: 1.2 model forwards per step / 4 per model-drafted step (the plain SD's length) = 30%.
    # Uncounted: 0.15 s of drafting per step / 0.1 s per forward (the plain SD's) = 1.5 forwards -> 37.5%.
    from orchestrator.config import load_config
    from placement.capacity import bench_acceptance, draft_costs, strategy_models

    cfg = load_config(ROOT / "cluster_configs/local.yaml")
    wl = load_workload(ROOT / "cluster_configs/workloads/local-closed-loop.yaml")
    bench = bench_acceptance(_bench_file(tmp_path, with_counts), ["humaneval"])
    models = {m.name: m for m in strategy_models(cfg, wl, bench, {})}
    hybrid = models["sd-0.5b-int8-hybrid"]
    assert hybrid.gamma == 8 and hybrid.model_draft_len == pytest.approx(4.0)
    assert hybrid.model_share == pytest.approx(share)
    assert hybrid.draft_forwards() == pytest.approx(share * 4)
    # Calibrated per-forward costs reproduce each strategy's draft seconds per step at batch 1.
    costs = draft_costs(list(models.values()), bench)
    for name in ("sd-0.5b-int8-adaptive", "sd-0.5b-int8-hybrid"):
        assert costs[name][0] * models[name].draft_forwards() == pytest.approx(bench[name].draft_s_per_step)


def test_duodecoding_costs_come_from_its_own_records(tmp_path):
    """A pipelined strategy's target never waits for drafts, so its draft seconds say nothing of the
    drafter: its drafter busy time and its verify time (measured with its own threads, beside the
    drafter) are taken instead, and no contention factor is added on top."""
    from orchestrator.config import load_config
    from placement.capacity import bench_acceptance, draft_costs, local_replicas, strategy_models

    cfg = load_config(ROOT / "cluster_configs/local.yaml")
    wl = load_workload(ROOT / "cluster_configs/workloads/local-bench-batch1.yaml")
    duo = {"category": "humaneval", "steps": 10, "step_tokens": 25, "drafted": 20, "draft_s": 0.0,
           "verify_s": 4.0, "seconds": 5.0, "drafter_idle_fraction": 0.2, "draft_budgets": [3] * 10}
    path = tmp_path / "duo.json"
    path.write_text(json.dumps({"records": {"plain": [{"category": "humaneval", "steps": 10, "step_tokens": 10,
                                                        "drafted": 0, "draft_s": 0.0, "verify_s": 2.0}],
                                            "duo-0.5b": [duo]}}))
    bench = bench_acceptance(path, ["humaneval"])
    assert bench["duo-0.5b"].pipelined_verify_s == pytest.approx(0.4)
    assert bench["duo-0.5b"].pipelined_draft_s == pytest.approx(0.8 * 5.0 / 10)
    models = [m for m in strategy_models(cfg, wl, bench, {}) if m.name in ("plain", "duo-0.5b")]
    costs = draft_costs(models, bench)
    duo_model = next(m for m in models if m.name == "duo-0.5b")
    assert costs["duo-0.5b"][0] * duo_model.draft_forwards() == pytest.approx(0.4)
    profile = {"target": {"tokens": {"1": 0.1, "16": 0.2}, "batch": {"1": 0.1, "4": 0.15}},
               "memory_bw_gbs": 20.0}
    reps = local_replicas(cfg, profile, models, 0.0, {"duo-0.5b": costs["duo-0.5b"][0]}, in_process=True,
                          own_verify_s={"duo-0.5b": 0.4})
    rep = reps[("duo-0.5b", "local")]
    assert rep.verify_step([Row(duo_model.verify_tokens, 100)]) == pytest.approx(0.4)
    assert rep.verify_shared_slowdown == rep.draft_shared_slowdown == 1.0
    assert reps[("plain", "local")].verify_step([Row(1, 100)]) == pytest.approx(0.1)


def test_drafter_prefill_runs_after_the_first_token_on_the_drafter():
    # One request: prefill 0.1 s (first token), drafter prefill 0.3 s, then 2 steps of 4 x 0.01 + 0.1 s
    # (alpha 1: 5 tokens per step; 11 tokens = 1 + 5 + 5).
    sd = StrategyModel("sd", "draft_model", 4, 1.0, "d")
    rep = Replica(sd, lambda rows: 0.1, max_batch=8, draft_step=lambda rows: 0.01,
                  draft_prefill_step=lambda rows: 0.3)
    res = simulate(rep, Arrivals("closed", 1, concurrency=1), lambda r: 10, lambda r: 11)
    assert res.makespan == pytest.approx(0.1 + 0.3 + 2 * (0.04 + 0.1))


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


def test_a_queue_past_capacity_holds_throughput_near_capacity():
    """A batching server whose prefill is expensive: past saturation, requests wait for a decode slot
    (server.concurrency) instead of piling prefills in front of every decode step. Without the limit
    (concurrency = 10**6) decoding starves and the throughput collapses (the bug this guards against)."""
    def step(rows):      # 5 ms per forward + 0.1 ms per token: a 500-token prefill costs 55 ms
        return 0.005 + 0.0001 * sum(r.new for r in rows)

    def run(rate, concurrency):
        rep = Replica(StrategyModel("plain", "plain"), step, max_batch=16, concurrency=concurrency)
        return simulate(rep, Arrivals("poisson", 400, rate=rate), lambda r: 500, lambda r: 64, seed=3)
    capacity = max(run(rate, 16).throughput for rate in (10, 20, 30))
    for rate in (60, 120):
        assert run(rate, 16).throughput > 0.8 * capacity
        assert run(rate, 10 ** 6).throughput < 0.5 * capacity
    busy = run(120, 16)
    # at no time more than 16 requests between their first token and their end
    events = sorted([(q.first_token, 1) for q in busy.requests] + [(q.done, -1) for q in busy.requests],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    assert peak == 16


def test_request_trace_replays_a_bench_record_step_by_step():
    from placement.speculative_model import RequestTrace

    record = {"draft_lengths": [0, 6, 0, 16], "accepted_lengths": [0, 2, 0, 16]}
    trace = RequestTrace.from_record(record)
    pld = StrategyModel("pld", "prompt_lookup", 2, 0.5)
    rng = random.Random(0)
    assert [pld.sample_step(rng, trace, i) for i in range(5)] == [(1, 1), (7, 3), (1, 1), (17, 17), (1, 1)]
    assert RequestTrace.from_record({"steps": 3}) is None                # older bench files: no trace
    with pytest.raises(ValueError, match="accepted"):
        RequestTrace(((2, 3),))


def test_requests_replay_the_measured_traces_in_turn_and_the_slowest_sets_the_wave():
    """Two prompts whose drafts are all accepted and two whose drafts never are: in a wave of 4 every
    trace is dealt once, and the wave lasts as long as the all-rejecting requests (31 steps), where
    the pooled alpha (the same mean tokens per step) would finish everything in about 2/3 of that."""
    from placement.speculative_model import RequestTrace

    full, none = RequestTrace(((4, 4),)), RequestTrace(((4, 0),))
    mixed = StrategyModel("sd", "draft_model", 4, alpha_for_mean_accepted(3.0, 4), request_mix=(full, none) * 2)
    free_drafts = lambda rows: 0.0   # noqa: E731
    rep = Replica(mixed, lambda rows: 0.1, max_batch=8, draft_step=free_drafts, drafter_max_batch=8)
    res = simulate(rep, Arrivals("closed", 4, concurrency=4), lambda r: 10, lambda r: 32, seed=1)
    assert sorted(q.trace.steps[0][1] for q in res.requests) == [0, 0, 4, 4]
    assert res.makespan == pytest.approx(0.1 * 32)               # prefill + 31 one-token steps
    pooled = simulate(Replica(StrategyModel("sd", "draft_model", 4, mixed.alpha), lambda rows: 0.1, max_batch=8,
                              draft_step=free_drafts, drafter_max_batch=8),
                      Arrivals("closed", 4, concurrency=4), lambda r: 10, lambda r: 32, seed=1)
    assert pooled.makespan < 0.75 * res.makespan


@pytest.mark.parametrize("fraction,merged", [(0.0, False), (0.1, True)])
def test_verifier_gathering_re_merges_requests_like_the_global_verifier(fraction, merged):
    """Requests 0 and 1 ran together; request 1 comes back 50 ms after request 0 (its host work).
    A fixed 5 ms wait runs them apart from then on; waiting up to 10% of the last 1 s forward
    takes both, and starts as soon as the second arrives rather than at the deadline."""
    from placement.simulate import BatchServer, Job, Sim

    sim = Sim()
    server = BatchServer(sim, lambda rows: 1.0, 8, 0.005, gather_fraction=fraction)
    starts: list[tuple[float, int]] = []
    orig = server._try_start

    def submit(owner: int, at: float):
        sim.at(at, lambda: server.submit(Job("verify", Row(1, 10), 1, lambda: None, owner=owner)))

    def spy(waited: bool = False):
        before = len(server.queue)
        orig(waited)
        if len(server.queue) < before:
            starts.append((sim.now, before - len(server.queue)))
    server._try_start = spy
    submit(0, 0.0)
    submit(1, 0.0)
    submit(0, 1.0)
    submit(1, 1.05)
    sim.run()
    assert starts[0] == (0.0, 2)
    if merged:
        assert starts[1] == (pytest.approx(1.05), 2)
    else:
        assert [n for _, n in starts[1:]] == [1, 1]


def test_staggered_clients_prefill_the_first_request_alone_then_the_rest_together():
    """As measured through gRPC: client 1 finds the verifier idle, clients 2-4 queue behind its
    prefill and prefill in one batch (TTFT 0.9 s for the first, 3.7 s for the others)."""
    prefill = lambda rows: 1.0 if len(rows) == 1 else 2.0 if max(r.new for r in rows) > 1 else 0.1  # noqa: E731
    rep = Replica(StrategyModel("plain", "plain"), prefill, max_batch=8)
    res = simulate(rep, Arrivals("closed", 4, concurrency=4, stagger_s=0.001), lambda r: 100, lambda r: 2)
    ttft = sorted(q.first_token - q.arrival for q in res.requests)
    assert ttft[0] == pytest.approx(1.0)
    assert ttft[1:] == pytest.approx([3.0 - 0.001 * i for i in (1, 2, 3)][::-1], abs=0.003)


def shared_device_run(strategy, rate: float) -> float:
    """Median per-token latency of a Poisson stream on a GPU-like replica whose drafter runs on the
    verifier's devices (its jobs queue there): a 20 ms weight-bound forward, a 3 ms draft step."""
    rep = Replica(strategy, lambda rows: 0.02 + 0.0002 * sum(r.new for r in rows), max_batch=16,
                  draft_step=lambda rows: 0.003, drafter_max_batch=16, drafter_shared=True,
                  batch_wait_s=0.005, gather_fraction=0.1)
    return simulate(rep, Arrivals("poisson", 120, rate=rate), lambda r: 50, lambda r: 96, seed=2).tpot_p50


@pytest.mark.parametrize("broken", [False, True])
def test_goodput_drafts_on_a_drafter_sharing_the_verifiers_devices(broken, monkeypatch):
    """A drafter on the target's GPUs queues behind their forwards in the simulator (a real deployment
    time-slices the GPU between the two processes); that wait is the forwards' time, already in the step
    cost. Charged as drafting, the scheduler found a 3 ms draft step dearer than a 20 ms forward and did
    not draft (8xA100: twice fixed drafting's per-token latency): with the draft's own seconds it keeps
    most of fixed drafting's latency gain."""
    plain = StrategyModel("plain", "plain")
    fixed = StrategyModel("sd-k5", "draft_model", 5, 0.75, "d")
    goodput = StrategyModel("sd-goodput", "draft_model", 8, 0.75, "d", goodput=True)
    if broken:       # the queueing charged as drafting
        monkeypatch.setattr(placement.simulate, "draft_charged_from", lambda rep, job, asked: asked)
    for rate, gain in ((5.0, 0.75), (20.0, 0.85)):
        base, with_fixed, with_goodput = (shared_device_run(m, rate) for m in (plain, fixed, goodput))
        assert with_fixed < gain * base
        if broken:
            assert with_goodput > 0.95 * base, (rate, base, with_goodput)
        else:
            assert with_goodput < gain * base, (rate, base, with_fixed, with_goodput)


def test_simulated_goodput_scheduler_never_loses_to_plain_decoding():
    """The simulator runs the server's goodput scheduler (orchestrator/goodput.py) against its own
    verifier. On a machine that turns compute-bound with load (150 ms + 12 ms per verified token), a
    fixed draft of 6 beats plain decoding alone and loses to it at 16 requests; the scheduler's choice
    wins alone and at 4, and stays within 5% of plain decoding at 8 and 16."""
    def verify(rows):
        return 0.15 + 0.012 * sum(r.new for r in rows)

    def run(model, c):      # gathering as the server's global verifier does (5 ms, 10% of the last forward)
        rep = Replica(model, verify, max_batch=16, draft_step=lambda rows: 0.02, drafter_max_batch=16,
                      batch_wait_s=0.005, gather_fraction=0.1)
        return simulate(rep, Arrivals("closed", 3 * c, concurrency=c), lambda r: 20, lambda r: 48, seed=1).throughput

    plain = StrategyModel("plain", "plain")
    fixed = StrategyModel("sd-k6", "draft_model", 6, 0.7, "d")
    goodput = StrategyModel("sd-goodput", "draft_model", 8, 0.7, "d", goodput=True)
    assert run(fixed, 1) > 1.2 * run(plain, 1) and run(fixed, 16) < run(plain, 16)
    assert run(goodput, 1) > 1.3 * run(plain, 1) and run(goodput, 4) > 1.05 * run(plain, 4)
    for c in (8, 16):       # drafting no longer pays: within what its model leaves out (batches that split)
        assert run(goodput, c) >= 0.95 * run(plain, c), c


def test_closed_loop_levels_send_the_serving_benchs_request_counts(monkeypatch):
    """A closed-loop level sends what scripts/serving_bench.py sends: max(c x requests_per_client,
    min_requests) requests (local-serving-2pc.yaml: two per client; local-serving.yaml: one)."""
    from types import SimpleNamespace

    import placement.capacity as capacity

    sent = []
    monkeypatch.setattr(capacity, "simulate_repeated",
                        lambda rep, arrivals, *a, **k: sent.append(arrivals.requests) or "result")
    for name, expected in (("local-serving-2pc", [8, 8, 8, 16, 32, 64]), ("local-serving", [8, 8, 8, 8, 16, 32])):
        sent.clear()
        capacity.sweep({("plain", "one"): SimpleNamespace(devices=1)},
                       load_workload(ROOT / "cluster_configs" / "workloads" / f"{name}.yaml"))
        assert sent == expected, name


def test_predictions_are_compared_with_the_mean_of_repeated_waves(tmp_path):
    """serving_bench --repeats measures each level several times; the simulator's error is against their
    mean (the last wave alone, as a dict keyed by level kept it, compared with one of them)."""
    from types import SimpleNamespace

    from orchestrator.capacity_cli import compare

    waves = [{"strategy": "plain", "concurrency": 8, "tokens_per_s": tps, "mean_verify_batch": 7.0, "repeat": r}
             for r, tps in enumerate((30.0, 34.0))]
    path = tmp_path / "serving.json"
    path.write_text(json.dumps({"throughput": waves}))
    # a bench JSON beside it (one request at a time: concurrency 1), read whichever file comes first
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"records": {"plain": [{"category": "humaneval", "tokens_per_s": 6.0},
                                                       {"category": "qa", "tokens_per_s": 8.0}]}}))
    point = SimpleNamespace(strategy="plain", level=8, placement="config:local", throughput=33.0,
                            result=SimpleNamespace(mean_verify_batch=8.0))
    alone = SimpleNamespace(strategy="plain", level=1, placement="config:local", throughput=7.7,
                            result=SimpleNamespace(mean_verify_batch=1.0))
    for files in ([path, bench], [bench, path]):
        _, rows = compare([point, alone], [str(f) for f in files])
        assert rows[0]["measured"] == pytest.approx(32.0) and rows[0]["error"] == pytest.approx(33.0 / 32.0 - 1)
        assert rows[1]["measured"] == pytest.approx(7.0), files
