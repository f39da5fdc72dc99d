"""Ray plumbing: start or join the cluster, place the plan's actors, and wrap them so
`SpeculativeEngine` and the gRPC server use them exactly like in-process parts.

- `PipelineTarget` looks like a `ModelRunner`: a forward runs through the
  `target-shard-i` actors in layer order, each stage's output ObjectRef passed
  straight to the next stage; KV caches live in the actors, the engine holds a
  `RemoteCache` that mirrors their lengths and forwards crop/keep to them.
- `RemoteDrafter` looks like a `Drafter`: sessions live in a `drafter-*` actor.
Cache edits and drafter feedback cost no calls of their own: they are queued on
the driver and sent with the request's next forward / propose, so one verify step
is one call per stage and one draft is one call to the drafter.

Faults: actors restart up to `cluster.actor_max_restarts` times, losing their
per-request state. Every blocking call waits at most `cluster.actor_call_timeout_s`;
a dead, restarted or silent target shard surfaces as `WorkerUnavailable` (the
server's UNAVAILABLE), a dead drafter as an ordinary drafter failure (the engine
falls back to target-only steps, output unchanged).
"""
from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace

import ray
import torch

from core.errors import WorkerUnavailable
from orchestrator.build import Built, policy_factory
from orchestrator.config import EngineConfig
from orchestrator.drafter_worker import DrafterWorker
from orchestrator.engine import SpeculativeEngine
from orchestrator.strategies import RayContext
from placement.plan import Plan, PlacementError, check_strategies, rank_name
from placement.ray_groups import create_placement_group, shard_strategy
from workers.actors import LostRequestState, TargetShard
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession
from workers.loading import DTYPES, eos_ids, pick_device
from workers.runner import ModelRunner


def get(ref, timeout: float | None, what: str):
    """ray.get bounded in time; a lost worker or lost request state becomes WorkerUnavailable."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise WorkerUnavailable(f"{what}: no answer within {timeout} s") from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise WorkerUnavailable(f"{what}: actor died ({type(exc).__name__})") from None
    except LostRequestState as exc:
        raise WorkerUnavailable(f"{what}: {exc}", actor_lost=False) from None


# ------------------------------------------------------------------ target
class RemoteCache:
    """The engine's handle on one request's KV state, held by every target shard actor."""

    def __init__(self, shards, capacity: int):
        self.rid = uuid.uuid4().hex
        self.shards = shards
        self.lengths = [0]
        self.edits: list[tuple] = []
        for s in shards:
            s.open.remote(self.rid, capacity)

    @property
    def batch(self) -> int:
        return 1

    def crop(self, row: int, length: int) -> None:
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"crop length {length} outside [0, {self.lengths[row]}]")
        self.lengths[row] = length
        self.edits.append(("crop", length))

    def keep(self, row: int, start: int, offsets: torch.Tensor) -> None:
        offsets = offsets.cpu()
        self.lengths[row] = start + int(offsets.numel())
        self.edits.append(("keep", start, offsets))

    def take_edits(self) -> list[tuple]:
        """The edits every shard applies before this request's next forward."""
        edits, self.edits = self.edits, []
        return edits

    def release(self) -> None:
        for s in self.shards:
            s.close.remote(self.rid)


