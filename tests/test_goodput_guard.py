"""The measured check on the goodput scheduler's plans (orchestrator/goodput_guard.py): drafting runs
only where it has been measured to beat plain decoding at the current load, the losing mode is
measured again at doubling intervals, and without a verifier nothing changes."""
from __future__ import annotations

import pytest

from orchestrator.goodput import AcceptanceEstimate, GoodputDraftLength, GoodputScheduler, StepCostModel
from orchestrator.goodput_guard import PLAIN, SPEC, ModeGuard, load_bucket


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_server(requests: int, forwards: int, plain_step_s: float, spec_step_s: float, accepted_of_k,
               guard_kwargs=None):
    """A verifier loop on a fake clock: each forward every request asks its draft length, the forward
    takes plain_step_s (nobody drafts) or spec_step_s (someone does), then each request reports its
    step. The model is told drafting is nearly free (weight-bound step, no draft cost), so it always
    wants to draft: what the guard measures is all that can stop it. Returns the draft lengths per
    forward and the scheduler."""
    clock = FakeClock()
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.1, 1e-4, 0.0), prior_weight=1e6, decay=1.0),
                                 guard=ModeGuard(clock=clock, **(guard_kwargs or {})), probe_every=10 ** 6)
    policies = [GoodputDraftLength(scheduler, k_max=4) for _ in range(requests)]
    for p in policies:
        p.acceptance = AcceptanceEstimate(4, prior=0.8)
    scheduler.observe_forward(requests, requests * 100, 1.0)     # the prompts' prefill
    history = []
    for _ in range(forwards):
        ks = [p.next_k() for p in policies]
        history.append(ks)
        clock.now += spec_step_s if any(ks) else plain_step_s
        scheduler.observe_forward(requests, requests + sum(ks), 0.1)
        for p, k in zip(policies, ks):
            p.observe(k, accepted_of_k(k), 0.0, 0.1)
    return history, scheduler


def test_drafting_that_measures_slower_is_held_back_and_retried_at_doubling_intervals():
    """Plain: 4 tokens per 0.1 s = 40 tok/s. Drafting: 4 x 2 tokens per 0.3 s = 26.7 tok/s (the
    contention the model does not see). The model wants to draft throughout."""
    history, scheduler = run_server(4, 1200, 0.1, 0.3, lambda k: 1 if k else 0)
    drafting = [any(ks) for ks in history]
    assert not any(drafting[:10])                       # the plain baseline is measured first
    assert all(drafting[10:20])                         # then drafting, once
    assert sum(drafting) / len(drafting) < 0.12         # then mostly plain: 40 vs 26.7 tok/s
    assert scheduler.stats.speculation_held_back
    assert scheduler.stats.measured_goodput == pytest.approx(40.0, rel=0.01)
    # Each retry of drafting lasts one window (2 + 8 forwards); the gaps between retries double.
    starts = [i for i in range(1, len(drafting)) if drafting[i] and not drafting[i - 1]]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 3 and all(later > earlier for earlier, later in zip(gaps, gaps[1:]))
    rates = scheduler.guard.stats.rates[load_bucket(4)]
    assert rates[PLAIN] == pytest.approx(40.0, rel=0.01) and rates[SPEC] == pytest.approx(26.67, rel=0.01)


def test_drafting_that_measures_faster_runs():
    """Drafting: 4 x 3 tokens per 0.15 s = 80 tok/s against 40: it runs nearly all the time, the plain
    baseline re-measured now and then."""
    history, scheduler = run_server(4, 600, 0.1, 0.15, lambda k: 2 if k else 0)
    drafting = [any(ks) for ks in history]
    assert sum(drafting) / len(drafting) > 0.85
    assert not scheduler.stats.speculation_held_back
    assert scheduler.stats.measured_goodput == pytest.approx(80.0, rel=0.01)


def test_a_guard_that_ignores_measurements_would_lose():
    """The check above can fail: with a guard that always allows the model's plan, drafting runs all the
    time at 26.7 tok/s against plain decoding's 40."""
    class Credulous(ModeGuard):
        def allow_speculation(self, rows, model_wants, predicted_ratio=0.0):
            return model_wants
    clock = FakeClock()
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.1, 1e-4, 0.0), prior_weight=1e6, decay=1.0),
                                 guard=Credulous(clock=clock), probe_every=10 ** 6)
    policy = GoodputDraftLength(scheduler, k_max=4)
    policy.acceptance = AcceptanceEstimate(4, prior=0.8)
    drafted = 0
    for _ in range(100):
        k = policy.next_k()
        drafted += k > 0
        scheduler.observe_forward(1, 1 + k, 0.1)
        policy.observe(k, 1 if k else 0, 0.0, 0.1)
    assert drafted == 100


