"""Model runner: our own decode loop over a `transformers` model's weights.

Why not call the HF model's `forward`: each HF step rebuilds masks, grows a
`DynamicCache` by concatenation and runs logits processors; on the CPU that is a
large share of a small model's step. The runner keeps a preallocated KV cache per
sequence row, writes new keys/values in place, and runs the layers of the HF
module tree directly (same Linear / norm / rotary modules, so float32 numerics
match HF's own forward op for op).

What the runner does:
  - prefill and multi-token forwards (a chain of draft tokens, or a tree with an
    ancestor-only mask and position = depth),
  - crop (rollback) and compaction of an accepted tree path,
  - a batch of rows of different lengths (per-row lengths, masks hide the rest).

The cache convention used by every strategy: a row's cache holds the KV of all
committed tokens except the newest one (the "pending" token), which is fed as
the first input of the next forward.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.core_lease import NO_LEASE
from workers.kernels import (KernelChoice, attention, choose_for, dense_linears, int8_matmul, matmul, unpadded,
                             wide_weight, widen_)

SUPPORTED_ARCHITECTURES = {"llama", "qwen2", "mistral", "qwen3", "gemma3_text"}


def _linear(x: torch.Tensor, layer: torch.nn.Linear, kernel: str = "linear", int8_kernel: str = "int8pack"
            ) -> torch.Tensor:
    """y = x W^T + b with the kernel chosen for this shape (workers/kernels.py LINEAR_KERNELS).

    On some CPUs `mv` / `mm(W, x^T)` stream decode-shaped weights at twice the bandwidth of
    oneDNN's `linear`, on others not; on a CPU without bf16 arithmetic a float32 copy wins from a
    few rows on (`widened`). int8 layers (workers/quantize.py) have kernels of their own.
    """
    w8 = getattr(layer, "weight_int8", None)
    if w8 is not None:                                           # int8 drafter (workers/quantize.py)
        y = int8_matmul(x.reshape(-1, x.shape[-1]), w8, layer.weight_scales, int8_kernel)
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], w8.shape[0])
    kernel, _, pad_rows = kernel.partition("@")
    if pad_rows and x.numel() // x.shape[-1] < int(pad_rows):
        # Zero rows up to the bucket whose kernel ran faster than this one's (kernels.padded_up).
        x2d = x.reshape(-1, x.shape[-1])
        padded = torch.cat([x2d, x2d.new_zeros(int(pad_rows) - x2d.shape[0], x2d.shape[1])])
        return _linear(padded, layer, kernel)[:x2d.shape[0]].reshape(*x.shape[:-1], -1)
    weight = layer.weight
    if kernel == "widened":
        weight = wide_weight(layer)
        if weight is None:               # not widened (a vocabulary-trimmed head): oneDNN's GEMM
            kernel = "linear"
    if kernel == "linear":
        return layer(x)
    y = matmul(x.reshape(-1, x.shape[-1]), weight, kernel)   # [rows, out]
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.weight.shape[0])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Step:
    """What every layer of one forward shares."""

    cache: "KVCache"
    mask: torch.Tensor         # [batch, 1, T, end] bool
    starts: list[int]
    end: int
    t: int
    slots: torch.Tensor        # [batch, T] cache slot of each new token
    batch_idx: torch.Tensor    # [batch, 1]
    uniform: bool              # every row starts at the same slot
    position_ids: torch.Tensor  # [batch, T]
    sliding_mask: torch.Tensor | None = None   # [batch, 1, T, end]: the mask of sliding-window layers
    # layer type -> (cos, sin) each [batch, 1, T, head_dim], set once the input is embedded (ModelRunner._rope)
    rope: dict | None = None


@dataclass
class KVCache:
    """Preallocated keys/values for `batch` rows; `lengths[r]` slots of row r are valid."""

    keys: list[torch.Tensor]    # per layer [batch, kv_heads, capacity, head_dim]
    values: list[torch.Tensor]  # per layer [batch, kv_heads, capacity, head_dim]
    lengths: list[int]          # host-side, so cache bookkeeping never syncs the device

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def crop(self, row: int, length: int) -> None:
        """Roll row back to its first `length` tokens (the rest is simply overwritten later)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"crop length {length} outside [0, {self.lengths[row]}]")
        self.lengths[row] = length

    @torch.inference_mode()     # a forward that grew the cache (ensure_capacity) made inference tensors
    def keep(self, row: int, start: int, offsets: torch.Tensor) -> None:
        """Compact an accepted tree path: slots start+offsets[i] move to start+i, then crop.

        offsets: [n] long, increasing, relative to `start` (offsets[i] >= i).
        """
        n = int(offsets.numel())
        src = start + offsets
        for k, v in zip(self.keys, self.values):
            k[row, :, start:start + n] = k[row, :, src]
            v[row, :, start:start + n] = v[row, :, src]
        self.lengths[row] = start + n

    def ensure_capacity(self, needed: int) -> None:
        """Grow (by doubling) when a row would write past the end; rare by construction."""
        if needed <= self.capacity:
            return
        new_cap = max(needed, 2 * self.capacity)
        for i in range(len(self.keys)):
            for store in (self.keys, self.values):
                old = store[i]
                grown = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                grown[:, :, : old.shape[2]] = old
                store[i] = grown


