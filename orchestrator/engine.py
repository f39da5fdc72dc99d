"""The speculative decoding loop for one request, in one process.

draft (maybe empty) -> one target forward over [pending, draft...] -> verify ->
roll the target KV back to the accepted prefix (or compact the accepted tree
path) -> feed the result back to the drafter and the draft-length policy.
Plain decoding is the same loop with no drafter, so "speedup vs plain" compares
like with like. Ray actors and the gRPC server call this; it imports neither.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch

from core.cost import draft_cost, parameter_count
from core.draft_length import DraftLengthPolicy, FixedDraftLength
from core.metrics import RequestStats
from core.sampling import SamplingParams, make_generator, sample, warp_probs
from core.verification import verify_chain, verify_greedy, verify_tree, verify_tree_greedy
from workers.drafters import EMPTY_DRAFT, Draft, Drafter
from workers.runner import ModelRunner


@dataclass
class GenerationResult:
    tokens: list[int]        # generated tokens (prompt excluded)
    stats: RequestStats
    finish_reason: str       # "stop" (an end-of-sequence token) or "length"


def tree_attention(parents: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and depths for the input [root, node_0, ..., node_{n-1}].

    Returns mask [n+1, n+1] bool (each input attends itself and its ancestors)
    and depths [n+1] long (root = 0).
    """
    n = len(parents)
    mask = torch.eye(n + 1, dtype=torch.bool)
    depths = [0] * (n + 1)
    mask[:, 0] = True
    for i, p in enumerate(parents):           # parents precede children, so rows are complete
        row, parent_row = i + 1, p + 1
        mask[row] |= mask[parent_row]
        depths[row] = depths[parent_row] + 1
    return mask.to(device), torch.tensor(depths, device=device)


def _clip(draft: Draft, limit: int) -> Draft:
    """A chain draft cut to `limit` tokens (no point verifying past max_new_tokens)."""
    if draft.parents is not None or len(draft) <= limit:
        return draft
    probs = draft.probs[:limit] if draft.probs is not None else None
    return replace(draft, tokens=draft.tokens[:limit], probs=probs)     # keeps its source and setup seconds


