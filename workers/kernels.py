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

The timings are taken once per machine and shape set and kept in `<cache root>/kernels.json`
(under a file lock); the choice is derived from them. Every process of a deployment (pipeline
stages, drafter actors, the next run) then computes with the same kernels, so bf16 results do
not change with the timing noise of one start-up. `SPECORCH_KERNELS=remeasure` measures again; `default` measures nothing and
uses fixed defaults.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# weight_major: mv for one row, mm(W, x^T) for several (the weight as the long operand);
# linear_pair: one row run as two (oneDNN's one-row path streamed a 470 MB output head at 25 GB/s
# on the EPYC, its two-row GEMM at 34 GB/s);
# widened: weight_major on a float32 copy of the weight, made once when a runner picks it
# (`widen_`). A CPU without native bf16 arithmetic (AVX2 only: an EPYC 7003) multiplies bf16 at a
# rate that grows with the rows: a 1536 x 8960 bf16 layer took 3.2 ms at 1 row and 29 ms at 16,
# its float32 copy 5.9 ms and 11 ms. Products of bf16 values are exact in float32, so it computes
# the bf16 layer, only summed in another order (as any other kernel may);
# converted: the same float32 product without the copy: the bf16 weight converted a block of rows at a
# time into a scratch buffer the caches hold, each block multiplied there. It streams half the bytes of
# `widened` and keeps no copy: on the EPYC 7003, per 1536 x 8960 layer at 16 rows, 7.0 ms against
# widened's 11.8 and bf16's 23; at 4 rows 6.0 against 5.7 (there the conversion does not hide).
LINEAR_KERNELS = ("linear", "weight_major", "linear_pair", "widened", "converted")
WIDE_ATTR = "weight_wide"       # a linear's float32 copy of its weight, and the weight it was made from
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)          # above the last: the last one's choice
# int8 weight-only layers (workers/quantize.py): int8pack (torch._weight_int8pack_mm, a GEMV per row: its
# time grows with the rows) or dequant (widen the weight, then one bf16 GEMM: a fixed cost, then cheap
# rows). Measured here on one thread: 0.11 vs 1.26 ms at 1 row, 15.5 vs 7.2 ms at 300 (a prefill).
INT8_KERNELS = ("int8pack", "dequant")
INT8_BUCKETS = (1, 8, 32, 64, 128, 256)         # above the last: the last one's choice
STREAM_BYTES = 128 << 20       # weights per timed pass: more than a CPU's caches hold
CONVERT_BLOCK_BYTES = 6 << 20  # `converted`'s float32 block: 1.5-14 MB measured, 7 MB the fastest
TABLE_VERSION = 6                               # part of a stored entry's key: a new rule measures again
MEASURE_ENV = "SPECORCH_KERNELS"                # "default": skip measuring, use the fixed defaults

Timings = dict  # bucket -> {kernel: seconds}


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket >= n, or None past the last."""
    for b in buckets:
        if n <= b:
            return b
    return None


def fastest(timings: Timings) -> dict[int, str]:
    """Per bucket, the candidate with the least seconds."""
    return {b: min(per, key=per.get) for b, per in timings.items()}


def padded_up(timings: Timings, choice: dict[int, str], gain: float = 0.1) -> dict[int, str]:
    """`choice` with a bucket whose fastest kernel is slower than a larger bucket's fastest (by more than
    `gain`: the timings' noise) run as that kernel on rows padded with zeros to the larger bucket,
    written "kernel@rows". On the EPYC 7003 a float32 GEMM of 8 rows of the 1.5B's output head took 173 ms
    where 16 rows took 133: oneDNN's small-M path is slower than its full tile."""
    best = {b: timings[b][k] for b, k in choice.items()}
    out = dict(choice)
    for b in choice:
        larger = [c for c in choice if c > b and best[c] < best[b] * (1 - gain)]
        if larger:
            c = min(larger, key=lambda c: (best[c], c))
            out[b] = f"{choice[c]}@{c}"
    return out


def interior_rows(b: int) -> int:
    """The row count inside bucket b (between the bucket below and b) timed against b itself."""
    return b - b // 4