def _leased(method):
    """Runs the forward holding the runner's core lease (workers/core_lease.py; a no-op by default)."""
    @functools.wraps(method)
    def leased(self, *args, **kwargs):
        with self.lease:
            return method(self, *args, **kwargs)
    return leased


class ModelRunner:
    """Runs a decoder-only HF causal LM (Llama / Qwen2 / Mistral / Qwen3 family, Gemma 3 text)."""

    # Set to a CoreLease where this runner's process shares CPU cores with another model's (placement).
    lease = NO_LEASE
    widen_at_init = True      # a tensor-parallel rank widens after slicing its weights

    def __init__(self, model, device: str | torch.device | None = None, layer_range: tuple[int, int] | None = None):
        """layer_range (start, end): run only these decoder layers, a pipeline stage. The first
        stage embeds token ids, later stages take the previous stage's hidden states; the last
        stage returns logits, the others hidden states [batch, T, hidden]."""
        arch = model.config.model_type
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type {arch!r} is not supported by ModelRunner "
                f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})"
            )
        self.model = model.eval()
        self.config = model.config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        inner = model.model
        self.embed = inner.embed_tokens
        total = len(inner.layers)
        start, end = layer_range if layer_range is not None else (0, total)
        if not 0 <= start < end <= total:
            raise ValueError(f"layer_range {layer_range} outside the model's {total} layers")
        self.layer_range = (start, end)
        # Every cache handed out, until freed (KVCache compares by value, so keyed by a counter).
        self._live_caches: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._caches_made = 0
        self.first_stage, self.last_stage = start == 0, end == total
        self.layers = list(inner.layers)[start:end]
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn0 = self.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.vocab_size = self.config.vocab_size
        self.num_layers = len(self.layers)
        self.max_positions = getattr(self.config, "max_position_embeddings", 1 << 20)
        self.has_qk_norm = hasattr(attn0, "q_norm")
        # Gemma 3: norms after attention and after the MLP too, sliding-window layers with a rotary
        # embedding of their own (the rotary module takes the layer type), final logits soft-capped.
        self.sandwich_norms = hasattr(self.layers[0], "pre_feedforward_layernorm")
        types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * total)[start:end]
        window = getattr(self.config, "sliding_window", None)
        self.sliding_window = window
        self._sliding = [t == "sliding_attention" and window is not None for t in types]
        by_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._rope_key = types if by_type else [None] * len(types)
        self.logit_softcap = getattr(self.config, "final_logit_softcapping", None)
        if getattr(self.config, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping (Gemma 2) is not supported by ModelRunner")
        if getattr(self.config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention (an embedding model) is not supported by ModelRunner")
        self.kernels: KernelChoice = choose_for(self)     # measured here, on this machine's CPU
        if self.widen_at_init:
            self.widen()

    def widen(self) -> None:
        """Make the float32 weight copies the chosen kernels use (`widened`, workers/kernels.py) where
        missing or made from other weights (a tensor-parallel rank calls it again after slicing)."""
        if "widened" in map(unpadded, self.kernels.linear.values()):
            widen_(dense_linears(self))
        head_kernels = map(unpadded, self.kernels.head.values())
        if self.last_stage and "widened" in head_kernels and hasattr(self.lm_head, "weight"):
            widen_([self.lm_head])

    def _kernel(self, x: torch.Tensor, head: bool = False) -> tuple[str, str]:
        """The kernels (dense, int8) for the linears (or the output head) of input x [..., in]."""
        rows = x.numel() // x.shape[-1]
        return self.kernels.linear_kernel(rows, head), self.kernels.int8_kernel(rows)

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        mk = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        cache = KVCache(
            keys=[mk() for _ in range(self.num_layers)],
            values=[mk() for _ in range(self.num_layers)],
            lengths=[0] * batch,
        )
        self._caches_made += 1
        self._live_caches[self._caches_made] = cache
        return cache

    def live_caches(self) -> int:
        """KV caches of this runner still referenced anywhere (finished requests free theirs)."""
        return len(self._live_caches)

    # ---------------------------------------------------------------- forward
    @_leased
    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        input_ids: torch.Tensor,      # [batch, T] long
        num_new: list[int] | None = None,   # per row, how many of the T tokens are real (rest = padding)
        depths: torch.Tensor | None = None,  # [batch, T] long, tree depth of each new token (chain: 0..T-1)
        tree_mask: torch.Tensor | None = None,  # [batch, T, W + T] bool, new token i may attend new token j
                                                # (last T columns) and the W cached slots just before the
                                                # new tokens (first W columns; usually W = 0)
        logits_rows: slice | torch.Tensor | None = None,  # which of the T positions need logits (None = all)
        layer_groups: list[list[int]] | None = None,  # EasySpec: layers of a group see the same input
        group_mode: str = "attn_only",               # "attn_only" or "direct_mlp" (workers/easyspec.py)
        group_exchange=None,                         # EasySpec across workers: see _grouped_layers
        lm_head: torch.nn.Module | None = None,      # replaces the output head (workers/vocab_trim.py)
        hidden_out: list | None = None,              # gets the normed last-layer hidden states [batch, T', hidden]
    ) -> torch.Tensor:
        """Append T new tokens per row and return logits [batch, T', vocab] (float32).

        Row r's token i is written to cache slot lengths[r] + i and gets position
        lengths[r] + depths[r, i]; it attends the row's cached prefix and, among
        the new tokens, those allowed by tree_mask (default: causal chain). A tree_mask W columns wider
        than T also decides which of the W cached slots before the new tokens each new token attends
        (a draft tree grown over several forwards: workers/opt_tree.py); older slots are always visible.
        Padded tokens (i >= num_new[r]) are computed but never become valid.
        """
        batch, t = input_ids.shape[:2]
        num_new = num_new if num_new is not None else [t] * batch
        ctx = self._step(cache, batch, t, depths, tree_mask)
        # A later pipeline stage receives hidden states [batch, T, hidden] instead of ids.
        hidden = self.embed(input_ids) if self.first_stage else input_ids.to(self.dtype)
        ctx.rope = self._rope(hidden, ctx.position_ids)
        if layer_groups is None:
            for li in range(self.num_layers):
                hidden = hidden + self._attention(li, hidden, ctx)
                hidden = hidden + self._mlp(li, hidden)
        else:
            hidden = self._grouped_layers(hidden, ctx, layer_groups, group_mode, group_exchange)

        for r in range(batch):
            cache.lengths[r] = ctx.starts[r] + num_new[r]
        if not self.last_stage:
            return hidden
        if logits_rows is not None:
            hidden = hidden[:, logits_rows]
        hidden = self.norm(hidden)
        if hidden_out is not None:       # a drafter's features for its draft-length predictor (workers/draft_states.py)
            hidden_out.append(hidden)
        return self._logits(hidden, lm_head if lm_head is not None else self.lm_head)

    def _logits(self, x: torch.Tensor, head) -> torch.Tensor:
        """The output head over normed hidden states x [..., hidden] -> float32 logits [..., vocab]."""
        logits = _linear(x, head, *self._kernel(x, head=True)).float()
        if self.logit_softcap is not None:            # Gemma: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _rope(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict:
        """cos, sin [batch, 1, T, head_dim] of positions [batch, T], per layer type (None: one for all)."""
        out = {}
        for key in set(self._rope_key):
            cos, sin = self.rotary(hidden, positions) if key is None else self.rotary(hidden, positions, key)
            out[key] = (cos.unsqueeze(1), sin.unsqueeze(1))
        return out

    def _step(self, cache: KVCache, batch: int, t: int, depths, tree_mask) -> _Step:
        """Positions, cache slots and the attention mask of T new tokens per row."""
        starts = list(cache.lengths)
        end = max(s + t for s in starts)
        cache.ensure_capacity(end)
        dev = self.device

        start_t = torch.tensor(starts, device=dev).unsqueeze(1)          # [batch, 1]
        if depths is None:
            depths = torch.arange(t, device=dev).expand(batch, t)
        position_ids = start_t + depths                                   # [batch, T]
        slots = start_t + torch.arange(t, device=dev)                     # [batch, T]

        # Attention mask over the first `end` cache slots: [batch, 1, T, end]
        kv_idx = torch.arange(end, device=dev)
        if tree_mask is None:
            tree_mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril().expand(batch, t, t)
        window = tree_mask.shape[-1] - t                                  # cached slots tree_mask covers
        # column of tree_mask for each cache slot: [batch, 1, end]; < 0 = the always-visible prefix
        rel = kv_idx.view(1, 1, end) - start_t.view(batch, 1, 1) + window
        prefix_ok = rel < 0                                               # cached prefix
        in_new = (rel >= 0) & (rel < window + t)
        new_ok = torch.gather(
            tree_mask, 2, rel.clamp(0, window + t - 1).expand(batch, t, end)
        ) & in_new
        mask = (prefix_ok | new_ok).unsqueeze(1)                          # [batch, 1, T, end]
        sliding = None
        if any(self._sliding):
            # HF's sliding window: key position > query position - window. Keys are compared by their
            # slot, which is their position for committed tokens and chains; only a tree token's slot
            # exceeds its position, which matters for trees deeper than the window (512 for Gemma 3).
            sliding = mask & (kv_idx.view(1, 1, 1, end) > position_ids.view(batch, 1, t, 1) - self.sliding_window)
        return _Step(cache, mask, starts, end, t, slots, torch.arange(batch, device=dev).view(batch, 1),
                     all(s == starts[0] for s in starts), position_ids, sliding)

    @_leased
    @torch.inference_mode()
    def forward_many(self, requests: list[tuple]) -> list[torch.Tensor]:
        """One forward for several independent sequences, each with its own batch-1 cache.

        requests: (cache, input_ids [1, T_i], depths [1, T_i] | None, tree_mask [1, T_i, T_i] | None,
        logits_rows | None[, lm_head | None]). The sequences' tokens are packed into one ragged row
        [1, sum T_i] (no padding): the linear layers, which stream every weight from memory, run once
        on all of them, and so does the output head (once per distinct head); rotary embedding and
        attention run per sequence on its own cache. Returns each request's logits [1, T_i', vocab]
        (float32), equal to what forward() gives that request alone (hidden states [1, T_i, hidden]
        from a pipeline stage that is not the last).
        """
        if len(requests) == 1:        # nothing to share: the plain path, without per-sequence loops
            cache, inputs, depths, tree_mask, rows = requests[0][:5]
            if cache.batch != 1:
                raise ValueError("forward_many takes batch-1 caches")
            return [self.forward(cache, inputs, depths=depths, tree_mask=tree_mask, logits_rows=rows,
                                 lm_head=requests[0][5] if len(requests[0]) > 5 else None)]
        lengths = [int(r[1].shape[1]) for r in requests]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)                                  # sequence i is [bounds[i], bounds[i+1])
        ctxs = []
        for cache, inputs, depths, tree_mask, _rows in (r[:5] for r in requests):
            if cache.batch != 1:
                raise ValueError("forward_many takes batch-1 caches")
            ctxs.append(self._step(cache, 1, int(inputs.shape[1]), depths, tree_mask))
        packed = torch.cat([r[1][0] for r in requests]).unsqueeze(0)        # [1, N] ids or [1, N, hidden]
        hidden = self.embed(packed) if self.first_stage else packed.to(self.dtype)
        positions = torch.cat([ctx.position_ids for ctx in ctxs], dim=1)   # [1, N]
        rope = self._rope(hidden, positions)                               # cos, sin [1, 1, N, head_dim]
        spans = list(zip(bounds[:-1], bounds[1:]))
        for li in range(self.num_layers):
            q, k, v = self._qkv(li, hidden)                                # [1, heads, N, hd]
            cos, sin = rope[self._rope_key[li]]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            out = torch.cat([self._attend_rotated(li, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ctx)
                             for ctx, (a, b) in zip(ctxs, spans)], dim=2)  # [1, heads, N, hd]
            hidden = hidden + self._attn_out(li, out.transpose(1, 2).reshape(1, bounds[-1], -1))
            hidden = hidden + self._mlp(li, hidden)
        results = self._split_outputs(requests, hidden, spans)
        for ctx, n in zip(ctxs, lengths):      # only now: a failed forward leaves every cache as it was
            ctx.cache.lengths[0] = ctx.starts[0] + n
        return results

    def _split_outputs(self, requests: list[tuple], hidden: torch.Tensor, spans: list[tuple[int, int]]):
        """Per request: its hidden states (not the last stage) or the logits of its logits_rows, with
        one output-head matmul per distinct head over every request's rows."""
        if not self.last_stage:
            return [hidden[:, a:b] for a, b in spans]
        picks, heads = [], []
        for request, (a, b) in zip(requests, spans):
            rows = request[4]
            idx = torch.arange(a, b, device=self.device)
            picks.append(idx[rows] if rows is not None else idx)
            heads.append(request[5] if len(request) > 5 and request[5] is not None else self.lm_head)
        results: list = [None] * len(requests)
        for head in {id(h): h for h in heads}.values():
            members = [i for i, h in enumerate(heads) if h is head]
            idx = torch.cat([picks[i] for i in members])
            x = self.norm(hidden[:, idx])                                   # [1, rows, hidden]
            logits = self._logits(x, head)[0]                               # [rows, vocab]
            start = 0
            for i in members:
                n = int(picks[i].numel())
                results[i] = logits[start:start + n].unsqueeze(0)
                start += n
        return results

    def _qkv(self, li: int, hidden: torch.Tensor):
        """Layer li's projected q, k, v before rotary embedding: each [batch, heads, T, hd]."""
        layer, kernel = self.layers[li], self._kernel(hidden)
        attn = layer.self_attn
        batch, t = hidden.shape[:2]
        x = layer.input_layernorm(hidden)
        q = _linear(x, attn.q_proj, *kernel).view(batch, t, -1, self.head_dim)
        k = _linear(x, attn.k_proj, *kernel).view(batch, t, -1, self.head_dim)
        v = _linear(x, attn.v_proj, *kernel).view(batch, t, -1, self.head_dim)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _attention(self, li: int, hidden: torch.Tensor, ctx: "_Step") -> torch.Tensor:
        """Layer li's attention block on `hidden` (norm -> qkv -> rope -> KV write -> sdpa -> o_proj)."""
        batch, t = hidden.shape[:2]
        out = self._attend(li, *self._qkv(li, hidden), ctx)               # [batch, heads, T, hd]
        return self._attn_out(li, out.transpose(1, 2).reshape(batch, t, -1))

    def _attn_out(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """What layer li's attention adds to the residual stream; x [batch, T, heads * hd]."""
        out = self._o_proj(li, x)
        return self.layers[li].post_attention_layernorm(out) if self.sandwich_norms else out

    def _o_proj(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """Layer li's attention output projection; x [batch, T, heads * hd]. (Tensor-parallel
        ranks hold a slice of the heads and sum the partial results: workers/tensor_parallel.py.)"""
        return _linear(x, self.layers[li].self_attn.o_proj, *self._kernel(x))

    def _attend(self, li: int, q, k, v, ctx: "_Step") -> torch.Tensor:
        """Rotary, KV write into ctx.cache, attention over the cache. q/k/v [batch, heads, T, hd]."""
        cos, sin = ctx.rope[self._rope_key[li]]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return self._attend_rotated(li, q, k, v, ctx)

    def _attend_rotated(self, li: int, q, k, v, ctx: "_Step") -> torch.Tensor:
        """KV write into ctx.cache and attention over it, rotary already applied."""
        attn, cache, t = self.layers[li].self_attn, ctx.cache, q.shape[2]
        kc, vc = cache.keys[li], cache.values[li]
        if ctx.uniform:  # common case: one contiguous write for all rows
            s0 = ctx.starts[0]
            kc[:, :, s0:s0 + t] = k
            vc[:, :, s0:s0 + t] = v
        else:
            kc[ctx.batch_idx, :, ctx.slots] = k.transpose(1, 2)
            vc[ctx.batch_idx, :, ctx.slots] = v.transpose(1, 2)
        mask = ctx.sliding_mask if self._sliding[li] else ctx.mask
        return attention(q, kc[:, :, :ctx.end], vc[:, :, :ctx.end], mask, attn.scaling,
                         self.num_kv_heads != self.num_heads, self.kernels.attention_fp32)  # [batch, heads, T, hd]

    def _mlp(self, li: int, hidden: torch.Tensor) -> torch.Tensor:
        """What layer li's MLP block adds to the residual stream (hidden [batch, T, hidden])."""
        layer = self.layers[li]
        if self.sandwich_norms:
            return layer.post_feedforward_layernorm(self._mlp_proj(li, layer.pre_feedforward_layernorm(hidden)))
        return self._mlp_proj(li, layer.post_attention_layernorm(hidden))

    def _mlp_proj(self, li: int, x: torch.Tensor) -> torch.Tensor:
        """Layer li's gated MLP on normed x. (Tensor-parallel ranks sum partial results.)"""
        mlp, kernel = self.layers[li].mlp, self._kernel(x)
        x = mlp.act_fn(_linear(x, mlp.gate_proj, *kernel)) * _linear(x, mlp.up_proj, *kernel)
        return _linear(x, mlp.down_proj, *kernel)

    def _grouped_layers(self, hidden, ctx, groups, mode, exchange=None):
        """EasySpec's layer-parallel approximation (ALGORITHMS.md section 1).

        Members of a group compute their output on the same group input: with
        "attn_only" the member output is the layer's attention and the MLPs then
        run in layer order on the running sum; with "direct_mlp" it is attention
        plus the MLP of (input + attention), and the outputs are summed.
        `exchange(group, compute, hidden)` returns every member's output in group order:
        in process it computes them one after another; across workers each rank
        computes its own member and the outputs are all-gathered
        (workers/easyspec_workers.py). Single-layer groups run here, exactly.
        """
        if mode not in ("attn_only", "direct_mlp"):
            raise ValueError(f"unknown group_mode {mode!r}")
        for group in groups:
            if len(group) == 1:
                li = group[0]
                hidden = hidden + self._attention(li, hidden, ctx)
                hidden = hidden + self._mlp(li, hidden)
                continue
            compute = lambda li, h=hidden: self._group_member(li, h, ctx, mode)  # noqa: E731
            outs = exchange(group, compute, hidden) if exchange is not None else [compute(li) for li in group]
            hidden = self._combine_group(group, hidden, outs, mode)
        return hidden

    def _group_member(self, li: int, hidden: torch.Tensor, ctx: "_Step", mode: str) -> torch.Tensor:
        """What one member of a layer group computes from the group input [batch, T, hidden]."""
        a = self._attention(li, hidden, ctx)
        return a if mode == "attn_only" else a + self._mlp(li, hidden + a)

    def _combine_group(self, group: list[int], hidden: torch.Tensor, outs: list[torch.Tensor],
                       mode: str) -> torch.Tensor:
        """The group's output from its members' outputs (identical on every worker, so they stay in sync)."""
        if mode == "direct_mlp":
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            return hidden + total
        for li, a in zip(group, outs):
            hidden = hidden + a
            hidden = hidden + self._mlp(li, hidden)
        return hidden

    # ------------------------------------------------------------- helpers
    def prefill(self, cache: KVCache, row: int, token_ids: list[int]) -> torch.Tensor:
        """Fill an empty batch-1 cache with a prompt; returns logits of the last token [vocab]."""
        if cache.batch != 1:
            raise ValueError("prefill works on a batch-1 cache; use forward() for batches")
        cache.crop(row, 0)
        ids = torch.tensor([token_ids], device=self.device)
        return self.forward(cache, ids, logits_rows=slice(-1, None))[0, -1]
