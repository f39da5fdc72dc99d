"""The goodput scheduler (orchestrator/goodput.py): its allocation rule, its cost model, and that
requests under it stay lossless alone and batched through the global verifier."""
from __future__ import annotations

import threading

import pytest

from orchestrator.goodput import (STEP_COST_SHAPES, AcceptanceEstimate, DraftCostModel, GoodputDraftLength,
                                  GoodputScheduler, StepCostModel, choose_draft_lengths, expected_tokens)
from orchestrator.goodput_guard import ModeGuard


def weight_bound(rows, tokens):          # streaming the weights dominates: extra tokens nearly free
    return 0.100 + 0.0005 * tokens


def compute_bound(rows, tokens):         # every token costs as much as the weights
    return 0.010 + 0.020 * tokens


def goodput_of(ks, accepts, step_s, draft_s=0.0):
    return sum(expected_tokens(a, k) for a, k in zip(accepts, ks)) / (
        step_s(len(ks), sum(k + 1 for k in ks)) + draft_s * max(ks))


def test_expected_tokens_counts_the_bonus_and_stops_at_the_first_rejection():
    assert expected_tokens([0.5] * 4, 0) == 1.0
    assert expected_tokens([0.5] * 4, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == 2.0          # position 1 always rejected: 2 tokens


def test_long_drafts_when_verification_is_weight_bound():
    ks, _ = choose_draft_lengths([[0.8] * 10], [10], weight_bound, draft_token_s=0.005)
    assert ks[0] >= 6


def test_no_drafts_when_every_token_costs_a_full_step():
    accepts = [[0.6] * 10 for _ in range(8)]
    ks, best = choose_draft_lengths(accepts, [10] * 8, compute_bound, draft_token_s=0.005)
    assert ks == [0] * 8
    # ... and what it avoids: a fixed draft of 4 would lose to plain decoding here
    assert goodput_of([4] * 8, accepts, compute_bound, 0.005) < goodput_of([0] * 8, accepts, compute_bound)
    assert best == pytest.approx(goodput_of([0] * 8, accepts, compute_bound))


def test_better_drafters_get_longer_drafts_and_the_choice_beats_uniform_lengths():
    def mixed(rows, tokens):
        return 0.05 + 0.004 * tokens
    accepts = [[0.9] * 10, [0.3] * 10, [0.7] * 10]
    ks, best = choose_draft_lengths(accepts, [10] * 3, mixed, draft_token_s=0.002)
    assert ks[0] > ks[2] > ks[1]
    for k in range(0, 11):                   # at least as good as any uniform draft length
        assert best >= goodput_of([k] * 3, accepts, mixed, 0.002) - 1e-9
    assert best == pytest.approx(goodput_of(ks, accepts, mixed, 0.002))


def test_k_max_and_plain_rows_are_respected():
    ks, _ = choose_draft_lengths([[0.95] * 10], [3], weight_bound, draft_token_s=0.0)
    assert ks == [3]
    # Many plain-decoding rows in the batch make it compute-bound: drafting stops paying.
    alone, _ = choose_draft_lengths([[0.7] * 10], [10], lambda r, t: 0.02 + 0.002 * t + 0.001 * r, 0.001)
    crowded, _ = choose_draft_lengths([[0.7] * 10], [10], lambda r, t: 0.02 + 0.002 * t + 0.001 * r, 0.001,
                                      other_rows=200)
    assert crowded[0] < alone[0]


def test_cost_model_recovers_a_linear_step_time():
    model = StepCostModel()
    for rows in (1, 2, 4, 8, 16):
        for per_row in (1, 3, 5):
            tokens = rows * per_row
            model.observe(rows, tokens, 0.05 + 0.002 * tokens + 0.001 * rows)
    assert model.predict(16, 80) == pytest.approx(0.05 + 0.002 * 80 + 0.001 * 16, rel=0.02)
    assert model.predict(1, 1) == pytest.approx(0.053, rel=0.05)


def test_step_cost_model_learns_the_step_past_one_token():
    """A CPU that streams bf16 for one token and runs a float32 GEMM past it (the EPYC 7003: 277 ms,
    then 435 ms for two tokens, 1,023 for sixteen): the model prices both sides, where one line through
    every shape over-priced the one-token step."""
    truth = lambda rows, tokens: 0.27 + 0.02 * tokens + (0.15 if tokens > 1 else 0.0)   # noqa: E731
    model = StepCostModel()
    for rows, per_row in ((1, 1), (1, 2), (1, 5), (4, 1), (4, 3), (8, 1), (16, 1), (16, 2)):
        model.observe(rows, rows * per_row, truth(rows, rows * per_row))
    for rows, tokens in ((1, 1), (1, 2), (1, 6), (8, 8), (16, 64)):
        assert model.predict(rows, tokens) == pytest.approx(truth(rows, tokens), rel=0.02)
    # A lone request (rows never vary) still learns the step, and the scheduler's plan pays it: drafting
    # 1-3 tokens at acceptance 0.8 (0.15 s each) gains less than the step costs, so it decodes plainly;
    # priced without the step, it would draft.
    lone = StepCostModel()
    for tokens in (1, 2, 3, 5, 1, 2):
        lone.observe(1, tokens, truth(1, tokens))
    assert lone.predict(1, 1) == pytest.approx(0.29, rel=0.02) and lone.coef[3] == pytest.approx(0.15, rel=0.02)
    ks, _ = choose_draft_lengths([[0.8] * 3], [3], lone.predict, draft_token_s=0.15)
    assert ks == [0]
    cheap = lambda rows, tokens: 0.27 + 0.02 * tokens                                    # noqa: E731
    assert choose_draft_lengths([[0.8] * 3], [3], cheap, draft_token_s=0.15)[0] != [0]


def _concave_step(rows, tokens):
    """A step whose kernels make each further token cheaper (the EPYC 7003's 1.5B: 277 ms for one token,
    435 for two, 744 for four, 969 for eight, 1,023 for sixteen), plus a little per request."""
    knots = ((1, 0.277), (2, 0.435), (4, 0.744), (8, 0.969), (16, 1.023), (64, 1.30), (256, 2.40))
    for (t0, s0), (t1, s1) in zip(knots, knots[1:]):
        if tokens <= t1:
            return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0) + 0.002 * rows
    return knots[-1][1] + 0.002 * rows


