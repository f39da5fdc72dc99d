"""Drafters: one interface, propose then learn from verification feedback.

A `Drafter` is shared (it holds weights or tables); `start()` opens a
per-request `DraftSession` that holds the request's context and any KV state.
An empty draft means "decode normally this step".
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from core.sampling import SamplingParams, sample, warp_probs
from workers.runner import ModelRunner
from workers.vocab_trim import TrimmedHead, kept_token_ids


@dataclass
class Draft:
    tokens: list[int]                  # [k] proposed tokens (chain order, or tree nodes in index order)
    probs: torch.Tensor | None = None  # [k, vocab] q each token was sampled from; None = deterministic
    parents: list[int] | None = None   # tree drafts: parent node of each token (-1 = root); None = chain
    source: str = ""                   # which drafter of a hybrid made it ("lookup" drafts skip the length policy)
    setup_s: float = 0.0               # seconds of the propose spent opening the session (one-time, not drafting)
    opening_s: float = 0.0             # seconds the drafter itself spent opening it (its prefill; set with setup_s)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Longest root-to-leaf path: the most tokens this draft can get accepted."""
        if self.parents is None:
            return len(self.tokens)
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return max(depths, default=0)


EMPTY_DRAFT = Draft(tokens=[])


class DraftSession(ABC):
    """Per-request drafting state. `context` is every committed token, prompt included."""

    #: > 0: after every verification the engine passes the target's top `target_topk` next tokens at
    #: each verified position to `observe_target` (Token Recycling learns from them); 0 costs nothing
    target_topk: int = 0

    def __init__(self, prompt_ids: list[int]):
        self.context: list[int] = list(prompt_ids)

    @abstractmethod
    def propose(self, k: int) -> Draft:
        """Propose up to k tokens continuing `context` (fewer, or none, is allowed)."""

    def update(self, new_tokens: list[int], num_accepted: int) -> None:
        """Feedback of one step: tokens committed since the last update, of which the
        first `num_accepted` came from the last draft."""
        self.context.extend(new_tokens)

    def observe_target(self, input_tokens: list[int], topk_ids: torch.Tensor) -> None:
        """Called before `update` when `target_topk` > 0: the target was fed `input_tokens` ([n]: the
        pending token, then the draft's tokens in draft order) and ranked `topk_ids` ([n, target_topk]
        on the host, best first) highest after each of them, rejected tree nodes included."""

    def close(self) -> None:
        """Free per-request state."""

    def open_ahead(self) -> None:
        """A session of a drafter that `opens_lazily`: open now, without waiting (the engine calls it
        before the target's prefill when the request will likely draft soon)."""

    @property
    def unopened(self) -> bool:
        """A session of a drafter that `opens_lazily` that has cost nothing yet: its first model draft
        (or open_ahead) pays the opening."""
        return False


class Drafter(ABC):
    name: str = "drafter"
    #: deterministic drafters produce one-hot q (prompt lookup, n-gram tables)
    deterministic: bool = False
    #: start() costs nothing and its session opens at the first draft or at open_ahead() (a drafter
    #: actor's); otherwise start() opens it, after the target's prefill
    opens_lazily: bool = False

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams,
              generator: torch.Generator | None) -> DraftSession:
        ...

    def open_at_first_draft(self) -> None:
        """Where it runs in the engine's process: let its sessions open (prefill the context) at their
        first model draft, not at start(), if it can (then `opens_lazily`). A request that never drafts
        (the goodput scheduler's k = 0) then costs no drafter prefill. By default: nothing changes."""


# ------------------------------------------------------------------ draft model
class DraftModelDrafter(Drafter):
    """A small causal LM with the target's tokenizer, drafting autoregressively."""

    #: the per-request session: _DraftModelSession or a subclass of it (workers/draft_states.py: one that
    #: reads the drafter's state); None = _DraftModelSession
    session_class: type | None = None

    def __init__(self, runner: ModelRunner, name: str = "draft-model", min_confidence: float = 0.0,
                 draft_vocab: int = 0, vocab_ranking: torch.Tensor | None = None):
        """min_confidence: stop a draft early after a token the drafter itself gave less than
        this probability (a draft-side decision, so verification stays lossless).
        draft_vocab: > 0 computes the drafter's logits only for draft_vocab token ids plus the
        prompt's tokens (workers/vocab_trim.py): the first draft_vocab of vocab_ranking ([m] ids,
        a FrequencyTable's, most frequent first), or the lowest ids when it is None."""
        self.runner = runner
        self.name = name
        self.min_confidence = min_confidence
        self.draft_vocab = draft_vocab
        self.vocab_ranking = vocab_ranking

    def start(self, prompt_ids, params, generator):
        if self.opens_lazily:
            return _LazyDraftModelSession(self, prompt_ids, params, generator)
        return self._open(prompt_ids, params, generator)

    def _open(self, prompt_ids, params, generator) -> "_DraftModelSession":
        session_class = self.session_class or _DraftModelSession
        return session_class(self.runner, prompt_ids, params, generator, self.min_confidence,
                             self.draft_vocab, self.vocab_ranking)

    def open_at_first_draft(self) -> None:
        # Not a session class of its own (a drafter reading its states learns from the prefill's).
        self.opens_lazily = self.session_class is None