class PipelineTarget:
    """A ModelRunner stand-in over pipeline-stage actors (see module doc).

    Hidden states between stages go through Ray's object store (each stage's output
    ObjectRef is passed to the next), or, for hops of at least `link_min_tokens` tokens,
    over the stages' torch.distributed link (workers/stage_link.py): then every stage's
    call is submitted at once, under one lock so all stages see forwards in the same
    order, and only the last stage's logits come back through Ray. A link whose actor
    died cannot be re-formed with the restarted actor: after such a failure every hop
    goes through Ray.
    """

    def __init__(self, stages: list, vocab_size: int, device: torch.device = torch.device("cpu"),
                 timeout: float | None = None, link_min_tokens: int | None = None):
        """stages: per pipeline stage, its actor, or the list of its tensor-parallel ranks (rank 0
        first; every rank gets every call, rank 0 answers)."""
        self.stages = [g if isinstance(g, list) else [g] for g in stages]
        self.shards = [a for g in self.stages for a in g]          # every actor holding request state
        self.vocab_size, self.device, self.timeout = vocab_size, device, timeout
        tensor_parallel = any(len(g) > 1 for g in self.stages)
        self.link_min_tokens = link_min_tokens if len(self.stages) > 1 and not tensor_parallel else None
        self._submit_lock = threading.Lock()
        self.hops = {"ray": 0, "link": 0}

    def new_cache(self, batch: int = 1, capacity: int = 256) -> RemoteCache:
        if batch != 1:
            raise ValueError("PipelineTarget keeps one sequence per cache")
        return RemoteCache(self.shards, capacity)

    def _through_stages(self, method: str, inputs, tokens, what: str, **kwargs):
        """One forward through every stage; the last stage's output."""
        total = tokens if isinstance(tokens, int) else sum(tokens)
        link = self.link_min_tokens is not None and total >= self.link_min_tokens
        refs = []
        with self._submit_lock:         # every actor sees forwards in one order (links and all-reduces pair up)
            ref = inputs
            for i, group in enumerate(self.stages):
                if link:
                    refs.append(getattr(group[0], method).remote(
                        inputs=inputs if i == 0 else None, recv_tokens=tokens if i else None,
                        send=i < len(self.stages) - 1, **kwargs))
                else:
                    group_refs = [getattr(rank, method).remote(inputs=ref, **kwargs) for rank in group]
                    ref = group_refs[0]
                    refs.extend(group_refs[1:] + [ref])     # rank 0's last: it is the stage's answer
        self.hops["link" if link else "ray"] += len(self.stages) - 1
        try:
            return get(refs[-1], self.timeout, what)
        except WorkerUnavailable as exc:
            if link and exc.actor_lost:
                self.link_min_tokens = None      # the link lost a member: Ray from now on
            raise
        except Exception:
            if link or len(refs) > len(self.stages):   # the answer may only reflect another actor's failure
                try:
                    for r in refs[:-1]:
                        get(r, self.timeout, what)
                except WorkerUnavailable as exc:
                    if exc.actor_lost:
                        self.link_min_tokens = None
                    raise
            raise

    def forward(self, cache: RemoteCache, input_ids: torch.Tensor, num_new=None, depths=None, tree_mask=None,
                logits_rows=None, **unsupported) -> torch.Tensor:
        if unsupported or num_new is not None:
            raise ValueError(f"PipelineTarget.forward does not take {sorted(unsupported) or 'num_new'}")
        d = depths.cpu() if depths is not None else None
        m = tree_mask.cpu() if tree_mask is not None else None
        t = int(input_ids.shape[1])
        out = self._through_stages("forward", input_ids.cpu(), t, "target forward", rid=cache.rid, depths=d,
                                   tree_mask=m, logits_rows=logits_rows, edits=cache.take_edits())
        cache.lengths[0] += t
        return out.to(self.device).float()       # logits travel in the model dtype (exact; actors.py)

    def forward_many(self, requests: list[tuple]) -> list[torch.Tensor]:
        extras = [(r[2].cpu() if r[2] is not None else None, r[3].cpu() if r[3] is not None else None, r[4])
                  for r in requests]
        tokens = [int(r[1].shape[1]) for r in requests]
        outs = self._through_stages("forward_many", [r[1].cpu() for r in requests], tokens,
                                    "batched target forward", rids=[r[0].rid for r in requests], extras=extras,
                                    edits=[r[0].take_edits() for r in requests])
        for r, t in zip(requests, tokens):
            r[0].lengths[0] += t
        return [o.to(self.device).float() for o in outs]

    prefill = ModelRunner.prefill     # built on forward()


# ------------------------------------------------------------------ drafter
class RemoteDrafter(Drafter):
    """A strategy's drafter running in drafter actors (requests spread round-robin over replicas)."""

    opens_lazily = True      # start() costs nothing: the session opens at its first draft or open_ahead()

    def __init__(self, workers: list, strategy: str, timeout: float | None = None, opens_ahead: bool = True):
        """opens_ahead: open_ahead() sends the start at once; False where the drafter's prefill would take
        the cores the target's prefill runs on (placement: both on one CPU node): there it only slowed
        both (one request at a time here: time to first token up 0.3-1 s, 10.15 tok/s against 11.4-11.9
        opening at the first draft), so its sessions open at their first draft."""
        self.workers, self.name, self.timeout, self.opens_ahead = workers, strategy, timeout, opens_ahead
        self._next = itertools.cycle(workers)

    def start(self, prompt_ids, params, generator):
        return _RemoteSession(next(self._next), self.name, prompt_ids, params, self.timeout, self.opens_ahead)


