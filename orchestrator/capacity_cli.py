"""`launch.py simulate` and `launch.py profile`: printing, plots and files around placement/capacity.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from core.config import ConfigError
from orchestrator.config import load_config


def _alphas(pairs: list[str] | None) -> dict[str, float]:
    out = {}
    for p in pairs or []:
        key, _, value = p.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise ConfigError(f"--alpha {p!r}: expected NAME=VALUE with a number") from None
    return out


def table(points) -> str:
    head = (f"{'strategy':<26} {'placement':<30} {'level':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'tpot p50':>9} {'tpot p99':>9} {'dev-h/Mtok':>10} {'batch':>6}")
    rows = [head, "-" * len(head)]
    for p in points:
        r = p.result
        rows.append(f"{p.strategy:<26} {p.placement:<30} {p.level:>6g} {p.throughput:>8.1f} {r.ttft_p50 * 1e3:>7.0f}ms "
                    f"{r.ttft_p99 * 1e3:>7.0f}ms {r.tpot_p50 * 1e3:>7.1f}ms {r.tpot_p99 * 1e3:>7.1f}ms "
                    f"{r.device_hours_per_mtok:>10.3f} {r.mean_verify_batch:>6.2f}")
    return "\n".join(rows)


def compare(points, measured_files: list[str], categories: list[str] | None = None) -> tuple[str, list[dict]]:
    """Predicted vs measured tokens/s at the same (strategy, concurrency): serving_bench JSONs
    (`throughput` rows), or a bench JSON (`records`: one request at a time, so concurrency 1;
    mean of per-request tokens/s over `categories`)."""
    measured = {}
    waves: dict[tuple, list[dict]] = {}
    for f in measured_files:
        data = json.loads(Path(f).read_text())
        for m in data.get("throughput", []):       # repeated waves (serving_bench --repeats): their mean
            waves.setdefault((m["strategy"], m["concurrency"]), []).append(m)
        for name, recs in data.get("records", {}).items():
            rs = [r for r in recs if not categories or r["category"] in categories]
            if rs:
                measured[(name, 1)] = {"tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs),
                                       "mean_verify_batch": 1.0}
    for key, ms in waves.items():
        measured[key] = {"tokens_per_s": sum(m["tokens_per_s"] for m in ms) / len(ms),
                         "mean_verify_batch": sum(m["mean_verify_batch"] for m in ms) / len(ms)}
    rows, lines = [], ["| strategy | concurrency | predicted tok/s | measured tok/s | error | predicted batch | measured batch |",
                       "|---|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        m = measured.get((p.strategy, int(p.level)))
        if m is None or p.placement.endswith("+drafter-node"):    # measured runs: drafters on the target's node
            continue
        err = (p.throughput - m["tokens_per_s"]) / m["tokens_per_s"]
        rows.append({"strategy": p.strategy, "concurrency": int(p.level), "predicted": p.throughput,
                     "measured": m["tokens_per_s"], "error": err, "predicted_batch": p.result.mean_verify_batch,
                     "measured_batch": m["mean_verify_batch"]})
        lines.append(f"| {p.strategy} | {int(p.level)} | {p.throughput:.2f} | {m['tokens_per_s']:.2f} | {err:+.1%} | "
                     f"{p.result.mean_verify_batch:.2f} | {m['mean_verify_batch']:.2f} |")
    return "\n".join(lines), rows


def plots(points, out_dir: Path, closed_loop: bool) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list] = {}
    for p in points:
        series.setdefault((p.strategy, p.placement), []).append(p)
    styles = ["-", "--", ":", "-."]
    placements = sorted({pl for _, pl in series})
    fig, ax = plt.subplots(figsize=(10, 7))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for (s, pl), ps in series.items():
        peak = max(range(len(ps)), key=lambda i: ps[i].throughput)
        ps = ps[: peak + 1]                     # past the peak the replica is overloaded: its queue only grows
        ax.plot([p.throughput for p in ps], [p.result.tpot_p50 * 1e3 for p in ps], marker="o", markersize=3,
                linestyle=styles[placements.index(pl) % len(styles)], label=f"{s} @ {pl}")
    ax.set_xlabel("throughput (output tokens/s)")
    ax.set_ylabel("per-token latency p50 (ms)")
    ax.set_yscale("log")
    ax.set_title("throughput vs latency per strategy and placement (up to each one's peak)")
    ax.legend(fontsize=6)
    first = out_dir / "throughput_vs_latency.png"
    fig.savefig(first, dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 7))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    base = {}
    for (s, pl), ps in series.items():
        if s == "plain":
            base[pl] = {p.level: p for p in ps}
    for (s, pl), ps in series.items():
        ref = base.get(pl) or base.get(pl.split("+")[0]) or (next(iter(base.values())) if base else None)
        if s == "plain" or not ref:
            continue
        xs, ys = [], []
        for p in ps:
            b = ref.get(p.level)
            if b is None:
                continue
            xs.append(p.level)
            ys.append(p.throughput / b.throughput if closed_loop else b.result.tpot_p50 / max(p.result.tpot_p50, 1e-12))
        ax.plot(xs, ys, marker="o", label=f"{s} @ {pl}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("client concurrency" if closed_loop else "request rate (req/s)")
    ax.set_ylabel("speedup vs plain: throughput" if closed_loop else "speedup vs plain: per-token latency p50")
    ax.set_xscale("log", base=2)
    ax.set_title("speedup vs concurrency")
    ax.legend(fontsize=6)
    second = out_dir / "speedup_vs_concurrency.png"
    fig.savefig(second, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [first, second]


def cmd_simulate(args) -> int:
    from placement.capacity import (bench_acceptance, calibrate_profile, cluster_replicas, cpu_contention,
                                    draft_costs, local_replicas, node_share, recommend, strategy_models, sweep)
    from placement.workload import ClosedLoopArrivals, load_workload

    cfg = load_config(args.cluster)
    wl = load_workload(args.workload)
    alphas = _alphas(args.alpha)
    calib = bench_acceptance(args.bench, wl.bench_categories) if args.bench else {}
    accept_path = args.acceptance or args.bench
    accept = bench_acceptance(accept_path, wl.bench_categories) if accept_path else {}
    if args.profile:
        profile = json.loads(Path(args.profile).read_text())
        models = strategy_models(cfg, wl, accept, alphas, args.per_request_acceptance)
        if args.calibrate:
            if not args.bench:
                raise ConfigError("--calibrate needs --bench (the batch-1 records it takes the costs from)")
            profile = calibrate_profile(profile, args.bench, wl.bench_categories, args.calibrate)
            costs = draft_costs(models, calib)
            c = profile["calibration"]
            print(f"calibrated ({c['how']}) on {args.bench}: target one-token step {c['target_step_s'] * 1e3:.0f} ms "
                  f"(profile x {c['scale']:.3f} or {c['shift_s'] * 1e3:+.0f} ms); seconds per drafter forward: "
                  + ", ".join(f"{k} {v * 1e3:.0f} ms ({src})" for k, (v, src) in costs.items()))
            forward_s = {k: v for k, (v, _) in costs.items()}
            own_verify = {k: m.pipelined_verify_s for k, m in calib.items() if m.pipelined_verify_s}
            for k, v in own_verify.items():
                print(f"  {k}: verify {v * 1e3:.0f} ms per step as measured beside its drafter (own threads)")
        else:
            forward_s = dict(profile.get("draft_token_s", {}))
            own_verify = {}
        print(f"acceptance from {accept_path or 'parameters'}:")
        for m in models:
            line = (f"  {m.name}: {m.family}, gamma {m.gamma}, alpha {m.effective_alpha:.3f} "
                    f"-> {m.expected_tokens:.2f} tokens/step ({m.source})")
            if m.draft_forwards() > 0 and m.name in forward_s and cfg.placement:
                share = node_share(cfg, profile, m, forward_s[m.name], args.oversubscription)
                slow_t, slow_d = cpu_contention(share)
                line += (f"\n      shared node: {share.cores} cores, threads target {share.target_threads} + drafter "
                         f"{share.drafter_threads}, bus {share.bus_gbs:.1f} GB/s (target draws {share.target_gbs:.1f}, "
                         f"drafter {share.drafter_gbs:.1f}) -> while both run target x{slow_t:.2f}, drafter x{slow_d:.2f}")
            print(line)
        replicas = local_replicas(cfg, profile, models, args.host_s, forward_s, args.in_process,
                                  args.oversubscription, args.drafter_batch,
                                  ("shared", "separate") if args.drafter_node == "both" else (args.drafter_node,),
                                  own_verify)
        pool_devices = None
    else:
        if cfg.placement is None or cfg.placement.target.device != "gpu":
            print(f"error: {args.cluster}: a CPU target is predicted from a measured profile: pass --profile "
                  f"(launch.py profile --cluster {args.cluster})", file=sys.stderr)
            return 2
        replicas, pool_devices = cluster_replicas(cfg, wl, alphas, args.cpu_device, args.step_overhead_ms / 1e3)
    if not replicas:
        print("error: nothing to simulate (no acceptance known for any strategy: --bench, --alpha or "
              "the workload's acceptance)", file=sys.stderr)
        return 2
    points = sweep(replicas, wl, pool_devices, args.requests)
    print(f"\n{cfg.name} x {wl.name}: {len(replicas)} (strategy, placement) pairs, "
          f"{'concurrency' if isinstance(wl.arrivals, ClosedLoopArrivals) else 'request rate'} levels "
          f"{[p for p in sorted({p.level for p in points})]}\n")
    print(table(points))
    best, reasons = recommend(points, wl)
    print("\nrecommended plan: " + f"{best.strategy} on {best.placement} at {best.level:g}")
    for r in reasons:
        print(f"  - {r}")
    out_dir = Path(args.out_dir or f"bench_out/capacity-{cfg.name}-{wl.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"cluster": args.cluster, "workload": args.workload, "profile": args.profile, "bench": args.bench,
              "points": [p.row() for p in points],
              "recommendation": {"strategy": best.strategy, "placement": best.placement, "level": best.level,
                                 "reasons": reasons}}
    if args.measured:
        text, rows = compare(points, args.measured, wl.bench_categories)
        print("\npredicted vs measured (closed loop, same machine):\n" + text)
        result["comparison"] = rows
    (out_dir / "simulation.json").write_text(json.dumps(result, indent=1))
    pngs = plots(points, out_dir, isinstance(wl.arrivals, ClosedLoopArrivals))
    print(f"\nwrote {out_dir / 'simulation.json'}, " + ", ".join(str(p) for p in pngs))
    return 0


def cmd_profile(args) -> int:
    from orchestrator.machine_profile import default_profile_path, profile_machine

    cfg = load_config(args.cluster)
    out = Path(args.out) if args.out else default_profile_path(cfg)
    prof = profile_machine(cfg, log=lambda s: print(s, flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1))
    print(f"wrote {out}")
    return 0


def add_parsers(sub) -> None:
    sim = sub.add_parser("simulate", help="capacity planning: predict latency/throughput/cost per strategy and placement")
    sim.add_argument("--cluster", required=True, help="config file (cluster_configs/*.yaml)")
    sim.add_argument("--workload", required=True, help="workload file (cluster_configs/workloads/*.yaml)")
    sim.add_argument("--profile", default=None, help="measured profile JSON (launch.py profile): predict this machine")
    sim.add_argument("--bench", default=None, help="bench JSON (launch.py bench --out): measured acceptance")
    sim.add_argument("--alpha", nargs="*", default=None, help="NAME=ALPHA per strategy, drafter or family")
    sim.add_argument("--measured", nargs="*", default=None, help="serving_bench JSONs to compare predictions with")
    sim.add_argument("--host-s", type=float, default=0.0,
                     help="with --profile: host (Python, gRPC) seconds per request step, a delay")
    sim.add_argument("--calibrate", choices=["scale", "shift"], default=None,
                     help="with --profile and --bench: absolute step costs from the bench's batch-1 records, "
                          "the profile's target curves for their shape only (scaled, or shifted)")
    sim.add_argument("--acceptance", default=None,
                     help="bench JSON whose records give acceptance (tokens/step, draft length, the hybrid's "
                          "model share); default: --bench. Lets the costs come from one day's bench and acceptance "
                          "from another's")
    sim.add_argument("--per-request-acceptance", action="store_true",
                     help="each simulated request replays one bench record's steps (draft length, accepted) in "
                          "turn, for predicting a run of the bench's own prompts; default: the pooled rates")
    sim.add_argument("--oversubscription", choices=["gang", "fair"], default="gang",
                     help="with --profile: how a drafter actor and the target share cores when their threads "
                          "outnumber them: 'gang' (a side runs only while all its threads hold a core: OpenMP "
                          "barriers) or 'fair' (each thread cores/threads of a core); see docs/capacity.md")
    sim.add_argument("--drafter-node", choices=["shared", "separate", "both"], default="shared",
                     help="with --profile: drafter actors on the target's CPU node (shared cores and bus), on a "
                          "CPU node of their own (no contention), or both placements")
    sim.add_argument("--drafter-batch", type=int, default=1,
                     help="with --profile: requests a drafter actor drafts at once (1 = one at a time)")
    sim.add_argument("--in-process", action="store_true",
                     help="with --profile: predict in-process engines (no Ray hop per draft), as `bench` runs them")
    sim.add_argument("--cpu-device", default="CPU-EPYC-7742", help="hardware entry for CPU drafters of a GPU cluster")
    sim.add_argument("--step-overhead-ms", type=float, default=0.0, help="fixed overhead per forward (roofline)")
    sim.add_argument("--requests", type=int, default=None, help="override the workload's requests per level")
    sim.add_argument("--out-dir", default=None, help="where simulation.json and the PNG plots go")
    sim.set_defaults(func=cmd_simulate)
    prof = sub.add_parser("profile", help="measure this machine (bandwidth, matmul, model step times) for simulate")
    prof.add_argument("--cluster", required=True)
    prof.add_argument("--out", default=None, help="profile JSON path (default ~/.cache/specorch/profile-<name>.json)")
    prof.set_defaults(func=cmd_profile)
