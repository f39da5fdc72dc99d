"""Tensor parallelism for the target (Megatron-style), one rank per Ray actor.

Each of the `world` ranks of a pipeline stage keeps, for every decoder layer of the
stage, a slice of the attention heads (rows of q/k/v, with their biases; the matching
columns of o_proj) and of the MLP's intermediate units (rows of gate/up, columns of
down). A layer's attention output and MLP output are then partial sums, added across
the ranks with one all-reduce each (torch.distributed: gloo on the CPU, NCCL on GPUs).
Embedding, norms and the output head are replicated, so every rank computes the same
hidden states and rank 0's logits are the answer. Each rank's KV cache holds only its
own KV heads.

Sums over ranks round differently from one device's matmul, so in float32 logits agree
to about 1e-6 rather than bit for bit (greedy outputs are compared in the tests).
"""
from __future__ import annotations

import torch

from workers.runner import ModelRunner


def _keep_rows(linear: torch.nn.Linear, start: int, end: int) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[start:end].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[start:end].clone(), requires_grad=False)
    linear.out_features = end - start


def _keep_cols(linear: torch.nn.Linear, start: int, end: int, keep_bias: bool) -> None:
    linear.weight = torch.nn.Parameter(linear.weight.data[:, start:end].clone(), requires_grad=False)
    if linear.bias is not None and not keep_bias:      # added once, by rank 0, after the sum
        linear.bias = None
    linear.in_features = end - start


def check_divisible(config, world: int) -> None:
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key)
        if value % world:
            raise ValueError(f"tensor_parallel {world} does not divide the model's {key} ({value})")


def shard_layers_(layers, config, rank: int, world: int) -> None:
    """Keep rank `rank`'s slice of every layer's attention heads and MLP units, in place."""
    check_divisible(config, world)
    heads, kv_heads = config.num_attention_heads // world, config.num_key_value_heads // world
    inter = config.intermediate_size // world
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        _keep_rows(attn.q_proj, rank * heads * hd, (rank + 1) * heads * hd)
        _keep_rows(attn.k_proj, rank * kv_heads * hd, (rank + 1) * kv_heads * hd)
        _keep_rows(attn.v_proj, rank * kv_heads * hd, (rank + 1) * kv_heads * hd)
        _keep_cols(attn.o_proj, rank * heads * hd, (rank + 1) * heads * hd, keep_bias=rank == 0)
        _keep_rows(mlp.gate_proj, rank * inter, (rank + 1) * inter)
        _keep_rows(mlp.up_proj, rank * inter, (rank + 1) * inter)
        _keep_cols(mlp.down_proj, rank * inter, (rank + 1) * inter, keep_bias=rank == 0)


class TensorParallelRunner(ModelRunner):
    """A ModelRunner over one rank's slice (see module doc); the process group must be joined
    before the first forward."""

    widen_at_init = False

    def __init__(self, model, device, layer_range, rank: int, world: int, group=None):
        super().__init__(model, device, layer_range)
        shard_layers_(self.layers, self.config, rank, world)
        self.widen()                      # float32 copies of the slices, not of the whole weights
        self.rank, self.world, self.group = rank, world, group
        self.num_heads //= world          # per rank; the grouped-query ratio is unchanged
        self.num_kv_heads //= world

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def _o_proj(self, li: int, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(super()._o_proj(li, x))

    def _mlp_proj(self, li: int, x: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(super()._mlp_proj(li, x))