def test_a_profiled_step_cost_follows_a_concave_machine():
    """Fitted on the start-up profile's shapes, the model prices a concave step's one-, two- and
    four-token forwards within 6%; a line past the first token (no shape) priced two tokens 25% high."""
    model = StepCostModel.fitted((r, r * t, _concave_step(r, r * t)) for r, t in STEP_COST_SHAPES)
    for rows, tokens in ((1, 1), (1, 2), (1, 4), (4, 4), (16, 16), (1, 3)):
        assert model.predict(rows, tokens) == pytest.approx(_concave_step(rows, tokens), rel=0.06)
    line = StepCostModel(prior=model.profile)
    assert line.predict(1, 2) > 1.25 * _concave_step(1, 2)
    # Online, the line follows the machine under the shape: 20% slower everywhere is learnt.
    for _ in range(60):
        for rows, tokens in ((1, 1), (1, 3), (4, 4), (4, 12), (8, 8)):
            model.observe(rows, tokens, 1.2 * _concave_step(rows, tokens))
    for rows, tokens in ((1, 1), (1, 2), (4, 8)):
        assert model.predict(rows, tokens) == pytest.approx(1.2 * _concave_step(rows, tokens), rel=0.06)


def test_the_plan_is_the_best_plan_whatever_the_steps_shape():
    """Exhaustive over every draft-length vector of small batches: the plan's predicted goodput is the
    best one for a linear, a concave and a stepped cost (a greedy that stops at the first token not worth
    its marginal cost misses concave steps' cheaper later tokens)."""
    import itertools
    import random

    rng = random.Random(3)
    stepped = lambda rows, tokens: 0.1 + 0.3 * (tokens > rows) + 0.004 * tokens   # noqa: E731
    for step_s in (compute_bound, weight_bound, _concave_step, stepped):
        for _ in range(12):
            n = rng.randint(1, 3)
            accepts = [[rng.uniform(0.3, 0.95) for _ in range(4)] for _ in range(n)]
            draft_s = rng.choice((0.0, 0.02, 0.08))
            ks, best = choose_draft_lengths(accepts, [4] * n, step_s, draft_token_s=draft_s)
            assert best == pytest.approx(goodput_of(ks, accepts, step_s, draft_s))
            brute = max(goodput_of(list(c), accepts, step_s, draft_s)
                        for c in itertools.product(range(5), repeat=n))
            assert best == pytest.approx(brute, rel=1e-9), (step_s, accepts, draft_s, ks)


