"""Greedy losslessness: every strategy's output equals plain decoding of the same target, in float32."""
from __future__ import annotations

import copy

import pytest
import torch

from core.draft_length import AdaptiveDraftLength, FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.engine import SpeculativeEngine
from tests.drafting import assert_drafted
from workers.drafters import DraftModelDrafter, LookupThenModelDrafter, PromptLookupDrafter
from workers.runner import ModelRunner

MAX_NEW = 40


def noisy_copy(model, scale: float, seed: int):
    """A drafter that agrees with the target often but not always."""
    g = torch.Generator().manual_seed(seed)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return clone


def strategies(target_model, draft_model):
    target = ModelRunner(target_model)
    drafters = {
        "draft-model": DraftModelDrafter(ModelRunner(draft_model)),
        "self-draft": DraftModelDrafter(ModelRunner(target_model)),        # every draft accepted
        "noisy-draft": DraftModelDrafter(ModelRunner(noisy_copy(target_model, 0.3, 5))),
        "prompt-lookup": PromptLookupDrafter(max_ngram=3),
        "prompt-lookup-tree": PromptLookupDrafter(max_ngram=2, num_candidates=4),
        # logits for ids < 40 plus the prompt's tokens only (the tiny vocabulary is 96)
        "draft-vocab": DraftModelDrafter(ModelRunner(draft_model), draft_vocab=40),
        "lookup-then-model": LookupThenModelDrafter(PromptLookupDrafter(3, 2),
                                                    DraftModelDrafter(ModelRunner(draft_model)), lookup_k=6),
    }
    for name in ("draft-model", "lookup-then-model"):      # as built in the engine's process (build.py)
        lazy = copy.copy(drafters[name])
        if isinstance(lazy, LookupThenModelDrafter):
            lazy.model = copy.copy(lazy.model)
        lazy.open_at_first_draft()
        assert lazy.opens_lazily
        drafters[f"{name}-lazy"] = lazy
    out = {}
    for name, drafter in drafters.items():
        out[f"{name}/k4"] = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(4), name=name)
        out[f"{name}/adaptive"] = SpeculativeEngine(
            target, drafter, lambda: AdaptiveDraftLength(k_init=3, k_max=8), name=name)
    return target, out


# Drafters whose drafts the target must accept some of (the others may be rejected throughout).
ACCEPTING = ("self-draft", "noisy-draft")


def test_greedy_equals_plain_and_hf(target_model, draft_model, prompts):
    target, engines = strategies(target_model, draft_model)
    plain = SpeculativeEngine(target)
    results: dict[str, list] = {name: [] for name in engines}
    for prompt in prompts:
        ref = plain.generate(prompt, MAX_NEW).tokens
        hf = target_model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert ref == hf, "plain decoding through the runner differs from HF generate()"
        for name, engine in engines.items():
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == ref, f"{name} diverged from plain decoding"
            assert res.stats.generated_tokens == MAX_NEW
            results[name].append(res)
    # Equal output alone would also pass with a dead drafter (target-only fallback): it drafted, over
    # the prompt set (lookup may find nothing on one prompt), and nothing fell back.
    for name, runs in results.items():
        assert_drafted(runs, accepted=name.split("/")[0] in ACCEPTING,
                       all_accepted=name.startswith("self-draft/"), what=name)


def test_self_draft_accepts_everything(target_model, prompts):
    target = ModelRunner(target_model)
    engine = SpeculativeEngine(target, DraftModelDrafter(target), lambda: FixedDraftLength(4))
    res = engine.generate(prompts[1], 21)
    # 1 prefill token + 4 steps of (4 accepted + bonus)
    assert res.stats.steps == 4
    assert res.stats.mean_accepted_tokens == 5.0
    assert res.stats.acceptance_rate == 1.0


