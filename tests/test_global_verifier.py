"""Continuous batching of verification: forward_many equals per-request forwards; concurrent
requests through the GlobalVerifier produce exactly their one-at-a-time outputs."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from core.draft_length import FixedDraftLength
from orchestrator.engine import SpeculativeEngine, tree_attention
from orchestrator.global_verifier import GlobalVerifier
from tests.drafting import assert_drafted
from workers.drafters import DraftModelDrafter, PromptLookupDrafter
from workers.runner import ModelRunner


def test_forward_many_equals_forward_alone(target_model, prompts):
    runner = ModelRunner(target_model)
    mask, depths = tree_attention([-1, -1, 0, 2], runner.device)                 # [5, 5], [5]
    inputs = [
        (torch.tensor([[7]]), None, None, None),                                   # one decode step
        (torch.tensor([[5, 9, 11, 2]]), None, None, None),                         # a chain draft
        (torch.tensor([[3, 4, 8, 6, 1]]), depths[None], mask[None], None),          # a tree draft
        (torch.tensor([[10, 12]]), None, None, slice(-1, None)),                   # last row's logits only
    ]
    alone, batched = [], []
    for store in (alone, batched):
        for p in prompts[: len(inputs)]:
            cache = runner.new_cache(1, capacity=8)   # small: forward_many must grow it too
            runner.prefill(cache, 0, p)
            store.append(cache)
    expected = [runner.forward(c, ids, depths=d, tree_mask=m, logits_rows=r)
                for c, (ids, d, m, r) in zip(alone, inputs)]
    got = runner.forward_many([(c, ids, d, m, r) for c, (ids, d, m, r) in zip(batched, inputs)])
    for e, g, ca, cb in zip(expected, got, alone, batched):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        assert torch.equal(g.argmax(-1), e.argmax(-1))
        assert ca.lengths == cb.lengths


class SlowRunner(ModelRunner):
    """Makes each batched forward take a while, so concurrent requests queue up behind it."""

    def forward_many(self, requests):
        time.sleep(0.02)
        return super().forward_many(requests)


def test_concurrent_requests_are_batched_and_exact(target_model, draft_model, prompts):
    plain_runner = ModelRunner(target_model)
    verifier = GlobalVerifier(SlowRunner(target_model), max_batch=8)
    try:
        drafters = [None, DraftModelDrafter(ModelRunner(draft_model)), PromptLookupDrafter(3)]
        jobs = [(prompts[i % len(prompts)], drafters[i % 3]) for i in range(6)]
        expected = [SpeculativeEngine(plain_runner).generate(p, 24).tokens for p, _ in jobs]
        got: list = [None] * len(jobs)
        runs: list = [None] * len(jobs)

        def run(i):
            p, d = jobs[i]
            runs[i] = SpeculativeEngine(verifier, d, lambda: FixedDraftLength(3)).generate(p, 24)
            got[i] = runs[i].tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == expected
        for kind in (DraftModelDrafter, PromptLookupDrafter):
            assert_drafted([r for r, (_, d) in zip(runs, jobs) if isinstance(d, kind)], what=kind.__name__)
        assert verifier.stats.max_rows >= 2, "no two requests were ever verified in one forward"
    finally:
        verifier.close()


class FixedForward(ModelRunner):
    """Every batched forward takes `forward_s`, whatever its rows (a memory-bound step)."""

    forward_s = 0.06

    def forward_many(self, requests):
        time.sleep(self.forward_s)
        return super().forward_many(requests)


def time_unit(floor: float = 0.005, cap: float = 0.015) -> float:
    """A time unit for tests built on sleeping threads: the worst lateness of a timed wake-up seen on
    this machine now (four threads sleeping 10 ms at once, five times), within [floor, cap]."""
    late: list[float] = []

    def sleeper():
        for _ in range(5):
            t0 = time.perf_counter()
            time.sleep(0.01)
            late.append(time.perf_counter() - t0 - 0.01)

    threads = [threading.Thread(target=sleeper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return min(cap, max(floor, max(late)))


def mean_batch_of_threads(verifier: GlobalVerifier, run, args) -> float:
    """Runs run(a) for each a in its own thread, all at once; the verifier's mean rows per forward."""
    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return verifier.stats.rows / verifier.stats.batches


