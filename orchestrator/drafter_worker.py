"""The drafter actor: draft models, the drafters of the strategies that use them, and per-request
sessions. A plain class: `ray.remote(...)` wraps it at placement time (orchestrator/ray_runtime.py),
and tests can also run it in process."""
from __future__ import annotations

import time

import torch

from core.config import ModelSpec
from core.sampling import SamplingParams, make_generator
from orchestrator.config import StrategyAdapter
from orchestrator.global_verifier import GlobalVerifier
from workers.actors import LostRequestState
from workers.core_lease import NO_LEASE, CoreLease
from workers.drafters import Draft
from workers.loading import load_for_decoding, pick_device
from workers.monitoring import BusyTimer
from workers.runner import ModelRunner


class DrafterWorker:
    """Hosts draft models, the drafters of the strategies that use them, and their sessions.

    Usually one draft model; several when the placement colocates drafters (e.g. the bf16 and
    int8 variants of one model: placement.drafters.<key>.colocate), each strategy drafting with
    its own (`drafter`, or a cascade's first `drafters` entry). With `batch_drafting` (and the
    actor started with max_concurrency > 1, so concurrent requests' calls run in parallel
    threads), the draft-model forwards of all live requests go through one batching queue per
    model, as the target's do through the global verifier: each draft step streams the weights
    once for every request drafting at that moment.
    """

    def __init__(self, drafter_specs: dict[str, dict], strategies: list[dict], device: str = "auto",
                 threads: int | None = None, batch_drafting: bool = False, max_batch: int = 16,
                 core_lease: str | None = None):
        """drafter_specs: models.drafters key -> its ModelSpec (as a dict), every model this actor loads.
        core_lease: the path of the lease file of CPU cores shared with a target shard (workers/core_lease.py):
        every forward of this actor's models then takes turns with the target's."""
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device(device)
        runners: dict[str, ModelRunner] = {}
        self._busy = BusyTimer("drafter")
        # one lease per process: its models share the cores too
        lease = CoreLease(core_lease, on_wait=self._busy.waited) if core_lease else NO_LEASE
        for key, raw in drafter_specs.items():
            spec = ModelSpec.model_validate(raw)
            model, _ = load_for_decoding(spec.source, spec.dtype, self.device, spec.quantize, with_tokenizer=False)
            runners[key] = ModelRunner(model, self.device)
            runners[key].lease = lease
        self.runners_lease = lease
        parsed = [StrategyAdapter.validate_python(s) for s in strategies]
        # Draft-model drafters only call forward(); EasySpec drives the layers itself and keeps the runner.
        self.batchers = {key: GlobalVerifier(r, max_batch=max_batch, name="draft-batcher" if len(runners) == 1
                                             else f"draft-batcher-{key}")
                         for key, r in runners.items()} if batch_drafting else {}
        self.drafters = {}
        for s in parsed:
            key = s.actor_drafters()[0]
            batched = key in self.batchers and s.drafts_by_forward()
            self.drafters[s.name] = s.make_drafter(self.batchers[key] if batched else runners[key])
        self.vocab = {key: r.vocab_size for key, r in runners.items()}
        self.first = next(iter(runners))
        self.sessions: dict = {}

    def vocab_size(self, key: str | None = None) -> int:
        """The vocabulary size of drafter `key` (default: the first loaded)."""
        return self.vocab[key or self.first]

    def start(self, sid: str, strategy: str, prompt_ids: list[int], params: SamplingParams) -> tuple[int, float]:
        """Opens the session; returns its `target_topk` (> 0: send it the target's top-k ids too) and the
        seconds the opening took here (the prefill of the prompt: what a scheduler weighs an opening by,
        where the request's own wait for it may be shorter)."""
        t0 = time.perf_counter()
        # The drafter's own stream, independent of the verifier's (core/sampling.py: STREAM_ROLES);
        # a seeded request stays reproducible, and draws the same drafts as in process.
        generator = make_generator(params.seed, self.device, role="drafter")
        session = self.sessions[sid] = self.drafters[strategy].start(prompt_ids, params, generator)
        return session.target_topk, time.perf_counter() - t0

    def propose(self, sid: str, k: int, updates=()) -> Draft:
        """updates: the session's feedback since its last propose, in order: (new_tokens, num_accepted)
        for `update`, or (input_tokens, topk_ids [n, target_topk]) tagged "target" as a third item for
        `observe_target`; sent with this call: one call per step, and no reordering when calls run in
        parallel threads."""
        session = self.sessions.get(sid)
        if session is None:
            raise LostRequestState(f"drafter has no session {sid} (the actor restarted)")
        self._apply(session, updates)
        with self._busy.busy():
            draft = session.propose(k)
        if draft.probs is not None:
            draft.probs = draft.probs.cpu()
        return draft

    def live_requests(self) -> int:
        return len(self.sessions)

    def draft_batches(self, key: str | None = None) -> dict:
        """How the batched drafting of drafter `key` (default: the first loaded) went: forwards, rows,
        largest batch (empty without batching)."""
        batcher = self.batchers.get(key or self.first)
        return vars(batcher.stats) if batcher else {}

    def core_lease(self) -> dict:
        """The core lease's turns and seconds waited (runtime.core_lease; zeros without one)."""
        lease = self.runners_lease
        return {"turns": lease.turns, "waited_s": lease.waited_s}

    @staticmethod
    def _apply(session, updates) -> None:
        for update in updates:
            if len(update) == 3:
                session.observe_target(update[0], update[1])
            else:
                session.update(*update)

    def close(self, sid: str, opened=None, updates=()) -> None:
        """opened: the session's start call when it may still be running (a session opened ahead and
        never drafted with): Ray resolves it first, so the session is not left open behind the close.
        updates: the feedback since the last propose (the request's last steps: a session that learns
        from them, as Ouroboros' pool does, gets them before it closes)."""
        session = self.sessions.pop(sid, None)
        if session is not None:
            try:
                self._apply(session, updates)
            finally:
                session.close()
