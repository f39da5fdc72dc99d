"""After generations through the gRPC server over Ray actors, our metrics are served by
Ray's Prometheus export endpoint with values that match what was generated."""
from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections import defaultdict

import pytest
import yaml

ray = pytest.importorskip("ray")

from orchestrator.config import load_config  # noqa: E402
from orchestrator.edge.client import Client  # noqa: E402
from orchestrator.ray_runtime import metrics_endpoints, place  # noqa: E402
from placement.plan import plan_placement  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402
from tests.serving import ByteTokenizer, serve_in_thread  # noqa: E402

LINE = re.compile(r'^(\w+)\{(.*)\} ([0-9.eE+-]+)$')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list] = defaultdict(list)
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        m = LINE.match(line)
        if m and m.group(1).startswith("ray_specorch_"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[m.group(1)].append((labels, float(m.group(3))))
    return out


def total(samples, **match) -> float:
    return sum(v for labels, v in samples if all(labels.get(k) == want for k, want in match.items()))


def test_metrics_reach_rays_prometheus_endpoint(tmp_path):
    target, draft = tiny_model("qwen2", seed=0, layers=2), tiny_model("qwen2", seed=1, layers=1)
    for m in (target, draft):
        m.config.eos_token_id = m.generation_config.eos_token_id = 95
    target.save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    cfg = {
        "name": "metrics",
        "models": {"target": {"source": str(tmp_path / "target"), "dtype": "float32"},
                   "drafters": {"d": {"source": str(tmp_path / "draft"), "dtype": "float32"}}},
        "strategies": [{"name": "sd-k3", "kind": "draft_model", "drafter": "d",
                        "draft_length": {"policy": "fixed", "k": 3}}],
        "runtime": {"device": "cpu", "threads": 1},
        "node_pools": [{"name": "local", "count": 1, "cpus": 4, "memory_gb": 8}],
        "placement": {"target": {"pool": "local", "device": "cpu"},
                      "drafters": {"d": {"pool": "local", "device": "cpu", "cpus": 1}}},
        "server": {"concurrency": 4},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    config = load_config(tmp_path / "m.yaml")
    port = free_port()
    ray.init(num_cpus=4, resources={"pool:local": 1000.0}, include_dashboard=False, log_to_driver=False,
             namespace="specorch-metrics", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        assert metrics_endpoints() == [f"http://{ray.util.get_node_ip_address()}:{port}/metrics"]
        built, runtime = place(config, plan_placement(config), name="test-metrics")
        built.tokenizer = ByteTokenizer()
        try:
            with serve_in_thread(built) as s, Client(s.address, timeout=60) as client:
                results = client.generate_batch(["abcabc", "hello hello", "xyz"] * 2, max_new_tokens=12,
                                                strategy="sd-k3", progress=False, concurrency=3)
                results += [client.generate("abcabc", max_new_tokens=8, temperature=0.8, seed=1)]
            generated = sum(len(r.token_ids) for r in results)
            steps = sum(r.stats.steps for r in results if r.stats.strategy == "sd-k3")
            url = metrics_endpoints()[0]
            deadline, got = time.monotonic() + 60, {}
            while time.monotonic() < deadline:
                got = scrape(url)
                busy = got.get("ray_specorch_worker_busy_seconds_total", [])
                if (total(got.get("ray_specorch_generated_tokens_total", [])) >= generated
                        and {lbl.get("worker") for lbl, _ in busy} >= {"target-shard-0", "drafter-cpu-0"}):
                    break
                time.sleep(1)
        finally:
            runtime.shutdown()
    finally:
        ray.shutdown()

    tokens = got["ray_specorch_generated_tokens_total"]
    assert total(tokens) == generated
    assert total(tokens, strategy="sd-k3", request_class="greedy/short") == generated - len(results[-1].token_ids)
    assert total(tokens, strategy="plain", request_class="sampled/short") == len(results[-1].token_ids)
    assert total(got["ray_specorch_verify_steps_total"], strategy="sd-k3") == steps
    assert total(got["ray_specorch_requests_total"], outcome="ok") == len(results)
    drafted = total(got["ray_specorch_drafted_tokens_total"], strategy="sd-k3")
    assert drafted > 0 and total(got.get("ray_specorch_accepted_tokens_total", []), strategy="sd-k3") <= drafted
    assert total(got["ray_specorch_ttft_seconds_count"]) == len(results)
    assert 0 < total(got["ray_specorch_ttft_seconds_sum"]) < 60
    assert total(got["ray_specorch_request_draft_length_count"], strategy="sd-k3") == len(results) - 1
    batches = total(got["ray_specorch_verify_batch_size_count"])
    at_most_4 = total(got["ray_specorch_verify_batch_size_bucket"], le="4.0")   # 3 clients + a straggler
    assert batches > 0 and at_most_4 == batches
    busy = {lbl["worker"]: v for lbl, v in got["ray_specorch_worker_busy_seconds_total"]}
    assert busy["target-shard-0"] > 0 and busy["drafter-cpu-0"] > 0 and busy["global-verifier"] > 0
    assert total(got["ray_specorch_requests_in_flight"]) == 0


def test_grafana_dashboard_uses_only_exported_metrics():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "docs/grafana/specorch.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_specorch_\w+", e)}
    defined = {"ray_" + n for n in re.findall(r'"(specorch_\w+)"', (root / "workers/monitoring.py").read_text())}
    assert used and used <= defined, used - defined
    assert defined <= used, f"metrics with no panel: {defined - used}"
