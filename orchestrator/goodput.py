"""Goodput-driven draft lengths for a batch of concurrent requests (SmartSpec; ALGORITHMS.md section 5).

With continuous batching every draft token costs verification compute for the whole batch. At low
load a step is bound by streaming the weights, so extra rows are nearly free; as the batch grows the
step becomes compute-bound and rejected draft tokens cost real time. The scheduler therefore chooses
every live request's draft length together, 0 included, to maximise

    goodput(k) = sum_i E_i(k_i) / (T(requests, tokens) + D(max_i k_i))

- E_i(k): request i's expected tokens from a step drafting k (accepted drafts plus the target's own
  token), from its per-position acceptance learned online;
- T: one batched target forward as a function of its rows and its tokens, fitted online (least
  squares with decay) on the forwards the verifier really ran, seeded by a start-up profile. Our
  batched forward packs the requests' tokens without padding (workers/runner.py forward_many), so
  tokens = sum_i (k_i + 1);
- D(k): seconds to draft k tokens, a fixed part (a drafter actor's round trip and catch-up) plus a
  part per token (concurrent requests' draft steps are batched: one draft step serves every request
  that drafts at that moment), fitted online (DraftCostModel).

By default one draft length L serves every drafting request (min(L, its k_max); `uniform`): requests
that draft the same length reach the verifier together. Per-request lengths (`uniform=False`, exact
for a linear T) win on paper when acceptance differs, but a request that drafts less arrives earlier
and the batch splits; in the simulator that cost more than the lengths gained (1.02x plain decoding
at 2 requests against 1.37x with one length).

With a drafter on hardware of its own, the plan may also split the batch into two cohorts verified in
alternation, one drafting while the other verifies (core/cohorts.py, `choose_cohort_lengths`): a cycle of
max(2 T(n/2), 2 D) instead of T(n) + D, chosen where it predicts more goodput than lockstep.

k = 0 for all is plain decoding and is kept unless drafting is predicted to beat it by `min_gain`.
Only draft lengths change, never a verification rule: the output is lossless whatever the scheduler
decides. Pure Python over floats; no Ray, no gRPC, no torch.
"""
from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass, field

from core.draft_length import DraftLengthPolicy, LinearCost

# Seconds to draft k tokens, fixed + per token (core/draft_length.py LinearCost: a remote drafter's call
# has a fixed part, the round trip and the catch-up forward; both parts include waiting for a busy drafter).
DraftCostModel = LinearCost
from orchestrator.goodput_guard import ModeGuard


# Decode-step shapes (requests, tokens each) the start-up profile times (machine_profile.profile_step_cost;
# the simulator profiles its verifier the same way).
STEP_COST_SHAPES = ((1, 1), (1, 2), (1, 6), (4, 1), (4, 4), (8, 2), (16, 1), (16, 4))
MAX_POSITIONS = 64          # draft positions a pooled acceptance estimate tracks (k_max <= 64 in the config)


def expected_tokens(accept: list[float], k: int) -> float:
    """Expected tokens of a step that drafts k: 1 (the target's own) + sum_j prod_{m<=j} accept[m].
    accept[j]: probability that draft position j is accepted given positions < j were."""
    total, survive = 1.0, 1.0
    for j in range(k):
        survive *= accept[j]
        total += survive
    return total


