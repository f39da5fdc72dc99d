import random

import pytest

from core.draft_length import AdaptiveDraftLength, LinearCost, expected_speedup


def test_expected_speedup_formula():
    # Leviathan et al.: alpha=0.8, gamma=4, c=0 -> (1 - 0.8^5) / 0.2
    assert abs(expected_speedup(0.8, 4, 0.0) - (1 - 0.8 ** 5) / 0.2) < 1e-9
    assert expected_speedup(0.5, 0, 0.3) == 1.0
    # A verification that costs 0.5 of a step more per token: 4 drafts verified in 3 steps' time.
    assert abs(expected_speedup(0.8, 4, 0.0, 0.5) - (1 - 0.8 ** 5) / 0.2 / 3.0) < 1e-9


def run_adaptive(verify_s, steps=60, alpha=0.8, seed=0):
    """A request whose drafts are accepted token by token with probability alpha, drafting at 5 ms a token,
    verifying n tokens in verify_s(n) seconds. Returns the draft lengths it chose."""
    rng, policy, ks = random.Random(seed), AdaptiveDraftLength(k_init=4, k_max=10), []
    for _ in range(steps):
        k = policy.next_k()
        ks.append(k)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        policy.observe(k, accepted, draft_s=0.005 * k, verify_s=verify_s(k + 1))
    return ks


def test_adaptive_drafts_short_where_each_verified_token_costs_and_long_where_verification_is_flat():
    """EPYC 7003 (no bf16 arithmetic): a one-token step 0.29 s, each further verified token 0.16 s. There
    drafting 4 at acceptance 0.8 emits 3.4 tokens in 0.96 s against plain decoding's 3.4 in 0.99 s: no gain,
    and long drafts lose. Flat verification (a GPU, or Leviathan's assumption) drafts long."""
    steep = run_adaptive(lambda n: 0.29 + 0.16 * (n - 1))
    flat = run_adaptive(lambda n: 0.29)
    assert sum(steep[20:]) / 40 <= 2.0, steep
    assert sum(flat[20:]) / 40 >= 7.0, flat


def test_the_verification_slope_is_what_shortens_the_drafts(monkeypatch):
    """The broken version (verification priced per step, Leviathan's flat assumption, whatever it costs
    per token) drafts long on the steep machine too: what the test above rules out."""
    import core.draft_length as dl

    flat_only = dl.expected_speedup
    monkeypatch.setattr(dl, "expected_speedup", lambda a, k, c, s=0.0: flat_only(a, k, c))
    steep = run_adaptive(lambda n: 0.29 + 0.16 * (n - 1))
    assert sum(steep[20:]) / 40 > 4.0, steep


def test_linear_cost_separates_fixed_and_per_token_seconds_and_guesses_until_two_lengths():
    per_token, flat = LinearCost(), LinearCost(all_per_token=False)
    for cost in (per_token, flat):
        cost.observe(4, 1.0)
    assert (per_token.fixed_s, per_token.per_token_s) == (0.0, pytest.approx(0.25))
    assert (flat.fixed_s, flat.per_token_s) == (pytest.approx(1.0), 0.0)
    flat = LinearCost(all_per_token=False)
    for n in (1, 4, 2, 6, 3):
        flat.observe(n, 0.29 + 0.16 * (n - 1))
    assert flat.fixed_s == pytest.approx(0.13) and flat.per_token_s == pytest.approx(0.16)


def test_adaptive_grows_with_good_cheap_drafts_and_stops_with_bad_costly_ones():
    good = AdaptiveDraftLength(k_init=4, k_max=12)
    for _ in range(30):
        k = good.next_k()
        good.observe(k, k, draft_s=0.001 * k, verify_s=0.1)
    assert good.next_k() == 12

    bad = AdaptiveDraftLength(k_init=4, k_max=12)
    ks = []
    for _ in range(40):
        k = bad.next_k()
        ks.append(k)
        bad.observe(k, 0, draft_s=0.05 * k, verify_s=0.1)
    assert 0 in ks[5:]                 # turns drafting off ...
    assert 1 in ks[-20:]               # ... but keeps probing now and then


def test_hf_heuristic_adds_two_after_a_whole_acceptance_and_drops_one_otherwise():
    from core.draft_length import HeuristicDraftLength

    p = HeuristicDraftLength(k_init=5, k_max=9)
    ks = []
    for accepted_whole in (True, True, True, False, False, False, False, False, False):
        k = p.next_k()
        ks.append(k)
        p.observe(k, k if accepted_whole else 0, 0.01, 0.1)
    assert ks == [5, 7, 9, 9, 8, 7, 6, 5, 4]            # capped at k_max, -1 per partial acceptance
    for _ in range(10):
        p.observe(p.next_k(), 0, 0.01, 0.1)
    assert p.next_k() == 1                             # never below k_min
    p.observe(0, 0, 0.0, 0.1)                          # a step that drafted nothing teaches nothing
    assert p.next_k() == 1