@pytest.mark.parametrize("gather_fraction,hint_units,merged", [(0.0, 0, False), (0.5, 0, True), (0.0, 9, True)])
def test_requests_whose_host_work_outlasts_the_fixed_wait_are_re_merged(target_model, gather_fraction, hint_units,
                                                                        merged):
    """Four requests whose work between steps (3u, staggered by 0.8u) outlasts the fixed 5 ms wait: with
    a wait of a fraction of the forward (12u: 6u), or a wait hint as the goodput scheduler gives for its
    drafting requests (9u), they are verified together again; with the fixed wait alone they split and
    stay in smaller batches. u is 5 ms on an idle machine and grows with how late it wakes sleeping
    threads now (time_unit), so the merged case's margin (3.6u past the last arrival) stays above the
    scheduling noise and the split case's host work above the 5 ms wait."""
    u = time_unit()
    runner = FixedForward(target_model)
    runner.forward_s = 12 * u
    verifier = GlobalVerifier(runner, max_batch=8, gather_s=0.005, gather_fraction=gather_fraction)
    verifier.wait_hints.append(lambda: hint_units * u)
    try:
        def run(i):
            cache = verifier.new_cache(1, capacity=64)
            for step in range(12):
                verifier.forward(cache, torch.tensor([[1 + step]]))
                time.sleep((3 + 0.8 * i) * u)          # picking the token, streaming it: host work

        mean = mean_batch_of_threads(verifier, run, range(4))
        assert (mean >= 3.3) if merged else (mean < 3.0), (mean, u)
    finally:
        verifier.close()


def test_a_failing_request_fails_alone(target_model, prompts):
    verifier = GlobalVerifier(SlowRunner(target_model), max_batch=8)
    try:
        good = verifier.new_cache(1, 64)
        verifier.prefill(good, 0, prompts[0])
        bad = verifier.new_cache(1, 64)
        verifier.prefill(bad, 0, prompts[1])
        errors, results = [], []

        def call(cache, ids):
            try:
                results.append(verifier.forward(cache, ids))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(good, torch.tensor([[3, 4]]))),
                   threading.Thread(target=call, args=(bad, torch.tensor([[10**6]])))]   # out-of-vocabulary id
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(errors) == 1 and len(results) == 1
        assert good.lengths[0] == len(prompts[0]) + 2 and bad.lengths[0] == len(prompts[1])
    finally:
        verifier.close()


def test_a_failing_observer_does_not_stop_verification(target_model, prompts):
    """An observer (the goodput scheduler, monitoring) that raises is logged; the verifier's loop goes on,
    so the next request is answered rather than left waiting for ever."""
    verifier = GlobalVerifier(ModelRunner(target_model), max_batch=4)
    seen = []

    def broken(rows, tokens, seconds):
        seen.append(tokens)
        raise NameError("a bug in an observer")
    verifier.observers.append(broken)
    try:
        cache = verifier.new_cache(1, 64)
        verifier.prefill(cache, 0, prompts[0])
        for token in (3, 4):
            out = pool_result(lambda: verifier.forward(cache, torch.tensor([[token]])))
            assert out.shape[-2] == 1
        assert len(seen) >= 3 and cache.lengths[0] == len(prompts[0]) + 2
    finally:
        verifier.close()