class StepCostModel:
    """Seconds of one batched target forward: a + b * tokens + c * requests + d * [tokens > 1], fitted online.

    d is the step from one token to several: the kernels change there (a CPU's GEMV streams the bf16
    weight; several rows ran a float32 GEMM on an EPYC 7003 without bf16 arithmetic: 277 ms for one
    token, 435 for two, 1,023 for sixteen), so a line through every shape over-priced a one-token step
    1.9x and made drafting look cheaper than it was against plain decoding.

    Exponentially weighted least squares over (rows, tokens, seconds) of the forwards the verifier ran,
    so the model follows the machine (and other load on it). Terms the forwards seen cannot tell apart
    (rows that never varied, never a one-token forward) are left out of the fit; from a single shape, a
    constant; before any, the prior (a profile's coefficients; three of them: d = 0).

    `shape`: what a line cannot follow, (tokens, seconds) knots of the profile's residuals, interpolated
    piecewise-linearly in the batch's tokens (flat past the outer knots). Kernels make a step concave on
    a CPU without bf16 arithmetic (each further token adds less: 277 ms for one token, 435 for two, 744
    for four, 969 for eight on the EPYC 7003), where one line past the first token priced a two-token
    forward at 982 ms. With a shape, the prior and the shape make a fixed curve P(requests, tokens) (the
    profile), and online the model fits a + e * P: an overhead and a scale (a machine that turns slower
    everywhere, under other load, scales the kernels' curve). Five free terms over the few shapes a
    server runs fit those exactly and priced the shapes between them 10-20% wrong."""

    # Fits tried in order, by the terms kept (0: 1, 1: tokens, 2: requests, 3: [tokens > 1], 4: profile).
    _TERM_SETS = ((0, 1, 2, 3), (0, 1, 3), (0, 1, 2), (0, 1))
    _PROFILE_TERM_SETS = ((0, 4), (4,))

    def __init__(self, prior: tuple[float, ...] | None = None, decay: float = 0.98,
                 prior_weight: float = 4.0, shape: tuple[tuple[float, float], ...] = ()):
        self.decay = decay
        self.shape = tuple(sorted(shape))
        line = None if prior is None else tuple(prior) + (0.0,) * (4 - len(prior))     # (a, b, c, d)
        # The profile's curve (line plus shape), which online terms offset and scale; None: a line alone.
        self.profile = line if line is not None and self.shape else None
        self.coef = None if line is None else (0.0, 0.0, 0.0, 0.0, 1.0) if self.profile else line + (0.0,)
        # Normal equations of the weighted fit, with the prior as pseudo-observations.
        self._xtx = [[0.0] * 5 for _ in range(5)]
        self._xty = [0.0] * 5
        if prior is not None:
            points = ((1, 1), (1, 2), (1, 8), (8, 8), (8, 64), (16, 16))
            for rows, tokens in points:
                self._add(rows, tokens, self._linear(self.coef, rows, tokens), prior_weight / len(points))

    def _features(self, rows: float, tokens: float) -> tuple[float, ...]:
        line = (1.0, float(tokens), float(rows), 1.0 if tokens > 1 else 0.0)
        curve = 0.0 if self.profile is None else _dot(self.profile, line) + self._shape_at(tokens)
        return line + (curve,)

    def _linear(self, coef, rows: float, tokens: float) -> float:
        return _dot(coef, self._features(rows, tokens))

    def _add(self, rows: float, tokens: float, seconds: float, weight: float = 1.0) -> None:
        x = self._features(rows, tokens)
        for i in range(5):
            self._xty[i] = self.decay * self._xty[i] + weight * x[i] * seconds
            for j in range(5):
                self._xtx[i][j] = self.decay * self._xtx[i][j] + weight * x[i] * x[j]

    def _shape_at(self, tokens: float) -> float:
        knots = self.shape
        if not knots:
            return 0.0
        if tokens <= knots[0][0]:
            return knots[0][1]
        for (t0, r0), (t1, r1) in zip(knots, knots[1:]):
            if tokens <= t1:
                return r0 + (r1 - r0) * (tokens - t0) / (t1 - t0)
        return knots[-1][1]

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        self._add(rows, tokens, seconds)
        for terms in self._PROFILE_TERM_SETS if self.profile else self._TERM_SETS:
            solved = _solve([[self._xtx[i][j] for j in terms] for i in terms], [self._xty[i] for i in terms],
                            len(terms))
            if solved is not None and min(solved) >= 0:
                coef = [0.0] * 5
                for i, v in zip(terms, solved):
                    coef[i] = v
                self.coef = tuple(coef)
                return
        if self.coef is None:             # one shape seen: a constant, the weight-bound assumption above
            self.coef = (self._xty[0] / self._xtx[0][0], 0.0, 0.0, 0.0, 0.0)

    @classmethod
    def fitted(cls, samples) -> "StepCostModel":
        """A model fitted to (rows, tokens, seconds) samples (a profile) as f(tokens) + c * rows, f free at
        each token count the samples hold: c from how seconds vary with rows at equal tokens (a
        within-group least squares; from the line's fit where rows never vary at equal tokens), then f
        as each token count's mean of seconds - c * rows. The prior is the line a + b * tokens + c * rows
        + d * [tokens > 1] through f, and the shape what f leaves of it (a line through concave samples
        alone misjudges c: the rows of the 16-token shapes stood in for the tokens' curvature)."""
        samples = [(float(r), float(t), float(s)) for r, t, s in samples]
        groups: dict[float, list[tuple[float, float]]] = {}
        for rows, tokens, seconds in samples:
            groups.setdefault(tokens, []).append((rows, seconds))
        sxy = sxx = 0.0
        for members in groups.values():
            mean_r = sum(r for r, _ in members) / len(members)
            mean_s = sum(s for _, s in members) / len(members)
            sxy += sum((r - mean_r) * (s - mean_s) for r, s in members)
            sxx += sum((r - mean_r) ** 2 for r, _ in members)
        if sxx > 0:
            per_row = max(sxy / sxx, 0.0)
        else:
            line = cls(decay=1.0)
            for rows, tokens, seconds in samples:
                line.observe(rows, tokens, seconds)
            per_row = line.coef[2] if line.coef is not None else 0.0
        level = {t: sum(s - per_row * r for r, s in m) / len(m) for t, m in groups.items()}   # f(tokens)
        through = cls(decay=1.0)
        for tokens, seconds in level.items():
            through.observe(0, tokens, seconds)                 # rows 0: the requests' term left out
        if through.coef is None:
            return cls()
        a, b, _, d, _ = through.coef
        return cls(prior=(a, b, per_row, d),
                   shape=tuple((t, f - a - b * t - d * (t > 1)) for t, f in level.items()))

    def predict(self, rows: int, tokens: int) -> float:
        if self.coef is None:
            # Nothing measured or profiled yet: assume the weight-bound regime of a small batch (a step
            # costs the same whatever its tokens), so the first steps draft and get measured.
            return 1.0
        return max(self._linear(self.coef, rows, tokens), 1e-6)


