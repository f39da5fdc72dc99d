"""Draft-length policies: how many tokens to draft next step.

`AdaptiveDraftLength` picks k maximising Leviathan et al.'s expected walltime
improvement (1 - a^(k+1)) / ((1 - a)(k c + 1 + k s)), with the per-token acceptance
rate a, the cost ratio c (draft time per token / a one-token step) and the
verification's slope s (what each further verified token adds, over a one-token
step: fitted on the steps' verify times, `LinearCost`) estimated online with
exponential decay. Leviathan's s = 0 holds where streaming the weights bounds a
step; on a CPU without bf16 arithmetic s was 0.55. Cheap drafters (c ~ 0) on flat
verification get long drafts, poorly matching ones or steep verification short
drafts, and k = 0 (plain decoding) is chosen when drafting cannot pay for itself.
"""
from __future__ import annotations

from dataclasses import dataclass


class DraftLengthPolicy:
    def free_draft_limit(self) -> int | None:
        """Longest draft that costs no drafter time (a context lookup) worth verifying now; None: no
        limit (such drafts run at their own length)."""
        return None

    def next_k(self) -> int:
        raise NotImplementedError

    def before_step(self, remaining: int, drafter_unopened: bool) -> None:
        """Called before each next_k: the tokens the request may still emit, and whether a model draft
        would first have to open the drafter's session (a drafter actor's prefill of the prompt, not yet
        paid): a policy that prices drafting can weigh that one-time cost against what is left to gain."""

    def observe_free(self, drafted: int, accepted: int) -> None:
        """Feedback on a free draft (a context lookup): most policies size model drafts only."""

    def observe(self, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        """Feedback from one step."""

    def observe_setup(self, seconds: float, cost_s: float | None = None) -> None:
        """Seconds the step's draft waited for the drafter's session to open (once per request; not
        drafting), and cost_s the seconds the drafter spent opening it (None: the same; more when it opened
        ahead, beside the target's prefill)."""

    def drafts_soon(self) -> bool:
        """Whether the request will likely draft with a model early on: a drafter whose session opens by
        itself (a drafter actor's) then opens it beside the target's prefill, not at the first draft."""
        return True

    def close(self) -> None:
        """The request ended (a shared scheduler forgets it: orchestrator/goodput.py)."""


@dataclass
class FixedDraftLength(DraftLengthPolicy):
    k: int

    def next_k(self) -> int:
        return self.k


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_slope: float = 0.0) -> float:
    """Leviathan et al. eq. for expected walltime improvement of drafting k tokens, with a verification
    that costs verify_slope more per verified token (relative to a one-token step; 0 = Leviathan's own
    assumption, a verification as dear as a decoding step)."""
    alpha = min(max(alpha, 0.0), 0.999)
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost_ratio + 1 + k * verify_slope)


class LinearCost:
    """Seconds of an operation on n tokens: fixed + per_token * n, fitted online (least squares with decay).

    A drafter call (n = draft length) has a fixed part: the round trip and the catch-up forward over the
    tokens accepted since its last draft. Dividing it among the tokens (seconds / n) makes short drafts look
    dear, so a policy that has turned drafting down only probes with short drafts and never finds out that
    longer ones pay. A verification (n = tokens verified) costs little more per token where the weights'
    streaming bounds it (a GPU, a CPU with AMX) and much more where arithmetic does: 0.16 s per extra token
    against 0.29 s for one on an EPYC 7003 without bf16 arithmetic.

    Until two lengths are seen the split is a guess: `all_per_token` (the cautious one for a cost that is
    paid per drafted token) or all fixed (Leviathan's flat verification)."""

    def __init__(self, decay: float = 0.9, all_per_token: bool = True):
        self.decay, self.all_per_token = decay, all_per_token
        self._n = self._sk = self._skk = self._ss = self._sks = 0.0
        self.fixed_s, self.per_token_s = 0.0, 0.0

    def observe(self, k: int, seconds: float) -> None:
        d = self.decay
        self._n, self._sk, self._skk = d * self._n + 1, d * self._sk + k, d * self._skk + k * k
        self._ss, self._sks = d * self._ss + seconds, d * self._sks + k * seconds
        det = self._n * self._skk - self._sk ** 2
        if det > 1e-9 * max(self._n * self._skk, 1e-12):
            per_token = (self._n * self._sks - self._sk * self._ss) / det
            fixed = (self._ss - per_token * self._sk) / self._n
            if per_token > 0 and fixed >= 0:
                self.fixed_s, self.per_token_s = fixed, per_token
                return
        # One length so far (or a fit with a negative part): the guess (class doc).
        if self.all_per_token:
            self.fixed_s, self.per_token_s = 0.0, self._ss / max(self._sk, 1e-12)
        else:
            self.fixed_s, self.per_token_s = self._ss / self._n, 0.0

    def seconds(self, k: int) -> float:
        return self.fixed_s + self.per_token_s * k if k > 0 else 0.0


