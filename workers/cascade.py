"""CS-Drafting (ALGORITHMS.md section 3): vertical and horizontal cascades down to MaG.

Levels, top-down: level 0 is the target (the engine verifies, exactly), levels
1..n-1 are neural drafters, level n is MaG (workers/mag.py). A neural level never
decodes autoregressively: it *reviews* a draft made for it by the levels below
with ONE forward over it (its own KV cache, cropped back on rejection), keeps the
accepted prefix and appends its own token (recovered after a rejection, bonus
after full acceptance): speculative decoding applied recursively.

k_matrix (the paper's `csd.py`): n x n, row r = reviewer level r (row 0 = the
target), column c = drafting level c + 1; entries with c < r are unused (must
be 0). Reviewer r's draft is built left to right: for c = r, r+1, ..., n-1,
while the draft is shorter than k[r][r] + ... + k[r][c], append one more output
of level c + 1 continuing it (a neural level: its review of the draft *it* gets
by its own row; MaG: exactly the missing tokens). So entries are increments of
draft length per position range: the early positions come from the larger
drafters, later ones from smaller ones (horizontal cascade). As in the paper a
neural level's output (accepted + 1) may overshoot its range; the engine's
draft length caps the top-level draft. Example, target <- 0.5B <- MaG with
[[6, 4], [0, 5]]: the 0.5B reviews 5-token MaG drafts (each review adds
accepted + 1 tokens) until the draft has >= 6 tokens, then MaG appends up to a
length of 10; the target verifies that.

Leniency (intermediate levels only): a reviewer with leniency l >= 1 accepts
draft token x with probability min(1, l * p(x) / q(x)) (l = 1 is speculative
sampling), i.e. at temperature 0 (p, q = unwarped softmax, as in the paper)
accepts a non-argmax x when p(x) > q(x) / l. Leniency never reaches level 0:
the engine verifies the final draft with core/verification.py, exact.

Lossless at T > 0: every level output token x_j has an exactly known
distribution given everything before it (the draft tokens below are drawn from
known q, the accept test uses a fresh uniform): o_j = min(q_j, l p_j) +
(1 - sum min(q_j, l p_j)) r_j with r_j the residual it samples from after a
rejection (a bonus token: o = p). The cascade hands the engine these rows as the
Draft's probs, MaG tokens as one-hot rows; which positions exist depends only on
earlier outcomes, so the target's chain rule reproduces p (tests/test_cascade.py
checks it with chi-square). At T = 0 drafts are deterministic (probs=None).

Cost model (the paper's): each neural review costs its model's parameters, MaG
costs 0; the session reports forwards per level and their parameter sum.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.cost import parameter_count
from core.sampling import SamplingParams, sample, warp_probs
from workers.drafters import EMPTY_DRAFT, Draft, Drafter, DraftSession
from workers.mag import MaGDrafter, MaGSession
from workers.runner import ModelRunner


# ------------------------------------------------------------------ pure review rules
def _residual_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) per row, p where nothing is left (a rejection then had probability 0).
    p, q: [rows, vocab] -> [rows, vocab]."""
    leftover = (p - q).clamp_min(0)
    total = leftover.sum(-1, keepdim=True)
    return torch.where(total > 0, leftover / total.clamp_min(torch.finfo(leftover.dtype).tiny), p)


@dataclass
class ReviewResult:
    num_accepted: int          # draft tokens kept
    next_token: int            # the reviewer's own token: recovered (after a rejection) or bonus
    out_probs: torch.Tensor    # [num_accepted + 1, vocab] T > 0: the exact distribution of each output token;
    #                            T = 0: rows unused, see out_token_probs
    out_token_probs: torch.Tensor  # [num_accepted + 1] probability of each output token under out_probs (T > 0)
    #                                or under the reviewer's softmax (T = 0, what the next leniency test uses)


def review_greedy(draft_tokens: torch.Tensor, draft_token_probs: torch.Tensor, reviewer_logits: torch.Tensor,
                  leniency: float) -> ReviewResult:
    """Temperature 0. draft_tokens [m] long, draft_token_probs [m] (the producing level's probability of
    each token), reviewer_logits [m+1, vocab]. Accept x_i if it is the argmax, or (leniency > 1) if
    softmax(x_i) > q(x_i) / leniency; stop at the first token that fails; then the reviewer's argmax."""
    m = draft_tokens.shape[0]
    probs = reviewer_logits.float().softmax(-1)                                 # [m+1, vocab]
    best = reviewer_logits.argmax(-1)                                           # [m+1]
    positions = torch.arange(m, device=probs.device)
    p_draft = probs[positions, draft_tokens]                                    # [m]
    ok = draft_tokens == best[:m]
    if leniency > 1:
        ok |= p_draft > draft_token_probs.to(p_draft) / leniency
    n = int(ok.long().cumprod(0).sum())
    next_token = int(best[n])
    token_probs = torch.cat([p_draft[:n], probs[n, next_token].view(1)])       # [n+1]
    return ReviewResult(n, next_token, probs[: n + 1], token_probs)