def test_acceptance_estimate_learns_per_position():
    est = AcceptanceEstimate(4, prior=0.5, prior_weight=1.0, decay=1.0)
    for _ in range(50):
        est.observe(drafted=4, accepted=1)         # position 0 accepted, position 1 rejected, 2-3 unseen
    rates = est.rates()
    assert rates[0] > 0.95 and rates[1] < 0.05 and rates[2] == pytest.approx(0.5)


def test_a_new_request_starts_from_its_strategys_pooled_acceptance():
    """One rejection at a new request's first position must not stop its drafting when the strategy's
    other requests were accepted 90% of the time (a fixed prior read it as 0.39 and stopped)."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.13, 0.005, 0.0)))
    veteran = GoodputDraftLength(scheduler, k_max=8, group="sd")
    for _ in range(40):
        veteran.observe(8, 7, 0.1, 0.15)
    veteran.close()
    newcomer, stranger = GoodputDraftLength(scheduler, k_max=8, group="sd"), GoodputDraftLength(
        scheduler, k_max=8, group="other")
    for p in (newcomer, stranger):
        p.observe(2, 0, 0.05, 0.15)
    assert newcomer.acceptance.rates()[0] > 0.6 > stranger.acceptance.rates()[0]
    assert newcomer.next_k() >= 3


def test_scheduler_shortens_drafts_as_the_batch_grows():
    """A machine that turns compute-bound with load (150 ms + 12 ms per token, as profiled): one request
    drafts long, sixteen together draft little."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.15, 0.012, 0.0)))
    one = GoodputDraftLength(scheduler, k_max=8)
    one.acceptance = AcceptanceEstimate(8, prior=0.7)
    alone = one.next_k()
    crowd = [GoodputDraftLength(scheduler, k_max=8) for _ in range(15)]
    for p in crowd:
        p.acceptance = AcceptanceEstimate(8, prior=0.7)
    # Requests in their prefill (joined, no step yet) are not rows of the decode forwards being planned.
    assert one.next_k() == alone
    for p in crowd:
        p.next_k()
    together = one.next_k()
    assert alone >= 3 and together < alone
    assert len(scheduler.stats.last_draft_lengths) == 16 and scheduler.stats.predicted_step_s > 0
    for p in crowd:
        p.close()
    assert one.next_k() == alone                  # the others left: back to the single-request choice


