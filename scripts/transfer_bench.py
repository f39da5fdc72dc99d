"""Moving a tensor between two Ray actors: Ray's object store vs torch.distributed (gloo).

Sizes are the pipeline's: hidden states [1, T, hidden] in bf16 between target stages,
and float32 logits [T, vocab] back to the engine. Each figure is the wall time of one
transfer as the pipeline pays it (call overhead included), median of `--reps`.

    .venv/bin/python scripts/transfer_bench.py --hidden 1536 --vocab 151936 --out bench_out/transfer.json
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import ray
import torch


@ray.remote(num_cpus=0)
class Peer:
    def setup(self, rank: int, port: int) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def make(self, shape, dtype) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype)

    def consume(self, t: torch.Tensor) -> int:
        return t.numel()

    def send(self, shape, dtype) -> None:
        import torch.distributed as dist

        dist.send(torch.ones(shape, dtype=dtype), dst=1)

    def recv(self, shape, dtype) -> int:
        import torch.distributed as dist

        buf = torch.empty(shape, dtype=dtype)
        dist.recv(buf, src=0)
        return buf.numel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, reps: int) -> float:
    fn()                                    # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    a, b = Peer.remote(), Peer.remote()
    port = free_port()
    ray.get([a.setup.remote(0, port), b.setup.remote(1, port)])
    cases = [(f"hidden T={t}", (1, t, args.hidden), torch.bfloat16) for t in (1, 8, 64, 512, 2048)]
    cases += [(f"logits T={t}", (t, args.vocab), torch.float32) for t in (1, 8)]
    rows = []
    print("| tensor | bytes | Ray object store ms | gloo send/recv ms | faster |\n|---|---:|---:|---:|---|")
    for label, shape, dtype in cases:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        via_ray = timed(lambda: ray.get(b.consume.remote(a.make.remote(shape, dtype))), args.reps)
        via_gloo = timed(lambda: ray.get([a.send.remote(shape, dtype), b.recv.remote(shape, dtype)]), args.reps)
        rows.append({"tensor": label, "bytes": nbytes, "ray_ms": via_ray, "gloo_ms": via_gloo})
        print(f"| {label} | {nbytes} | {via_ray:.2f} | {via_gloo:.2f} | {'ray' if via_ray < via_gloo else 'gloo'} |",
              flush=True)
    ray.shutdown()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