class _LazyDraftModelSession(DraftSession):
    """A draft-model session in the engine's process that opens at its first model draft: one prefill
    over the whole context then (prompt and the tokens committed since together), none before. Its first
    draft reports the opening as setup_s / opening_s, as a drafter actor's does. A trimmed vocabulary
    (draft_vocab) then keeps the tokens of that context, not only the prompt's: other q, still exact
    verification against them."""

    def __init__(self, drafter: DraftModelDrafter, prompt_ids, params, generator):
        super().__init__(prompt_ids)
        self.drafter, self.params, self.generator = drafter, params, generator
        self.inner: _DraftModelSession | None = None

    @property
    def unopened(self) -> bool:
        return self.inner is None

    def open_ahead(self) -> None:
        """In one process an opening ahead overlaps nothing (it would only delay the target's prefill):
        the first draft opens the session."""

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        opening_s = 0.0
        if self.inner is None:
            t0 = time.perf_counter()
            # Opened on all but the newest committed token, then given it as the engine gives the first:
            # the session's first draft forward feeds it (its cache never holds the newest token).
            self.inner = self.drafter._open(self.context[:-1], self.params, self.generator)
            self.inner.update(self.context[-1:], 0)
            opening_s = time.perf_counter() - t0
        draft = self.inner.propose(k)
        if opening_s:
            draft.setup_s = draft.opening_s = opening_s
        return draft

    def update(self, new_tokens, num_accepted):
        if self.inner is None:
            super().update(new_tokens, num_accepted)
        else:
            self.inner.update(new_tokens, num_accepted)

    def close(self):
        if self.inner is not None:
            self.inner.close()


