"""Measured goodput of speculating against not speculating, per load level: the check on the model.

The goodput scheduler (orchestrator/goodput.py) plans from a model: a fitted step cost, a fitted draft
cost and learned acceptance. What the model leaves out decides whether speculation wins under load:
a drafter sharing the target's cores slows the target's forwards, requests that draft reach the
verifier later and batches split, Python work per step grows with the draft. Served on this machine
(2 cores, drafter and target on the same CPU), the model's plans made 0.87x plain decoding at four
requests. No model of those effects travels between machines; a measurement does.

So the scheduler runs its model's plan only where it has *measured* that speculating beats decoding
plainly at the current load. Per load bucket (live requests: 1, 2, 3-5, 6-11, 12-23, ...) it keeps the
emitted tokens per second of each mode, measured over windows of forwards (the first forwards after a
switch are left out: sessions catch up, batches re-form). The better mode runs; the other is measured
again now and then, at intervals that double each time it loses again (so a losing mode costs a
vanishing share of the time) and reset when it wins. Before a bucket has a plain baseline, it
decodes plainly for one window: the baseline is what "never slower than plain" is measured against.

"Plain" means no draft of any kind (context-lookup copies are held back too). One-time costs of a
request are left out of the windows as they fall: its prompt's prefill (both modes pay it) and its
drafter session's opening (paid once per request, it would make the first drafting window of a wave of
new requests read far slower than drafting is, and later ones faster). The openings are charged to
drafting spread evenly instead: each drafting window is charged its tokens times the mean opening's
seconds per token of a mean request (measured on the requests seen). Short requests thus pay their
drafter sessions in full: served here with 64-token requests, an opening of ~0.7 s was a fifth of what
drafting saved at four requests, and left out it made a losing mode measure 35% faster than plain
decoding. Windows are measured only while the verifier's batches hold no other strategy's requests
(their tokens are not reported here).

Pure Python over floats; the clock is injected (the simulator runs it on simulated time).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

PLAIN, SPEC = "plain", "spec"
DECAY = 0.98          # of the opening and request-length sums: recent requests weigh most


def load_bucket(rows: float) -> int:
    """Live requests -> bucket: 1 -> 1, 2 -> 2, 3-5 -> 3, 6-11 -> 4, 12-23 -> 5, ... (doubling, so a
    closed loop whose requests come and go between 3 and 4 stays in one bucket)."""
    rows = max(1, round(rows))
    return rows if rows <= 2 else int(math.log2(rows / 3)) + 3


@dataclass
class _Bucket:
    explore_every: int
    rates: dict[str, float] = field(default_factory=dict)   # mode -> tokens/s (EMA over windows)
    since_other: int = 0          # forwards run in the winning mode since the other was last measured
    exploring: bool = False       # the losing mode is being measured now
    presumed: str = SPEC          # the winner once plain decoding is measured and drafting is not yet
    predicted: float = 0.0        # the model's predicted goodput ratio, drafting / plain (EMA; 0: none)
    judged: bool = False          # the corrected prediction has been weighed here (_judge)

    def winner(self, margin: float) -> str | None:
        if PLAIN not in self.rates:
            return None
        if SPEC not in self.rates:
            return self.presumed
        return SPEC if self.rates[SPEC] >= self.rates[PLAIN] * (1 + margin) else PLAIN


@dataclass
class _Window:
    bucket_rows: float            # sum of live requests over the counted forwards
    mode: str
    start: float
    forwards: int = 0             # counted forwards
    skip: int = 0                 # forwards still to leave out
    tokens: int = 0
    busy: float = 0.0             # seconds of the counted forwards themselves: the least the window took


@dataclass
class GuardStats:
    """Exported with the scheduler's stats: the measured rates per bucket and the mode in force."""
    mode: str = PLAIN
    windows: int = 0
    rates: dict[int, dict[str, float]] = field(default_factory=dict)
    setup_s_per_token: float = 0.0      # drafter-session opening charged per drafted token (ModeGuard)
    predicted: dict[int, float] = field(default_factory=dict)   # bucket -> the model's drafting/plain ratio
    presumed_plain: list[int] = field(default_factory=list)     # buckets the corrected prediction held back


