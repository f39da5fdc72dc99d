"""Kernel choices for decode-shaped work, measured on the machine when a model loads.

Which kernel wins depends on the CPU, not only on the shape. For a bf16 linear with a few
rows, oneDNN's `linear` ran at half the bandwidth of `mv` / `mm(W, x^T)` on an Intel AMX
machine (0.83 vs 1.53 ms per layer) and about even on an AMD EPYC without AMX (1.69 vs
1.73 ms). bf16 attention over a short query ran 7x slower than the same attention in
float32 on the EPYC (0.21 vs 0.03 ms per sequence and layer). So a runner times the
candidates on its own weights and shapes when it loads (well under a second) and keeps
the fastest per row-count bucket.

float32 always uses `linear` and native attention, so float32 numerics stay HF's
exactly (the lossless tests compare against HF's own forward); GPUs keep the defaults.

A choice is measured once per machine and shape set and kept in `<cache root>/kernels.json`
(under a file lock): every process of a deployment (pipeline stages, drafter actors, the next
run) then computes with the same kernels, so bf16 results do not change with the timing noise
of one start-up. `SPECORCH_KERNELS=remeasure` measures again; `default` measures nothing and
uses fixed defaults.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

# weight_major: mv for one row, mm(W, x^T) for several (the weight as the long operand);
# linear_pair: one row run as two (oneDNN's one-row path streamed a 470 MB output head at 25 GB/s
# on the EPYC, its two-row GEMM at 34 GB/s).
LINEAR_KERNELS = ("linear", "weight_major", "linear_pair")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)          # above the last: `linear` (a GEMM, oneDNN's home ground)
QUERY_BUCKETS = (1, 4, 16)                      # new tokens per sequence in one attention call
# int8 weight-only layers (workers/quantize.py): int8pack (torch._weight_int8pack_mm, a GEMV per row: its
# time grows with the rows) or dequant (widen the weight, then one bf16 GEMM: a fixed cost, then cheap
# rows). Measured here on one thread: 0.11 vs 1.26 ms at 1 row, 15.5 vs 7.2 ms at 300 (a prefill).
INT8_KERNELS = ("int8pack", "dequant")
INT8_BUCKETS = (1, 8, 32, 64, 128, 256)         # above the last: the last one's choice
TABLE_VERSION = 2                               # part of a stored choice's key: a new rule measures again
MEASURE_ENV = "SPECORCH_KERNELS"                # "default": skip measuring, use the fixed defaults


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None past the last."""
    for b in buckets:
        if n <= b:
            return b
    return None


def fastest(timings: dict[int, dict[str, float]]) -> dict[int, str]:
    """Per bucket, the candidate with the least seconds."""
    return {b: min(per, key=per.get) for b, per in timings.items()}


@dataclass
class KernelChoice:
    """What a runner uses per shape; `timings` keeps what the choice was made from."""

    linear: dict[int, str] = field(default_factory=dict)          # row bucket -> LINEAR_KERNELS member
    head: dict[int, str] = field(default_factory=dict)            # the same for the output head
    attention_fp32: dict[int, bool] = field(default_factory=dict)  # query bucket -> compute in float32
    int8: dict[int, str] = field(default_factory=dict)            # row bucket -> INT8_KERNELS member
    timings: dict[str, dict] = field(default_factory=dict)
    measured: bool = False

    def linear_kernel(self, rows: int, head: bool = False) -> str:
        b = bucket(rows, ROW_BUCKETS)
        return (self.head if head else self.linear).get(b, "linear") if b is not None else "linear"

    def int8_kernel(self, rows: int) -> str:
        if not self.int8:
            return "int8pack"
        b = bucket(rows, INT8_BUCKETS)
        return self.int8.get(b if b is not None else INT8_BUCKETS[-1], "int8pack")

    def upcast_attention(self, queries: int) -> bool:
        b = bucket(queries, QUERY_BUCKETS)
        return b is not None and self.attention_fp32.get(b, False)

    def describe(self) -> str:
        if not self.measured:
            return "fixed defaults (linear, native attention)"
        lin = ", ".join(f"{b}: {k}" for b, k in sorted(self.linear.items()))
        head = ", ".join(f"{b}: {k}" for b, k in sorted(self.head.items()))
        att = ", ".join(f"{b}: {'float32' if up else 'native'}" for b, up in sorted(self.attention_fp32.items()))
        int8 = ", ".join(f"{b}: {k}" for b, k in sorted(self.int8.items()))
        return (f"layer linears by rows [{lin}]; output head by rows [{head}]; attention by queries [{att}]"
                + (f"; int8 layers by rows [{int8}]" if int8 else ""))