def padded_from(interior: Timings, choice: dict[int, str], margin: float = 0.1) -> dict[int, int]:
    """Per bucket b, the row count from which rows below b run on rows zero-padded to b: from
    interior_rows(b) where the bucket's kernel was not measurably faster there than at b rows (by more
    than `margin`, the timings' noise; timed in the same rounds). Fewer rows than b then save nothing
    measurable, and a GEMM's odd row counts can cost more than the full tile: on the EPYC 7003 a float32
    GEMM of 15 rows on a 1536 x 8960 weight took 26 ms against 16 ms for 16 rows, and 1.5B forwards of 6
    and 7 rows took 1.34 and 1.59 s unpadded against 1.17 and 1.12 s padded to 8."""
    return {b: interior_rows(b) for b, t in interior.items()
            if "@" not in choice.get(b, "@") and t["interior"] > t["bucket"] * (1 - margin)}


def unpadded(kernel: str) -> str:
    """The kernel a choice runs ("converted@16" runs converted)."""
    return kernel.partition("@")[0]


@dataclass
class KernelChoice:
    """What a runner uses per shape (derived from `timings`, kept to show what it was made from)."""

    linear: dict[int, str] = field(default_factory=dict)          # row bucket -> LINEAR_KERNELS member [@rows]
    head: dict[int, str] = field(default_factory=dict)            # the same for the output head
    int8: dict[int, str] = field(default_factory=dict)            # row bucket -> INT8_KERNELS member
    # Bucket -> the row count from which fewer rows than the bucket run padded to it (padded_from).
    linear_pad_from: dict[int, int] = field(default_factory=dict)
    head_pad_from: dict[int, int] = field(default_factory=dict)
    # Attention in float32 for every query count, decided on one query (decoding): a verification
    # forward then computes attention as plain decoding does, so bf16 outputs of speculation and of
    # plain decoding part only where matmuls round apart.
    attention_fp32: bool = False
    timings: dict[str, Timings] = field(default_factory=dict)
    measured: bool = False

    @classmethod
    def from_timings(cls, timings: dict[str, Timings], widen: bool = True, widen_head: bool = True
                     ) -> "KernelChoice":
        """widen / widen_head: whether the layers' / the output head's float32 copies may be made (they
        fit in memory); where not, the fastest of the other kernels."""
        def pick(part: str, allowed: bool) -> dict[int, str]:
            t = timings.get(part, {})
            t = t if allowed else {b: {k: v for k, v in per.items() if k != "widened"} for b, per in t.items()}
            return padded_up(t, fastest(t))
        att = timings.get("attention", {}).get(1)
        linear, head = pick("linear", widen), pick("head", widen_head)
        return cls(linear=linear, head=head, int8=fastest(timings.get("int8", {})),
                   linear_pad_from=padded_from(timings.get("linear-interior", {}), linear),
                   head_pad_from=padded_from(timings.get("head-interior", {}), head),
                   attention_fp32=bool(att) and att["float32"] < att["native"], timings=timings, measured=True)

    def linear_kernel(self, rows: int, head: bool = False) -> str:
        """Past the last bucket, the last one's choice (a widened GEMM beat oneDNN's bf16 GEMM 4x at 64
        rows on a CPU without bf16 arithmetic; elsewhere the last bucket picks `linear`). Inside a bucket,
        from its padded_from row count on, the bucket's kernel on rows padded to the bucket."""
        b = bucket(rows, ROW_BUCKETS)
        kernel = (self.head if head else self.linear).get(b if b is not None else ROW_BUCKETS[-1], "linear")
        pad_from = (self.head_pad_from if head else self.linear_pad_from).get(b)
        if b is not None and "@" not in kernel and pad_from is not None and pad_from <= rows < b:
            return f"{kernel}@{b}"
        return kernel

    def int8_kernel(self, rows: int) -> str:
        b = bucket(rows, INT8_BUCKETS)
        return self.int8.get(b if b is not None else INT8_BUCKETS[-1], "int8pack")

    def describe(self) -> str:
        if not self.measured:
            return "fixed defaults (linear, native attention)"
        lin = ", ".join(f"{b}: {k}" for b, k in sorted(self.linear.items()))
        head = ", ".join(f"{b}: {k}" for b, k in sorted(self.head.items()))
        int8 = ", ".join(f"{b}: {k}" for b, k in sorted(self.int8.items()))
        pads = lambda p: ", ".join(f"{r}-{b - 1} to {b}" for b, r in sorted(p.items())) or "none"  # noqa: E731
        return (f"layer linears by rows [{lin}] (padded: {pads(self.linear_pad_from)}); output head by rows "
                f"[{head}] (padded: {pads(self.head_pad_from)}); attention in "
                f"{'float32' if self.attention_fp32 else 'the model dtype'}"
                + (f"; int8 layers by rows [{int8}]" if int8 else ""))