def test_loads_are_measured_apart():
    """Drafting wins alone and loses at eight requests: each bucket keeps its own verdict."""
    assert [load_bucket(r) for r in (1, 2, 3, 4, 5, 6, 11, 12, 23, 24)] == [1, 2, 3, 3, 3, 4, 4, 5, 5, 6]
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1)
    for rows, mode_rates in ((1, {PLAIN: 10.0, SPEC: 20.0}), (8, {PLAIN: 40.0, SPEC: 30.0})):
        for mode in (PLAIN, SPEC):
            guard._mode = mode
            guard._win = None
            for _ in range(6):
                guard.add_tokens(int(mode_rates[mode]))
                clock.now += 1.0
                guard.on_forward(rows)
    assert guard.allow_speculation(1, True) and not guard.allow_speculation(8, True)
    assert not guard.allow_speculation(1, False)       # the model's "no" always stands


def test_without_a_verifier_the_guard_stays_out():
    """A single in-process request reports no forwards: the model's plan runs as before."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.1, 1e-4, 0.0), prior_weight=1e6, decay=1.0))
    policy = GoodputDraftLength(scheduler, k_max=4)
    policy.acceptance = AcceptanceEstimate(4, prior=0.8)
    assert policy.next_k() > 0


def test_prefill_time_is_left_out_of_the_measurement():
    """A new request's prompt is prefilled whatever the mode: a window it falls in must not read slower."""
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1)
    guard._mode = PLAIN
    for i in range(6):
        guard.add_tokens(1)
        clock.now += 0.1
        if i == 3:
            clock.now += 2.0                 # a 2 s prefill between two decode forwards
            guard.exclude(2.0)
        guard.on_forward(1)
    assert guard.stats.rates[1][PLAIN] == pytest.approx(10.0)


def test_other_strategies_traffic_is_not_measured():
    """Forwards with rows from other strategies' requests (whose tokens are not reported to the
    scheduler) must not enter a window: they read as zero tokens per second of plain decoding."""
    clock = FakeClock()
    scheduler = GoodputScheduler(guard=ModeGuard(clock=clock, window=4, warmup=1))
    policy = GoodputDraftLength(scheduler, k_max=4)
    for _ in range(30):
        clock.now += 0.1
        scheduler.observe_forward(5, 5, 0.1)       # one of ours, four of a plain strategy's
    assert scheduler.guard.stats.windows == 0
    policy.close()


def test_a_window_never_counts_less_than_its_forwards_seconds():
    """Excluded one-time costs (a drafter session's opening) cannot make a window shorter than its own
    forwards took, which would read as an absurd rate."""
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1)
    for i in range(6):
        guard.add_tokens(1)
        clock.now += 0.1
        if i == 2:
            guard.exclude(5.0)               # meanwhile other requests' forwards ran
        guard.on_forward(1, 0.1)
    assert guard.stats.rates[1][PLAIN] == pytest.approx(10.0)


def test_drafting_must_win_by_the_margin():
    """Drafting measured 5% faster than plain decoding does not run (margin 10%); 20% faster does."""
    for spec_rate, runs in ((10.5, False), (12.0, True)):
        clock = FakeClock()
        guard = ModeGuard(clock=clock, window=4, warmup=1, margin=0.1)
        for mode, rate in ((PLAIN, 10.0), (SPEC, spec_rate)):
            guard._mode, guard._win = mode, None
            for _ in range(6):
                guard.add_tokens(rate)
                clock.now += 1.0
                guard.on_forward(1)
        assert guard.allow_speculation(1, True) == runs