def test_plain_decoding_scores_one(target_model, prompts):
    res = SpeculativeEngine(ModelRunner(target_model)).generate(prompts[0], 10)
    assert res.stats.steps == 9 and res.stats.mean_accepted_tokens == 1.0
    assert res.stats.drafted_tokens == 0


def test_eos_stops_generation(target_model, prompts):
    target = ModelRunner(target_model)
    ref = SpeculativeEngine(target).generate(prompts[2], 30).tokens
    eos = ref[7]
    first = ref.index(eos)
    for drafter in (None, DraftModelDrafter(target), PromptLookupDrafter()):
        res = SpeculativeEngine(target, drafter, lambda: FixedDraftLength(5), eos_token_ids=(eos,)).generate(prompts[2], 30)
        assert res.tokens == ref[: first + 1] and res.finish_reason == "stop"
        if isinstance(drafter, DraftModelDrafter) and first > 0:   # the target drafting for itself
            assert_drafted(res, all_accepted=True)
        elif drafter is not None:
            assert not res.stats.events, res.stats.events


def test_seeded_sampling_is_reproducible(target_model, draft_model, prompts):
    target = ModelRunner(target_model)
    engine = SpeculativeEngine(target, DraftModelDrafter(ModelRunner(draft_model)), lambda: FixedDraftLength(3))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7)
    a = engine.generate(prompts[0], 25, params).tokens
    b = engine.generate(prompts[0], 25, params).tokens
    c = engine.generate(prompts[0], 25, SamplingParams(temperature=0.9, top_p=0.95, seed=8)).tokens
    assert a == b
    assert a != c


@pytest.mark.parametrize("bad", [[], None])
def test_empty_prompt_rejected(target_model, bad):
    with pytest.raises((ValueError, TypeError)):
        SpeculativeEngine(ModelRunner(target_model)).generate(bad, 5)


def test_int8_bf16_drafter_keeps_float32_target_exact(target_model, prompts):
    """A quantized low-precision drafter changes acceptance only, never the output."""
    from workers.hugepages import move_to_hugepages
    from workers.quantize import quantize_model_int8

    drafter_model = copy.deepcopy(target_model).to(torch.bfloat16)
    quantize_model_int8(drafter_model)
    move_to_hugepages(drafter_model, min_bytes=0)
    target = ModelRunner(target_model)
    plain = SpeculativeEngine(target)
    for min_conf in (0.0, 0.5):
        engine = SpeculativeEngine(target, DraftModelDrafter(ModelRunner(drafter_model), min_confidence=min_conf),
                                   lambda: AdaptiveDraftLength(k_init=4, k_max=8))
        for prompt in prompts:
            res = engine.generate(prompt, MAX_NEW)
            assert res.tokens == plain.generate(prompt, MAX_NEW).tokens
            assert_drafted(res, accepted=True, what=f"min_confidence={min_conf}")


def test_hugepage_move_preserves_weights_and_ties(family):
    from tests.conftest import tiny_model
    from workers.hugepages import move_to_hugepages

    model = tiny_model(family, seed=3)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    move_to_hugepages(model, min_bytes=0)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tree_drafts_are_verified_and_compacted(target_model, prompts):
    """Prompt lookup with several candidates builds tree drafts; output stays plain decoding's."""
    from workers.drafters import find_ngram_continuations, merge_into_trie

    ctx = torch.tensor([1, 2, 3, 9, 1, 2, 4, 8, 1, 2, 3, 7, 1, 2])
    found = find_ngram_continuations(ctx, 3, max_ngram=2, min_ngram=1, num_candidates=3)
    assert found == [[3, 7, 1], [4, 8, 1], [3, 9, 1]]          # most recent first, distinct
    tree = merge_into_trie(found)
    assert tree.tokens == [3, 7, 1, 4, 8, 1, 9, 1] and tree.parents == [-1, 0, 1, -1, 3, 4, 0, 6]
    assert tree.depth == 3

    target = ModelRunner(target_model)
    engine = SpeculativeEngine(target, PromptLookupDrafter(max_ngram=2, num_candidates=4), lambda: FixedDraftLength(4))
    plain = SpeculativeEngine(target)
    runs = []
    for prompt in prompts:
        res = engine.generate(prompt, MAX_NEW)
        assert res.tokens == plain.generate(prompt, MAX_NEW).tokens
        runs.append(res)
    assert_drafted(runs)