def test_zero_length_requests_probe_now_and_then_one_at_a_time():
    """At k = 0 nothing is measured again, so the server probes: one request at a time (not every
    request on its own), alternately 1 and 4 tokens, first after `probe_every` verifier forwards, then
    at doubling intervals while the probes do not turn the plan to drafting."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.01, 0.05, 0.0)), probe_every=4)
    a, b = GoodputDraftLength(scheduler, k_max=8), GoodputDraftLength(scheduler, k_max=8)
    for p in (a, b):
        p.acceptance = AcceptanceEstimate(8, prior=0.05)
    scheduler.draft_cost.observe(2, 0.05)              # a drafter known to take 25 ms a token
    ks_a, ks_b = [], []
    for _ in range(17):
        ks_a.append(a.next_k())
        ks_b.append(b.next_k())
        scheduler.observe_forward(2, 2, 0.11)
    assert ks_a == [0] * 4 + [1] + [0] * 7 + [4] + [0] * 4 and ks_b == [0] * 17
    # The verifier waits for a probe in flight (its batch would otherwise leave it behind) until the
    # prober's step is observed; the other request's steps do not end the wait.
    assert scheduler.draft_wait_s() > 0
    b.observe(0, 0, 0.0, 0.1)
    assert scheduler.draft_wait_s() > 0
    a.observe(4, 1, 0.1, 0.1)
    assert scheduler.draft_wait_s() == 0


def opening_plan(cost_prior, accept, remaining, opening_s, requests, gate=True, waited_s=None, shared=True):
    """Draft lengths of `requests` stepping requests whose drafter sessions are not open yet (each may
    still emit `remaining` tokens), with an opening measured at `opening_s` seconds of the drafter (a
    request waited `waited_s` for it: the same unless it opened ahead), and the probe each takes at k = 0
    (probe_every 0: due at once). The acceptance is known well (20 steps' evidence): a probe accepted in
    full would not move it far enough to open a session the plan would not open."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=cost_prior), probe_every=0, min_gain=0.0)
    scheduler.drafter_shares_target = shared
    scheduler.guard.observe_setup(opening_s if waited_s is None else waited_s, opening_s)
    policies = [GoodputDraftLength(scheduler, k_max=6) for _ in range(requests)]
    for p in policies:
        p.acceptance = AcceptanceEstimate(6, prior=accept, prior_weight=20.0)
        p.before_step(remaining, drafter_unopened=gate)
        p.next_k()                                   # stepping: planned from now on
    scheduler.mark_dirty()
    return [p.next_k() for p in policies]


def test_a_drafter_session_opens_only_where_the_gain_left_pays_for_it():
    """Opening a drafter session costs its prefill of the prompt once (0.7 s here). A request alone on a
    weight-bound machine gains seconds over 60 tokens and opens; four requests on a machine where drafting
    gains a little per token, or a request with 3 tokens left, do not (and do not probe: a probe would pay
    the opening). The broken version (openings not weighed) opens all of them."""
    weight_bound_prior, compute_prior = (0.10, 0.0005, 0.0), (0.13, 0.004, 0.0)
    assert all(opening_plan(weight_bound_prior, 0.7, 60, 0.7, 1))
    assert not any(opening_plan(weight_bound_prior, 0.7, 3, 0.7, 1))
    assert not any(opening_plan(compute_prior, 0.5, 60, 0.7, 4))
    # with the sessions open, the same four draft: the gate is what held them back
    assert all(opening_plan(compute_prior, 0.5, 60, 0.7, 4, gate=False))
    assert all(opening_plan(compute_prior, 0.5, 60, 0.0, 4))       # no opening measured yet: nothing weighed
    # An opening made ahead (beside the target's prefill) took the drafter as long, the request only waited
    # less: it is weighed by the drafter's seconds (weighed by the wait, it would open all four).
    assert not any(opening_plan(compute_prior, 0.5, 60, 0.7, 4, waited_s=0.0))
    # A drafter on hardware of its own: the opening delays only the waiting request, a quarter of the batch.
    assert all(opening_plan(compute_prior, 0.5, 60, 0.7, 4, shared=False))


def test_a_lone_request_probes_past_a_low_estimate_and_drafts_again():
    """One rejection at position 0 (a server's warm-up) took the pooled estimate from 0.6 to 0.4. A new
    request's session is not open, so the plan weighs its opening, declines, and, with no probes from
    unopened requests, nothing was ever measured again: every later request decoded plainly (a lone
    request on an AMX CPU where drafting makes 1.6x). A probe that could pay for its opening is taken; the
    drafter turns out good; the request drafts from then on, and so does the next one."""
    step = 0.13
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(step, 0.0026, 0.0)), probe_every=16)
    scheduler.guard.observe_setup(0.17, 0.17)             # the drafter's prefill of a prompt
    scheduler.draft_cost.observe(1, 0.037)
    warm_up = GoodputDraftLength(scheduler, k_max=10, group="g")
    warm_up.observe(10, 0, 0.37, step)                    # rejected at position 0
    warm_up.close()

    def run(request, tokens=64):
        ks, unopened = [], True
        while tokens > 0:
            request.before_step(tokens, drafter_unopened=unopened)
            k = request.next_k()
            ks.append(k)
            unopened = unopened and k == 0
            accepted = k                                   # a drafter that is right here
            request.observe(k, accepted, 0.037 * k, step)
            tokens -= accepted + 1
        request.close()
        return ks
    first = run(GoodputDraftLength(scheduler, k_max=10, group="g"))
    opened = next(i for i, k in enumerate(first) if k)
    assert 8 <= opened <= 16 and first[opened] == 4        # the probe, when due (every 16 steps), opens
    assert all(k > 0 for k in first[opened:])              # and drafting pays from then on
    assert run(GoodputDraftLength(scheduler, k_max=10, group="g"))[0] > 0


def test_draft_cost_separates_the_fixed_part_from_the_per_token_part():
    """A drafter call of 60 ms + 20 ms per token: per-token averages would price a 1-token draft at
    80 ms a token and keep a scheduler from ever trying longer drafts."""
    cost = DraftCostModel()
    cost.observe(1, 0.080)
    assert cost.fixed_s == 0.0 and cost.per_token_s == pytest.approx(0.080)   # one length: all per token
    for k in (4, 1, 4, 2):
        cost.observe(k, 0.060 + 0.020 * k)
    assert cost.fixed_s == pytest.approx(0.060, rel=1e-6) and cost.per_token_s == pytest.approx(0.020, rel=1e-6)
    assert cost.seconds(0) == 0.0 and cost.seconds(5) == pytest.approx(0.160)


