"""DuoDecoding's drafter half: multi-sequence drafts on top of any base context, in its own process.

The engine (orchestrator/duo.py) asks for a draft of `budget` tokens continuing a base context: the
committed tokens, or, while the target is still verifying a round, the committed tokens plus that round's
main draft sequence (the speculative next round). The session keeps its KV cache for whatever it last
fed and rolls back to the longest common prefix with each new base, so a discarded speculative draft
costs nothing but the time spent on it.

Draft shape (ALGORITHMS.md section 2): x1 is the drafter's choice after the base (argmax when greedy,
sampled from q otherwise); lp12 = log q(x1) + max log q(. | x1) from the raw logits; k sequences
(core/duo_policy.plan_num_sequences) of budget // k tokens each: sequence 0 starts with x1,
sequence j with the j-th best alternative to x1. Alternatives are deterministic given x1, so their
first rows are one-hot (the one-hot sibling rule); the structure (k, lengths) is fixed before the
tokens it governs are sampled, which keeps the multi-draft verification exact.

`DuoDrafterSide` is a plain class: in process for tests, or wrapped by `ray.remote` (`DuoDrafterActor`
loads its own model and sets its own torch thread count, so the drafter's threads and the target's
never share a pool).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import torch

from core.duo_policy import plan_num_sequences
from core.sampling import SamplingParams, make_generator, sample, warp_probs
from workers.runner import ModelRunner


@dataclass
class MultiDraft:
    sequences: list[list[int]]                 # k sequences, first tokens distinct; sequence 0 is the main one
    probs: list[torch.Tensor] | None           # per sequence [len, vocab] q of each token; None = greedy (one-hot)
    compute_s: float = 0.0                     # drafter busy seconds for this draft (prefill, re-feeds included)
    forwards: int = 0                          # one-token drafter forwards it took
    step_s: float = 0.0                        # seconds those one-token forwards took (the budget's unit)

    @property
    def roots(self) -> list[int]:
        return [s[0] for s in self.sequences if s]

    def root_probs(self, vocab: int) -> torch.Tensor:
        """[k, vocab] q of each first token (one-hot rows for deterministic ones)."""
        if self.probs is None:
            return torch.nn.functional.one_hot(torch.tensor(self.roots), vocab).float()
        return torch.stack([p[0] for p in self.probs])


class TorchKV:
    """A session's KV state on a ModelRunner (torch/transformers weights): the cache and its tokens."""

    def __init__(self, runner: ModelRunner, capacity: int):
        self.runner = runner
        self.cache = runner.new_cache(1, capacity=capacity)
        self.fed: list[int] = []      # tokens whose KV is in the cache, in order

    def truncate(self, length: int) -> None:
        self.cache.crop(0, length)
        del self.fed[length:]

    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append tokens; logits after the last one [vocab] (float32)."""
        ids = torch.tensor([tokens], device=self.runner.device)                  # [1, n]
        logits = self.runner.forward(self.cache, ids, logits_rows=slice(-1, None))[0, -1]   # [vocab]
        self.fed.extend(tokens)
        return logits


class TorchDraftModel:
    """The torch backend: per-session KV caches on one ModelRunner."""

    def __init__(self, runner: ModelRunner):
        self.runner, self.device, self.vocab_size = runner, runner.device, runner.vocab_size

    def new_kv(self, prompt_len: int) -> TorchKV:
        return TorchKV(self.runner, prompt_len + 256)


class _Session:
    def __init__(self, model, prompt_ids: list[int], params: SamplingParams):
        self.params = params
        self.generator = make_generator(params.seed, model.device, role="drafter")
        self.kv = model.new_kv(len(prompt_ids))
        self.forwards = 0             # one-token forwards of the current draft call
        self.step_s = 0.0             # and their seconds (multi-token re-feeds are left out: see _run)
        self.last_logits: torch.Tensor | None = None   # [vocab] after the last fed token


class DuoDrafterSide:
    def __init__(self, model, top_alternatives: int = 8):
        """model: a ModelRunner (wrapped in TorchDraftModel) or a backend with the same two members
        (device, vocab_size) and new_kv(prompt_len) -> an object with fed, truncate(n), feed(tokens)."""
        if top_alternatives < 1:
            raise ValueError(f"top_alternatives must be >= 1, got {top_alternatives}")
        self.model = TorchDraftModel(model) if isinstance(model, ModelRunner) else model
        self.top_alternatives = top_alternatives
        self.sessions: dict[str, _Session] = {}
        # A backend with one shared context (llama.cpp) runs one draft at a time; torch caches are per session.
        self._lock = threading.Lock() if getattr(self.model, "one_context", False) else contextlib.nullcontext()

    def vocab_size(self) -> int:
        return self.model.vocab_size

    def pid(self) -> int:
        return os.getpid()

    def open(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.sessions[rid] = _Session(self.model, prompt_ids, params)

    def close(self, rid: str) -> None:
        self.sessions.pop(rid, None)

    def seconds_per_token(self, steps: int = 4, context: int = 16) -> float:
        """Start-up calibration: the mean time of one single-token draft forward after a short context."""
        with self._lock:
            kv = self.model.new_kv(context)
            kv.truncate(0)
            kv.feed([0] * context)
            t0 = time.perf_counter()
            for _ in range(steps):
                kv.feed([0])
            return (time.perf_counter() - t0) / steps

    def prefill(self, rid: str, prompt_ids: list[int]) -> float:
        """Build the prompt's KV ahead of the first draft (round 0, while the target prefills); seconds."""
        with self._lock:
            t0 = time.perf_counter()
            self._sync(self.sessions[rid], prompt_ids)
            return time.perf_counter() - t0

    # ------------------------------------------------------------------ drafting
    def draft(self, rid: str, base: list[int], budget: int, multi_sequence: bool) -> MultiDraft:
        """A draft of about `budget` tokens continuing `base` (every token before the draft)."""
        with self._lock:
            return self._draft(rid, base, budget, multi_sequence)

    def _draft(self, rid: str, base: list[int], budget: int, multi_sequence: bool) -> MultiDraft:
        t0 = time.perf_counter()
        s = self.sessions[rid]
        s.forwards, s.step_s = 0, 0.0
        if budget < 1:
            return MultiDraft([], None if s.params.greedy else [], time.perf_counter() - t0)
        logits0 = self._sync(s, base)                                            # [vocab]
        x1, q1 = self._choose(s, logits0)
        first_logprobs = torch.log_softmax(logits0, dim=-1)                      # [vocab]
        logits1 = None
        k = 1
        if multi_sequence and budget > 1:
            logits1 = self._feed(s, x1)                                          # [vocab]
            lp12 = float(first_logprobs[x1] + torch.log_softmax(logits1, dim=-1).max())
            alternatives = self._alternatives(first_logprobs, x1)                # [m]
            k = plan_num_sequences(first_logprobs[alternatives], lp12, budget)
        else:
            alternatives = torch.empty(0, dtype=torch.long)
        length = budget // k

        sequences, probs = [], []
        seq, rows = self._continue(s, base, [x1], [q1], length, logits1)
        sequences.append(seq)
        probs.append(rows)
        for alt in alternatives[: k - 1].tolist():
            seq, rows = self._continue(s, base, [alt], [self._one_hot(alt, logits0)], length, None)
            sequences.append(seq)
            probs.append(rows)
        greedy = s.params.greedy
        return MultiDraft(sequences, None if greedy else [torch.stack(r) for r in probs],
                          time.perf_counter() - t0, s.forwards, s.step_s)

    def _alternatives(self, first_logprobs: torch.Tensor, x1: int) -> torch.Tensor:
        """Token ids of the best first-token alternatives to x1, best first: [top_alternatives - 1]."""
        top = torch.topk(first_logprobs, min(self.top_alternatives, first_logprobs.numel())).indices  # [top]
        return top[top != x1][: self.top_alternatives - 1]

    def _continue(self, s: _Session, base, seq, rows, length, next_logits):
        """Extend `seq` (its tokens after `base`) to `length` tokens; next_logits: after seq, if known."""
        if length > 1 and next_logits is None:
            self._sync(s, base + seq)        # rolls back over the previous sequence, feeds seq
            next_logits = s.last_logits
        while len(seq) < length:
            tok, q = self._choose(s, next_logits)
            seq.append(tok)
            rows.append(q)
            if len(seq) < length:
                next_logits = self._feed(s, tok)
        return seq, rows

    def _choose(self, s: _Session, logits: torch.Tensor):
        """(token, q row or None when greedy)."""
        if s.params.greedy:
            return int(logits.argmax()), None
        q = warp_probs(logits, s.params)                                          # [vocab]
        return int(sample(q, s.generator)), q

    @staticmethod
    def _one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(like.shape[-1], dtype=torch.float32, device=like.device)
        row[token] = 1
        return row

    # ------------------------------------------------------------------ KV cache
    def _sync(self, s: _Session, base: list[int]) -> torch.Tensor:
        """Make the cache hold base (rolling back to the common prefix); logits after base [vocab]."""
        common = 0
        fed = s.kv.fed
        limit = min(len(fed), len(base) - 1)   # always re-feed >= 1 token: its logits are needed
        while common < limit and fed[common] == base[common]:
            common += 1
        s.kv.truncate(common)
        return self._run(s, base[common:])

    def _feed(self, s: _Session, token: int) -> torch.Tensor:
        return self._run(s, [token])

    def _run(self, s: _Session, tokens: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        logits = s.kv.feed(tokens)                                                # [vocab]
        # Only one-token forwards feed the budget: a prompt prefill or a rollback re-feed timed as
        # "one forward" would make a drafted token look many times dearer than it is.
        if len(tokens) == 1:
            s.forwards += 1
            s.step_s += time.perf_counter() - t0
        s.last_logits = logits
        return logits


def load_draft_model(drafter_spec: dict, backend: str, vocab_size: int, device: str = "cpu",
                     threads: int | None = None):
    """The drafter side's model: torch weights through the model store, or the GGUF through llama.cpp."""
    from core.config import ModelSpec

    spec = ModelSpec.model_validate(drafter_spec)
    if backend == "llama_cpp":
        from workers.llama_cpp_drafter import LlamaCppDraftModel

        return LlamaCppDraftModel(spec.source, vocab_size, threads=threads or 1)
    from workers.loading import load_for_decoding, pick_device

    dev = pick_device(device)
    model, _ = load_for_decoding(spec.source, spec.dtype, dev, spec.quantize, with_tokenizer=False)
    return TorchDraftModel(ModelRunner(model, dev))


class DuoDrafterActor(DuoDrafterSide):
    """The drafter side in its own process (wrapped by ray.remote): loads its model, owns its threads."""

    def __init__(self, drafter_spec: dict, device: str = "cpu", threads: int | None = None,
                 top_alternatives: int = 8, backend: str = "torch", vocab_size: int = 0):
        if threads:
            torch.set_num_threads(threads)
        super().__init__(load_draft_model(drafter_spec, backend, vocab_size, device, threads), top_alternatives)