class AdaptiveDraftLength(DraftLengthPolicy):
    def __init__(self, k_init: int = 4, k_max: int = 12, k_min: int = 0, decay: float = 0.9,
                 probe_every: int = 16):
        self.k_max, self.k_min, self.decay = k_max, k_min, decay
        self.k = k_init
        # Pseudo-counts so the first steps behave like alpha = 0.6 with a cheap drafter.
        self.accepted, self.trials = 0.6 * 5, 5.0
        self.draft_time, self.drafted = 0.0, 0.0
        self.verify_time, self.steps = 0.0, 0.0
        self.verify = LinearCost(decay, all_per_token=False)      # seconds of a step verifying n tokens
        self.probe_every, self._since_draft = probe_every, 0

    def observe(self, drafted, accepted, draft_s, verify_s):
        d = self.decay
        if drafted > 0:
            # Geometric model: each drafted position is a Bernoulli(a) trial until the first
            # rejection, so a = accepted / (accepted + rejections).
            rejected = 1 if accepted < drafted else 0
            self.accepted = d * self.accepted + accepted
            self.trials = d * self.trials + accepted + rejected
            self.draft_time = d * self.draft_time + draft_s
            self.drafted = d * self.drafted + drafted
        self.verify_time = d * self.verify_time + verify_s
        self.steps = d * self.steps + 1
        self.verify.observe(drafted + 1, verify_s)
        alpha = self.accepted / self.trials if self.trials else 0.0
        # Both costs relative to a one-token step (plain decoding's): drafting per token, and each further
        # verified token (0 until two lengths were verified: Leviathan's flat verification).
        one = self.verify.seconds(1) or (self.verify_time / self.steps if self.steps else 0.0)
        cost = (self.draft_time / self.drafted) / one if self.drafted and one > 0 else 0.0
        slope = self.verify.per_token_s / one if one > 0 else 0.0
        best = max(range(self.k_min, self.k_max + 1),
                   key=lambda k: (expected_speedup(alpha, k, cost, slope), -k))
        if best == 0:
            # With k = 0 nothing would ever be measured again: probe with one token now and then.
            self._since_draft += 1
            if self._since_draft >= self.probe_every:
                best, self._since_draft = 1, 0
        else:
            self._since_draft = 0
        self.k = best

    def next_k(self) -> int:
        return self.k


class HeuristicDraftLength(DraftLengthPolicy):
    """Hugging Face's assisted-generation schedule ("heuristic"): two more tokens after a step whose
    draft was accepted whole, one fewer otherwise (never below k_min). The common baseline."""

    def __init__(self, k_init: int = 5, k_max: int = 64, k_min: int = 1):
        self.k, self.k_max, self.k_min = k_init, k_max, k_min

    def next_k(self) -> int:
        return self.k

    def observe(self, drafted, accepted, draft_s, verify_s):
        if drafted == 0:
            return
        self.k = min(self.k_max, self.k + 2) if accepted >= drafted else max(self.k_min, self.k - 1)


class ThompsonDraftLength(DraftLengthPolicy):
    """EESD's stopping rule: a Beta(a, b) posterior of the per-token acceptance; for each next draft
    position a rate is drawn from it, and drafting goes on while the draw beats `threshold`.

    Drawing before drafting is the same as drawing after each drafted token: the posterior does not
    change within a step (it learns from verification). The draws come from this policy's own
    generator; draft lengths never change the output (every draft is verified), only its speed."""

    def __init__(self, k_max: int = 16, threshold: float = 0.5, prior: tuple[float, float] = (1.0, 1.0),
                 decay: float = 1.0, seed: int | None = None):
        import random

        self.k_max, self.threshold, self.decay = k_max, threshold, decay
        self.a, self.b = prior
        self._rng = random.Random(seed)

    def next_k(self) -> int:
        k = 0
        while k < self.k_max and self._rng.betavariate(self.a, self.b) > self.threshold:
            k += 1
        return k

    def observe(self, drafted, accepted, draft_s, verify_s):
        if drafted == 0:
            return
        rejected = 1 if accepted < drafted else 0          # positions after the first rejection are unseen
        self.a = self.decay * self.a + accepted
        self.b = self.decay * self.b + rejected



class AdaptiveDraftLengthADL(DraftLengthPolicy):
    """DiffuSpec's adaptive draft length (ADL): k = clip(floor(ema_gen) + delta * [ema_acc >= ema_gen]).

    ema_gen: exponential moving average of the draft length the drafter *realised* (how many tokens it
    produced before stopping on its own; DiffuSpec's diffusion drafter ends its block where it ends);
    ema_acc: the same average of the accepted draft tokens. While acceptance keeps up with what is
    drafted, k grows by delta; otherwise it follows the drafter's realised length down.

    Read literally with a drafter that always drafts exactly k, ema_gen stays at k and k never falls:
    the rule needs a drafter that stops early when unsure (draft_model's `min_confidence`), which is
    how it is configured here. An empty draft (nothing to propose) says nothing and is skipped."""

    def __init__(self, k_init: int = 4, k_min: int = 1, k_max: int = 16, delta: int = 1, beta: float = 0.5):
        if not 1 <= k_min <= k_init <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_init <= k_max, got {k_min}, {k_init}, {k_max}")
        self.k_min, self.k_max, self.delta, self.beta = k_min, k_max, delta, beta
        self.k = k_init
        self.ema_gen, self.ema_acc = float(k_init), float(k_init)   # an optimistic start, as a first draft

    def next_k(self) -> int:
        return self.k

    def observe(self, drafted, accepted, draft_s, verify_s):
        if drafted == 0:
            return
        b = self.beta
        self.ema_gen = b * self.ema_gen + (1 - b) * drafted
        self.ema_acc = b * self.ema_acc + (1 - b) * accepted
        grow = self.delta if self.ema_acc >= self.ema_gen else 0
        self.k = min(self.k_max, max(self.k_min, int(self.ema_gen) + grow))