def _best_seconds(fn, reps: int) -> float:
    fn()                                         # warm-up: first calls pay allocation and dispatch
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul(x2d: torch.Tensor, weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """x2d [rows, in] @ weight [out, in]^T -> [rows, out] with one of LINEAR_KERNELS."""
    if kernel == "weight_major":
        return torch.mv(weight, x2d[0]).unsqueeze(0) if x2d.shape[0] == 1 else torch.mm(weight, x2d.t()).t()
    if kernel == "linear_pair" and x2d.shape[0] == 1:
        return F.linear(x2d.expand(2, -1).contiguous(), weight)[:1]
    return F.linear(x2d, weight)


def int8_matmul(x2d: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor, kernel: str) -> torch.Tensor:
    """x2d [rows, in] @ (w8 [out, in] int8 x scales [out])^T -> [rows, out] with one of INT8_KERNELS."""
    if kernel == "dequant":
        return F.linear(x2d, w8.to(x2d.dtype) * scales[:, None])
    return torch._weight_int8pack_mm(x2d.contiguous(), w8, scales)


def time_int8(layers: list, dtype, device, reps: int = 2) -> dict[int, dict[str, float]]:
    """Seconds per row bucket and int8 kernel, summed over int8 layers (weight_int8, weight_scales)."""
    timings = {}
    for rows in INT8_BUCKETS if layers else ():
        xs = [torch.randn(rows, m.weight_int8.shape[1], dtype=dtype, device=device) for m in layers]
        timings[rows] = {k: sum(_best_seconds(lambda x=x, m=m, k=k: int8_matmul(x, m.weight_int8, m.weight_scales, k),
                                              reps) for x, m in zip(xs, layers))
                         for k in INT8_KERNELS}
    return timings


def _time_kernels(weights: list[torch.Tensor], dtype, device, reps: int) -> dict[int, dict[str, float]]:
    """Seconds per row bucket and kernel, summed over the weights."""
    timings = {}
    for rows in ROW_BUCKETS if weights else ():
        xs = [torch.randn(rows, w.shape[1], dtype=dtype, device=device) for w in weights]
        kernels = LINEAR_KERNELS if rows == 1 else LINEAR_KERNELS[:2]
        timings[rows] = {k: sum(_best_seconds(lambda x=x, w=w, k=k: matmul(x, w, k), reps) for x, w in zip(xs, weights))
                         for k in kernels}
    return timings


def attention(q, k, v, mask, scale: float, gqa: bool, upcast: bool) -> torch.Tensor:
    """sdpa over q [b, heads, T, hd] and k/v [b, kv_heads, S, hd]; upcast: in float32, result cast back."""
    if not upcast:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=gqa)
    return out.to(q.dtype)