def pool_result(fn, timeout_s: float = 60.0):
    """fn() on a daemon thread, failing the test (not hanging it, nor pytest's exit) where it does not
    return in time."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "no answer: the verifier's loop stopped"
    return box["out"]


def test_bad_calls_are_refused(target_model):
    verifier = GlobalVerifier(ModelRunner(target_model))
    try:
        with pytest.raises(ValueError, match="one sequence"):
            verifier.forward(verifier.new_cache(2, 8), torch.zeros(2, 1, dtype=torch.long))
    finally:
        verifier.close()


def test_batched_drafting_with_trimmed_heads_equals_drafting_alone(target_model, draft_model, prompts):
    """A drafter actor's batcher: concurrent draft-model sessions, each with its own trimmed head,
    through one GlobalVerifier give exactly the drafts (and q) each session gives alone."""
    from core.sampling import SamplingParams, make_generator
    from workers.vocab_trim import TrimmedHead, kept_token_ids

    runner = ModelRunner(draft_model)
    head = TrimmedHead(runner.lm_head, kept_token_ids(runner.vocab_size, 48, prompts[0]))
    cache_a, cache_b = runner.new_cache(1, 64), runner.new_cache(1, 64)
    runner.prefill(cache_a, 0, prompts[0])
    runner.prefill(cache_b, 0, prompts[1])
    got = runner.forward_many([(cache_a, torch.tensor([[7, 8]]), None, None, None, head),
                               (cache_b, torch.tensor([[9]]), None, None, None, None)])
    alone_a, alone_b = runner.new_cache(1, 64), runner.new_cache(1, 64)
    runner.prefill(alone_a, 0, prompts[0])
    runner.prefill(alone_b, 0, prompts[1])
    want_a = runner.forward(alone_a, torch.tensor([[7, 8]]), lm_head=head)
    want_b = runner.forward(alone_b, torch.tensor([[9]]))
    assert got[0].shape == want_a.shape
    torch.testing.assert_close(got[0], want_a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], want_b, rtol=1e-4, atol=1e-5)

    batcher = GlobalVerifier(runner, max_batch=4, name="draft-batcher")
    try:
        drafter = DraftModelDrafter(batcher, draft_vocab=48)
        reference = DraftModelDrafter(runner, draft_vocab=48)
        params = SamplingParams(temperature=0.9, seed=5)
        results: dict[int, list] = {}

        def run(i, d, key):
            session = d.start(prompts[i], params, make_generator(11 + i, role="drafter"))
            session.update([4], 0)                     # the target's first token, as the engine does
            out = []
            for step in range(4):
                draft = session.propose(3)
                out.append((draft.tokens, draft.probs))
                session.update(draft.tokens[:1] + [4], 1)
            results[key] = out

        threads = [threading.Thread(target=run, args=(i, drafter, i)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            run(i, reference, 10 + i)
            for (tok_b, q_b), (tok_r, q_r) in zip(results[i], results[10 + i]):
                assert tok_b == tok_r
                torch.testing.assert_close(q_b, q_r, rtol=1e-4, atol=1e-5)
        assert batcher.stats.max_rows >= 2
    finally:
        batcher.close()


def test_a_forward_after_close_fails_at_once(target_model):
    """A request that reaches a stopped verifier gets an error, not a wait that never ends."""
    runner = ModelRunner(target_model)
    verifier = GlobalVerifier(runner, max_batch=2)
    verifier.close()
    cache = verifier.new_cache(1, 16)
    outcome: list = []

    def call():
        try:
            verifier.forward(cache, torch.tensor([[5, 6, 7]]))
            outcome.append("answered")
        except RuntimeError as exc:
            outcome.append(str(exc))
    thread = threading.Thread(target=call, daemon=True)      # a daemon: a hang cannot block the run
    thread.start()
    thread.join(10)
    assert outcome == ["global verifier stopped"], outcome or "still waiting after 10 s"


@pytest.mark.parametrize("wait_for_drafting", [False, True])
def test_decode_batches_wait_for_drafting_requests_where_told(target_model, wait_for_drafting):
    """Lockstep on shared cores: one request drafts 3u before each step (told through `drafting`), the
    other comes straight back. Told to wait for drafting, the verifier runs both in one forward each step;
    without it, the second goes alone while the first drafts and the two stay out of step."""
    u = time_unit()
    runner = FixedForward(target_model)
    runner.forward_s = 6 * u
    verifier = GlobalVerifier(runner, max_batch=8, gather_s=0.005, gather_fraction=0.1)
    verifier.wait_for_drafting = wait_for_drafting
    try:
        def run(drafts: bool):
            cache = verifier.new_cache(1, capacity=64)
            for step in range(10):
                if drafts:
                    with verifier.drafting(cache):
                        time.sleep(3 * u)
                verifier.forward(cache, torch.tensor([[1 + step]]))

        mean = mean_batch_of_threads(verifier, run, (True, False))
        # waiting: both in one forward from the second step (the first draft sets the wait), 20 rows in 11
        assert (mean >= 1.65) if wait_for_drafting else (mean < 1.5), (mean, u)
    finally:
        verifier.close()


def test_a_draft_far_longer_than_recent_ones_is_not_waited_out(target_model):
    """The wait for a drafting request ends at 1.5x the recent longest draft (a session opening is not
    waited out): after drafts of 2u, a draft of 40u holds the other request's forward back ~3u, not 40u."""
    u = time_unit()
    verifier = GlobalVerifier(FixedForward(target_model), max_batch=8, gather_s=0.005)
    verifier.wait_for_drafting = True
    FixedForward.forward_s = 0.0
    try:
        drafter_cache, other = verifier.new_cache(1, capacity=64), verifier.new_cache(1, capacity=64)
        for _ in range(3):
            with verifier.drafting(drafter_cache):
                time.sleep(2 * u)
        started = threading.Event()

        def long_draft():
            with verifier.drafting(drafter_cache):
                started.set()
                time.sleep(40 * u)

        t = threading.Thread(target=long_draft)
        t.start()
        started.wait()
        t0 = time.perf_counter()
        verifier.forward(other, torch.tensor([[1]]))
        waited = time.perf_counter() - t0
        t.join()
        assert 2 * u <= waited < 10 * u, (waited / u, u)
    finally:
        FixedForward.forward_s = 0.06
        verifier.close()


def test_the_engine_tells_the_verifier_while_it_drafts(target_model, draft_model, prompts):
    """Every draft the engine asks for runs inside GlobalVerifier.drafting (what wait_for_drafting waits on)."""
    verifier = GlobalVerifier(ModelRunner(target_model), max_batch=4)
    told = []
    real = verifier.drafting

    def spy(cache):
        told.append(id(cache))
        return real(cache)

    verifier.drafting = spy
    try:
        run = SpeculativeEngine(verifier, DraftModelDrafter(ModelRunner(draft_model)),
                                lambda: FixedDraftLength(3)).generate(prompts[0], 16)
        drafted_steps = sum(1 for k in run.stats.draft_lengths if k > 0)   # the last step asks for none
        assert drafted_steps > 0 and len(told) == drafted_steps and len(set(told)) == 1
        assert verifier._drafting.until(time.perf_counter(), 0.0) == 0.0    # nobody left registered
    finally:
        verifier.close()