class _DraftModelSession(DraftSession):
    """Autoregressive drafting with a model; subclasses change how the forwards are computed."""

    def __init__(self, runner: ModelRunner, prompt_ids, params, generator, min_confidence: float = 0.0,
                 draft_vocab: int = 0, vocab_ranking: torch.Tensor | None = None):
        super().__init__(prompt_ids)
        self.min_confidence = min_confidence
        self.runner = runner
        self.head = (TrimmedHead(runner.lm_head, kept_token_ids(runner.vocab_size, draft_vocab, prompt_ids,
                                                                vocab_ranking))
                     if draft_vocab > 0 else None)
        self.params = params
        self.generator = generator
        self.cache = runner.new_cache(1, capacity=len(prompt_ids) + 256)
        # Prefill now, so a step's draft time is drafting only (the length policy relies on it).
        self._prefill(list(prompt_ids))

    def _logits(self, tokens: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """Feed tokens [1, n]; logits of the last one [vocab]."""
        logits = self.runner.forward(self.cache, tokens, logits_rows=slice(-1, None), lm_head=self.head,
                                     **forward_kwargs)[0, -1]
        return logits if self.head is None else self.head.expand(logits)

    def _prefill(self, prompt_ids: list[int]) -> None:
        self._logits(torch.tensor([prompt_ids], device=self.runner.device))

    def _first_logits(self) -> torch.Tensor:
        # Feed the committed tokens the drafter has not seen yet (always >= 1: the newest one).
        feed = self.context[self.cache.lengths[0]:]
        return self._logits(torch.tensor([feed], device=self.runner.device))

    def _next_logits(self, token: torch.Tensor) -> torch.Tensor:
        return self._logits(token.view(1, 1))

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        tokens: list[torch.Tensor] = []   # kept on the device: one host sync per draft, not per token
        probs: list[torch.Tensor] = []
        logits = self._first_logits()                                             # [vocab]
        for i in range(k):
            tok, q, confidence = self._choose(logits)
            if q is not None:
                probs.append(q)
            tokens.append(tok)
            if i + 1 < k:
                if self.min_confidence > 0 and float(confidence) < self.min_confidence:
                    break
                logits = self._next_logits(tok)
        return Draft(tokens=torch.stack(tokens).tolist(), probs=torch.stack(probs) if probs else None)

    def _choose(self, logits: torch.Tensor):
        """The next draft token (0-dim, on the device), the q it was sampled from ([vocab], None when
        greedy) and the drafter's confidence in it (None when not needed)."""
        if self.params.greedy:
            tok = logits.argmax()
            return tok, None, torch.softmax(logits, -1)[tok] if self.min_confidence > 0 else None
        q = warp_probs(logits, self.params)                                        # [vocab]
        tok = sample(q, self.generator)
        return tok, q, q[tok]

    def update(self, new_tokens, num_accepted):
        committed_before = len(self.context)
        super().update(new_tokens, num_accepted)
        # The cache holds the old context plus the drafts fed after it; only the
        # accepted ones stay valid.
        valid = min(self.cache.lengths[0], committed_before + num_accepted)
        self.cache.crop(0, valid)

    def close(self):
        self.cache = None


# ------------------------------------------------------------------ prompt lookup
class PromptLookupDrafter(Drafter):
    """Copy the continuation of earlier matches of the context's last n-gram.

    With num_candidates > 1 the continuations of several matches (most recent
    first) are merged into a trie and verified together as a tree.
    """

    deterministic = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_candidates: int = 1,
                 name: str = "prompt-lookup"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.max_ngram, self.min_ngram, self.name = max_ngram, min_ngram, name
        self.num_candidates = num_candidates

    def start(self, prompt_ids, params, generator):
        return _PromptLookupSession(prompt_ids, self.max_ngram, self.min_ngram, self.num_candidates)


def find_ngram_continuations(context: torch.Tensor, k: int, max_ngram: int, min_ngram: int,
                             num_candidates: int = 1) -> list[list[int]]:
    """Continuations of the longest matching suffix n-gram, most recent match first,
    distinct, at most num_candidates. context: [length] long."""
    length = context.numel()
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        pattern = context[length - n:]                                   # [n]
        windows = context[: length - 1].unfold(0, n, 1)                  # [length-n, n], excludes the suffix itself
        hits = (windows == pattern).all(dim=1).nonzero().flatten()
        if hits.numel():
            out: list[list[int]] = []
            for start in (hits.flip(0)[: 4 * num_candidates] + n).tolist():
                cont = context[start:start + k].tolist()
                if cont and cont not in out:
                    out.append(cont)
                    if len(out) == num_candidates:
                        break
            return out
    return []


def merge_into_trie(sequences: list[list[int]]) -> Draft:
    """Merge candidate continuations into one tree draft (shared prefixes become one node)."""
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for seq in sequences:
        parent = -1
        for tok in seq:
            key = (parent, tok)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            parent = index[key]
    return Draft(tokens=tokens, parents=parents)


class _PromptLookupSession(DraftSession):
    def __init__(self, prompt_ids, max_ngram, min_ngram, num_candidates=1):
        super().__init__(prompt_ids)
        self.max_ngram, self.min_ngram, self.num_candidates = max_ngram, min_ngram, num_candidates
        # A growing tensor copy of the context so matching is vectorised.
        self._buf = torch.tensor(prompt_ids + [0] * 256, dtype=torch.long)
        self._len = len(prompt_ids)

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        need = self._len + len(new_tokens)
        if need > self._buf.numel():
            self._buf = torch.cat([self._buf, torch.zeros(max(need, self._buf.numel()), dtype=torch.long)])
        self._buf[self._len:need] = torch.tensor(new_tokens, dtype=torch.long)
        self._len = need

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        found = find_ngram_continuations(self._buf[: self._len], k, self.max_ngram, self.min_ngram,
                                         self.num_candidates)
        if len(found) <= 1:
            return Draft(tokens=found[0] if found else [])
        return merge_into_trie(found)


# ------------------------------------------------------------------ hybrid
class LookupThenModelDrafter(Drafter):
    """Prompt lookup when the context's suffix n-gram has occurred before, the model otherwise.

    Copying from the context costs nothing and, on code, is often right for many
    tokens; the model covers the steps where there is nothing to copy. The model
    session catches up on the tokens it skipped in its next forward.
    """

    def __init__(self, lookup: PromptLookupDrafter, model: Drafter, lookup_k: int = 10):
        self.lookup, self.model, self.lookup_k = lookup, model, lookup_k
        self.name = f"{lookup.name}+{model.name}"
        # The lookup costs nothing to start; the model's session (a drafter actor's) may open lazily.
        self.opens_lazily = model.opens_lazily

    def open_at_first_draft(self) -> None:
        self.model.open_at_first_draft()
        self.opens_lazily = self.model.opens_lazily

    def start(self, prompt_ids, params, generator):
        return _LookupThenModelSession(self.lookup.start(prompt_ids, params, generator),
                                       self.model.start(prompt_ids, params, generator), self.lookup_k)


class _LookupThenModelSession(DraftSession):
    def __init__(self, lookup: DraftSession, model: DraftSession, lookup_k: int):
        super().__init__([])
        self.lookup, self.model, self.lookup_k = lookup, model, lookup_k

    def propose(self, k: int) -> Draft:
        # The lookup length is its own: the engine's length policy sizes model drafts only.
        draft = self.lookup.propose(self.lookup_k)
        if len(draft):
            draft.source = "lookup"
            return draft
        return self.model.propose(k)

    def update(self, new_tokens, num_accepted):
        self.lookup.update(new_tokens, num_accepted)
        self.model.update(new_tokens, num_accepted)

    def open_ahead(self):
        self.model.open_ahead()

    @property
    def unopened(self) -> bool:
        return self.model.unopened

    def close(self):
        self.lookup.close()
        self.model.close()