class ModeGuard:
    """Chooses, per forward, whether the scheduler's plan may speculate (see module doc)."""

    def __init__(self, window: int = 8, warmup: int = 2, explore_every: int = 48,
                 max_explore_every: int = 1536, smoothing: float = 0.5, margin: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter):
        """window: forwards per measurement; warmup: forwards left out after a switch; explore_every:
        forwards in the winning mode before the losing one is measured again (doubling to
        max_explore_every while it keeps losing); smoothing: weight of a new window in the rate; margin:
        drafting must measure this fraction faster than plain decoding to run (windows are short and
        noisy, and "never slower than plain" matters more than the last few percent of a win)."""
        if window < 1 or warmup < 0 or explore_every < 1:
            raise ValueError("window and explore_every must be >= 1, warmup >= 0")
        self.window, self.warmup, self.smoothing, self.margin = window, warmup, smoothing, margin
        self.explore_every, self.max_explore_every = explore_every, max_explore_every
        self.clock = clock
        self.stats = GuardStats()
        self._buckets: dict[int, _Bucket] = {}
        self._win: _Window | None = None
        self._mode = PLAIN            # the mode the current forward's plan was made in
        # Decayed sums (each new observation weighs as much as the last ~50) of the drafter sessions'
        # opening seconds and count, and of finished requests' tokens and count.
        self._setup_s = self._setups = self._request_tokens = self._requests = 0.0

    def _bucket(self, bucket: int) -> _Bucket:
        if bucket not in self._buckets:
            self._buckets[bucket] = self._new_bucket(bucket)
        return self._buckets[bucket]

    def _new_bucket(self, bucket: int) -> _Bucket:
        """Drafting's gain only shrinks as batches grow (a step turns compute-bound, rejected rows cost
        more): where it measured losing at a lower load, a new, higher load presumes it loses too and
        decodes plainly, measuring drafting first when that lower load would measure it again. Served
        here, exploring each new load afresh cost a wave of four requests 13% (every request's drafter
        session opened for one window that confirmed drafting loses)."""
        b = _Bucket(self.explore_every)
        below = [self._buckets[k] for k in sorted(self._buckets) if k < bucket]
        lost = [lb for lb in below if SPEC in lb.rates and lb.winner(self.margin) == PLAIN]
        if lost:
            b.presumed = PLAIN
            b.explore_every = max(lb.explore_every for lb in lost)
        return b

    def allow_speculation(self, rows: float, model_wants: bool, predicted_ratio: float = 0.0) -> bool:
        """Whether the next forward's plan may draft. model_wants: the model's plan drafts;
        predicted_ratio: its predicted goodput over plain decoding's (0: not given)."""
        key = load_bucket(rows)
        b = self._bucket(key)
        if model_wants and predicted_ratio > 0:
            b.predicted = predicted_ratio if not b.predicted else 0.8 * b.predicted + 0.2 * predicted_ratio
            self.stats.predicted[key] = b.predicted
        winner = b.winner(self.margin)
        if model_wants and winner == SPEC and SPEC not in b.rates and not b.judged:
            self._judge(key, b)
            winner = b.winner(self.margin)
        if not model_wants:
            mode = PLAIN
        elif winner is None:                  # no plain baseline at this load yet: measure it first
            mode = PLAIN
        elif b.exploring:
            mode = PLAIN if winner == SPEC else SPEC
        else:
            mode = winner
        self._mode = mode
        self.stats.mode = mode
        return mode == SPEC

    def _judge(self, key: int, b: _Bucket) -> None:
        """Before drafting is first measured at a load (its plain baseline is): where a lower load was
        measured in both modes, the model's predicted ratio here is corrected by how far off the model
        was there (measured ratio / predicted ratio: what the model leaves out, a drafter slowed by the
        batch, openings, split batches, scales the step time), and a corrected ratio short of the margin
        presumes drafting loses, as a measured loss would (the next measurement after twice the base
        interval). Exploring is what it saves: a wave of new requests opens every drafter session for
        the window that measures drafting."""
        b.judged = True
        if not b.predicted:
            return
        for k in sorted((k for k in self._buckets if k < key), reverse=True):
            lb = self._buckets[k]
            if lb.predicted and PLAIN in lb.rates and SPEC in lb.rates:
                corrected = b.predicted * (lb.rates[SPEC] / lb.rates[PLAIN]) / lb.predicted
                if corrected < 1 + self.margin:
                    b.presumed = PLAIN
                    b.explore_every = max(b.explore_every, 2 * self.explore_every)
                    self.stats.presumed_plain.append(key)
                return

    def speculating(self, rows: float) -> bool:
        """Whether drafting is what runs now at this load (it is measured winning, or being measured
        again): a new request's drafter session is then worth opening ahead of its first draft."""
        b = self._bucket(load_bucket(rows))
        winner = b.winner(self.margin)
        return winner is not None and (winner == SPEC) != b.exploring

    def observe_setup(self, seconds: float, cost_s: float | None = None) -> None:
        """A drafter session was opened: `seconds` the request waited for it (left out of the window), and
        cost_s the drafter's seconds opening it (None: the same). The cost is what openings are charged
        and weighed by: one opened ahead took the drafter as long, the request only waited less (on shared
        cores it slowed the target's prefill instead)."""
        self.exclude(seconds)
        self._setup_s = DECAY * self._setup_s + (seconds if cost_s is None else cost_s)
        self._setups = DECAY * self._setups + 1
        self.stats.setup_s_per_token = self.setup_s_per_token()

    def observe_request(self, tokens: int) -> None:
        """A request ended having emitted `tokens`: the length its drafter session's opening is spread over."""
        self._request_tokens = DECAY * self._request_tokens + tokens
        self._requests = DECAY * self._requests + 1
        self.stats.setup_s_per_token = self.setup_s_per_token()

    def opening_s(self) -> float:
        """Mean seconds a drafter took to open a request's session (0 before any was seen)."""
        return self._setup_s / self._setups if self._setups else 0.0

    def setup_s_per_token(self) -> float:
        """Seconds of drafter-session opening per emitted token of a mean request (0 until both are seen)."""
        if not self._setups or not self._requests or not self._request_tokens:
            return 0.0
        return self.opening_s() / (self._request_tokens / self._requests)

    def measured_rate(self, rows: float) -> float:
        """Tokens/s last measured at this load in the mode now running (0 before any)."""
        return self._bucket(load_bucket(rows)).rates.get(self._mode, 0.0)

    def add_tokens(self, n: int) -> None:
        """Tokens a request step emitted (reported after the forward that verified them)."""
        if self._win is not None:
            self._win.tokens += n

    def interrupt(self) -> None:
        """Drop the window being measured (a forward it cannot account for); the next one starts anew."""
        self._win = None

    def exclude(self, seconds: float) -> None:
        """Leave seconds out of the window being measured: one-time costs of a request (its prefill, which
        both modes pay and which window it falls in is chance; its drafter session's opening). The
        window never counts less than its forwards' own seconds (other requests' forwards may have run
        meanwhile)."""
        if self._win is not None:
            self._win.start += seconds

    def on_forward(self, rows: float, seconds: float = 0.0) -> None:
        """A decode forward of `rows` live requests finished (taking `seconds`), planned in the mode last
        chosen."""
        now, mode, w = self.clock(), self._mode, self._win
        if w is None or w.mode != mode:
            # This forward (planned in the old mode or before any) starts the window and is the first
            # of those left out.
            self._win = _Window(0.0, mode, now, skip=max(self.warmup - 1, 0))
            return
        if w.skip > 0:                       # settling after a switch: restart the clock and the count
            w.skip -= 1
            w.start, w.tokens = now, 0
            return
        w.forwards += 1
        w.bucket_rows += rows
        w.busy += seconds
        b = self._bucket(load_bucket(w.bucket_rows / w.forwards))
        if mode == b.winner(self.margin) and not b.exploring:
            b.since_other += 1
            if b.since_other >= b.explore_every and b.winner(self.margin) is not None:
                b.exploring = True
        if w.forwards < self.window:
            return
        elapsed = max(now - w.start, w.busy)
        if mode == SPEC:     # the requests' drafter sessions, spread evenly (module doc)
            elapsed += w.tokens * self.setup_s_per_token()
        if elapsed > 0:
            self._record(b, mode, w.tokens / elapsed)
        self._win = _Window(0.0, mode, now)

    def _record(self, b: _Bucket, mode: str, rate: float) -> None:
        before = b.winner(self.margin)
        old = b.rates.get(mode)
        b.rates[mode] = rate if old is None else (1 - self.smoothing) * old + self.smoothing * rate
        self.stats.windows += 1
        self.stats.rates = {k: dict(v.rates) for k, v in self._buckets.items()}
        if b.exploring and mode != before:
            # The losing mode was measured again: if it still loses, wait twice as long next time.
            b.exploring, b.since_other = False, 0
            after = b.winner(self.margin)
            b.explore_every = (min(2 * b.explore_every, self.max_explore_every) if after == before
                               else self.explore_every)