def _dot(xs, ys) -> float:
    return sum(x * y for x, y in zip(xs, ys))


def _solve(a: list[list[float]], b: list[float], n: int) -> tuple[float, ...] | None:
    """Solve the leading n x n block of a x = b (Gaussian elimination, partial pivoting); None when
    (nearly) singular."""
    m = [a[r][:n] + [b[r]] for r in range(n)]
    scale = max(abs(m[r][r]) for r in range(n)) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-9 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return tuple(m[i][n] / m[i][i] for i in range(n))


def choose_draft_lengths(accepts: list[list[float]], k_max: list[int], step_s, draft_token_s: float,
                         other_rows: int = 0, min_gain: float = 0.0, uniform: bool = False,
                         draft_fixed_s: float = 0.0) -> tuple[list[int], float]:
    """The draft length of every request maximising the batch's goodput. accepts[i]: request i's
    per-position acceptance (len >= k_max[i]); step_s(rows, tokens): predicted forward seconds of a batch
    of `rows` requests and `tokens` tokens in all (StepCostModel; any shape in tokens); drafting L tokens
    takes draft_fixed_s + draft_token_s x L seconds (a round trip to the drafter and its catch-up, then one
    (batched) draft step per token); other_rows: requests in the batch that do not draft (plain decoding),
    one token each; min_gain: drafting must beat plain decoding's predicted goodput by this fraction (a
    margin for what the model leaves out: requests that draft reach the verifier later, and batches can
    split). uniform: every request drafts min(L, its k_max) for one chosen L (so they reach the verifier
    together); otherwise each request gets its own length.
    Returns (draft length per request, predicted goodput in tokens per second).

    SmartSpec's goodput rule, solved exactly: for each longest draft L (which sets the draft time), a
    plan that verifies m draft tokens in all emits most by taking the m largest increments
    E_i(k + 1) - E_i(k) among positions < L (each request's increments only shrink with k, so the m
    largest are a prefix of every request's draft), and its step costs step_s(rows, rows + m) whoever
    the tokens belong to. So every (L, m) is scored and the best kept; no stopping rule assumes a step
    linear in tokens (on a CPU whose kernels make it concave, a greedy that stops at the first token
    not worth its marginal cost stops too early). L = 0 is plain decoding, so the plan never predicts
    worse than it."""
    n = len(accepts)
    rows = n + other_rows
    base = float(rows)                                  # one token per row: the target's own
    if uniform:
        return _uniform_lengths(accepts, k_max, step_s, draft_token_s, other_rows, min_gain, draft_fixed_s)
    increments = []                                     # (E_i(j + 1) - E_i(j), j, i)
    for i, accept in enumerate(accepts):
        survive = 1.0
        for j in range(k_max[i]):
            survive *= accept[j]
            increments.append((survive, j, i))
    increments.sort(key=lambda x: (-x[0], x[1]))
    steps: dict[int, float] = {}                        # step seconds by draft tokens verified

    def step(m: int) -> float:
        if m not in steps:
            steps[m] = step_s(rows, rows + m)
        return steps[m]

    plain = base / step(0)
    best_ks, best, best_m, best_longest = [0] * n, plain, 0, 0
    for longest in range(1, max(k_max, default=0) + 1):
        drafting = draft_fixed_s + draft_token_s * longest
        out, m, top_m = base, 0, 0
        top = best
        for delta, j, _ in increments:
            if j >= longest:
                continue
            out += delta
            m += 1
            value = out / (step(m) + drafting)
            if value > top * (1 + 1e-9):
                top, top_m = value, m
        # A plan whose longest draft is shorter than L is scored (cheaper) at that L.
        if top_m and top > plain * (1 + min_gain) and top > best * (1 + 1e-9):
            best, best_m, best_longest = top, top_m, longest
    if best_m:
        taken = 0
        for delta, j, i in increments:
            if taken == best_m:
                break
            if j < best_longest:
                best_ks[i] += 1
                taken += 1
    return best_ks, best


