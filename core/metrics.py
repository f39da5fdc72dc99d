"""Speculative-decoding statistics, per request and aggregated.

Definitions follow Spec-Bench:
  - a *step* is one target verification forward (prefill is not a step);
  - mean accepted tokens = tokens added by steps / steps, i.e. accepted draft
    tokens plus the one token the target contributes (recovered or bonus), so
    plain decoding scores exactly 1.00;
  - tokens/s = generated tokens / wall time of the whole request (prefill included).
Sinks (logging, Ray metrics, gRPC) read these objects; nothing here exports.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0          # includes the token sampled from the prefill logits
    steps: int = 0                     # verification forwards
    step_tokens: int = 0               # tokens added by verification steps
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    drafted_per_position: list[int] = field(default_factory=list)   # [max draft length seen]
    accepted_per_position: list[int] = field(default_factory=list)  # [max draft length seen]
    draft_lengths: list[int] = field(default_factory=list)          # draft length chosen per step
    accepted_lengths: list[int] = field(default_factory=list)       # drafted tokens kept per step
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    events: list[str] = field(default_factory=list)  # e.g. "drafter failed; target-only from step 7"
    # Cost model (core/cost.py): drafter forwards x their parameters / target parameters; None = unknown
    draft_cost: float | None = None
    draft_forwards: dict[str, int] = field(default_factory=dict)    # forwards per drafter level (prefill excluded)
    # Pipelined drafting (orchestrator/duo.py): the budget chosen per step, each side's busy seconds,
    # speculative next-round drafts made while the target verified, and how many of them were used.
    draft_budgets: list[int] = field(default_factory=list)
    drafter_busy_s: float = 0.0
    target_busy_s: float = 0.0
    speculative_drafts: int = 0
    speculative_used: int = 0

    def observe_step(self, drafted: int, accepted: int, emitted: int, draft_s: float, verify_s: float) -> None:
        """One verification step: `drafted` proposed, `accepted` kept, `emitted` tokens added (<= accepted+1)."""
        self.steps += 1
        self.step_tokens += emitted
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.draft_lengths.append(drafted)
        self.accepted_lengths.append(accepted)
        grow = drafted - len(self.drafted_per_position)
        if grow > 0:
            self.drafted_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        self.draft_s += draft_s
        self.verify_s += verify_s

    @property
    def mean_accepted_tokens(self) -> float:
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def drafter_idle_fraction(self) -> float | None:
        """Share of the request's wall time the drafter was not computing (None: not measured)."""
        return 1 - self.drafter_busy_s / self.total_s if self.drafter_busy_s and self.total_s > 0 else None

    @property
    def target_idle_fraction(self) -> float | None:
        return 1 - self.target_busy_s / self.total_s if self.target_busy_s and self.total_s > 0 else None

    @property
    def cost_speedup(self) -> float | None:
        """Plain decoding's cost for the same tokens / this request's (target forwards + draft_cost); plain = 1."""
        if self.draft_cost is None or not self.steps:
            return None
        return self.step_tokens / (self.steps + self.draft_cost)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            mean_accepted_tokens=self.mean_accepted_tokens,
            acceptance_rate=self.acceptance_rate,
            tokens_per_s=self.tokens_per_s,
            cost_speedup=self.cost_speedup,
            drafter_idle_fraction=self.drafter_idle_fraction,
            target_idle_fraction=self.target_idle_fraction,
        )
        return d


@dataclass
class AggregateStats:
    """Sums over requests; tokens/s is the mean of per-request tokens/s (Spec-Bench's speedup basis)."""

    requests: list[RequestStats] = field(default_factory=list)

    def add(self, stats: RequestStats) -> None:
        self.requests.append(stats)

    def _sum(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.requests)

    @property
    def mean_tokens_per_s(self) -> float:
        return self._sum("tokens_per_s") / len(self.requests) if self.requests else 0.0

    @property
    def mean_accepted_tokens(self) -> float:
        steps = self._sum("steps")
        return self._sum("step_tokens") / steps if steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        drafted = self._sum("drafted_tokens")
        return self._sum("accepted_tokens") / drafted if drafted else 0.0

    def accepted_per_position(self) -> list[float]:
        """Fraction of steps that drafted position i where position i was accepted."""
        width = max((len(r.drafted_per_position) for r in self.requests), default=0)
        drafted, accepted = [0] * width, [0] * width
        for r in self.requests:
            for i, (d, a) in enumerate(zip(r.drafted_per_position, r.accepted_per_position)):
                drafted[i] += d
                accepted[i] += a
        return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]

    def summary(self) -> dict:
        n = len(self.requests)
        return {
            "requests": n,
            "generated_tokens": int(self._sum("generated_tokens")),
            "mean_tokens_per_s": self.mean_tokens_per_s,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "acceptance_rate": self.acceptance_rate,
            "accepted_per_position": self.accepted_per_position(),
            "draft_s": self._sum("draft_s"),
            "verify_s": self._sum("verify_s"),
            "mean_ttft_s": self._sum("ttft_s") / n if n else 0.0,
            "total_s": self._sum("total_s"),
        }