def test_thompson_drafts_long_after_acceptances_and_short_after_rejections():
    """EESD: the Beta posterior of acceptance decides token by token; a drafter always accepted drafts
    near k_max, one always rejected near 0 (and, with draws, still now and then: it keeps learning)."""
    import statistics

    from core.draft_length import ThompsonDraftLength

    good, bad = ThompsonDraftLength(k_max=10, seed=1), ThompsonDraftLength(k_max=10, seed=2)
    for _ in range(50):
        good.observe(good.next_k() or 1, 10, 0.01, 0.1)      # everything drafted was accepted
        k = bad.next_k()
        bad.observe(k or 1, 0, 0.01, 0.1)                    # the first position is always rejected
    assert good.a > 50 and bad.b > 40
    assert statistics.mean(good.next_k() for _ in range(200)) > 8
    assert statistics.mean(bad.next_k() for _ in range(200)) < 0.2
    # The same posterior and seed give the same lengths: the policy's draws are its own stream.
    a, b = ThompsonDraftLength(seed=7), ThompsonDraftLength(seed=7)
    assert [a.next_k() for _ in range(20)] == [b.next_k() for _ in range(20)]


def test_adl_grows_while_acceptance_keeps_up_and_follows_the_realised_length_down():
    """DiffuSpec's rule k = clip(floor(ema_gen) + delta [ema_acc >= ema_gen]): whole acceptances grow
    k by delta; a drafter that stops early (realised length 2) and gets little accepted brings k to 2."""
    from core.draft_length import AdaptiveDraftLengthADL

    adl = AdaptiveDraftLengthADL(k_init=4, k_max=10, delta=2, beta=0.5)
    for _ in range(3):
        adl.observe(adl.next_k(), adl.next_k(), 0.0, 0.0)      # everything accepted
    assert adl.next_k() >= 8
    for _ in range(12):
        adl.observe(2, 0, 0.0, 0.0)                             # the drafter stops at 2; none accepted
    assert adl.next_k() == 2
    adl.observe(0, 0, 0.0, 0.0)                                 # nothing to propose: no news
    assert adl.next_k() == 2
    # The literal rule's blind spot (module doc): a drafter that always drafts k keeps k.
    stuck = AdaptiveDraftLengthADL(k_init=4, k_max=10)
    for _ in range(20):
        stuck.observe(stuck.next_k(), 1, 0.0, 0.0)
    assert stuck.next_k() == 4


def test_the_new_policies_load_from_yaml_and_build(tmp_path):
    from orchestrator.build import policy_factory
    from orchestrator.config import load_config
    from core.draft_length import HeuristicDraftLength, ThompsonDraftLength

    src = (tmp_path / "c.yaml")
    src.write_text("""
name: t
models: {target: {source: smollm2-135m, dtype: float32}, drafters: {d: {source: smollm2-135m, dtype: float32}}}
strategies:
  - {name: sd-hf, kind: draft_model, drafter: d, draft_length: {policy: heuristic, k_init: 3}}
  - {name: sd-ts, kind: draft_model, drafter: d, draft_length: {policy: thompson, threshold: 0.6}}
  - {name: sd-adl, kind: draft_model, drafter: d, min_confidence: 0.3, draft_length: {policy: adl, k_init: 5, delta: 2}}
""")
    cfg = load_config(src)
    hf, ts, adl = (policy_factory(s.draft_length)() for s in cfg.strategies)
    assert adl.next_k() == 5 and adl.delta == 2 and cfg.strategies[2].capacity_gamma() == 5
    assert isinstance(hf, HeuristicDraftLength) and hf.next_k() == 3
    assert isinstance(ts, ThompsonDraftLength) and ts.threshold == 0.6
    assert cfg.strategies[0].capacity_gamma() == 3 and 1 <= cfg.strategies[1].capacity_gamma() <= 16
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.read_text().replace("threshold: 0.6", "threshold: 1.5"))
    try:
        load_config(bad)
    except Exception as e:       # ConfigError naming the file and the key
        assert "threshold" in str(e) and "bad.yaml" in str(e)
    else:
        raise AssertionError("a threshold of 1.5 must be refused")


def test_heuristic_and_thompson_lengths_keep_greedy_output_equal_to_plain(target_model, draft_model, prompts):
    from core.draft_length import AdaptiveDraftLengthADL, HeuristicDraftLength, ThompsonDraftLength
    from orchestrator.engine import SpeculativeEngine
    from tests.drafting import assert_drafted
    from workers.drafters import DraftModelDrafter
    from workers.runner import ModelRunner

    target = ModelRunner(target_model)
    expected = [SpeculativeEngine(target).generate(p, 24).tokens for p in prompts]
    drafter = DraftModelDrafter(ModelRunner(draft_model))
    for make in (lambda: HeuristicDraftLength(k_init=3), lambda: ThompsonDraftLength(k_max=6, seed=0),
                 lambda: AdaptiveDraftLengthADL(k_init=3, k_max=6)):
        results = [SpeculativeEngine(target, drafter, make).generate(p, 24) for p in prompts]
        assert [r.tokens for r in results] == expected
        assert_drafted(results)