class _RemoteSession(DraftSession):
    """A request's session in a drafter actor, opened by its first draft, or ahead of it (`open_ahead`,
    beside the target's prefill) when the request will likely draft: a request that never drafts (the
    goodput scheduler's k = 0 under load) costs the actor no prefill and the request no wait for it."""

    def __init__(self, worker, strategy: str, prompt_ids, params, timeout: float | None, opens_ahead: bool = True):
        super().__init__([])
        self.worker, self.sid, self.timeout, self.opens_ahead = worker, uuid.uuid4().hex, timeout, opens_ahead
        self._start = (strategy, list(prompt_ids), params)       # sent ahead or with the first propose
        self._opening = None                                     # the start call in flight
        self.updates: list[tuple] = []         # update and observe_target calls, sent with the next propose

    def open_ahead(self) -> None:
        """Send the start call now, without waiting: the actor prefills the prompt meanwhile (unless the
        drafter shares the target's cores: RemoteDrafter's opens_ahead)."""
        if self.opens_ahead:
            self._send_start()

    def _send_start(self) -> None:
        if self._start is not None:
            start, self._start = self._start, None
            self._opening = self.worker.start.remote(self.sid, *start)

    @property
    def unopened(self) -> bool:
        return self._start is not None

    def propose(self, k: int) -> Draft:
        if k == 0:        # "decode normally": nothing to ask (a hybrid's lookup runs beside the engine)
            return EMPTY_DRAFT
        setup_s = opening_s = 0.0
        self._send_start()
        if self._opening is not None:
            t0 = time.perf_counter()
            # The actor serves calls concurrently (threads): the session must exist before the propose.
            opening, self._opening = self._opening, None
            # A session that learns from the target's top-k (Ouroboros' pool) gets them from here on.
            self.target_topk, opening_s = get(opening, self.timeout, "drafter start")
            setup_s = time.perf_counter() - t0       # what is left of the opening when the draft is wanted
        updates, self.updates = self.updates, []
        draft = get(self.worker.propose.remote(self.sid, k, updates), self.timeout, "draft")
        draft.setup_s = setup_s         # a draft length policy prices drafting, not opening the session
        draft.opening_s = opening_s
        return draft

    def update(self, new_tokens, num_accepted):
        self.updates.append((list(new_tokens), num_accepted))       # sent with the next propose

    def observe_target(self, input_tokens, topk_ids):
        self.updates.append((list(input_tokens), topk_ids, "target"))   # likewise, in order

    def close(self):
        if self._start is None:
            self.worker.close.remote(self.sid, self._opening, self.updates)


# ------------------------------------------------------------------ cluster
@dataclass
class RayRuntime:
    plan: Plan
    placement_group: object
    actors: dict[str, object]          # actor name -> handle
    dashboard_url: str | None
    lease_files: tuple[str, ...] = ()  # core leases' files (workers/core_lease.py), removed at shutdown

    def shutdown(self) -> None:
        for handle in self.actors.values():
            ray.kill(handle)
        ray.util.remove_placement_group(self.placement_group)
        for path in self.lease_files:       # those on this node; another node's stay in its temp directory
            if os.path.exists(path):
                os.remove(path)