def _top_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring token ids of each row, best first, on the host: logits [n, vocab] -> [n, k]."""
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices.cpu()


def emit(new_tokens: list[int], remaining: int, eos_token_ids) -> tuple[list[int], bool]:
    """A step's tokens as output: at most `remaining`, cut after the first end-of-sequence
    token. Returns (tokens, whether an end-of-sequence token ended them)."""
    emitted = new_tokens[:remaining]
    for i, tok in enumerate(emitted):
        if tok in eos_token_ids:
            return emitted[: i + 1], True
    return emitted, False


class SpeculativeEngine:
    """Runs requests through a target runner with an optional drafter."""

    def __init__(
        self,
        target: ModelRunner,
        drafter: Drafter | None = None,
        policy_factory: Callable[[], DraftLengthPolicy] | None = None,
        eos_token_ids: tuple[int, ...] = (),
        name: str = "plain",
    ):
        self.target = target
        self.drafter = drafter
        self.policy_factory = policy_factory or (lambda: FixedDraftLength(0))
        self.eos_token_ids = frozenset(eos_token_ids)
        self.name = name

    def with_target(self, target) -> "SpeculativeEngine":
        """The same strategy over another target (e.g. the global verifier)."""
        return SpeculativeEngine(target, self.drafter, self.policy_factory, tuple(self.eos_token_ids), self.name)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stats = RequestStats(prompt_tokens=len(prompt_ids))
        generator = make_generator(params.seed, self.target.device, role="verifier")
        policy = self.policy_factory()
        t_start = time.perf_counter()

        session = None
        opens_lazily = self.drafter is not None and self.drafter.opens_lazily
        if opens_lazily:
            # Its session opens in a drafter actor by itself: when the request will likely draft, it opens
            # now, beside the target's prefill, and the first draft waits for what is left of it.
            session = self._start_session(prompt_ids, params, stats, ahead=policy.drafts_soon())
        cache = self.target.new_cache(1, capacity=len(prompt_ids) + max_new_tokens + 16)
        try:
            logits = self.target.prefill(cache, 0, prompt_ids)              # [vocab]
        except BaseException:       # nothing of the request may stay behind: its session, its scheduler seat
            if session:
                session.close()
            policy.close()
            raise
        first = int(logits.argmax()) if params.greedy else int(sample(warp_probs(logits, params), generator))
        stats.prefill_s = stats.ttft_s = time.perf_counter() - t_start
        out = [first]
        if on_tokens:
            on_tokens([first])
        t_draft_start = time.perf_counter()
        if self.drafter and not opens_lazily:
            session = self._start_session(prompt_ids, params, stats)
        if session:
            try:
                if session.target_topk:
                    session.observe_target(prompt_ids[-1:], _top_ids(logits[None], session.target_topk))
                session.update([first], 0)
            except Exception as exc:  # noqa: BLE001 - as below: a broken drafter never fails the request
                session = self._drop_drafter(session, stats, exc)
        stats.draft_s += time.perf_counter() - t_draft_start     # drafter prefill
        opened, model_drafted = session, 0     # for the cost model (core/cost.py)
        # A global verifier is told while this request drafts (it may wait for it: GlobalVerifier.drafting).
        drafting = getattr(self.target, "drafting", None)
        finish = "stop" if first in self.eos_token_ids else "length"

        try:
            while finish != "stop" and len(out) < max_new_tokens:
                remaining = max_new_tokens - len(out)
                t0 = time.perf_counter()
                policy.before_step(remaining, session is not None and session.unopened)
                k = min(policy.next_k(), remaining - 1)
                draft = EMPTY_DRAFT
                # A policy that prices every verified token (goodput) bounds free drafts too; when it wants
                # neither kind, the drafter is not asked at all (for a drafter actor: no round trip, and
                # the request reaches the verifier's batch in time).
                free = policy.free_draft_limit()
                if session and remaining > 1 and (k > 0 or free != 0):
                    # k may be 0 (the policy's "decode normally"); a hybrid may still copy from the context.
                    try:
                        with drafting(cache) if drafting else nullcontext({}) as told:
                            draft = _clip(session.propose(k), remaining - 1)
                            told.update(setup_s=draft.setup_s, timed=draft.source != "lookup")
                        if free is not None and draft.source == "lookup":
                            draft = _clip(draft, free)
                    except Exception as exc:  # a failed drafter costs speed, never the request
                        session = self._drop_drafter(session, stats, exc)
                t1 = time.perf_counter()
                accepted, next_token, logits = self._verify(cache, out[-1], draft, params, generator)
                t2 = time.perf_counter()
                if session and session.target_topk:      # a drafter that learns from the target's top-k
                    session = self._observe(session, [out[-1]] + draft.tokens, logits, stats)

                new_tokens = accepted + [next_token]
                emitted, stopped = emit(new_tokens, remaining, self.eos_token_ids)
                finish = "stop" if stopped else finish
                out.extend(emitted)
                # For tree drafts "drafted" is the depth: the positions that could be accepted.
                stats.observe_step(draft.depth, len(accepted), len(emitted), t1 - t0, t2 - t1)
                if draft.source != "lookup":   # free context copies would skew the model's cost and acceptance
                    policy.observe(draft.depth, len(accepted), t1 - t0 - draft.setup_s, t2 - t1)
                    if draft.setup_s or draft.opening_s:
                        policy.observe_setup(draft.setup_s, draft.opening_s or draft.setup_s)
                    model_drafted += len(draft)
                else:
                    policy.observe_free(draft.depth, len(accepted))
                if session:
                    try:
                        session.update(new_tokens, len(accepted))
                    except Exception as exc:
                        session = self._drop_drafter(session, stats, exc)
                if on_tokens:
                    on_tokens(emitted)
        finally:
            stats.draft_cost, stats.draft_forwards = draft_cost(
                self.drafter, opened if opened is session else None, model_drafted,
                parameter_count(getattr(self.target, "model", None)))
            if session:
                session.close()
            policy.close()
            release = getattr(cache, "release", None)   # KV held by remote shards (orchestrator/ray_runtime.py)
            if release:
                release()
        stats.generated_tokens = len(out)
        stats.total_s = time.perf_counter() - t_start
        return GenerationResult(tokens=out, stats=stats, finish_reason=finish)

    def _start_session(self, prompt_ids: list[int], params: SamplingParams, stats: RequestStats,
                       ahead: bool = False):
        """The request's drafter session (None if the drafter failed); ahead: open it now (open_ahead)."""
        try:
            # The drafter samples from its own stream: never the verifier's (STREAM_ROLES).
            session = self.drafter.start(prompt_ids, params,
                                         make_generator(params.seed, self.target.device, role="drafter"))
            if ahead:
                session.open_ahead()
            return session
        except Exception as exc:  # noqa: BLE001 - a broken drafter never fails the request
            return self._drop_drafter(None, stats, exc)

    @classmethod
    def _observe(cls, session, input_tokens: list[int], logits: torch.Tensor, stats: RequestStats):
        """Give the session the target's top-k after each verified input (logits [n+1, vocab]): one topk
        and one host transfer. Its time counts as drafting. Returns the session, None if it failed."""
        t0 = time.perf_counter()
        try:
            session.observe_target(input_tokens, _top_ids(logits, session.target_topk))
        except Exception as exc:  # noqa: BLE001 - as for update: the drafter is dropped, not the request
            session = cls._drop_drafter(session, stats, exc)
        stats.draft_s += time.perf_counter() - t0
        return session

    @staticmethod
    def _drop_drafter(session, stats: RequestStats, exc: Exception):
        stats.events.append(f"drafter failed before step {stats.steps + 1} ({type(exc).__name__}: {exc}); "
                            "target-only decoding from there")
        try:
            if session is not None:
                session.close()
        except Exception:  # noqa: BLE001 - the drafter is already broken; its cleanup must not fail the request
            pass
        return None

    def _verify(self, cache, pending: int, draft: Draft, params: SamplingParams, generator):
        """One target forward over [pending, draft], then roll the cache back to the
        pending token plus the accepted drafts. Returns (accepted tokens, next token,
        the target's logits [k+1, vocab] at pending and each draft token)."""
        target = self.target
        base = cache.lengths[0]
        ids = torch.tensor([[pending] + draft.tokens], device=target.device)   # [1, k+1]
        if draft.parents is None:
            logits = target.forward(cache, ids)[0]                             # [k+1, vocab]
            if params.greedy:
                res = verify_greedy(ids[0, 1:], logits)
            else:
                res = verify_chain(ids[0, 1:], draft.probs, warp_probs(logits, params), generator)
            n = res.num_accepted
            cache.crop(0, base + 1 + n)
            return draft.tokens[:n], res.next_token, logits

        mask, depths = tree_attention(draft.parents, target.device)
        logits = target.forward(cache, ids, depths=depths[None], tree_mask=mask[None])[0]  # [n+1, vocab]
        tokens, parents = ids[0, 1:], torch.tensor(draft.parents)
        if params.greedy:
            res = verify_tree_greedy(tokens, parents, logits)
        else:
            res = verify_tree(tokens, parents, warp_probs(logits, params), draft.probs, generator)
        path = res.accepted_nodes
        # Keep the root's KV and the accepted path's, contiguously.
        offsets = torch.tensor([0] + [i + 1 for i in path], device=target.device)
        cache.keep(0, base, offsets)
        return [draft.tokens[i] for i in path], res.next_token, logits
