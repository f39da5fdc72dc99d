"""Ray actors that hold model shards and per-request state.

`TargetShard` holds a contiguous layer range of the target (a pipeline stage)
and one KV cache per live request (orchestrator/drafter_worker.py's `DrafterWorker`
holds drafters and their sessions). A plain class: `ray.remote(...)` wraps it at
placement time (orchestrator/ray_runtime.py), and tests can also run it in
process. Tensors cross process boundaries as method arguments and results;
Ray's object store carries them, and an ObjectRef returned by one stage is
passed straight to the next, so activations never go through the driver.
"""
from __future__ import annotations

import os

import torch

from workers.core_lease import CoreLease
from workers.loading import load_for_decoding, pick_device
from workers.monitoring import BusyTimer
from workers.runner import KVCache, ModelRunner
from workers.stage_link import StageLink


class LostRequestState(KeyError):
    """The actor has no state for this request: it restarted (or the request was closed)."""


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


class TargetShard:
    """A pipeline stage of the target: layers [start, end), plus per-request KV caches."""

    def __init__(self, source: str, dtype: str, layer_range: tuple[int, int] | None, device: str = "auto",
                 threads: int | None = None, tp_rank: int = 0, tp_size: int = 1, core_lease: str | None = None):
        """tp_size > 1: this actor is rank tp_rank of the stage's tensor-parallel group
        (workers/tensor_parallel.py); join_stages() forms the group before the first forward.
        core_lease: the path of the lease file of the CPU cores this actor shares with a drafter actor
        (workers/core_lease.py); not for tensor-parallel ranks, whose all-reduces would wait on it."""
        _threads(threads)
        self.device = pick_device(device)
        model, _ = load_for_decoding(source, dtype, self.device, with_tokenizer=False)
        if tp_size > 1:
            from workers.tensor_parallel import TensorParallelRunner

            self.runner = TensorParallelRunner(model, self.device, layer_range, tp_rank, tp_size)
        else:
            self.runner = ModelRunner(model, self.device, layer_range)
        self.tp_rank = tp_rank
        start, end = self.runner.layer_range
        layers = model.model.layers
        for i in range(len(layers)):          # free the layers other stages hold
            if not start <= i < end:
                layers[i] = torch.nn.Module()
        self.caches: dict[str, KVCache] = {}
        self._busy = BusyTimer("target")
        if core_lease and tp_size == 1:
            self.runner.lease = CoreLease(core_lease, on_wait=self._busy.waited)
        # The last stage's float32 logits are the model dtype's values widened (the head runs in it),
        # so sending them back in that dtype is exact and halves the bytes for bf16/fp16 models.
        self.wire_dtype = self.runner.dtype
        self.link: StageLink | None = None        # set when the stages join a torch.distributed group

    # --------------------------------------------------- the stage link (workers/stage_link.py)
    def rendezvous(self) -> str:
        """init_method for the stages' process group: this actor's address and a free port (stage 0)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((ip, 0))
            return f"tcp://{ip}:{sock.getsockname()[1]}"

    def join_stages(self, init_method: str, rank: int, world: int, timeout_s: float) -> None:
        """Join this actor's process group: all pipeline stages (their link), or, with tensor
        parallelism, the ranks of this stage (their all-reduces)."""
        self.link = StageLink.join(init_method, rank, world, self.device, timeout_s)

    def leave_stages(self) -> None:
        if self.link is not None:
            self.link.leave()
            self.link = None

    def _hop(self, recv_tokens, send: bool, compute):
        """Run `compute(received)` between a receive from the previous stage (recv_tokens: tokens
        per request, or None = inputs came with the call) and a send to the next (send = True:
        returns None). A failure still sends a failure header on, then raises."""
        try:
            received = None
            if recv_tokens is not None:
                shapes = [(1, t, self.runner.config.hidden_size) for t in recv_tokens]
                received = self.link.recv(shapes, self.runner.dtype)
            outs = compute(received)
        except BaseException:
            if send:
                self.link.send(None)
            raise
        if not send:
            return outs
        self.link.send(outs)
        return None

    def info(self) -> dict:
        import ray

        return {"layers": self.runner.layer_range, "tp_rank": self.tp_rank, "device": str(self.device),
                "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
                "requests": len(self.caches), "lease_turns": self.runner.lease.turns}

    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # ------------------------------------------------------- per-request state
    def open(self, rid: str, capacity: int) -> None:
        self.caches[rid] = self.runner.new_cache(1, capacity)

    def close(self, rid: str) -> None:
        self.caches.pop(rid, None)

    def _cache(self, rid: str) -> KVCache:
        try:
            return self.caches[rid]
        except KeyError:
            raise LostRequestState(f"target shard {self.runner.layer_range} has no KV state for request {rid} "
                                   "(the actor restarted)") from None

    def _apply(self, rid: str, edits) -> None:
        """Cache edits the engine made since this request's last forward: ("crop", length) and
        ("keep", start, offsets). They ride along with the next forward instead of costing calls."""
        cache = self._cache(rid)
        for edit in edits or ():
            if edit[0] == "crop":
                cache.crop(0, edit[1])
            else:
                cache.keep(0, edit[1], edit[2].to(self.device))

    # ---------------------------------------------------------------- compute
    def forward(self, rid: str, inputs: torch.Tensor | None, depths=None, tree_mask=None, logits_rows=None,
                edits=(), recv_tokens: int | None = None, send: bool = False):
        """inputs: ids [1, T] (first stage) or hidden [1, T, hidden]; returns hidden or logits, on the CPU.
        Over the stage link: recv_tokens = T (inputs arrive from the previous stage), send = the
        output goes to the next stage (returns None)."""
        dev = self.device

        def compute(received):
            x = received[0] if received is not None else inputs.to(dev)
            self._apply(rid, edits)
            with self._busy.busy():
                out = self.runner.forward(self._cache(rid), x,
                                          depths=depths.to(dev) if depths is not None else None,
                                          tree_mask=tree_mask.to(dev) if tree_mask is not None else None,
                                          logits_rows=logits_rows)
            return [out] if send else out.to(self.wire_dtype).cpu()

        if recv_tokens is None and not send:
            out = compute(None)
            return out if self.tp_rank == 0 else None     # tensor-parallel ranks agree; rank 0 answers
        return self._hop([recv_tokens] if recv_tokens is not None else None, send, compute)

    def forward_many(self, rids: list[str], inputs: list[torch.Tensor] | None, extras: list[tuple],
                     edits: list | None = None, recv_tokens: list[int] | None = None, send: bool = False):
        """Batched forward of several requests (the global verifier's batch); extras: (depths, mask, rows).
        recv_tokens / send: as for forward, per request."""
        dev = self.device

        def compute(received):
            xs = received if received is not None else [x.to(dev) for x in inputs]
            for rid, request_edits in zip(rids, edits or [()] * len(rids)):
                self._apply(rid, request_edits)
            reqs = [(self._cache(rid), x, d.to(dev) if d is not None else None,
                     m.to(dev) if m is not None else None, rows) for rid, x, (d, m, rows) in zip(rids, xs, extras)]
            with self._busy.busy():
                outs = self.runner.forward_many(reqs)
            return outs if send else [o.to(self.wire_dtype).cpu() for o in outs]

        if recv_tokens is None and not send:
            outs = compute(None)
            return outs if self.tp_rank == 0 else None
        return self._hop(recv_tokens, send, compute)
