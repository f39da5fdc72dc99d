"""Analytic model of one speculative-decoding step per strategy (Leviathan et al. 2023).

With per-token acceptance rate alpha and draft length gamma, a step emits on average

    E[tokens] = (1 - alpha^(gamma + 1)) / (1 - alpha)        (accepted drafts + the target's token)

and costs a draft (gamma drafter steps, or less) plus one target forward of gamma + 1
tokens. Strategies differ in what the draft costs and whether it overlaps verification:

  plain          no draft, 1 token per forward
  draft_model    gamma sequential drafter steps, then verify (sum)
  prompt_lookup  draft is a table scan (free); alpha is the lookup's
  hybrid         lookup when the context repeats, the draft model otherwise: model_share of
                 the steps pay the drafter
  easyspec       drafter layers run layer-parallel: drafter step / speedup, alpha * (1 - penalty)
  duodecoding    drafter on another device drafts the next round while the target verifies:
                 step = max(draft, verify) instead of the sum
  cs_drafting    cascade: a free statistical drafter (MaG) proposes, the small model reviews
                 `review_chunk` tokens per forward, so gamma tokens cost gamma / review_chunk
                 drafter forwards
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

FAMILIES = ("plain", "draft_model", "prompt_lookup", "hybrid", "easyspec", "duodecoding", "cs_drafting")


def expected_tokens(alpha: float, gamma: int) -> float:
    """Leviathan's expected tokens per step (accepted + 1); gamma + 1 when alpha = 1."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def alpha_for_mean_accepted(mean_accepted: float, gamma: float) -> float:
    """Invert expected_tokens: the alpha whose expectation at draft length gamma is `mean_accepted` (bisection)."""
    g = max(1, round(gamma))
    target = min(max(mean_accepted, 1.0), g + 1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, g) < target else (lo, mid)
    return (lo + hi) / 2


def sample_emitted(alpha: float, gamma: int, rng: random.Random) -> int:
    """Tokens one step emits: accepted drafts (each kept with prob alpha, stopping at the first rejection) + 1."""
    n = 0
    while n < gamma and rng.random() < alpha:
        n += 1
    return n + 1


@dataclass(frozen=True)
class RequestTrace:
    """One measured request's steps, each (tokens drafted, drafted tokens accepted), from a bench
    record (`draft_lengths`, `accepted_lengths`). A simulated request given this trace replays it
    step by step (cycling if it runs longer): its drafts' lengths, which pad a batched verification
    to the longest row, and its acceptance, prompt by prompt, as measured."""
    steps: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not self.steps:
            raise ValueError("a request trace needs at least one step")
        for d, a in self.steps:
            if not 0 <= a <= d:
                raise ValueError(f"a trace step needs 0 <= accepted <= drafted, got {(d, a)}")

    @classmethod
    def from_record(cls, record: dict) -> "RequestTrace | None":
        drafted, accepted = record.get("draft_lengths"), record.get("accepted_lengths")
        if not drafted or accepted is None or len(drafted) != len(accepted):
            return None
        return cls(tuple(zip(drafted, accepted)))


@dataclass(frozen=True)
class StrategyModel:
    name: str
    family: str
    gamma: int = 0                      # draft length
    alpha: float = 0.0                  # per-token acceptance
    drafter: str | None = None          # models.drafters key whose step time a draft pays
    model_share: float = 1.0            # hybrid: fraction of steps drafted by the model (rest: lookup)
    model_draft_len: float = 0.0        # hybrid: drafter forwards of a model-drafted step (0: gamma; lookup
                                        # drafts run longer than the model's, so the mean draft overstates it)
    easyspec_speedup: float = 1.0       # easyspec: drafter step divided by this
    easyspec_alpha_penalty: float = 0.0  # easyspec: alpha * (1 - penalty)
    review_chunk: float = 1.0           # cs_drafting: drafted tokens reviewed per drafter forward
    source: str = ""                    # where alpha came from (bench file, parameter)
    draft_share: float = 1.0            # share of steps with a non-empty draft (a lookup miss drafts nothing)
    # One per measured request. Acceptance differs a lot between prompts (one HumanEval prompt
    # accepts 6 tokens a step, another 2.6), and in a wave of concurrent requests the slowest one sets
    # the wall time; the simulation gives each request one of these in turn. Empty: every request
    # drafts gamma tokens on every step (draft_share of them for a lookup) with `alpha`.
    request_mix: tuple[RequestTrace, ...] = ()
    # Draft lengths chosen by the goodput scheduler (orchestrator/goodput.py, the server's own code) run
    # against the simulated verifier; gamma is then its k_max. Draft-model-like families only.
    goodput: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"strategy {self.name!r}: unknown family {self.family!r} (known: {FAMILIES})")
        if not 0 < self.draft_share <= 1:
            raise ValueError(f"strategy {self.name!r}: draft_share must be in (0, 1], got {self.draft_share}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"strategy {self.name!r}: alpha must be in [0, 1], got {self.alpha}")

    @property
    def effective_alpha(self) -> float:
        if self.family == "easyspec":
            return self.alpha * (1 - self.easyspec_alpha_penalty)
        return self.alpha

    @property
    def expected_tokens(self) -> float:
        return 1.0 if self.family == "plain" else expected_tokens(self.effective_alpha, self.gamma)

    @property
    def verify_tokens(self) -> int:
        """Tokens the target forward takes per step: the draft plus the last accepted token."""
        return 1 if self.family == "plain" else self.gamma + 1

    def sample_verify_tokens(self, rng) -> int:
        """Target tokens of one step. With draft_share < 1 a step drafts with that probability, and then
        gamma / draft_share tokens (the mean is kept): uneven rows, which cost a padded forward the
        whole batch (tests/test_capacity.py) and a packed one (ours) only their own tokens."""
        if self.family == "plain" or self.draft_share >= 1:
            return self.verify_tokens
        if rng.random() < self.draft_share:
            return 1 + max(1, round(self.gamma / self.draft_share))
        return 1

    def sample_step(self, rng, trace: RequestTrace | None = None, index: int = 0) -> tuple[int, int]:
        """(target tokens verified, tokens emitted) for a request's step `index`: replayed from its
        trace, else drawn from the strategy's pooled gamma and alpha (independently)."""
        if trace is None:
            return self.sample_verify_tokens(rng), sample_emitted(self.effective_alpha, self.gamma, rng)
        drafted, accepted = trace.steps[index % len(trace.steps)]
        return 1 + drafted, 1 + accepted

    @property
    def overlapped(self) -> bool:
        return self.family == "duodecoding"

    @property
    def model_draft_forwards(self) -> float:
        """hybrid: drafter forwards when the lookup misses and the model drafts."""
        return self.model_draft_len or float(self.gamma)

    def draft_forwards(self) -> float:
        """Expected drafter forwards (of one token each) per step."""
        if self.family in ("plain", "prompt_lookup"):
            return 0.0
        if self.family == "hybrid":
            return self.model_share * self.model_draft_forwards
        if self.family == "easyspec":
            return self.gamma / self.easyspec_speedup
        if self.family == "cs_drafting":
            return math.ceil(self.gamma / self.review_chunk)
        return float(self.gamma)

    def step_time(self, draft_step_s: float, verify_s: float) -> float:
        """Single-request step latency (no queueing): draft + verify, or their max when overlapped."""
        draft = self.draft_forwards() * draft_step_s
        return max(draft, verify_s) if self.overlapped else draft + verify_s

    def tokens_per_s(self, draft_step_s: float, verify_s: float) -> float:
        return self.expected_tokens / self.step_time(draft_step_s, verify_s)