def matmul(x2d: torch.Tensor, weight: torch.Tensor, kernel: str) -> torch.Tensor:
    """x2d [rows, in] @ weight [out, in]^T -> [rows, out] with one of LINEAR_KERNELS ("widened": weight is
    the float32 copy; the result comes back in x2d's dtype)."""
    if kernel == "widened":
        # x^T as a view of the row-major input: from a contiguous [in, rows] copy, the float32 GEMM ran
        # at half the speed for 2 to 8 rows on the EPYC 7003 (10.9 vs 5.6 ms at 4 rows on 1536 x 8960).
        return torch.mm(weight, x2d.float().t()).t().to(x2d.dtype)
    if kernel == "converted":
        return _converted_matmul(x2d, weight)
    if kernel == "weight_major":
        return torch.mv(weight, x2d[0]).unsqueeze(0) if x2d.shape[0] == 1 else torch.mm(weight, x2d.t()).t()
    if kernel == "linear_pair" and x2d.shape[0] == 1:
        return F.linear(x2d.expand(2, -1).contiguous(), weight)[:1]
    return F.linear(x2d, weight)


_scratch = threading.local()      # `converted`'s block buffer, one per thread (cohorts forward concurrently)


def _converted_matmul(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [rows, in] @ weight [out, in]^T in float32, the weight converted block by block (`converted`).
    Inference only: `mm(out=)` records no gradient, so the operands are taken detached."""
    x2d, weight = x2d.detach(), weight.detach()
    out_features, width = weight.shape
    block_rows = max(1, CONVERT_BLOCK_BYTES // (4 * width))
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < block_rows * width or buf.device != weight.device:
        with torch.inference_mode(False):     # a normal tensor: writable in inference mode and outside it
            buf = _scratch.buf = torch.empty(max(block_rows * width, CONVERT_BLOCK_BYTES // 4),
                                             dtype=torch.float32, device=weight.device)
    cols = x2d.float().t()                                        # [in, rows], a view (as `widened`)
    y = torch.empty(out_features, x2d.shape[0], dtype=torch.float32, device=x2d.device)   # [out, rows]
    for r0 in range(0, out_features, block_rows):
        r1 = min(out_features, r0 + block_rows)
        block = buf[:(r1 - r0) * width].view(r1 - r0, width)
        block.copy_(weight[r0:r1])
        torch.mm(block, cols, out=y[r0:r1])
    return y.t().to(x2d.dtype)


def wide_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """A linear's float32 copy of its weight, if made from the weight it has now (a tensor-parallel
    rank slices its weights after its runner is built: workers/tensor_parallel.py)."""
    made = getattr(layer, WIDE_ATTR, None)
    return made[1] if made is not None and made[0] is layer.weight else None


def widen_(layers) -> None:
    """Give each linear a float32 copy of its weight (the `widened` kernel), unless it has one already."""
    from workers.hugepages import _libc, hugepage_copy

    libc = _libc()
    for m in layers:
        if wide_weight(m) is None:
            w = m.weight.detach()
            # Huge pages, as the model's own weights (workers/hugepages.py): a streamed copy on 4 KiB pages
            # pays a TLB miss per page.
            wide = hugepage_copy(w, libc, torch.float32) if libc is not None and w.device.type == "cpu" else w.float()
            setattr(m, WIDE_ATTR, (m.weight, wide))


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def int8_matmul(x2d: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor, kernel: str) -> torch.Tensor:
    """x2d [rows, in] @ (w8 [out, in] int8 x scales [out])^T -> [rows, out] with one of INT8_KERNELS."""
    if kernel == "dequant":
        return F.linear(x2d, w8.to(x2d.dtype) * scales[:, None])
    return torch._weight_int8pack_mm(x2d.contiguous(), w8, scales)


def attention(q, k, v, mask, scale: float, gqa: bool, upcast: bool) -> torch.Tensor:
    """sdpa over q [b, heads, T, hd] and k/v [b, kv_heads, S, hd]; upcast: in float32, result cast back."""
    if not upcast:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale,
                                         enable_gqa=gqa)
    return out.to(q.dtype)


# ------------------------------------------------------------------ timing
def best_seconds_interleaved(calls: dict, reps: int, long_s: float = 0.05, clock=None) -> dict:
    """Best seconds of each of several calls, timed in rounds: one call of each per round, reps rounds
    after a warm-up round. A burst of other work on the machine (a drafter actor converting its model
    while the target times its kernels, on 2 shared cores) then slows every candidate in the round it
    falls in, not all of one candidate's runs: timed one candidate after the other, such a burst made a
    fresh server pick bf16 `linear` over weight-major products that are 30% faster on a quiet AMX CPU.
    A call whose warm-up took over long_s is timed once (a pass that long averages its own noise, and a
    1.5B model's weights at 64 rows took a minute on the EPYC 7003)."""
    clock = clock or time.perf_counter
    rounds = {}
    for name, fn in calls.items():                 # warm-up: first calls pay allocation and dispatch
        t0 = clock()
        fn()
        rounds[name] = 1 if clock() - t0 > long_s else reps
    best = {name: float("inf") for name in calls}
    for r in range(max(rounds.values(), default=0)):
        for name, fn in calls.items():
            if r < rounds[name]:
                t0 = clock()
                fn()
                best[name] = min(best[name], clock() - t0)
    return best


def time_candidates(buckets, operands, candidates, run, dtype, device, reps: int = 3) -> Timings:
    """Seconds per bucket and candidate of one pass over operands (several layers' weights, streamed from
    memory as a forward streams them: on the EPYC 7003 one float32 weight timed again and again ran at
    twice the speed it ran at in a forward): per bucket b, run(x, operand, kernel) on an input x
    [b, operand's input width]. candidates(b) lists the kernels."""
    timings = {}
    for rows in buckets if operands else ():
        xs = [torch.randn(rows, width, dtype=dtype, device=device) for width, _ in operands]
        timings[rows] = best_seconds_interleaved(
            {k: lambda k=k: [run(x, op, k) for x, (_, op) in zip(xs, operands)] for k in candidates(rows)}, reps)
    return timings


def time_interior(choice: dict[int, str], operands, run, dtype, device, reps: int = 3) -> Timings:
    """Per bucket b of 4 rows or more, seconds of its chosen kernel at interior_rows(b) and at b rows, timed
    in the same rounds ({b: {"interior": s, "bucket": s}}); buckets already padded up are left out."""
    out = {}
    for b, kernel in choice.items() if operands else ():
        if b < 4 or "@" in kernel:
            continue
        xs = {n: [torch.randn(n, width, dtype=dtype, device=device) for width, _ in operands]
              for n in (interior_rows(b), b)}
        best = best_seconds_interleaved(
            {name: lambda n=n: [run(x, op, kernel) for x, (_, op) in zip(xs[n], operands)]
             for name, n in (("interior", interior_rows(b)), ("bucket", b))}, reps)
        out[b] = best
    return out


def time_attention(heads: int, kv_heads: int, head_dim: int, dtype, device, context: int = 256,
                   reps: int = 9) -> Timings:
    """Seconds of one query's attention over `context` cached tokens, native and in float32."""
    q = torch.randn(1, heads, 1, head_dim, dtype=dtype, device=device)
    kv = torch.randn(1, kv_heads, context, head_dim, dtype=dtype, device=device)
    return {1: best_seconds_interleaved(
        {kind: lambda up=kind == "float32": attention(q, kv, kv, None, head_dim ** -0.5, heads != kv_heads, up)
         for kind in ("native", "float32")}, reps)}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stored(key: str, time_now, path) -> Timings:
    """The timings stored under key, else time_now() stored there (one process measures at a time).
    Where the cache cannot be written, each process measures for itself."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:
        return time_now()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            table = {}
        if key in table and os.environ.get(MEASURE_ENV) != "remeasure":
            return {int(b): per for b, per in table[key].items()}       # JSON keys are strings
        timings = time_now()
        table[key] = timings
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(path)
        except OSError:          # a full or read-only disk: the timings still serve this process
            pass
        return timings


def choose_for(runner) -> KernelChoice:
    """A runner's choice: from timings on this CPU for reduced precision (taken once per machine and
    shapes, then read back), fixed defaults otherwise."""
    from workers.model_store import cache_root

    dtype, device = runner.dtype, runner.device
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return KernelChoice()
    if os.environ.get(MEASURE_ENV, "measure") == "default":   # what the runner did before measuring
        return KernelChoice(linear={b: "weight_major" for b in ROW_BUCKETS},
                            head={b: "weight_major" for b in ROW_BUCKETS})
    linears = timed_linears(runner)
    dense = [(m.weight.shape[1], m.weight) for m in linears if getattr(m, "weight_int8", None) is None]
    int8 = [(m.weight_int8.shape[1], m) for m in linears if getattr(m, "weight_int8", None) is not None]
    head = runner.lm_head if runner.last_stage and getattr(runner.lm_head, "weight_int8", None) is None else None
    # The instruction set in the key too: "AMD EPYC" names CPUs with and without native bf16 arithmetic.
    machine = [TABLE_VERSION, _cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
               torch.get_num_threads(), str(dtype)]
    path = cache_root() / "kernels.json"

    def stored(part: str, shapes, time_now) -> Timings:
        key = hashlib.sha1(json.dumps(machine + [part, shapes]).encode()).hexdigest()
        with torch.inference_mode():
            return _stored(key, time_now, path)

    multi_row = tuple(k for k in LINEAR_KERNELS if k != "linear_pair")
    dense_kernels = lambda rows: LINEAR_KERNELS if rows == 1 else multi_row           # noqa: E731 (pair: 1 row)
    wide: dict[int, torch.Tensor] = {}        # float32 copies of the timed weights, while timing

    def run_dense(x, w, k):
        if k == "widened":
            if id(w) not in wide:
                wide[id(w)] = w.float()
            w = wide[id(w)]
        return matmul(x, w, k)
    # Each part apart, so a pipeline stage with or without the output head shares the whole model's choice.
    timings = {
        "linear": stored("linear", [list(w.shape) for _, w in dense], lambda: time_candidates(
            ROW_BUCKETS, dense, dense_kernels, run_dense, dtype, device)),
        "attention": stored("attention", [runner.num_heads, runner.num_kv_heads, runner.head_dim],
                            lambda: time_attention(runner.num_heads, runner.num_kv_heads, runner.head_dim,
                                                   dtype, device)),
    }
    if int8:
        timings["int8"] = stored("int8", [list(m.weight_int8.shape) for _, m in int8], lambda: time_candidates(
            INT8_BUCKETS, int8, lambda rows: INT8_KERNELS,
            lambda x, m, k: int8_matmul(x, m.weight_int8, m.weight_scales, k), dtype, device, reps=2))
    if head is not None:
        w = head.weight
        timings["head"] = stored("head", list(w.shape), lambda: time_candidates(
            ROW_BUCKETS, [(w.shape[1], w)], dense_kernels, run_dense, dtype, device, reps=2))
    wide.clear()
    # Float32 copies only where they fit in half the memory available now (the layers', then the head's too).
    free = available_memory()
    layers_bytes = 4 * sum(m.weight.numel() for m in dense_linears(runner))
    head_bytes = 4 * head.weight.numel() if head is not None else 0
    widen, widen_head = free is None or layers_bytes < free / 2, free is None or layers_bytes + head_bytes < free / 2
    # Then the chosen kernels inside their buckets, stored apart (a table without them keeps its choices)
    # and under the choices they time.
    chosen = KernelChoice.from_timings(timings, widen=widen, widen_head=widen_head)
    timings["linear-interior"] = stored(
        "linear-interior", [[list(w.shape) for _, w in dense], chosen.linear],
        lambda: time_interior(chosen.linear, dense, run_dense, dtype, device))
    if head is not None:
        timings["head-interior"] = stored("head-interior", [list(w.shape), chosen.head], lambda: time_interior(
            chosen.head, [(w.shape[1], w)], run_dense, dtype, device, reps=2))
    wide.clear()
    return KernelChoice.from_timings(timings, widen=widen, widen_head=widen_head)


def timed_linears(runner) -> list[torch.nn.Module]:
    """Four linears per layer (q, o, gate, down: the shapes of a decoder layer) of as many of the runner's
    layers as make STREAM_BYTES (cycling through a pipeline stage's few layers; at most 8 layers)."""
    out, size = [], 0
    for li in range(8):
        layer = runner.layers[li % len(runner.layers)]
        for m in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            w = getattr(m, "weight_int8", None)
            w = m.weight if w is None else w
            out.append(m)
            size += w.numel() * w.element_size()
        if size >= STREAM_BYTES:
            break
    return out


def dense_linears(runner) -> list[torch.nn.Module]:
    """The runner's decoder layers' linears that are not int8 (what the `widened` kernel widens)."""
    out = []
    for layer in runner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if getattr(m, "weight_int8", None) is None:
                out.append(m)
    return out