def measure(weights: list[torch.Tensor], head: torch.Tensor | None, heads: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype, device: torch.device, reps: int = 3, context: int = 256,
            with_attention: bool = True) -> KernelChoice:
    """Time every candidate on these weights (one layer's) and the output head, and on attention
    shapes; pick the fastest per bucket.

    weights: [out, in] matrices in `dtype` on `device` (none for int8 layers, whose kernel is fixed).
    Seconds are summed over the weights: the choice is the fastest for the layer as a whole.
    """
    lin = _time_kernels(weights, dtype, device, reps)
    head_t = _time_kernels([head] if head is not None else [], dtype, device, 2)
    att: dict[int, dict[str, float]] = {}
    kv = torch.randn(1, kv_heads, context, head_dim, dtype=dtype, device=device)
    for t in QUERY_BUCKETS if with_attention else ():
        q = torch.randn(1, heads, t, head_dim, dtype=dtype, device=device)
        mask = torch.ones(1, 1, t, context, dtype=torch.bool, device=device).tril(context - t)
        att[t] = {kind: _best_seconds(lambda up=kind == "float32": attention(q, kv, kv, mask, head_dim ** -0.5,
                                                                               heads != kv_heads, up), reps * 3)
                  for kind in ("native", "float32")}
    return KernelChoice(linear=fastest(lin), head=fastest(head_t),
                        # One precision for every query count, the one-query (decode) winner's: a
                        # verification forward then computes attention as plain decoding does, so bf16
                        # outputs of speculation and of plain decoding part only where matmuls round apart.
                        attention_fp32={t: fastest(att)[1] == "float32" for t in att} if att else {},
                        timings={"linear": lin, "head": head_t, "attention": att}, measured=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stored(key: str, measure_now, path) -> KernelChoice:
    """The choice stored under key, else measure_now() stored there (one process measures at a time).
    Where the cache cannot be written, each process measures for itself."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:
        return measure_now()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            table = {}
        if key in table and os.environ.get(MEASURE_ENV) != "remeasure":
            d = table[key]
            return KernelChoice(linear={int(b): k for b, k in d["linear"].items()},
                                head={int(b): k for b, k in d["head"].items()},
                                attention_fp32={int(b): v for b, v in d["attention_fp32"].items()},
                                int8={int(b): k for b, k in d.get("int8", {}).items()},
                                timings={kind: {int(b): per for b, per in by.items()}
                                         for kind, by in d.get("timings", {}).items()}, measured=True)
        choice = measure_now()
        table[key] = asdict(choice)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)
        except OSError:          # a full or read-only disk: the choice still serves this process
            pass
        return choice


def choose_for(runner) -> KernelChoice:
    """A runner's choice: measured for reduced precision on the CPU (once per machine and shapes, then
    read back), fixed defaults otherwise."""
    from workers.model_store import cache_root

    dtype, device = runner.dtype, runner.device
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return KernelChoice()
    if os.environ.get(MEASURE_ENV, "measure") == "default":   # what the runner did before measuring
        return KernelChoice(linear={b: "weight_major" for b in ROW_BUCKETS},
                            head={b: "weight_major" for b in ROW_BUCKETS})
    layer = runner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    weights = [m.weight for m in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)
               if getattr(m, "weight_int8", None) is None and m.weight.dtype == dtype]
    head = runner.lm_head.weight if runner.last_stage else None
    if head is not None and (getattr(runner.lm_head, "weight_int8", None) is not None or head.dtype != dtype):
        head = None
    machine = [TABLE_VERSION, _cpu_name(), torch.__version__, torch.get_num_threads(), str(dtype)]
    dims = (runner.num_heads, runner.num_kv_heads, runner.head_dim)
    path = cache_root() / "kernels.json"

    def stored(what, shapes, measure_now):
        key = hashlib.sha1(json.dumps(machine + [what, shapes, list(dims)]).encode()).hexdigest()
        with torch.inference_mode():
            return _stored(key, measure_now, path)

    # Layers and output head apart, so a pipeline stage without the head (or with it) and the whole
    # model share each choice.
    layers = stored("layers", [list(w.shape) for w in weights],
                    lambda: measure(weights, None, *dims, dtype, device))
    int8_layers = [m for m in (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)
                   if getattr(m, "weight_int8", None) is not None]
    if int8_layers:
        timed = stored("int8", [list(m.weight_int8.shape) for m in int8_layers],
                       lambda: KernelChoice(timings={"int8": time_int8(int8_layers, dtype, device)}, measured=True))
        int8_t = timed.timings["int8"]
        layers = KernelChoice(linear=layers.linear, attention_fp32=layers.attention_fp32, int8=fastest(int8_t),
                              timings={**layers.timings, "int8": int8_t}, measured=True)
    if head is None:
        return layers
    out = stored("head", list(head.shape), lambda: measure([], head, *dims, dtype, device, with_attention=False))
    return KernelChoice(linear=layers.linear, head=out.head, attention_fp32=layers.attention_fp32, int8=layers.int8,
                        timings={**layers.timings, "head": out.timings.get("head", {})}, measured=True)
