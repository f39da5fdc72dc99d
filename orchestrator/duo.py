"""DuoDecoding (ALGORITHMS.md section 2): the drafter drafts round i+1 while the target verifies round i.

Round structure, with `pending` the newest committed token (not yet in the target's KV):
1. The target forwards [pending, draft] (k sequences merged into a tree) on this process's threads.
   Meanwhile the drafter, in its own process (a Ray actor: workers/duo_drafter.py), drafts the
   speculative next round on top of committed + the draft's main sequence (sequence 0), assuming it
   is accepted in full. Its first tokens are candidates for the bonus position.
2. Verification walks the tree with the section-0 rules (verify_tree / verify_tree_greedy).
   - The main sequence accepted in full: instead of sampling the bonus from p, the speculative draft's
     first tokens are verified against p as siblings (verify_siblings: the sampled one against its q,
     the deterministic alternatives one-hot). If one is accepted it is the step's last token and the rest
     of its sequence is the next round's draft, already made: the drafter never waited. Otherwise the
     recovered token comes from the residual and the speculative draft is discarded.
   - Anything else (a rejection, or another sequence accepted): the speculative draft is discarded and
     the next round has an empty draft: the target forwards the pending token alone while the drafter
     rolls back to the committed tokens (it keeps its KV up to the common prefix) and drafts past it.
     That draft's first tokens are the bonus candidates of the one-token round, so the target never
     waits for a fresh draft.
   Each round's draft is verified against the q it was drawn from, so the output is exactly the
   target's, whatever is speculated or discarded; the walk's own bonus sample, when replaced, is an
   independent draw that is simply not used.
3. Round 0: the first token is sampled from the target's prefill without waiting for the drafter,
   so the time to first token is the target's prefill alone. The drafter prefills the prompt at the
   same time, unless `target_threads` says the two share cores: then the target prefills alone on
   all threads and the drafter's prefill runs in round 1, beside the target's one-token forward. (The spec's round-0 draft of length 1 would be a guess checked
   against this same p: it cannot add a token, and waiting for it puts the drafter's prefill, here
   often slower than the target's, on the first token's path.)
The draft budget per round comes from `DraftBudgetController` (core/duo_policy.py), fed with
the drafter's per-token compute time and the target's verify time, measured online and by a short
start-up calibration.

Thread split: the target runs on this process's torch threads (runtime.threads); the drafter actor sets
its own (`threads` in the strategy config), so the two never share an intra-op pool. The in-process
client runs the drafter side sequentially (tests; same outputs as the actor) or on one worker thread.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from core.duo_policy import DraftBudgetController
from core.metrics import RequestStats
from core.sampling import SamplingParams, make_generator, sample, warp_probs
from core.verification import verify_chain, verify_greedy, verify_siblings, verify_tree, verify_tree_greedy
from orchestrator.engine import GenerationResult, emit, tree_attention
from orchestrator.gpu_stats import GpuMonitor
from workers.duo_drafter import MultiDraft
from workers.runner import ModelRunner


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class InProcessDrafterClient:
    """Calls a DuoDrafterSide in this process: sequentially (overlap=False) or on one worker thread."""

    def __init__(self, side, overlap: bool = False):
        self.side = side
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="duo-drafter") if overlap else None

    def call(self, method: str, *args):
        fn = getattr(self.side, method)
        return self.pool.submit(fn, *args) if self.pool else _Done(fn(*args))


class _RayFuture:
    def __init__(self, ref):
        self.ref = ref

    def result(self):
        import ray

        return ray.get(self.ref)


class RayDrafterClient:
    """Calls a DuoDrafterActor; Ray runs one caller's calls to an actor in order, so an open, a draft
    and a close of a request never overtake each other."""

    def __init__(self, actor):
        self.actor = actor

    def call(self, method: str, *args):
        return _RayFuture(getattr(self.actor, method).remote(*args))


def _clip(draft: MultiDraft, limit: int) -> MultiDraft:
    """Every sequence cut to `limit` tokens (a decision made before verification, from the lengths only)."""
    seqs = [s[:limit] for s in draft.sequences if s[:limit]]
    probs = None if draft.probs is None else [p[:limit] for s, p in zip(draft.sequences, draft.probs) if s[:limit]]
    return MultiDraft(seqs, probs, draft.compute_s, draft.forwards, draft.step_s)


def _flatten(draft: MultiDraft) -> tuple[list[int], list[int] | None, torch.Tensor | None]:
    """(tokens, parents or None for a chain, probs [n, vocab] or None): the sequences as one tree."""
    tokens: list[int] = []
    parents: list[int] = []
    for seq in draft.sequences:
        start = len(tokens)
        tokens.extend(seq)
        parents.extend([-1] + list(range(start, start + len(seq) - 1)))
    probs = torch.cat(draft.probs) if draft.probs else None
    return tokens, (parents if len(draft.sequences) > 1 else None), probs


class _RequestDrafter:
    """One request's draft calls. A failed drafter (an error, a dead actor) costs speed, never the
    request: the failure is recorded once and every later draft is empty (plain decoding)."""

    def __init__(self, client, rid: str, stats: RequestStats):
        self.client, self.rid, self.stats = client, rid, stats
        self.failed = False

    def _fail(self, exc: Exception) -> MultiDraft:
        if not self.failed:
            self.stats.events.append(f"drafter failed before step {self.stats.steps + 1} "
                                     f"({type(exc).__name__}: {exc}); target-only decoding from there")
        self.failed = True
        return MultiDraft([], None)

    def prefill(self, prompt: list[int]) -> None:
        """Start the drafter's prefill; not waited for (a failure shows in the next draft's result)."""
        if not self.failed:
            try:
                self.client.call("prefill", self.rid, prompt)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                self._fail(exc)

    def draft(self, base: list[int], budget: int, multi_sequence: bool):
        if self.failed:
            return _Done(MultiDraft([], None))
        try:
            return self.client.call("draft", self.rid, base, budget, multi_sequence)
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            return _Done(self._fail(exc))

    def result(self, future) -> MultiDraft:
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            return self._fail(exc)


class _TargetThreads:
    """torch's intra-op thread count for the target while DuoDecoding requests decode. torch's pool
    is process-wide, so concurrent requests share one setting: the first to enter sets it, the last to
    leave restores what was there."""

    _lock = threading.Lock()
    _active = 0
    _saved = 0

    def __init__(self, threads: int | None):
        self.threads = threads

    def __enter__(self):
        if self.threads:
            with self._lock:
                if _TargetThreads._active == 0:
                    _TargetThreads._saved = torch.get_num_threads()
                    torch.set_num_threads(self.threads)
                _TargetThreads._active += 1

    def __exit__(self, *exc):
        if self.threads:
            with self._lock:
                _TargetThreads._active -= 1
                if _TargetThreads._active == 0:
                    torch.set_num_threads(_TargetThreads._saved)


def _release(cache) -> None:
    release = getattr(cache, "release", None)   # KV held by remote shards (orchestrator/ray_runtime.py)
    if release:
        release()


class DuoEngine:
    """Pipelined speculative decoding: target here, drafter behind a client (actor or in-process)."""

    def __init__(self, target: ModelRunner, drafter, budget: DraftBudgetController | None = None,
                 multi_sequence: bool = True, eos_token_ids: tuple[int, ...] = (), name: str = "duo",
                 calibration_steps: int = 4, target_threads: int | None = None):
        self.target = target
        self.target_threads = target_threads       # torch threads while decoding (None: leave as is)
        self.drafter = drafter
        self.budget = budget or DraftBudgetController()
        self.multi_sequence = multi_sequence
        self.eos_token_ids = frozenset(eos_token_ids)
        self.name = name
        self.calibration_steps = calibration_steps
        self._calibrated = calibration_steps == 0
        self.gpu = GpuMonitor()      # reads nothing (and says so once) without a GPU

    def with_target(self, target) -> "DuoEngine":
        """The same strategy (drafter, budget controller) over another target (e.g. the global verifier)."""
        engine = DuoEngine(target, self.drafter, self.budget, self.multi_sequence, tuple(self.eos_token_ids),
                           self.name, self.calibration_steps, self.target_threads)
        engine._calibrated = self._calibrated
        return engine

    def calibrate(self) -> None:
        """Seed the budget controller with one timed drafter token and one timed verify forward."""
        steps = self.calibration_steps
        draft_token_s = self.drafter.call("seconds_per_token", steps).result()
        cache = self.target.new_cache(1, capacity=32 + self.budget.gamma_max)
        self.target.forward(cache, torch.zeros(1, 16, dtype=torch.long, device=self.target.device))
        ids = torch.zeros(1, self.budget.budget() + 1, dtype=torch.long, device=self.target.device)
        t0 = time.perf_counter()
        for _ in range(max(1, steps // 2)):
            self.target.forward(cache, ids)
            cache.crop(0, 16)
        verify_s = (time.perf_counter() - t0) / max(1, steps // 2)
        _release(cache)
        self.budget.observe(draft_token_s, verify_s)
        self._calibrated = True

    def generate(self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not self._calibrated:
            with _TargetThreads(self.target_threads):
                self.calibrate()
        prompt = list(prompt_ids)
        stats = RequestStats(prompt_tokens=len(prompt))
        generator = make_generator(params.seed, self.target.device, role="verifier")
        rid = uuid.uuid4().hex
        t_start = time.perf_counter()
        # The drafter derives its own stream from the seed (workers/duo_drafter.py; STREAM_ROLES).
        try:
            self.drafter.call("open", rid, prompt, params)
        except Exception:  # noqa: BLE001 - the first draft call reports the failure (_RequestDrafter)
            pass
        cache = self.target.new_cache(1, capacity=len(prompt) + max_new_tokens + 16)
        try:
            return self._generate(rid, cache, prompt, max_new_tokens, params, generator, stats, t_start, on_tokens)
        finally:
            _release(cache)
            try:
                self.drafter.call("close", rid)
            except Exception:  # noqa: BLE001 - a broken drafter has nothing left to free
                pass

    def _generate(self, rid, cache, prompt, max_new_tokens, params, generator, stats, t_start, on_tokens):
        target = self.target
        # Round 0: the first token is the target's own sample and never waits for the drafter (a
        # first-token guess could only be checked against this same p, and waiting for it would put
        # the drafter's prefill on the time to first token). On separate hardware the drafter prefills
        # at the same time. With target_threads set the two share cores: the target prefills on all of
        # this process's threads alone, and the drafter's prefill runs in round 1 beside the target's
        # one-token forward.
        drafter = _RequestDrafter(self.drafter, rid, stats)
        if self.target_threads is None:
            drafter.prefill(prompt)
        t0 = time.perf_counter()
        logits = target.prefill(cache, 0, prompt)                                 # [vocab]
        stats.target_busy_s += time.perf_counter() - t0
        stats.prefill_s = time.perf_counter() - t0
        first = int(sample(warp_probs(logits, params), generator))
        stats.ttft_s = time.perf_counter() - t_start
        out = [first]
        if on_tokens:
            on_tokens([first])
        finish = "stop" if first in self.eos_token_ids else "length"
        with _TargetThreads(self.target_threads):
            finish = self._decode(drafter, cache, prompt, out, finish, max_new_tokens, params, generator,
                                  stats, on_tokens)
        stats.generated_tokens = len(out)
        stats.total_s = time.perf_counter() - t_start
        readings = self.gpu.read()
        if readings:
            stats.events.append("at the end: " + "; ".join(map(str, readings)))
        return GenerationResult(tokens=out, stats=stats, finish_reason=finish)

    def _decode(self, drafter, cache, prompt, out, finish, max_new_tokens, params, generator, stats, on_tokens):
        """Rounds after the first token, until max_new_tokens or a stop; extends `out`, returns finish."""
        draft = None
        while finish != "stop" and len(out) < max_new_tokens:
            remaining = max_new_tokens - len(out)
            gamma = self.budget.budget()
            stats.draft_budgets.append(gamma)
            context = prompt + out
            t0 = time.perf_counter()
            # Nothing usable was speculated (round 1, or the last speculation was discarded): the target
            # does not wait for a fresh draft. It forwards the pending token alone while the drafter
            # drafts past it; that draft's first tokens are then the bonus candidates, as after any
            # fully accepted round, so neither side idles.
            draft = _clip(draft, remaining - 1) if draft is not None else MultiDraft([], None)
            t1 = time.perf_counter()
            main = draft.sequences[0] if draft.sequences else []
            after_main = len(out) + len(main) + 1       # tokens once the main sequence and a bonus are in
            speculation = None
            if after_main < max_new_tokens and not drafter.failed:
                speculation = drafter.draft(context + main, min(gamma, max_new_tokens - after_main),
                                            self.multi_sequence)
            tokens, parents, probs = _flatten(draft)
            tv = time.perf_counter()     # (inline, the speculative draft was made above: not the target's time)
            nodes, next_token, logits = self._verify(cache, out[-1], tokens, parents, probs, params, generator)
            t2 = time.perf_counter()
            stats.target_busy_s += t2 - tv
            self.budget.observe(verify_s=t2 - tv)
            next_draft = None
            if speculation is not None:
                spec = self._observe_draft(drafter.result(speculation), stats)
                stats.speculative_drafts += 1
                if nodes == list(range(len(main))):          # the main sequence accepted in full
                    p_bonus = warp_probs(logits[len(main)], params)                   # [vocab]
                    next_token, next_draft = self._take_speculation(p_bonus, spec, generator)
                    stats.speculative_used += next_draft is not None
            accepted = [tokens[i] for i in nodes]
            new_tokens = accepted + [next_token]
            emitted, stopped = emit(new_tokens, remaining, self.eos_token_ids)
            finish = "stop" if stopped else finish
            out.extend(emitted)
            # "drafted" is the depth (the most tokens that could be accepted); draft_s = time the target
            # spent on the draft before verifying (only clipping now: it never waits for the drafter).
            depth = max((len(s) for s in draft.sequences), default=0)
            stats.observe_step(depth, len(accepted), len(emitted), t1 - t0, t2 - tv)
            if on_tokens:
                on_tokens(emitted)
            draft = next_draft
        return finish

    def _observe_draft(self, draft: MultiDraft, stats: RequestStats) -> MultiDraft:
        stats.drafter_busy_s += draft.compute_s
        # Per one-token drafter forward: a plan of k sequences costs about budget - k + 1 of them.
        if draft.forwards:
            self.budget.observe(draft_token_s=draft.step_s / draft.forwards)
        return draft

    def _take_speculation(self, p: torch.Tensor, spec: MultiDraft, generator):
        """The token at a bonus position whose target distribution is p ([vocab], warped): one of the
        speculative draft's first tokens if the sibling rule accepts it, else the recovered token.
        Returns (token, the rest of the accepted sequence as the next draft, or None)."""
        roots = spec.roots
        if not roots:
            return int(sample(p, generator)), None
        j, residual = verify_siblings(torch.tensor(roots, device=p.device), p,
                                      spec.root_probs(p.shape[-1]).to(p.device), generator)
        if j < 0:
            return int(sample(residual, generator)), None
        rest = spec.sequences[j][1:]
        rest_probs = None if spec.probs is None else [spec.probs[j][1:]]
        return roots[j], MultiDraft([rest] if rest else [], rest_probs if rest else None)

    def _verify(self, cache, pending, tokens, parents, probs, params, generator):
        """One target forward over [pending, draft]; keeps the KV of pending + the accepted nodes.
        Returns (accepted node indices, next token from the walk, target logits [n+1, vocab])."""
        target = self.target
        base = cache.lengths[0]
        ids = torch.tensor([[pending] + tokens], device=target.device)         # [1, n+1]
        draft_ids = ids[0, 1:]                                                  # [n]
        if parents is None:
            logits = target.forward(cache, ids)[0]                              # [n+1, vocab]
            if params.greedy:
                res = verify_greedy(draft_ids, logits)
            else:
                res = verify_chain(draft_ids, probs, warp_probs(logits, params), generator)
            cache.crop(0, base + 1 + res.num_accepted)
            return list(range(res.num_accepted)), res.next_token, logits
        mask, depths = tree_attention(parents, target.device)
        logits = target.forward(cache, ids, depths=depths[None], tree_mask=mask[None])[0]   # [n+1, vocab]
        parent_ids = torch.tensor(parents)
        if params.greedy:
            res = verify_tree_greedy(draft_ids, parent_ids, logits)
        else:
            res = verify_tree(draft_ids, parent_ids, warp_probs(logits, params), probs, generator)
        offsets = torch.tensor([0] + [i + 1 for i in res.accepted_nodes], device=target.device)
        cache.keep(0, base, offsets)
        return res.accepted_nodes, res.next_token, logits


def build_duo_engine(strategy, drafter_spec, target, eos_token_ids: tuple[int, ...]) -> DuoEngine:
    """A DuoEngine for a `kind: duodecoding` strategy (orchestrator/strategies/duodecoding.py) over a
    loaded target; the drafter is loaded on the CPU, in a Ray actor or in this process."""
    from workers.duo_drafter import DuoDrafterActor, DuoDrafterSide, load_draft_model

    s = strategy
    if s.process == "actor":
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        actor = ray.remote(DuoDrafterActor).options(num_cpus=s.threads).remote(
            drafter_spec.model_dump(), "cpu", s.threads, s.top_alternatives, s.backend, target.vocab_size)
        client = RayDrafterClient(actor)
    else:
        model = load_draft_model(drafter_spec.model_dump(), s.backend, target.vocab_size, "cpu", s.threads)
        client = InProcessDrafterClient(DuoDrafterSide(model, s.top_alternatives), overlap=s.process == "thread")
    if client.call("vocab_size").result() != target.vocab_size:
        raise ValueError(f"models.drafters.{s.drafter}: vocabulary size differs from the target's")
    return DuoEngine(target, client, DraftBudgetController(s.gamma_init, s.gamma_min, s.gamma_max),
                     s.multi_sequence, eos_token_ids, s.name, s.calibration_steps, s.target_threads)