def _uniform_lengths(accepts, k_max, step_s, draft_token_s, other_rows, min_gain, draft_fixed_s=0.0):
    """choose_draft_lengths with one longest draft L for all (see there); tokens packed."""
    rows = len(accepts) + other_rows
    plain = rows / step_s(rows, rows)
    best_ks, best = [0] * len(accepts), plain
    for longest in range(1, max(k_max, default=0) + 1):
        ks = [min(longest, k) for k in k_max]
        out = other_rows + sum(expected_tokens(a, k) for a, k in zip(accepts, ks))
        value = out / (step_s(rows, rows + sum(ks)) + draft_fixed_s + draft_token_s * longest)
        if value > best * (1 + 1e-9) and value > plain * (1 + min_gain):
            best_ks, best = ks, value
    return best_ks, best


def choose_cohort_lengths(accepts: list[list[float]], k_max: list[int], step_s, draft_token_s: float,
                          other_rows: int = 0, min_gain: float = 0.0,
                          draft_fixed_s: float = 0.0) -> tuple[list[int], float]:
    """The best uniform plan when the batch is verified as two alternating cohorts (core/cohorts.py), each
    drafting while the other verifies. Target and drafter each serve both cohorts once per cycle, so a
    cycle takes max(2 T(rows/2, tokens/2), 2 D(L)) and emits every request's expected tokens once.
    Arguments as choose_draft_lengths (uniform); the draft cost is taken per cohort at the fitted rate (a
    batched draft step costs about the same for half the requests). Returns (draft length per request,
    predicted goodput); ([0, ...], 0.0) where no plan beats plain decoding in lockstep by min_gain, or
    fewer than two requests make cohorts."""
    n = len(accepts)
    rows = n + other_rows
    if rows < 2 or n == 0:
        return [0] * n, 0.0
    plain = rows / step_s(rows, rows)
    best_ks, best = [0] * n, 0.0
    for longest in range(1, max(k_max, default=0) + 1):
        ks = [min(longest, k) for k in k_max]
        out = other_rows + sum(expected_tokens(a, k) for a, k in zip(accepts, ks))
        cycle = 2 * max(step_s(rows / 2, (rows + sum(ks)) / 2), draft_fixed_s + draft_token_s * longest)
        value = out / cycle
        if value > best * (1 + 1e-9) and value > plain * (1 + min_gain):
            best_ks, best = ks, value
    return best_ks, best


@dataclass
class AcceptanceEstimate:
    """Per-position acceptance, exponentially decayed counts shrunk toward a prior.

    The prior is a fixed rate, or (`parent`) the pooled estimate of every request of the same strategy:
    a request's first steps say little (one rejection at position 0 would read as 0.39 against a fixed
    0.6 prior and stop its drafting), while what the strategy's other requests saw says a lot."""
    positions: int
    prior: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.9
    parent: "AcceptanceEstimate | None" = None
    accepted: list[float] = field(default_factory=list)
    trials: list[float] = field(default_factory=list)

    def __post_init__(self):
        seed = 0.0 if self.parent is not None else self.prior_weight
        self.accepted = [self.prior * seed] * self.positions
        self.trials = [seed] * self.positions

    def observe(self, drafted: int, accepted: int) -> None:
        """Positions < accepted were accepted; position `accepted` (if drafted) was rejected."""
        for j in range(min(drafted, self.positions)):
            if j > accepted:
                break
            self.accepted[j] = self.decay * self.accepted[j] + (1.0 if j < accepted else 0.0)
            self.trials[j] = self.decay * self.trials[j] + 1.0
        if self.parent is not None:
            self.parent.observe(drafted, accepted)

    def hypothetical(self, drafted: int, accepted: int) -> "AcceptanceEstimate":
        """A copy that has also seen one more step (drafted, accepted); this estimate and its parent are
        left as they are."""
        twin = copy.deepcopy(self)          # the parent too: observe() feeds it
        twin.observe(drafted, accepted)
        return twin

    def rates(self) -> list[float]:
        if self.parent is None:
            raw = [a / t for a, t in zip(self.accepted, self.trials)]
        else:
            pooled, w = self.parent.rates(), self.prior_weight
            raw = [(a + w * p) / (t + w) for a, t, p in zip(self.accepted, self.trials, pooled)]
        return [min(max(r, 0.0), 0.99) for r in raw]