def review_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, reviewer_probs: torch.Tensor,
                   leniency: float, generator: torch.Generator | None) -> ReviewResult:
    """Temperature > 0. draft_tokens [m] long drawn from draft_probs [m, vocab]; reviewer_probs [m+1, vocab]
    warped p. Accept x_i with probability min(1, leniency * p(x_i) / q(x_i)); after the first rejection
    sample from norm(max(0, p - q)); if all pass, a bonus from p. out_probs row i is the exact
    distribution of output token i given the tokens before it: min(q, l p) + (1 - sum min(q, l p)) r."""
    m = draft_tokens.shape[0]
    positions = torch.arange(m, device=reviewer_probs.device)
    p_draft = reviewer_probs[positions, draft_tokens]                           # [m]
    q_draft = draft_probs[positions, draft_tokens]                              # [m]
    u = torch.rand(m, generator=generator, device=reviewer_probs.device)        # [m]
    accepted = u * q_draft < leniency * p_draft                                 # [m]
    n = int(accepted.long().cumprod(0).sum())
    p, q = reviewer_probs[: min(n + 1, m)], draft_probs[: min(n + 1, m)]       # rows that produced output
    kept = torch.minimum(q, leniency * p)                                       # [rows, vocab] accept branch
    residual = _residual_rows(p, q)                                             # [rows, vocab]
    out = kept + (1 - kept.sum(-1, keepdim=True)).clamp_min(0) * residual       # [rows, vocab]
    if n == m:                                                                  # bonus from p
        next_token = int(sample(reviewer_probs[m], generator))
        out = torch.cat([out, reviewer_probs[m:]])
    else:                                                                       # recovered from the residual
        next_token = int(sample(residual[n], generator))
    tokens = torch.cat([draft_tokens[:n], torch.tensor([next_token], device=draft_tokens.device)])
    return ReviewResult(n, next_token, out, out[torch.arange(n + 1, device=out.device), tokens])


# ------------------------------------------------------------------ horizontal schedule
def validate_k_matrix(k_matrix: list[list[int]], levels: int) -> None:
    """levels = drafting levels below the target (neural drafters + MaG): k_matrix is levels x levels."""
    if len(k_matrix) != levels or any(len(row) != levels for row in k_matrix):
        raise ValueError(f"k_matrix must be {levels} x {levels} (one row per reviewer: the target and each "
                         f"neural drafter; one column per drafting level), got {[len(r) for r in k_matrix]}")
    for r, row in enumerate(k_matrix):
        if any(v < 0 for v in row):
            raise ValueError(f"k_matrix[{r}]: entries must be >= 0, got {row}")
        if any(row[:r]):
            raise ValueError(f"k_matrix[{r}]: entries left of the diagonal are unused and must be 0, got {row}")
        if sum(row) < 1:
            raise ValueError(f"k_matrix[{r}]: a reviewer needs a draft (row sum >= 1), got {row}")


def schedule(k_row: list[int], r: int) -> list[tuple[int, int]]:
    """Reviewer r's horizontal schedule: (drafting level, draft length to reach), in order."""
    out, goal = [], 0
    for c in range(r, len(k_row)):
        goal += k_row[c]
        if k_row[c]:
            out.append((c + 1, goal))
    return out


# ------------------------------------------------------------------ drafter
@dataclass
class _Chunk:
    """Draft tokens with what the level above needs to review them."""
    tokens: list[int] = field(default_factory=list)        # [m]
    probs: list[torch.Tensor] = field(default_factory=list)  # T > 0: m rows [vocab], the exact q of each token
    token_probs: list[float] = field(default_factory=list)   # [m] q(token) (T = 0: the producer's softmax)

    def extend(self, other: "_Chunk") -> None:
        self.tokens += other.tokens
        self.probs += other.probs
        self.token_probs += other.token_probs


class CascadeDrafter(Drafter):
    """target <- runners[0] <- ... <- runners[-1] <- MaG, scheduled by k_matrix (see the module docstring)."""

    def __init__(self, runners: list[ModelRunner], mag: MaGDrafter, k_matrix: list[list[int]],
                 leniency: list[float] | None = None, level_names: list[str] | None = None, name: str = "cascade"):
        validate_k_matrix(k_matrix, len(runners) + 1)
        leniency = list(leniency) if leniency is not None else [1.0] * len(runners)
        if len(leniency) != len(runners) or any(l < 1 for l in leniency):
            raise ValueError(f"leniency: one value >= 1 per neural drafter ({len(runners)}), got {leniency}")
        self.runners, self.mag, self.k_matrix, self.leniency, self.name = runners, mag, k_matrix, leniency, name
        self.level_names = level_names or [f"level{i + 1}" for i in range(len(runners))]
        self.level_params = [parameter_count(r.model) for r in runners]

    def start(self, prompt_ids, params, generator):
        return _CascadeSession(self, prompt_ids, params, generator)


