"""Measurements for checking the capacity simulator on this machine (issue: capacity planning).

The machine's speed drifts by 20-30% within half an hour (docs/capacity.md), so a calibration
bench taken at one time and a serving run taken at another disagree for reasons no model has.
This script takes both in one process, back to back, in rounds:

  round r:  in-process batch-1 bench of every strategy on the N prompts (`launch.py bench`'s
            records, interleaved prompt by prompt)  ->  bench_r{r}.json   (calibrates the costs,
            gives acceptance)
            the same N prompts through gRPC + Ray at each concurrency (a closed loop of c
            clients, N requests in all)              ->  serving_r{r}.json (what is predicted)

Then, per round, with nothing fitted to the serving file:

    .venv/bin/python launch.py simulate --cluster cluster_configs/local.yaml \\
        --workload cluster_configs/workloads/local-validation.yaml --profile bench_out/profile-local.json \\
        --bench OUT/bench_r0.json --calibrate scale --drafter-batch 16 --measured OUT/serving_r0.json

    .venv/bin/python scripts/capacity_validation.py --rounds 3 --out-dir bench_out/validation
    .venv/bin/python scripts/capacity_validation.py --report --out-dir bench_out/validation \
        --profile bench_out/profile-local.json       # the simulation per round, then pooled

Pooled error = sum of the rounds' predictions / sum of their measurements - 1: each round's
calibration and serving run share that round's machine speed, and pooling averages the noise of
single 4-request waves (about +-15% from one run to the next here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_bench import as_request, measure_wave, serve_in_thread, stop_serving  # noqa: E402

from orchestrator.bench import load_prompts, run_bench  # noqa: E402
from orchestrator.build import build_engines  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.edge.client import Client  # noqa: E402
from orchestrator.ray_runtime import place, start_ray  # noqa: E402
from placement.plan import plan_placement  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", default="cluster_configs/local.yaml")
    ap.add_argument("--strategies", nargs="+",
                    default=["plain", "sd-0.5b-int8-adaptive", "sd-0.5b-int8-hybrid", "pld-adaptive"])
    ap.add_argument("--data", default="../shared/data/humaneval_dev.jsonl")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per round (each level sends all of them)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out-dir", default="bench_out/validation")
    ap.add_argument("--report", action="store_true", help="simulate each measured round and pool the errors")
    ap.add_argument("--profile", default="bench_out/profile-local.json", help="for --report: launch.py profile's JSON")
    ap.add_argument("--workload", default="cluster_configs/workloads/local-validation.yaml")
    args = ap.parse_args()
    if args.report:
        report(args)
        return

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.cluster)
    # Our engines only: the HF peers are not what the simulator predicts.
    cfg = cfg.model_copy(update={"bench": cfg.bench.model_copy(update={"hf_peers": []})})
    only = [s for s in args.strategies if s != "plain"]
    prompts = load_prompts(args.data, args.prompts)
    start_ray(cfg)
    built, runtime = place(cfg, plan_placement(cfg), only=only)
    loop, box = serve_in_thread(built)
    local = build_engines(cfg, only=only)
    try:
        with Client(f"127.0.0.1:{box['port']}", timeout=3600) as client:
            for name in args.strategies:        # first calls through the actors pay one-off costs
                client.generate(as_request(prompts[0]), max_new_tokens=8, strategy=name)
            for r in range(args.rounds):
                t0 = time.time()
                bench = run_bench(local, prompts, args.max_new_tokens, log=lambda s: print(s, flush=True))
                bench.update(started=t0, finished=time.time(), max_new_tokens=args.max_new_tokens)
                (out_dir / f"bench_r{r}.json").write_text(json.dumps(bench, indent=1))
                serving = {"throughput": [], "server": cfg.server.model_dump(), "started": time.time()}
                for name in args.strategies:
                    for c in args.concurrency:
                        row = measure_wave(client, box["service"].verifier, name,
                                           [as_request(p) for p in prompts], c, args.max_new_tokens)
                        serving["throughput"].append(row)
                        print(f"round {r} | {name} | c={c} | {row['tokens_per_s']:.2f} tok/s | "
                              f"verify batch {row['mean_verify_batch']:.2f}", flush=True)
                serving["finished"] = time.time()
                (out_dir / f"serving_r{r}.json").write_text(json.dumps(serving, indent=1))
                print(f"round {r}: bench {serving['started'] - t0:.0f} s, serving "
                      f"{serving['finished'] - serving['started']:.0f} s", flush=True)
    finally:
        stop_serving(loop, box, runtime)


def report(args) -> None:
    """`launch.py simulate` on every round found in --out-dir; per-round and pooled errors."""
    out_dir = Path(args.out_dir)
    rows: dict[tuple[str, int], list[dict]] = {}
    rounds = sorted(out_dir.glob("serving_r*.json"))
    for serving in rounds:
        r = serving.stem.removeprefix("serving_")
        sim_dir = out_dir / f"sim_{r}"
        subprocess.run([sys.executable, "launch.py", "simulate", "--cluster", args.cluster, "--workload", args.workload,
                        "--profile", args.profile, "--bench", str(out_dir / f"bench_{r}.json"), "--calibrate", "scale",
                        "--drafter-batch", "16", "--per-request-acceptance", "--measured", str(serving),
                        "--out-dir", str(sim_dir)], check=True, stdout=subprocess.DEVNULL,
                       cwd=Path(__file__).resolve().parents[1])
        for c in json.loads((sim_dir / "simulation.json").read_text())["comparison"]:
            rows.setdefault((c["strategy"], c["concurrency"]), []).append(c)
    print(f"| strategy | concurrency | predicted tok/s ({len(rounds)} rounds) | measured tok/s | error per round "
          "| pooled error | predicted / measured verify batch |\n|---|---:|---|---|---|---:|---|")
    for (name, c), cs in rows.items():
        pred, meas = [x["predicted"] for x in cs], [x["measured"] for x in cs]
        print(f"| {name} | {c} | {' / '.join(f'{x:.2f}' for x in pred)} | {' / '.join(f'{x:.2f}' for x in meas)} | "
              + " / ".join(format(x["error"], "+.0%") for x in cs) + f" | {sum(pred) / sum(meas) - 1:+.1%} | "
              f"{sum(x['predicted_batch'] for x in cs) / len(cs):.2f} / {sum(x['measured_batch'] for x in cs) / len(cs):.2f} |")


if __name__ == "__main__":
    main()