def start_ray(config: EngineConfig, namespace: str = "specorch") -> str | None:
    """Join `cluster.address` or start a local head with the dashboard; returns the dashboard URL."""
    c = config.cluster
    if ray.is_initialized():
        return None
    kwargs = dict(namespace=namespace, log_to_driver=True)
    if c.address:
        ctx = ray.init(address=c.address, **kwargs)
    else:
        # A local head advertises the first node pool's resources, so the plan's bundles fit.
        pool = config.node_pools[0] if config.node_pools else None
        resources = {f"pool:{pool.name}": 1000.0} if pool else {}
        if c.metrics_export_port is not None:
            kwargs["_metrics_export_port"] = c.metrics_export_port
        port = c.dashboard_port
        if not _port_free(c.dashboard_host, port):    # another Ray head on this machine: do not fail for it
            print(f"note: cluster.dashboard_port {port} is in use; the dashboard takes the next free port",
                  flush=True)
            port = None
        ctx = ray.init(include_dashboard=True, dashboard_host=c.dashboard_host, dashboard_port=port,
                       num_cpus=max(pool.cpus, len(config.strategies) + 2) if pool else None,
                       resources=resources, **kwargs)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def metrics_endpoints() -> list[str]:
    """Every live node's Prometheus endpoint, where our `ray_specorch_*` metrics are served."""
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def place(config: EngineConfig, plan: Plan, only: list[str] | None = None,
          name: str = "specorch") -> tuple[Built, RayRuntime]:
    """Create the placement group, start the shard and drafter actors, and build engines over them."""
    pg = create_placement_group(plan, name=f"{name}-{config.name}")
    actors: dict[str, object] = {}
    # One lease file per node whose cores a target shard and a drafter actor share (workers/core_lease.py).
    run_id = uuid.uuid4().hex[:12]
    leases = {node: os.path.join(tempfile.gettempdir(), f"specorch-cores-{run_id}-{node[0]}-{node[1]}.lock")
              for node in plan.shared_cpu_nodes()} if config.runtime.core_lease else {}
    try:
        return _place(config, plan, only, pg, actors, leases)
    except BaseException:
        RayRuntime(plan, pg, actors, None, tuple(leases.values())).shutdown()   # nothing half-started stays
        raise


