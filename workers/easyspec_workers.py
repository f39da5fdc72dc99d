"""EasySpec across workers (ALGORITHMS.md section 1): the members of a layer group run on
different Ray actors that exchange their outputs through a torch.distributed group
(gloo on the CPU, NCCL on GPUs).

Each of the N ranks (`EasySpecRank`, an actor) holds the full draft weights and, per
request, an ordinary in-process EasySpec session (workers/easyspec.py) whose drafter
has a `GroupExchange`. The layer math is ModelRunner._grouped_layers for both modes;
the exchange only decides who computes which group member:

  fused group [l_0 .. l_{n-1}]  rank r computes member l_r on the group input (its
                                attention, writing only l_r's KV; with direct_mlp
                                also l_r's MLP), then an all-gather gives every rank
                                all members' outputs and every rank combines them in
                                layer order, identically, so all ranks hold the same h.
  single-layer group            every rank computes it (no collective): rank 0 needs
                                it anyway, so the copies on other ranks add no latency,
                                while computing it on one rank and broadcasting would
                                add a collective per layer to every draft step.
  exact passes                  prefill and KV calibration run every layer in order on
                                every rank, so each rank's KV is exact up to the last
                                exact point for every layer it will compute.
  sampling                      only rank 0 computes logits and samples (the others skip
                                the output head, a quarter of the 0.5B drafter's weights);
                                its token is broadcast and fed by all. Rank 0 returns the
                                draft and the q it sampled from, so q is exact.

Which KV a rank holds: layer l_r of each fused group only where it is rank r's
member (other ranks never read the approximate KV of layers they do not compute),
every other layer exact. That is exactly what in-process mode computes for the
layers each rank reads, so the ranks' drafts equal in-process drafts.

The driver side, `DistributedEasySpecDrafter`, is a `Drafter`: every command goes to
all ranks, submitted under one lock so each rank sees requests in the same order
(collectives must be entered in the same order everywhere).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import threading
import uuid
from datetime import timedelta

import torch

from core.sampling import SamplingParams, make_generator
from workers.actors import LostRequestState
from workers.drafters import Draft, Drafter, DraftSession


class GroupExchange:
    """This rank's part of the group collectives (torch.distributed's default group)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def members(self, group: list[int], compute, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every member of `group` ([batch, T, hidden] each), in group order."""
        import torch.distributed as dist

        mine = compute(group[self.rank]) if self.rank < len(group) else torch.zeros_like(hidden)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine.contiguous())
        return gathered[: len(group)]

    def share_token(self, tok: torch.Tensor) -> torch.Tensor:
        """Rank 0's draft token (0-dim long) on every rank."""
        import torch.distributed as dist

        buf = tok.reshape(1).clone()
        dist.broadcast(buf, src=0)
        return buf[0]


# The keys of an EasySpec strategy's config (orchestrator/strategies/easyspec.py) its drafters take;
# other keys of the strategy dicts passed to EasySpecRank / start_ranks are ignored.
DRAFTER_ARGS = ("name", "degree", "mode", "calibration", "groups")


class EasySpecRank:
    """One rank of distributed EasySpec drafters: full draft weights, one drafter per EasySpec
    strategy over them (each a dict holding DRAFTER_ARGS), and per-request sessions."""

    def __init__(self, drafter_spec: dict, strategies: list[dict], rank: int, world: int, device: str = "auto",
                 threads: int | None = None):
        from core.config import ModelSpec
        from workers.easyspec import EasySpecDrafter
        from workers.loading import load_for_decoding, pick_device
        from workers.runner import ModelRunner

        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world = rank, world
        self.device = pick_device(device)
        spec = ModelSpec.model_validate(drafter_spec)
        model, _ = load_for_decoding(spec.source, spec.dtype, self.device, spec.quantize, with_tokenizer=False)
        runner = ModelRunner(model, self.device)
        exchange = GroupExchange(rank, world)
        self.drafters: dict[str, EasySpecDrafter] = {}
        for s in strategies:
            drafter = EasySpecDrafter(runner, exchange=exchange, **{k: s[k] for k in DRAFTER_ARGS if k in s})
            largest = max(len(g) for g in drafter.groups)
            if largest > world:
                raise ValueError(f"strategy {s['name']!r}: workers ({world}) < its largest layer group ({largest})")
            self.drafters[s["name"]] = drafter
        self.vocab = runner.vocab_size
        self.sessions: dict[str, DraftSession] = {}

    def rendezvous(self) -> str:
        """init_method for the process group: this actor's node address and a free port (call on rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((ip, 0))
            return f"tcp://{ip}:{sock.getsockname()[1]}"

    def join(self, init_method: str, timeout_s: float = 300.0) -> None:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=timeout_s))

    def leave(self) -> bool:
        """Drop every session and the process group; True once the group is gone."""
        import torch.distributed as dist

        self.sessions.clear()
        if dist.is_initialized():
            dist.destroy_process_group()
        return not dist.is_initialized()

    def info(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), "requests": len(self.sessions)}

    def vocab_size(self) -> int:
        return self.vocab

    def start(self, sid: str, strategy: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.sessions[sid] = self.drafters[strategy].start(prompt_ids, params, make_generator(params.seed, self.device, role="drafter"))

    def propose(self, sid: str, k: int) -> Draft | None:
        session = self.sessions.get(sid)
        if session is None:     # the same on every rank, so no rank is left waiting in a collective
            raise LostRequestState(f"EasySpec rank {self.rank} has no session {sid}")
        draft = session.propose(k)
        if self.rank != 0:
            return None                     # rank 0 answers for the group
        if draft.probs is not None:
            draft.probs = draft.probs.cpu()
        return draft

    def update(self, sid: str, new_tokens: list[int], num_accepted: int) -> None:
        if sid in self.sessions:          # fire-and-forget: a lost session fails at its next propose
            self.sessions[sid].update(new_tokens, num_accepted)

    def close(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.close()


# ------------------------------------------------------------------ driver side
def start_ranks(drafter_spec: dict, strategies: list[dict], world: int, device: str = "auto", threads: int | None = None,
                actor_options: list[dict] | None = None, timeout_s: float = 300.0) -> list:
    """Start `world` EasySpecRank actors and join them into one process group; returns their handles."""
    import ray

    options = actor_options or [{} for _ in range(world)]
    remote = ray.remote(EasySpecRank)
    ranks = [remote.options(**options[r]).remote(drafter_spec, strategies, r, world, device, threads)
             for r in range(world)]
    try:
        init_method = ray.get(ranks[0].rendezvous.remote(), timeout=timeout_s)
        ray.get([r.join.remote(init_method, timeout_s) for r in ranks], timeout=timeout_s)
    except BaseException:
        stop_ranks(ranks)
        raise
    return ranks


def stop_ranks(ranks: list, timeout_s: float = 30.0) -> None:
    """Leave the process group, then end the actors."""
    import ray

    try:
        ray.get([r.leave.remote() for r in ranks], timeout=timeout_s)
    except Exception:   # noqa: BLE001 - a dead or stuck rank is killed below all the same
        pass
    for r in ranks:
        ray.kill(r)


class DistributedEasySpecDrafter(Drafter):
    """The EasySpec strategy `name`, its group members running on the `ranks` actors (see module doc)."""

    def __init__(self, ranks: list, name: str, timeout: float | None = None, submit_lock=None):
        """submit_lock: shared by every drafter over the same ranks (one submission order for all)."""
        self.ranks, self.name, self.timeout = ranks, name, timeout
        self._submit = submit_lock or threading.Lock()

    def call(self, method: str, *args, wait: bool = True):
        import ray

        with self._submit:
            refs = [getattr(r, method).remote(*args) for r in self.ranks]
        return ray.get(refs, timeout=self.timeout) if wait else refs

    def start(self, prompt_ids, params, generator):
        return _DistributedSession(self, prompt_ids, params)


class _DistributedSession(DraftSession):
    def __init__(self, drafter: DistributedEasySpecDrafter, prompt_ids, params):
        super().__init__([])
        self.d, self.sid = drafter, uuid.uuid4().hex
        if params.seed is None:
            # Every rank samples the draft tokens itself, so all need one stream: an unseeded request
            # gets a seed here (from this process's RNG), and each rank derives its drafter stream from it.
            params = dataclasses.replace(params, seed=int(torch.randint(0, 2 ** 62, ())))
        drafter.call("start", self.sid, drafter.name, list(prompt_ids), params)

    def propose(self, k: int) -> Draft:
        return self.d.call("propose", self.sid, k)[0]

    def update(self, new_tokens, num_accepted):
        self.d.call("update", self.sid, list(new_tokens), num_accepted, wait=False)

    def close(self):
        self.d.call("close", self.sid, wait=False)