def test_failing_drafter_falls_back_to_target_only(target_model, prompts):
    """A drafter that dies mid-request: the output is still plain decoding's, and the stats say why."""
    from workers.drafters import Drafter

    class Flaky(Drafter):
        def __init__(self, inner, fail_after):
            self.inner, self.fail_after = inner, fail_after

        def start(self, prompt_ids, params, generator):
            session = self.inner.start(prompt_ids, params, generator)
            calls = {"n": 0}
            real = session.propose

            def propose(k):
                calls["n"] += 1
                if calls["n"] > self.fail_after:
                    raise RuntimeError("drafter worker died")
                return real(k)
            session.propose = propose
            return session

    target = ModelRunner(target_model)
    engine = SpeculativeEngine(target, Flaky(DraftModelDrafter(target), 2), lambda: FixedDraftLength(3))
    res = engine.generate(prompts[0], MAX_NEW)
    assert res.tokens == SpeculativeEngine(target).generate(prompts[0], MAX_NEW).tokens
    assert res.stats.accepted_tokens == 6          # two full drafts before the failure
    assert len(res.stats.events) == 1 and "drafter worker died" in res.stats.events[0]


class _Recording:
    """A target runner that logs its prefills (and can fail them)."""

    def __init__(self, runner, log, fail=False):
        self.runner, self.log, self.fail = runner, log, fail

    def prefill(self, *args, **kwargs):
        self.log.append("prefill")
        if self.fail:
            raise RuntimeError("target shard lost")
        return self.runner.prefill(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def _lazy_drafter(inner, log):
    """A drafter whose sessions open by themselves, like a drafter actor's (ray_runtime.RemoteDrafter):
    start() costs nothing; open_ahead() or the first propose opens the session (logged)."""
    from workers.drafters import DraftSession, Drafter

    class LazySession(DraftSession):
        def __init__(self, args):
            super().__init__([])
            self.args, self.real, self.pending = args, None, []

        def open_ahead(self):
            if self.real is None:
                log.append("open")
                self.real = inner.start(*self.args)

        def propose(self, k):
            self.open_ahead()
            for new, accepted in self.pending:
                self.real.update(new, accepted)
            self.pending = []
            return self.real.propose(k)

        def update(self, new_tokens, num_accepted):
            self.pending.append((new_tokens, num_accepted))

        @property
        def unopened(self):
            return self.real is None

        def close(self):
            log.append("close")

    class Lazy(Drafter):
        opens_lazily = True

        def start(self, prompt_ids, params, generator):
            return LazySession((prompt_ids, params, generator))

    return Lazy()


class _Policy(FixedDraftLength):
    def __init__(self, k, soon, log):
        super().__init__(k)
        self.soon, self.log = soon, log

    def drafts_soon(self):
        return self.soon

    def before_step(self, remaining, drafter_unopened):
        self.log.append(f"step (unopened: {drafter_unopened})")

    def close(self):
        self.log.append("policy closed")


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("soon", [True, False])
def test_a_lazy_drafters_session_opens_beside_the_prefill_when_drafting_is_likely(target_model, prompts, soon,
                                                                                 hybrid):
    """A drafter actor's session opens before the target's prefill (so the actor prefills meanwhile) when
    the policy says the request will draft soon, else at the first draft; the output is plain decoding's.
    The policy hears before each step whether a draft would open the session. A hybrid (context lookup,
    then the actor's model) opens the same way: it hid its model's laziness once, and open_ahead never ran
    for the served goodput strategy."""
    log = []
    runner = ModelRunner(target_model)
    drafter = _lazy_drafter(DraftModelDrafter(runner), log)
    if hybrid:       # a lookup that never finds anything (its n-grams are longer than the prompt)
        drafter = LookupThenModelDrafter(PromptLookupDrafter(max_ngram=64, min_ngram=64), drafter)
    engine = SpeculativeEngine(_Recording(runner, log), drafter, lambda: _Policy(3, soon, log))
    res = engine.generate(prompts[1], MAX_NEW)
    assert res.tokens == SpeculativeEngine(runner).generate(prompts[1], MAX_NEW).tokens
    assert_drafted(res, accepted=True)
    steps = [e for e in log if e.startswith("step")]
    if soon:
        assert log[:2] == ["open", "prefill"] and set(steps) == {"step (unopened: False)"}, log
    else:
        assert log[:3] == ["prefill", "step (unopened: True)", "open"], log
        assert set(steps[1:]) == {"step (unopened: False)"}, log
    assert log.count("open") == 1 and log[-2:] == ["close", "policy closed"]


class _CountingRunner(ModelRunner):
    """A drafter's runner that counts the tokens it is fed."""

    fed = 0

    def forward(self, cache, input_ids, *args, **kwargs):
        type(self).fed += int(input_ids.shape[-1])
        return super().forward(cache, input_ids, *args, **kwargs)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_session_opened_at_its_first_draft_drafts_as_one_opened_at_start(draft_model, prompts, greedy):
    """The in-process drafter opens at its first model draft (one forward over the whole context): its
    drafts equal an eagerly opened session's, whichever steps drafted nothing before; until then it has
    fed the drafter nothing, and the first draft reports the opening as setup time, not drafting."""
    params = SamplingParams() if greedy else SamplingParams(temperature=0.8, seed=3)
    _CountingRunner.fed = 0
    runner = _CountingRunner(draft_model)
    eager, lazy = DraftModelDrafter(runner), DraftModelDrafter(runner)
    lazy.open_at_first_draft()
    prompt = prompts[2]
    sessions = []
    for drafter in (eager, lazy):
        before = _CountingRunner.fed
        s = drafter.start(prompt, params, torch.Generator().manual_seed(7))
        sessions.append((s, _CountingRunner.fed - before))
    (e, e_fed), (z, z_fed) = sessions
    assert e_fed == len(prompt) and z_fed == 0 and z.unopened and not e.unopened
    drafts = {0: [], 1: []}
    for s in (e, z):
        s.update([5], 0)                   # the target's first token, as the engine gives it
    for step, k in enumerate((0, 0, 3, 0, 2, 4)):
        for i, s in enumerate((e, z)):
            fed_before = _CountingRunner.fed
            d = s.propose(k)
            drafts[i].append(list(d.tokens))
            if i == 1 and k and step == 2:
                assert d.setup_s > 0 and d.opening_s == d.setup_s
                assert _CountingRunner.fed - fed_before == len(prompt) + 3 + 2     # context, then 2 draft steps
            if i == 1 and step < 2:
                assert _CountingRunner.fed == fed_before and z.unopened
        accepted = drafts[0][-1][:1]
        committed = accepted + [(step * 7) % 90]
        for s in (e, z):
            s.update(committed, len(accepted))
    assert drafts[0] == drafts[1] and any(drafts[0])


def test_a_failed_prefill_leaves_no_session_and_no_scheduler_seat(target_model, prompts):
    """The session opened ahead is closed and the policy (a shared scheduler's seat) released."""
    log = []
    runner = ModelRunner(target_model)
    engine = SpeculativeEngine(_Recording(runner, log, fail=True), _lazy_drafter(DraftModelDrafter(runner), log),
                               lambda: _Policy(3, True, log))
    with pytest.raises(RuntimeError, match="target shard lost"):
        engine.generate(prompts[1], MAX_NEW)
    assert log == ["open", "prefill", "close", "policy closed"]