def _place(config: EngineConfig, plan: Plan, only, pg, actors: dict, leases: dict) -> tuple[Built, RayRuntime]:
    def options(shard) -> dict:   # the actor's name, resources and bundle
        return dict(name=shard.name, num_cpus=shard.cpus, num_gpus=shard.gpus,
                    max_restarts=config.cluster.actor_max_restarts,
                    scheduling_strategy=shard_strategy(pg, plan, shard.name))

    threads = config.runtime.threads
    call_timeout = config.cluster.actor_call_timeout_s
    t = config.models.target
    run = check_strategies(config, only, log=None)   # check_plan's strategy checks (launch.py ran them before Ray)
    chosen = run.strategies
    tokenizer, meta = _tokenizer_and_meta(t.source, t.dtype)
    for st in chosen:                # a drafter actor fails out of sight: its tokenizers are checked here
        st.check_tokenizers(config, tokenizer)
    targets = sorted((s for s in plan.shards if s.role == "target"), key=lambda s: (s.layers[0], s.tp_rank))
    for s in targets:
        actors[s.name] = ray.remote(TargetShard).options(**options(s)).remote(
            t.source, t.dtype, tuple(s.layers), "cuda" if s.device == "gpu" else "cpu", threads or s.cpus,
            s.tp_rank, s.tp_size, leases.get((s.pool, s.node)) if s.device == "cpu" else None)
    stages: list[list] = []                  # per pipeline stage, its tensor-parallel ranks in order
    for s in targets:
        if s.tp_rank == 0:
            stages.append([])
        stages[-1].append(actors[s.name])

    def form_group(members: list, what: str) -> None:
        init = get(members[0].rendezvous.remote(), call_timeout, what)
        get([m.join_stages.remote(init, i, len(members), call_timeout) for i, m in enumerate(members)],
            call_timeout, what)

    placement = config.placement.target if config.placement else None
    link_min_tokens = None
    if any(len(g) > 1 for g in stages):      # each stage's ranks form their own group (all-reduces)
        for g in stages:
            form_group(g, "tensor-parallel process group")
    elif len(stages) > 1 and placement is not None and placement.stage_transport == "auto":
        form_group([g[0] for g in stages], "pipeline stage process group")
        link_min_tokens = placement.link_min_tokens
    shards = [g[0] for g in stages]

    drafter_actors: dict[str, list] = {}      # models.drafters key -> the actors that load it
    for s in plan.shards:
        if s.role != "drafter":
            continue
        # Strategies drafting in a drafter actor (`actor_drafters`: draft-model, one-process EasySpec and
        # one-drafter cascade strategies) live in the actor that loads their drafter: this entry's own
        # model or one it colocates.
        uses = [st for st in chosen if (keys := st.actor_drafters()) and run.hosts.get(keys[0]) == s.model]
        if not uses:
            continue
        loads = [k for k in s.models if any(st.actor_drafters()[0] == k for st in uses)]
        batching = config.server.batch_drafting and config.server.concurrency > 1
        actors[s.name] = ray.remote(DrafterWorker).options(
            **options(s), max_concurrency=config.server.concurrency if batching else 1).remote(
            {k: config.models.drafters[k].model_dump() for k in loads}, [st.model_dump() for st in uses],
            "cuda" if s.device == "gpu" else "cpu", threads or s.cpus, batching, config.server.max_verify_batch,
            leases.get((s.pool, s.node)) if s.device == "cpu" else None)
        for k in loads:
            drafter_actors.setdefault(k, []).append(actors[s.name])

    vocab = ray.get(shards[-1].vocab_size.remote())
    # Drafts are compared with the target index by index, except by strategies that spell them (own_vocabulary).
    compared = {key for st in chosen if not st.own_vocabulary() for key in st.actor_drafters()}
    for model_key, handles in drafter_actors.items():
        # Every actor answers once: one that failed to start (a drafter that could not be built) fails the
        # placement here, instead of leaving its requests to decode target-only, unreported.
        sizes = ray.get([h.vocab_size.remote(model_key) for h in handles])
        if model_key in compared and sizes[0] != vocab:
            raise ValueError(f"models.drafters.{model_key}: vocabulary size differs from the target's")

    device = pick_device(config.runtime.device)
    timeout = config.cluster.actor_call_timeout_s
    target = PipelineTarget(stages, vocab, timeout=timeout, link_min_tokens=link_min_tokens)
    eos = eos_ids(meta, tokenizer)
    built = Built(config, device, meta, tokenizer, target,
                  {"plain": SpeculativeEngine(target, None, eos_token_ids=eos, name="plain")})

    def remote_drafter(key: str, strategy: str) -> Drafter:
        if key not in drafter_actors:     # check_plan rules this out for plans of this config
            raise PlacementError(f"strategy {strategy!r}: drafter {key!r} has no actor in this plan "
                                 f"(add placement.drafters.{key}, or colocate it)")
        return RemoteDrafter(drafter_actors[key], strategy, timeout, opens_ahead=not plan.shares_target_cores(key))

    def own_shards(st) -> list:
        return [next(s for s in plan.shards if s.name == rank_name(st, r)) for r in range(st.own_actors())]

    ctx = RayContext(config, target, vocab, threads, timeout, remote_drafter, own_shards, options, actors)
    # An opening (a drafter's prefill) costs the target's time only where a drafter shares its cores, and
    # only a drafter on hardware of its own can draft for one cohort while the target verifies the other.
    built.scheduler.drafter_shares_target = any(plan.shares_target_cores(k) for st in chosen
                                                for k in st.actor_drafters())
    for st in chosen:
        # an engine of its own (DuoDecoding: pipelined, with its own CPU drafter actor), else its drafter:
        # in a drafter actor, in ranks of its own (EasySpec, workers > 1) or beside the engine (prompt lookup)
        engine = st.make_engine(config, target, eos)
        if engine is None:
            engine = SpeculativeEngine(target, st.ray_drafter(ctx), policy_factory(st.draft_length, built.scheduler, st.name),
                                       eos_token_ids=eos, name=st.name)
        built.engines[st.name] = engine
    return built, RayRuntime(plan, pg, actors, None, tuple(leases.values()))


def _tokenizer_and_meta(source: str, dtype: str):
    """The target's tokenizer and config without loading its weights into this process."""
    from transformers import AutoConfig, GenerationConfig

    from workers.model_store import load_tokenizer, resolve_model_path

    path = resolve_model_path(source, DTYPES[dtype])
    tokenizer = load_tokenizer(path)
    try:
        gen = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        gen = None
    return tokenizer, SimpleNamespace(config=AutoConfig.from_pretrained(path, local_files_only=True),
                                      generation_config=gen)