class _Reviewer:
    """One neural level's KV cache. `cached` are the tokens whose KV the cache holds (any prefix is reused)."""

    def __init__(self, runner: ModelRunner, prompt_ids: list[int]):
        self.runner = runner
        self.cache = runner.new_cache(1, capacity=len(prompt_ids) + 256)
        self.cached: list[int] = prompt_ids[:-1]
        if self.cached:   # prefill now, so a step's draft time is drafting only
            runner.forward(self.cache, torch.tensor([self.cached], device=runner.device), logits_rows=slice(-1, None))

    def logits(self, prefix: list[int], draft: list[int]) -> torch.Tensor:
        """Logits at the positions predicting draft[0..m-1] and the token after: [m+1, vocab]. One forward."""
        seq = prefix + draft
        n = min(len(self.cached), len(seq))
        same = torch.tensor(self.cached[:n]) == torch.tensor(seq[:n])
        common = int(same.long().cumprod(0).sum())
        start = min(common, len(prefix) - 1)       # the last prefix token is always fed: its logits are needed
        self.cache.crop(0, start)
        ids = torch.tensor([seq[start:]], device=self.runner.device)
        out = self.runner.forward(self.cache, ids, logits_rows=slice(len(prefix) - 1 - start, None))[0]
        self.cached = seq
        return out

    def keep(self, length: int) -> None:
        """Only the first `length` tokens of the reviewed sequence stay valid."""
        self.cache.crop(0, min(length, self.cache.lengths[0]))
        self.cached = self.cached[:length]


class _CascadeSession(DraftSession):
    def __init__(self, drafter: CascadeDrafter, prompt_ids, params: SamplingParams, generator):
        super().__init__(prompt_ids)
        self.d, self.params, self.generator = drafter, params, generator
        self.reviewers = [_Reviewer(r, list(prompt_ids)) for r in drafter.runners]
        self.mag: MaGSession = drafter.mag.start(prompt_ids, params, generator)
        self.forwards = [0] * len(drafter.runners)      # reviews per neural level (prefill not counted)
        self.mag_calls = 0
        self.vocab = drafter.runners[0].vocab_size if drafter.runners else None
        self.device = drafter.runners[0].device if drafter.runners else torch.device("cpu")

    # cost reporting, read by the engine (orchestrator/engine.py)
    @property
    def forward_params(self) -> int:
        return sum(f * p for f, p in zip(self.forwards, self.d.level_params))

    @property
    def forwards_by_level(self) -> dict[str, int]:
        return {**dict(zip(self.d.level_names, self.forwards)), "mag": self.mag_calls}

    def update(self, new_tokens, num_accepted):
        super().update(new_tokens, num_accepted)
        self.mag.update(new_tokens, num_accepted)

    def close(self):
        self.reviewers = []

    def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        chunk = self._draft_for(0, [], cap=k)
        tokens = chunk.tokens[:k]
        if not tokens:
            return EMPTY_DRAFT
        if self.params.greedy or not self.reviewers:   # MaG alone is deterministic: one-hot q
            return Draft(tokens=tokens)
        return Draft(tokens=tokens, probs=torch.stack(chunk.probs[:k]))             # [k, vocab]

    def _draft_for(self, r: int, pending: list[int], cap: int | None = None) -> _Chunk:
        """The draft reviewer level r reviews, continuing context + pending (its row of k_matrix)."""
        chunk = _Chunk()
        for level, goal in schedule(self.d.k_matrix[r], r):
            goal = goal if cap is None else min(goal, cap)
            while len(chunk.tokens) < goal:
                before = pending + chunk.tokens
                if level == len(self.reviewers) + 1:
                    piece = self._mag(before, goal - len(chunk.tokens))
                    if not piece.tokens:          # nothing to copy and no bigram: this range stays short
                        break
                else:
                    piece = self._review(level, before, self._draft_for(level, before))
                chunk.extend(piece)
        return chunk

    def _mag(self, pending: list[int], k: int) -> _Chunk:
        self.mag_calls += 1
        tokens = self.mag.draft_after(pending, k)
        rows = []
        if not self.params.greedy and tokens and self.vocab is not None:
            rows = list(torch.nn.functional.one_hot(torch.tensor(tokens, device=self.device), self.vocab).float())
        return _Chunk(tokens, rows, [1.0] * len(tokens))

    def _review(self, level: int, pending: list[int], draft: _Chunk) -> _Chunk:
        """Level `level` reviews `draft` with one forward; returns accepted + its own token."""
        reviewer = self.reviewers[level - 1]
        leniency = self.d.leniency[level - 1]
        prefix = self.context + pending
        logits = reviewer.logits(prefix, draft.tokens)                               # [m+1, vocab]
        self.forwards[level - 1] += 1
        tokens = torch.tensor(draft.tokens, dtype=torch.long, device=logits.device)
        if self.params.greedy:
            res = review_greedy(tokens, torch.tensor(draft.token_probs), logits, leniency)
            rows = []
        else:
            q = (torch.stack(draft.probs).to(logits.device) if draft.tokens
                 else logits.new_zeros(0, logits.shape[-1]))
            res = review_sampled(tokens, q, warp_probs(logits, self.params), leniency, self.generator)
            rows = list(res.out_probs)
        reviewer.keep(len(prefix) + res.num_accepted)
        return _Chunk(draft.tokens[: res.num_accepted] + [res.next_token], rows, res.out_token_probs.tolist())
