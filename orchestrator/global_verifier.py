"""The global verifier: one target forward for the verification steps of all live requests.

Every request decodes in its own thread with its own `SpeculativeEngine.generate`
loop and drafter session. Their target forwards (prefill and verification) go
through `GlobalVerifier`, which looks like a `ModelRunner` to the engine: each call
queues the request's input and blocks; a single verifier thread takes whatever is
queued (up to `max_batch`), runs `ModelRunner.forward_many` once, and hands each
request its logits. A request joins at its next step and leaves when it finishes,
so batches change between steps (continuous batching). The target's weights are
streamed from memory once per batch instead of once per request, which is what
a memory-bound decode step pays for.

Long prompts (prefill) run in batches of their own, so a 2,000-token prompt
does not pad a batch of one-token steps. A forward that raises is retried
request by request, so one bad request fails alone.

While a split hint says so (the goodput scheduler's plan, with a drafter on
hardware of its own), decode steps are verified as two alternating cohorts
(core/cohorts.py): one cohort's requests draft while the other's verify.

Where the drafter shares the target's cores (`wait_for_drafting`), a batch of decode
steps also waits for the requests that are drafting now (the engines say when:
`drafting`): a forward that starts without them only splits the batch, and on shared
cores it runs beside their drafting at the speed of both sharing the cores (measured
here: a target forward 0.23 s against 0.13 s alone, a draft forward 0.08 s against
0.024 s); the requests then stay out of step, each forward streaming the weights for
half of them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from core.cohorts import Cohorts, DraftingRequests
from workers import monitoring
from workers.runner import KVCache, ModelRunner

log = logging.getLogger(__name__)
PREFILL_TOKENS = 32   # inputs longer than this are batched only with each other


@dataclass(eq=False)          # identity comparison: items hold tensors
class _Item:
    cache: KVCache
    input_ids: torch.Tensor          # [1, T]
    depths: torch.Tensor | None      # [1, T]
    tree_mask: torch.Tensor | None   # [1, T, T]
    logits_rows: object
    lm_head: object = None           # a drafter's trimmed head (workers/vocab_trim.py); None = the model's
    future: Future = field(default_factory=Future)

    @property
    def long(self) -> bool:
        return self.input_ids.shape[1] > PREFILL_TOKENS

    def as_request(self) -> tuple:
        return (self.cache, self.input_ids, self.depths, self.tree_mask, self.logits_rows, self.lm_head)


@dataclass
class VerifierStats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0
    busy_s: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class GlobalVerifier:
    """A ModelRunner stand-in that batches concurrent callers' forwards (see module doc)."""

    def __init__(self, runner: ModelRunner, max_batch: int = 16, gather_s: float = 0.005,
                 name: str = "global-verifier", gather_fraction: float = 0.1):
        """While fewer requests are queued than took part in the last two batches, wait for the
        others (they are between steps: verifying, picking the token, re-queuing) up to
        max(gather_s, gather_fraction x the last forward's seconds); a lone request never waits.
        Counting the last *two* batches is what re-merges a batch that split in halves: once the
        host work of a few requests outlasts the wait, the halves would otherwise alternate for
        good, each forward streaming the weights for half the requests. The same batching serves
        a drafter actor's draft model (orchestrator/drafter_worker.py), under another name."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runner, self.max_batch, self.gather_s = runner, max_batch, gather_s
        self.gather_fraction = gather_fraction
        self._recent: deque[set[int]] = deque(maxlen=2)   # cache ids of the last two batches
        self._last_forward_s = 0.0
        self.device, self.vocab_size = runner.device, runner.vocab_size
        self.lm_head = getattr(runner, "lm_head", None)     # drafters build trimmed heads from it
        self.stats = VerifierStats()
        # Called with (rows, tokens, seconds) after each forward (the goodput
        # scheduler's cost model).
        self.observers: list = []
        # Called before gathering a batch; each returns seconds worth waiting for requests still drafting
        # (the goodput scheduler's plan: GoodputScheduler.draft_wait_s). The longest wait counts.
        self.wait_hints: list = []
        # Called before gathering a batch of decode steps; any True = verify two alternating cohorts
        # (GoodputScheduler.split_cohorts).
        self.split_hints: list = []
        self.cohorts = Cohorts()
        # Requests drafting now, told by the engines (`drafting`). With wait_for_drafting a batch of
        # decode steps waits for them, each within its allowance (core/cohorts.py DraftingRequests): a
        # draft that runs far longer than recent ones (a drafter session's opening) is not waited out.
        self.wait_for_drafting = False
        self._drafting = DraftingRequests()             # by cache id
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._held: list[_Item] = []        # taken from the queue but kept for the next batch
        self._closing = threading.Lock()
        self._closed = False
        self._busy = monitoring.BusyTimer("verifier", name)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------- runner interface
    def new_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        return self.runner.new_cache(batch, capacity)

    def forward(self, cache: KVCache, input_ids: torch.Tensor, num_new=None, depths=None, tree_mask=None,
                logits_rows=None, lm_head=None, **unsupported) -> torch.Tensor:
        if unsupported or num_new is not None or input_ids.shape[0] != 1 or cache.batch != 1:
            raise ValueError("GlobalVerifier.forward takes one sequence per call (batch-1 cache, no extra options)")
        item = _Item(cache, input_ids, depths, tree_mask, logits_rows, lm_head)
        self._drafting.arrived(id(cache))            # its draft, if any, has come
        with self._closing:
            if self._closed:
                raise RuntimeError("global verifier stopped")
            self._queue.put(item)
        return item.future.result()

    prefill = ModelRunner.prefill     # built on forward(), so prompts are batched too

    @contextmanager
    def drafting(self, cache: KVCache):
        """The request of `cache` drafts its next step meanwhile (see wait_for_drafting). Yields a dict the
        caller fills: "setup_s", the seconds of the draft spent opening a drafter session, and "timed":
        False for a draft that is not the drafter's work (a context copy). Neither counts toward the
        recent longest draft (an opening is a one-time cost several drafts long, a copy takes
        microseconds), nor does a draft that failed (a drafter call that timed out)."""
        key, told = id(cache), {"setup_s": 0.0, "timed": True}
        self._drafting.begin(key, time.perf_counter())
        try:
            yield told
        except BaseException:
            self._drafting.arrived(key)              # no forward follows a failed draft for sure
            raise
        self._drafting.end(key, time.perf_counter(), told["setup_s"], told["timed"])

    def _drafting_until(self, cohort) -> float:
        """When the last of the drafting requests (of `cohort`, if split) is no longer worth waiting for."""
        return self._drafting.until(time.perf_counter(), self.gather_s,
                                    lambda key: cohort is None or self.cohorts.of(key) == cohort)

    def close(self) -> None:
        with self._closing:        # no forward is queued after the stop marker: none would be answered
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- loop
    def _next_batch(self) -> list[_Item] | None:
        pending = self._held or []
        self._held = []
        if not pending:
            first = self._queue.get()
            if first is None:
                return None
            pending = [first]
        recent = set().union(*self._recent)
        expected = min(len(recent), self.max_batch)
        cohort = None                                 # None: every request; else that cohort's only
        if not pending[0].long and any(h() for h in self.split_hints):
            for owner in recent:                      # entering the split: the recent requests, halved
                self.cohorts.of(owner)
            cohort = self.cohorts.of(id(pending[0].cache))
            expected = min(self.cohorts.expected(cohort, recent), self.max_batch)

        def wanted(it: _Item) -> bool:                # joins the batch being gathered
            return it.long == pending[0].long and (cohort is None or self.cohorts.of(id(it.cache)) == cohort)

        def counted(it: _Item) -> bool:               # toward `expected` (in lockstep: anything queued)
            return cohort is None or wanted(it)
        hint = max((h() for h in self.wait_hints), default=0.0)
        deadline = time.perf_counter() + max(self.gather_s, self.gather_fraction * self._last_forward_s, hint)
        gathered = sum(map(counted, pending))
        wait_drafts = self.wait_for_drafting and not pending[0].long
        while True:                                   # everything queued now, or soon
            now = time.perf_counter()
            drafts_until = self._drafting_until(cohort) if wait_drafts and gathered < self.max_batch else 0.0
            try:
                if gathered < expected or drafts_until > now:
                    item = self._queue.get(timeout=max(0.0, max(deadline, drafts_until) - now))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                # A request that began drafting while this waited (its thread had just been answered)
                # is waited for too.
                if wait_drafts and gathered < self.max_batch and self._drafting_until(cohort) > time.perf_counter():
                    continue
                break
            if item is None:
                self._queue.put(None)
                break
            pending.append(item)
            gathered += counted(item)
        batch = [it for it in pending if wanted(it)][: self.max_batch]
        chosen = {id(it) for it in batch}
        self._held = [it for it in pending if id(it) not in chosen]
        self._recent.append({id(it.cache) for it in batch})
        self.cohorts.ran(id(it.cache) for it in batch)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                for it in self._held:
                    it.future.set_exception(RuntimeError("global verifier stopped"))
                return
            self._run(batch)
            batch = None     # hold no request's KV cache while waiting for the next batch

    def _run(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        monitoring.record_verify_batch(len(batch), self._queue.qsize() + len(self._held))
        outs = None
        with self._busy.busy():
            try:
                outs = self.runner.forward_many([it.as_request() for it in batch])
            except Exception:  # noqa: BLE001 - isolate the failing request, the others go on
                for it in batch:
                    try:
                        it.future.set_result(self.runner.forward_many([it.as_request()])[0])
                    except Exception as exc:  # noqa: BLE001
                        it.future.set_exception(exc)
        self._last_forward_s = time.perf_counter() - t0
        tokens = sum(int(it.input_ids.shape[1]) for it in batch)   # forward_many packs rows, no padding
        # Observers first, then the answers: the requests' next steps then plan with this forward known.
        # An observer that raises is logged and skipped: it must not stop the loop every request waits on.
        for observe in self.observers:
            try:
                observe(len(batch), tokens, self._last_forward_s)
            except Exception:  # noqa: BLE001
                log.exception("global verifier: observer %r failed; verification goes on", observe)
        if outs is not None:
            for it, out in zip(batch, outs):
                it.future.set_result(out)
        s = self.stats
        s.batches += 1
        s.rows += len(batch)
        s.max_rows = max(s.max_rows, len(batch))
        s.busy_s += time.perf_counter() - t0