def test_a_fixed_draft_cost_favours_fewer_longer_drafts():
    """With a fixed cost per drafter call a draft must be long enough to pay for the call."""
    step = lambda rows, tokens: 0.15 + 0.001 * tokens     # noqa: E731 - weight-bound
    short, _ = choose_draft_lengths([[0.8] * 10], [10], step, draft_token_s=0.02)
    assert short[0] > 0
    none, _ = choose_draft_lengths([[0.5] * 10], [10], step, draft_token_s=0.02, draft_fixed_s=0.5)
    assert none == [0]                                     # 0.5 s a call: plain decoding wins
    value = lambda k, fixed: expected_tokens([0.8] * 10, k) / (step(1, k + 1) + fixed + 0.02 * k)  # noqa: E731
    ks, best = choose_draft_lengths([[0.8] * 10], [10], step, draft_token_s=0.02, draft_fixed_s=0.1)
    assert best == pytest.approx(max(value(k, 0.1) for k in range(1, 11)))
    assert ks[0] >= short[0]


def test_free_drafts_are_bounded_by_their_own_acceptance():
    """Context-lookup copies have their own acceptance: a request whose copies are always right gets
    long free drafts, one whose copies are always wrong none, whatever its model drafts do."""
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(0.15, 0.002, 0.0)))
    good, bad = GoodputDraftLength(scheduler, k_max=8), GoodputDraftLength(scheduler, k_max=8)
    for _ in range(30):
        good.observe_free(16, 16)
        bad.observe_free(16, 0)
    assert good.free_draft_limit() == 16 and bad.free_draft_limit() == 0


def test_engine_skips_the_drafter_when_the_policy_wants_no_draft_of_any_kind(target_model, draft_model, prompts):
    """k = 0 and no free drafts: the session is not asked (a drafter actor's round trip saved)."""
    from core.draft_length import DraftLengthPolicy
    from orchestrator.engine import SpeculativeEngine
    from workers.drafters import DraftModelDrafter
    from workers.runner import ModelRunner

    class Nothing(DraftLengthPolicy):
        def __init__(self, free):
            self.free = free

        def next_k(self):
            return 0

        def free_draft_limit(self):
            return self.free

    calls = []
    drafter = DraftModelDrafter(ModelRunner(draft_model))
    start = drafter.start

    def counting_start(*a, **kw):
        session = start(*a, **kw)
        propose = session.propose
        session.propose = lambda k: calls.append(k) or propose(k)
        return session
    drafter.start = counting_start
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target).generate(prompts[0], 10).tokens
    assert SpeculativeEngine(target, drafter, lambda: Nothing(0)).generate(prompts[0], 10).tokens == plain
    assert calls == []
    SpeculativeEngine(target, drafter, lambda: Nothing(None)).generate(prompts[0], 10)
    assert calls == [0] * 8         # no bound on free drafts: asked at every step but the last (1 token left)


