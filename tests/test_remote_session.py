"""A drafter actor's session as the engine sees it (orchestrator/ray_runtime.py: _RemoteSession): the
feedback a session in process gets reaches the session in the actor, in order, including the target's
top-k ids for sessions that learn from them (Ouroboros' pool); a session opened ahead of its first draft
and never used is closed after its start. The actor is orchestrator/drafter_worker.py's DrafterWorker run
in process behind a handle whose calls return their results directly (no Ray needed for the protocol)."""
from __future__ import annotations

import pytest

import orchestrator.ray_runtime as ray_runtime
from core.draft_length import FixedDraftLength
from core.sampling import SamplingParams
from orchestrator.drafter_worker import DrafterWorker
from orchestrator.engine import SpeculativeEngine
from orchestrator.ray_runtime import RemoteDrafter, _RemoteSession
from tests.drafting import assert_drafted
from workers.drafters import DraftModelDrafter, DraftSession
from workers.monitoring import BusyTimer
from workers.runner import ModelRunner

MAX_NEW = 24


class Learning(DraftModelDrafter):
    """A draft model whose sessions ask for the target's top-2 ids and record what they are given."""

    def __init__(self, runner, log):
        super().__init__(runner)
        self.log = log

    def start(self, prompt_ids, params, generator):
        session = super().start(prompt_ids, params, generator)
        session.target_topk = 2
        log = self.log

        def observe_target(input_tokens, topk_ids):
            log.append((list(input_tokens), topk_ids.tolist()))
        session.observe_target = observe_target
        return session


class Handle:
    """Stands in for a Ray actor handle: `handle.method.remote(*args)` runs the method at once."""

    def __init__(self, obj):
        self.obj, self.calls = obj, []

    def __getattr__(self, name):
        method = getattr(self.obj, name)
        calls = self.calls

        class Remote:
            @staticmethod
            def remote(*args):
                calls.append(name)
                return method(*args)
        return Remote


def in_process_actor(drafter) -> Handle:
    worker = object.__new__(DrafterWorker)          # the actor's methods, without loading models
    worker.device, worker.sessions, worker.drafters = "cpu", {}, {"s": drafter}
    worker._busy = BusyTimer("drafter")
    return Handle(worker)


@pytest.fixture(autouse=True)
def no_ray_get(monkeypatch):
    monkeypatch.setattr(ray_runtime, "get", lambda ref, timeout, what: ref)


def run(target_model, draft_model, prompt, remote: bool):
    log = []
    target = ModelRunner(target_model)
    drafter = Learning(ModelRunner(draft_model), log)
    handle = in_process_actor(drafter) if remote else None
    engine = SpeculativeEngine(target, RemoteDrafter([handle], "s") if remote else drafter,
                               lambda: FixedDraftLength(3))
    return engine.generate(prompt, MAX_NEW), log, handle


def test_the_targets_top_k_reach_a_session_in_the_actor(target_model, draft_model, prompts):
    """Every observation the in-process session gets after its first draft, the actor's session gets too
    (the remote one opens at the first draft, so it misses the prompt's), the last step's with the close."""
    res_local, local, _ = run(target_model, draft_model, prompts[1], remote=False)
    res_remote, remote, handle = run(target_model, draft_model, prompts[1], remote=True)
    assert res_remote.tokens == res_local.tokens
    assert_drafted(res_remote)
    assert remote and remote == local[1:], (len(remote), len(local))
    assert handle.calls.count("start") == 1 and handle.calls[-1] == "close"


def test_top_k_dropped_on_the_way_is_caught(target_model, draft_model, prompts, monkeypatch):
    """The broken version (the remote session ignores observe_target, as before): the actor learns nothing."""
    monkeypatch.setattr(_RemoteSession, "observe_target", DraftSession.observe_target)
    _, remote, _ = run(target_model, draft_model, prompts[1], remote=True)
    assert remote == []


def test_a_session_opened_ahead_and_never_used_is_closed_after_its_start(draft_model):
    drafter = Learning(ModelRunner(draft_model), [])
    handle = in_process_actor(drafter)
    session = RemoteDrafter([handle], "s").start([1, 2, 3], SamplingParams(), None)
    session.open_ahead()
    session.close()
    assert handle.calls == ["start", "close"] and handle.obj.sessions == {}


def test_the_first_draft_carries_the_drafters_opening_seconds(draft_model):
    """An opening is weighed by the drafter's own seconds (the goodput scheduler: ModeGuard.opening_s):
    the first draft of a session opened ahead carries them, however little the request then waited; the
    later drafts carry none (the cost is once per request)."""
    handle = in_process_actor(Learning(ModelRunner(draft_model), []))
    session = RemoteDrafter([handle], "s").start([1, 2, 3, 4, 5], SamplingParams(), None)
    assert session.unopened
    session.open_ahead()                                 # in process: the start has run by now
    assert not session.unopened
    session.update([9], 0)                               # the target's first token, as the engine sends it
    first = session.propose(2)
    assert first.opening_s > 0 and first.setup_s < first.opening_s
    session.update(first.tokens + [7], len(first.tokens))
    later = session.propose(2)
    assert later.opening_s == 0 and later.setup_s == 0
    session.close()
