from core.draft_length import AdaptiveDraftLength, expected_speedup


def test_expected_speedup_formula():
    # Leviathan et al.: alpha=0.8, gamma=4, c=0 -> (1 - 0.8^5) / 0.2
    assert abs(expected_speedup(0.8, 4, 0.0) - (1 - 0.8 ** 5) / 0.2) < 1e-9
    assert expected_speedup(0.5, 0, 0.3) == 1.0


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
