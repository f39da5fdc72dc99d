"""DuoDecoding's two draft-side decisions, as pure functions (ALGORITHMS.md section 2).

- `plan_num_sequences`: dynamic multi-sequence drafting. Draft x1, x2; lp12 = log q(x1) + log q(x2|x1);
  k = 1 + the number of first-token alternatives (best first) whose log-prob beats lp12, counted until
  the first that does not; k is snapped down to a divisor of the budget so every sequence has budget/k tokens.
- `DraftBudgetController`: the hardware-aware budget. The drafter drafts round i+1 while the target
  verifies round i, so neither side idles when budget x (draft time per token) == verify time; the
  controller keeps exponentially smoothed estimates of both and picks that budget, clamped.

Both are draft-side choices: whatever they return, verification stays lossless.
"""
from __future__ import annotations

import torch


def largest_divisor_at_most(budget: int, k: int) -> int:
    """The largest divisor of `budget` that is <= k (>= 1)."""
    k = max(1, min(k, budget))
    while budget % k:
        k -= 1
    return k


def plan_num_sequences(alternative_logprobs: torch.Tensor, lp12: float, budget: int) -> int:
    """Number of sequences k for a draft of `budget` tokens.

    alternative_logprobs: [m] first-token log-probs of the alternatives to x1, best first
    lp12: log q(x1) + log q(x2 | x1), the greedy two-token path's log-prob
    """
    beats = (alternative_logprobs > lp12).long()          # [m]
    k = 1 + int(beats.cumprod(dim=0).sum())              # in order, stop at the first that does not beat lp12
    return largest_divisor_at_most(budget, k)


class DraftBudgetController:
    """Draft budget (tokens per round) from measured drafter and target times.

    observe() takes the drafter's compute time per drafted token and the target's verify time of a
    round; budget() = round(verify / per_token), clamped to [gamma_min, gamma_max]. Until both are
    measured (start-up calibration or a first round) it returns gamma_init.
    """

    def __init__(self, gamma_init: int = 4, gamma_min: int = 1, gamma_max: int = 32, decay: float = 0.5):
        if not 1 <= gamma_min <= gamma_init <= gamma_max:
            raise ValueError(f"need 1 <= gamma_min <= gamma_init <= gamma_max, got "
                             f"{gamma_min}, {gamma_init}, {gamma_max}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.gamma_min, self.gamma_max, self.decay = gamma_min, gamma_max, decay
        self.gamma = gamma_init
        self.draft_token_s: float | None = None   # smoothed drafter seconds per drafted token
        self.verify_s: float | None = None        # smoothed target seconds per verify forward

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def observe(self, draft_token_s: float | None = None, verify_s: float | None = None) -> int:
        if draft_token_s is not None and draft_token_s > 0:
            self.draft_token_s = self._smooth(self.draft_token_s, draft_token_s)
        if verify_s is not None and verify_s > 0:
            self.verify_s = self._smooth(self.verify_s, verify_s)
        if self.draft_token_s and self.verify_s:
            balanced = round(self.verify_s / self.draft_token_s)
            self.gamma = min(self.gamma_max, max(self.gamma_min, balanced))
        return self.gamma

    def budget(self) -> int:
        return self.gamma