def serve_short_requests(opening_s: float, request_tokens: int = 16, forwards: int = 400):
    """A closed loop of 4 requests of `request_tokens` tokens each on a fake clock. Forwards take 0.1 s
    whatever the mode; a drafting step emits 2 tokens, a plain one 1 (drafting 2x faster per forward).
    A request's first draft first opens its drafter session: `opening_s` of wall time that no forward
    runs in (the drafter prefills on the shared cores), reported as a one-time cost (observe_setup).
    Returns the fraction of forwards that drafted and the guard."""
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1, margin=0.1, explore_every=16)
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.1, 1e-4, 0.0), prior_weight=1e6, decay=1.0),
                                 guard=guard, probe_every=10 ** 6)

    def new_request():
        p = GoodputDraftLength(scheduler, k_max=1)
        p.acceptance = AcceptanceEstimate(1, prior=0.95)
        return {"policy": p, "left": request_tokens, "opened": False}

    live = [new_request() for _ in range(4)]
    drafting = 0
    for _ in range(forwards):
        ks = [r["policy"].next_k() for r in live]
        drafting += any(ks)
        for r, k in zip(live, ks):
            if k and not r["opened"]:
                r["opened"] = True
                clock.now += opening_s
                r["policy"].observe_setup(opening_s)
        clock.now += 0.1
        scheduler.observe_forward(len(live), len(live) + sum(ks), 0.1)
        for i, (r, k) in enumerate(zip(live, ks)):
            r["policy"].observe(k, k, 0.0, 0.1)
            r["left"] -= k + 1
            if r["left"] <= 0:
                r["policy"].close()
                live[i] = new_request()
    return drafting / forwards, guard


def test_drafter_session_openings_are_charged_to_drafting():
    """Drafting doubles the tokens per forward (80 tok/s against plain decoding's 40), but each
    ~17-token request first waits 0.4 s for its drafter session: 0.024 s per token, so drafting makes
    1 / (1/80 + 0.024) = 28 tok/s and loses. Left out, as before openings were charged, drafting
    measured 80 tok/s and kept running (next test). With cheap openings drafting still runs."""
    share, guard = serve_short_requests(opening_s=0.4)
    assert guard.setup_s_per_token() == pytest.approx(0.4 / 17, rel=0.05)
    rates = guard.stats.rates[load_bucket(4)]
    assert rates[SPEC] < rates[PLAIN] and share < 0.3, (rates, share)
    share_cheap, guard = serve_short_requests(opening_s=0.01)
    assert share_cheap > 0.8, guard.stats.rates


def test_leaving_openings_out_would_keep_a_losing_mode(monkeypatch):
    """The broken version: openings only excluded, never charged. Drafting then reads twice as fast as
    plain decoding and runs though it loses."""
    monkeypatch.setattr(ModeGuard, "setup_s_per_token", lambda self: 0.0)
    share, guard = serve_short_requests(opening_s=0.4)
    assert share > 0.8, guard.stats.rates


def test_new_requests_open_sessions_ahead_only_where_drafting_runs():
    """drafts_soon (a drafter actor's session opens beside the prefill): not before the plain baseline,
    yes once drafting is measured winning alone, no beside other requests or where drafting loses."""
    clock = FakeClock()
    scheduler = GoodputScheduler(guard=ModeGuard(clock=clock, window=4, warmup=1))
    scheduler.observe_forward(1, 1, 0.1)               # a verifier reports forwards
    newcomer = GoodputDraftLength(scheduler, k_max=4)
    assert not newcomer.drafts_soon()                   # no plain baseline yet: plain decoding comes first
    newcomer.close()
    for mode, rate in ((PLAIN, 10.0), (SPEC, 20.0)):      # windows of 1 request: plain 10, drafting 20 tok/s
        scheduler.guard._mode, scheduler.guard._win = mode, None
        for _ in range(6):
            scheduler.guard.add_tokens(rate / 10)
            clock.now += 0.1
            scheduler.guard.on_forward(1)
    assert scheduler.guard.stats.rates[1] == {PLAIN: pytest.approx(10.0), SPEC: pytest.approx(20.0)}
    newcomer = GoodputDraftLength(scheduler, k_max=4)
    assert newcomer.drafts_soon()                       # drafting measured winning alone
    other = GoodputDraftLength(scheduler, k_max=4)
    assert not newcomer.drafts_soon()                   # not beside another request's drafts
    other.close()
    scheduler.guard._buckets[1].rates[SPEC] = 5.0       # alone, but drafting measured losing
    assert not newcomer.drafts_soon()


def measure(guard, clock, mode, rate, rows, windows=1):
    """Run `windows` windows of `mode` at `rows` live requests, emitting `rate` tokens/s."""
    guard._mode, guard._win = mode, None
    for _ in range(guard.window * windows + guard.warmup):
        guard.add_tokens(rate / 10)
        clock.now += 0.1
        guard.on_forward(rows)