@dataclass
class SchedulerStats:
    """What the scheduler did: exported through GetStats and the metrics (docs/monitoring.md)."""
    decisions: int = 0
    last_draft_lengths: list[int] = field(default_factory=list)
    mean_draft_length: float = 0.0
    predicted_step_s: float = 0.0
    measured_step_s: float = 0.0
    predicted_goodput: float = 0.0
    forwards: int = 0
    speculation_held_back: bool = False     # the model's plan drafts; the guard measured drafting losing
    split_cohorts: bool = False             # the plan verifies two alternating cohorts (core/cohorts.py)
    measured_goodput: float = 0.0           # tokens/s the guard measured for the mode now running


class GoodputScheduler:
    """Shared by every request of a server (or of one process): chooses all live requests' draft lengths
    together. Requests join through `GoodputDraftLength` policies; the verifier reports each batched
    forward through `observe_forward` (orchestrator/global_verifier.py's observers)."""

    def __init__(self, cost: StepCostModel | None = None, probe_every: int = 16, min_gain: float = 0.1,
                 uniform: bool = True, guard: ModeGuard | None = None, max_probe_every: int = 256,
                 cohorts: bool = True):
        """uniform: one draft length for all drafting requests (module doc). guard: the measured check on
        the model's plans (orchestrator/goodput_guard.py), used once a verifier reports forwards; None =
        a default ModeGuard on the wall clock. Probes back off from probe_every to max_probe_every
        forwards while they do not turn the plan to drafting. cohorts: plans may split the batch into two
        alternating cohorts where the drafter does not share the target's hardware (module doc)."""
        self.cost = cost or StepCostModel()
        self.uniform = uniform
        self.cohorts = cohorts
        self._split = False                 # the current plan verifies two alternating cohorts
        self.probe_every = probe_every
        self.max_probe_every = max(max_probe_every, probe_every)
        self._probe_interval = probe_every
        self.guard = guard or ModeGuard()
        self._held_back = False             # the model's plan drafts but the guard measured it losing
        self.min_gain = min_gain
        self.stats = SchedulerStats()
        self._lock = threading.Lock()
        self._requests: dict[int, "GoodputDraftLength"] = {}
        self._ids = itertools.count()
        self._plan: dict[int, int] = {}
        self._free_plan: dict[int, int] = {}
        self._dirty = True
        # Seconds to draft, fixed + per token, fitted on the requests' draft calls. It includes waiting for
        # a busy drafter: a request that drafts reaches the verifier that much later, and its batch may
        # split (tried: the fastest recent step, or the median, drafted where that lost to plain decoding
        # in the simulator; docs/scheduler.md).
        self.draft_cost = DraftCostModel()
        self._other_rows = 0.0              # decayed mean of rows that did not come from our requests
        self._last_rows = 0                 # rows of the verifier's last decode forward
        # Pooled acceptance per strategy (model drafts, free drafts): the prior of its new requests.
        self._pooled: dict[str, tuple[AcceptanceEstimate, AcceptanceEstimate]] = {}
        self.forward_source = False         # True once a verifier reports forwards
        self._since_probe = 0               # forwards (or, without a verifier, steps) since the last probe
        self._plan_draft_s = 0.0            # drafting seconds of the current plan (its longest draft)
        self._probe_s = 0.0                 # drafting seconds of the probe in flight (0: none)
        self._prober: int | None = None     # the request whose probe is in flight
        # Whether the drafter runs on the target's hardware (a drafter actor on the target's CPU node, or in
        # its process; orchestrator/ray_runtime.py sets it from the placement). Then a drafter session's
        # opening costs the whole batch its seconds (otherwise only the waiting request's share), and
        # drafting beside verification only trades one for the other: no cohorts.
        self.drafter_shares_target = True

    # ------------------------------------------------------------ requests
    def pooled(self, group: str) -> tuple[AcceptanceEstimate, AcceptanceEstimate]:
        """The pooled (model, free) acceptance of a strategy's requests, made on first use."""
        with self._lock:
            if group not in self._pooled:
                self._pooled[group] = (AcceptanceEstimate(MAX_POSITIONS, decay=0.98),
                                       AcceptanceEstimate(MAX_POSITIONS, decay=0.98))
            return self._pooled[group]

    def join(self, policy: "GoodputDraftLength") -> int:
        with self._lock:
            rid = next(self._ids)
            self._requests[rid] = policy
            self._dirty = True
            return rid

    def leave(self, rid: int) -> None:
        with self._lock:
            if rid == self._prober:
                self._probe_s, self._prober = 0.0, None
            self._requests.pop(rid, None)
            self._plan.pop(rid, None)
            self._free_plan.pop(rid, None)
            self._dirty = True

    def draft_length(self, rid: int, free: bool = False) -> int:
        """This request's draft length in the current plan; free = for a draft that costs no drafter
        time (the plan made with a zero draft cost)."""
        with self._lock:
            if self._dirty or rid not in self._plan:
                self._replan()
            return (self._free_plan if free else self._plan).get(rid, 0)

    def _replan(self) -> None:
        # Requests still in their prefill are no rows of the decode forwards being planned: planned as
        # rows, they made the model price rows that were not there (simulated: 1.11x plain decoding at
        # four requests became 1.02x). They count as ours in the verifier's batches all the same.
        ids = [i for i, p in self._requests.items() if p.stepping]
        policies = [self._requests[i] for i in ids]
        ks, goodput, split = self._model_plan(policies)
        if any(ks):
            self._probe_interval = self.probe_every     # drafting pays again: probes at the base rate
        # Free drafts (context lookup): no drafter time, their own acceptance and length bound, and per
        # request (a copy takes no time, so no request arrives later for it).
        free_ks, _ = choose_draft_lengths([p.free_acceptance.rates() for p in policies],
                                          [p.free_k_max for p in policies], self.cost.predict, 0.0,
                                          round(self._other_rows), self.min_gain, uniform=False)
        # With a verifier, the plans run only where drafting of any kind has been measured to beat plain
        # decoding (no draft at all) at this load.
        wants = any(ks) or any(free_ks)
        # The check's load counts every live request of ours, as its windows do (observe_forward): by the
        # planned rows alone, a request in its prefill moved the decision a bucket below its windows.
        load = len(self._requests) + self._other_rows
        rows = len(ks) + round(self._other_rows)
        ratio = goodput * self.cost.predict(rows, rows) / rows if any(ks) else 0.0   # over plain decoding
        self._held_back = (self.forward_source and not self.guard.allow_speculation(load, wants, ratio)
                           and wants)
        if self._held_back:
            ks, free_ks = [0] * len(ks), [0] * len(free_ks)
        self.stats.speculation_held_back = self._held_back
        self.stats.measured_goodput = self.guard.measured_rate(load)
        self._split = split and any(ks)
        self.stats.split_cohorts = self._split
        self._plan = dict(zip(ids, ks))
        self._plan_draft_s = self.draft_cost.seconds(max(ks, default=0))
        self._free_plan = dict(zip(ids, free_ks))
        self._dirty = False
        s = self.stats
        s.decisions += 1
        s.last_draft_lengths = ks
        s.mean_draft_length = sum(ks) / len(ks) if ks else 0.0
        s.predicted_step_s = (self.cost.predict(rows / 2, (rows + sum(ks)) / 2) if self._split
                              else self.cost.predict(rows, rows + sum(ks)))
        s.predicted_goodput = goodput

    def _model_plan(self, policies: list["GoodputDraftLength"]) -> tuple[list[int], float, bool]:
        """Model draft lengths of the stepping requests, the predicted goodput, and whether the plan splits
        the batch into cohorts. A request whose drafter session has not opened yet drafts only where the
        plan's gain over what it may still emit pays for the opening (the drafter's prefill of its prompt,
        `ModeGuard.opening_s`): on this machine an opening takes ~0.7 s of the two cores the target shares,
        and a four-request wave of 64-token requests that opened every session for drafts that gained
        10-20% lost 11-14% to plain decoding (docs/scheduler.md). A drafter on hardware of its own costs the
        batch only the waiting request's share (`drafter_shares_target`)."""
        rows_other = round(self._other_rows)

        def plan(drafting: list[int]) -> tuple[list[int], float, bool]:
            sub = [policies[i] for i in drafting]
            args = ([p.acceptance.rates() for p in sub], [p.k_max for p in sub], self.cost.predict,
                    self.draft_cost.per_token_s, rows_other + len(policies) - len(sub), self.min_gain)
            ks, goodput = choose_draft_lengths(*args, self.uniform, self.draft_cost.fixed_s)
            split = False
            if self.cohorts and not self.drafter_shares_target:
                split_ks, split_goodput = choose_cohort_lengths(*args, self.draft_cost.fixed_s)
                if split_goodput > goodput:
                    ks, goodput, split = split_ks, split_goodput, True
            full = [0] * len(policies)
            for i, k in zip(drafting, ks):
                full[i] = k
            return full, goodput, split

        everyone = list(range(len(policies)))
        ks, goodput, split = plan(everyone)
        rows = len(policies) + rows_other
        opening_s = self.guard.opening_s() / (1 if self.drafter_shares_target else rows)
        unopened = {i for i in everyone if ks[i] and policies[i].drafter_unopened}
        if not unopened or not opening_s:
            return ks, goodput, split
        plain = rows / self.cost.predict(rows, rows)
        saved_per_token = 1.0 / plain - 1.0 / goodput if goodput > plain else 0.0    # machine seconds
        keep = [i for i in everyone if i not in unopened or policies[i].remaining * saved_per_token > opening_s]
        if len(keep) == len(everyone):
            return ks, goodput, split
        return plan(keep) if keep else ([0] * len(policies), plain, False)

    def speculating(self, rid: int) -> bool:
        """Whether a new request should open its drafter session ahead of its first draft
        (GoodputDraftLength.drafts_soon): only when it is alone and drafting runs alone (measured winning
        at one request, or no verifier to measure). With other requests live, their drafts share the
        drafter: an opening beside them made their draft calls wait, the plan priced drafting by those
        waits and stopped drafting at two requests (1.02-1.06x plain decoding against 1.26-1.30x when
        sessions opened at the first draft)."""
        with self._lock:
            if any(i != rid for i in self._requests) or self._other_rows >= 0.5:
                return False
            if self.forward_source:
                return self.guard.speculating(1)
            return True

    def split_cohorts(self) -> bool:
        """Whether the verifier should verify two alternating cohorts (GlobalVerifier.split_hints)."""
        with self._lock:
            return self._split

    def draft_wait_s(self) -> float:
        """How long the verifier should wait for this plan's drafting requests (GlobalVerifier.wait_hints):
        the plan assumed every request's step costs the draft plus the forward, so a batch that starts
        without the requests still drafting splits in two, each half streaming the weights alone."""
        with self._lock:
            return max(self._plan_draft_s, self._probe_s)

    def take_probe(self, rid: int, k: int) -> bool:
        """Whether a request at k = 0 may probe now with k tokens: one probe per `probe_every` forwards
        of the whole server, not per request (sixteen requests probing on their own made a slow
        drafter's queue and split the batch every other step). Until the probe's step is observed the
        verifier waits for it (draft_wait_s): a batch that left the prober behind would cost a forward
        of its own."""
        with self._lock:
            # No probe while the guard holds a drafting plan back (acceptance is not what is in doubt), and
            # each probe that did not turn the plan to drafting doubles the wait for the next.
            if self._held_back or self._since_probe < self._probe_interval:
                return False
            self._since_probe = 0
            self._probe_interval = min(2 * self._probe_interval, self.max_probe_every)
            if self._requests[rid].drafter_unopened and not self._probe_could_open(rid, k):
                return False
            self._probe_s, self._prober = self.draft_cost.seconds(k), rid
            return True

    def _probe_could_open(self, rid: int, k: int) -> bool:
        """Whether a probe of k tokens by a request whose drafter session is not open could pay for the
        opening it costs: whether the plan, were the probe accepted in full, would open this request's
        session (its gain over the tokens left weighed against the opening, _model_plan). Without probes
        from unopened requests, a pooled estimate that fell low (one rejection at position 0 in a server's
        warm-up: 0.6 -> 0.4) kept every later request from drafting, and so from ever measuring again: a
        lone request on an AMX CPU, where drafting makes 1.6x, decoded plainly for good."""
        ids = [i for i, p in self._requests.items() if p.stepping or i == rid]
        policies = [self._requests[i] for i in ids]
        me = ids.index(rid)
        hopeful = copy.copy(policies[me])
        hopeful.acceptance = policies[me].acceptance.hypothetical(k, k)
        policies[me] = hopeful
        ks, _, _ = self._model_plan(policies)
        return ks[me] > 0

    def mark_dirty(self) -> None:
        """A request's estimates changed: replan at the next decision (with a verifier, once per forward
        anyway: replanning per request step made every step of sixteen requests pay sixteen plans)."""
        if not self.forward_source:
            self._dirty = True

    # ------------------------------------------------------------ measurements
    def observe_forward(self, rows: int, tokens: int, seconds: float) -> None:
        """One batched target forward (the verifier's), any mix of requests."""
        with self._lock:
            self.forward_source = True
            if tokens > rows * 32:            # a prefill batch: not a decode step's shape
                self.guard.exclude(seconds)   # and a cost of new requests, whatever the mode
                return
            self.cost.observe(rows, tokens, seconds)
            self._since_probe += 1
            # Split in cohorts, a forward holds about half the live requests: the last two hold them all.
            seen = rows + self._last_rows if self._split else rows
            self._last_rows = rows
            self._other_rows = 0.9 * self._other_rows + 0.1 * max(seen - len(self._requests), 0)
            mine = len(self._requests)
            if mine == 0 or seen > mine or self._other_rows > 0.5:
                # Other strategies' requests share the verifier: their tokens are not counted here, so
                # no window is measured while they are in the batches.
                self.guard.interrupt()
            else:
                self.guard.on_forward(mine + self._other_rows, seconds)
            self.stats.forwards += 1
            self.stats.measured_step_s = seconds
            self._dirty = True

    def observe_step(self, drafted: int, accepted: int, draft_s: float, verify_s: float,
                     rid: int | None = None) -> None:
        with self._lock:
            self.guard.add_tokens(accepted + 1)
            if rid is not None and rid == self._prober:     # the probe has been verified
                self._probe_s, self._prober = 0.0, None
            if drafted > 0:
                self.draft_cost.observe(drafted, draft_s)
            if not self.forward_source:       # no verifier reports forwards: learn from this request alone
                self.cost.observe(1, drafted + 1, verify_s)
                self._since_probe += 1
                self._dirty = True
            # With a verifier, the plan is remade once per forward (observe_forward), not per request step:
            # the allocation costs O(requests x k_max^2) and every request of a batch steps once per forward.