# ------------------------------------------------------------------ lossless through the engine
def test_goodput_requests_equal_plain_decoding_alone_and_batched(target_model, draft_model, prompts):
    from orchestrator.engine import SpeculativeEngine
    from orchestrator.global_verifier import GlobalVerifier
    from tests.drafting import assert_drafted
    from workers.drafters import DraftModelDrafter
    from workers.runner import ModelRunner

    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    expected = [plain.generate(p, 30).tokens for p in prompts]
    # A weight-bound target's profile (1 s a step, whatever its tokens): drafting pays, even when a loaded
    # machine slows the tiny drafter (its own costs would say it does not).
    # Its measured check (goodput_guard.py) times tiny models on a shared machine: a margin of -100% keeps
    # drafting on once the plain baseline exists, so the batched requests really draft (equality is tested).
    scheduler = GoodputScheduler(cost=StepCostModel(prior=(1.0, 1e-4, 0.0), prior_weight=1e6, decay=1.0),
                                 guard=ModeGuard(margin=-1.0))
    engine = SpeculativeEngine(target, DraftModelDrafter(ModelRunner(draft_model)),
                               lambda: GoodputDraftLength(scheduler, k_max=6), name="goodput")
    results = [engine.generate(p, 30) for p in prompts]
    assert [r.tokens for r in results] == expected
    assert_drafted(results)
    verifier = GlobalVerifier(target, max_batch=4)
    verifier.observers.append(scheduler.observe_forward)
    batched = engine.with_target(verifier)
    got = [None] * len(prompts)

    def run(i):
        got[i] = batched.generate(prompts[i], 30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    verifier.close()
    assert [r.tokens for r in got] == expected
    assert_drafted(got)
    assert scheduler.stats.forwards > 0 and scheduler.forward_source
    assert not scheduler._requests                # every request left the scheduler


def test_get_stats_reports_the_schedulers_decisions():
    """Through the gRPC server: concurrent goodput requests meet in the global verifier, and GetStats
    shows the chosen draft lengths, predicted and measured step times and the predicted goodput."""
    from orchestrator.build import Built
    from orchestrator.config import EngineConfig
    from orchestrator.edge.client import Client
    from orchestrator.engine import SpeculativeEngine
    from tests.conftest import tiny_model
    from tests.serving import ByteTokenizer, serve_in_thread
    from workers.drafters import DraftModelDrafter
    from workers.runner import ModelRunner

    model = tiny_model("llama", seed=0, layers=2)
    target = ModelRunner(model)
    config = EngineConfig.model_validate({"models": {"target": {"source": "tiny"}},
                                          "server": {"concurrency": 4, "max_verify_batch": 4}})
    scheduler = GoodputScheduler()
    engines = {"plain": SpeculativeEngine(target),
               "goodput": SpeculativeEngine(target, DraftModelDrafter(ModelRunner(model)),
                                            lambda: GoodputDraftLength(scheduler, k_max=4), name="goodput")}
    built = Built(config, target.device, model, ByteTokenizer(), target, engines, scheduler=scheduler)
    with serve_in_thread(built) as served, Client(served.address, timeout=120) as client:
        results = client.generate_batch(["abcabc", "hello world", "xyz xyz xyz", "def f(): pass"],
                                        strategy="goodput", max_new_tokens=24, concurrency=4, progress=False)
        stats = client.stats().scheduler
    assert all(len(r.token_ids) == 24 for r in results)
    assert stats.decisions > 0 and stats.forwards > 0
    assert stats.predicted_step_s > 0 and stats.measured_step_s > 0 and stats.predicted_goodput > 0
    assert max(stats.last_draft_lengths, default=0) <= 4
    # Lossless whatever it chose (here the drafter costs what the target does, so it drafts little).
    plain = SpeculativeEngine(target)
    tok = ByteTokenizer()
    for prompt, r in zip(["abcabc", "hello world", "xyz xyz xyz", "def f(): pass"], results):
        assert r.token_ids == plain.generate(tok(prompt).input_ids, 24).tokens


def test_start_up_profile_fits_the_targets_step_cost(target_model):
    from orchestrator.machine_profile import profile_step_cost
    from workers.runner import ModelRunner

    runner = ModelRunner(target_model)
    model = profile_step_cost(runner, runner.vocab_size)
    a, b, c, d = model.profile
    assert min(a, b, c, d) >= 0 and a + b + c + d > 0
    assert model.predict(8, 16) >= model.predict(1, 1) > 0
    assert {t for t, _ in model.shape} == {float(r * t) for r, t in STEP_COST_SHAPES}


def test_goodput_bounds_free_lookup_drafts_too(target_model, draft_model, prompts):
    """A hybrid's context copies cost no drafter time but every verified token costs the batch: under
    a compute-bound cost model the scheduler's k = 0 also stops them (a fixed policy would not)."""
    from core.draft_length import FixedDraftLength
    from orchestrator.engine import SpeculativeEngine
    from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter
    from workers.runner import ModelRunner

    target = ModelRunner(target_model)
    expected = [SpeculativeEngine(target).generate(p, 30).tokens for p in prompts]

    def hybrid():
        return LookupThenModelDrafter(PromptLookupDrafter(2, 1), DraftModelDrafter(ModelRunner(draft_model)), 8)
    compute_bound = GoodputScheduler(cost=StepCostModel(prior=(0.0, 1.0, 0.0)), probe_every=10 ** 6)
    goodput = SpeculativeEngine(target, hybrid(), lambda: GoodputDraftLength(compute_bound, k_max=6))
    fixed0 = SpeculativeEngine(target, hybrid(), lambda: FixedDraftLength(0))
    bounded = [goodput.generate(p, 30) for p in prompts]
    free = [fixed0.generate(p, 30) for p in prompts]
    assert [r.tokens for r in bounded] == expected and [r.tokens for r in free] == expected
    assert sum(r.stats.drafted_tokens for r in free) > 0          # lookup copies despite k = 0
    assert sum(r.stats.drafted_tokens for r in bounded) == 0