def test_a_higher_load_presumes_drafting_loses_where_a_lower_one_measured_it_losing():
    """Drafting lost at 2 requests: at 4 (a new bucket) it is not explored after the plain baseline but
    only when the lower load would measure it again; where it won at 2, 4 explores it at once."""
    for spec_at_2, explored_at_once in ((12.0, False), (20.0, True)):
        clock = FakeClock()
        guard = ModeGuard(clock=clock, window=4, warmup=1, explore_every=48)
        measure(guard, clock, PLAIN, 15.0, 2)
        measure(guard, clock, SPEC, spec_at_2, 2)
        measure(guard, clock, PLAIN, 30.0, 4)                  # the plain baseline at the new load
        assert guard.allow_speculation(4, True) == explored_at_once
        if not explored_at_once:
            forwards = 0
            while not guard.allow_speculation(4, True):
                measure_one = guard._mode
                guard.add_tokens(3.0)
                clock.now += 0.1
                guard.on_forward(4)
                forwards += 1
                assert measure_one == PLAIN and forwards < 200
            # explored after the lower load's interval (doubled there when drafting lost)
            assert forwards >= 48 - 1, forwards


def test_without_the_presumption_each_new_load_explores_drafting_at_once(monkeypatch):
    """The broken version (every new load starts from scratch) explores drafting right after the
    baseline: what the test above rules out."""
    from orchestrator.goodput_guard import _Bucket

    monkeypatch.setattr(ModeGuard, "_new_bucket", lambda self, bucket: _Bucket(self.explore_every))
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1, explore_every=48)
    measure(guard, clock, PLAIN, 15.0, 2)
    measure(guard, clock, SPEC, 12.0, 2)
    measure(guard, clock, PLAIN, 30.0, 4)
    assert guard.allow_speculation(4, True)


def judged_at_four(predicted_at_2: float, predicted_at_4: float, spec_at_2: float = 18.0) -> ModeGuard:
    """Drafting measured 1.2x plain decoding at 2 requests (15 -> spec_at_2 tok/s) where the model
    predicted predicted_at_2; then a plain baseline at 4 requests with the model predicting
    predicted_at_4. Returns the guard, about to choose its first mode after that baseline."""
    clock = FakeClock()
    guard = ModeGuard(clock=clock, window=4, warmup=1, explore_every=48)
    guard.allow_speculation(2, True, predicted_at_2)
    measure(guard, clock, PLAIN, 15.0, 2)
    measure(guard, clock, SPEC, spec_at_2, 2)
    guard.allow_speculation(4, True, predicted_at_4)
    measure(guard, clock, PLAIN, 30.0, 4)
    return guard


def test_a_higher_load_presumes_drafting_loses_where_the_corrected_prediction_says_so():
    """The model predicted 1.6x at 2 requests and drafting measured 1.2x (the model is 25% optimistic).
    At 4 it predicts 1.3x: corrected, 0.975x, short of the 10% margin, so drafting is not explored after
    the plain baseline but after twice the base interval. Predicting 1.8x at 4 (corrected 1.35x), it
    is explored at once; so it is where the model was right at 2 (1.2 predicted, 1.2 measured)."""
    guard = judged_at_four(1.6, 1.3)
    assert not guard.allow_speculation(4, True, 1.3)
    assert guard.stats.presumed_plain == [load_bucket(4)]
    assert guard._buckets[load_bucket(4)].explore_every == 96
    assert guard.allow_speculation(4, True, 1.3) is False   # judged once: the presumption holds
    assert judged_at_four(1.6, 1.8).allow_speculation(4, True, 1.8)
    assert judged_at_four(1.2, 1.3).allow_speculation(4, True, 1.3)
    # Without a prediction at the lower load nothing is corrected: explored at once, as before.
    assert judged_at_four(0.0, 1.3).allow_speculation(4, True, 1.3)


def test_the_scheduler_gives_the_guard_its_predicted_ratio_over_plain_decoding():
    """What the correction is made from: the plan's predicted goodput over plain decoding's, per bucket.
    A plan with a nearly free draft step and 0.8 acceptance predicts well above 1."""
    history, scheduler = run_server(2, 30, 0.1, 0.1, lambda k: k)
    ratio = scheduler.guard.stats.predicted[load_bucket(2)]
    assert 1.5 < ratio < 5.0, ratio