class GoodputDraftLength(DraftLengthPolicy):
    """One request's view of the shared scheduler (draft_length.policy: goodput). It bounds context-
    lookup drafts too (free_draft_limit): their drafting is free, their verification is not; their
    acceptance is learned apart from the model's (copies from the context are right more often, or
    less, than the model)."""

    def __init__(self, scheduler: GoodputScheduler, k_max: int = 10, free_k_max: int = 16, group: str = ""):
        """group: the strategy's name; its requests pool their acceptance (AcceptanceEstimate)."""
        self.scheduler, self.k_max, self.free_k_max = scheduler, k_max, free_k_max
        pooled, pooled_free = scheduler.pooled(group)
        self.acceptance = AcceptanceEstimate(k_max, parent=pooled)
        self.free_acceptance = AcceptanceEstimate(free_k_max, parent=pooled_free)
        self._probes = 0
        self._tokens = 1              # emitted so far: the prefill's token, then each step's
        self.stepping = False         # asked for a draft length yet (a request in its prefill is not)
        self.remaining = k_max + 1    # tokens it may still emit, and whether a model draft would first
        self.drafter_unopened = False  # open its drafter session (before_step)
        self.rid = scheduler.join(self)

    def next_k(self) -> int:
        self._step()
        k = self.scheduler.draft_length(self.rid)
        # With k = 0 nothing is measured again: probe now and then, alternately 1 and up to 4 tokens (two
        # lengths separate the drafter's fixed cost from its cost per token).
        probe = 1 if self._probes % 2 == 0 else min(4, self.k_max)
        # A request whose drafter session is not open probes only where a probe accepted in full would
        # make its opening pay (take_probe), and with 4 tokens: one token would buy the opening for one
        # position's evidence.
        if self.drafter_unopened:
            probe = min(4, self.k_max)
        if k == 0 and self.scheduler.take_probe(self.rid, probe):
            self._probes += 1
            return probe
        return k

    def before_step(self, remaining: int, drafter_unopened: bool) -> None:
        self.remaining, self.drafter_unopened = remaining, drafter_unopened

    def _step(self) -> None:
        self.stepping = True          # planned from now on (draft_length replans: it is not in the plan yet)

    def free_draft_limit(self) -> int:
        self._step()
        return self.scheduler.draft_length(self.rid, free=True)

    def drafts_soon(self) -> bool:
        return self.scheduler.speculating(self.rid)

    def observe(self, drafted, accepted, draft_s, verify_s):
        self._tokens += accepted + 1
        with self.scheduler._lock:           # the pooled estimate is shared with the other requests
            self.acceptance.observe(drafted, accepted)
        self.scheduler.observe_step(drafted, accepted, draft_s, verify_s, self.rid)

    def observe_setup(self, seconds: float, cost_s: float | None = None) -> None:
        with self.scheduler._lock:        # a one-time cost of the request, spread over requests' tokens
            self.scheduler.guard.observe_setup(seconds, cost_s)

    def observe_free(self, drafted: int, accepted: int) -> None:
        self._tokens += accepted + 1
        with self.scheduler._lock:
            self.free_acceptance.observe(drafted, accepted)
            self.scheduler.guard.add_tokens(accepted + 1)
        self.scheduler.mark_dirty()

    def close(self) -> None:
        with self.scheduler._lock:
            self.scheduler.guard.observe_request(self._tokens)
        self.scheduler.leave(self.rid)
