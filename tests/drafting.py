"""Checks that a speculative run really drafted.

A drafter that raises is dropped (SpeculativeEngine._drop_drafter, DuoDecoding's _RequestDrafter) and
the request decodes target-only, which *equals* plain decoding: an output-equality test alone passes
with a dead drafter. Greedy-equality tests therefore also call `assert_drafted` on their results.
"""
from __future__ import annotations

from collections.abc import Iterable

GPU_READING = "at the end: "      # DuoDecoding's GPU reading (orchestrator/duo.py): the one event that is no fault


def _stats(x):
    return getattr(x, "stats", x)       # a GenerationResult, or stats already (RequestStats / pb.RequestStats)


def fault_events(stats) -> list[str]:
    """The request's events other than GPU readings: a drafter failure and the fallback taken."""
    return [e for e in _stats(stats).events if not e.startswith(GPU_READING)]


def _drafted(s) -> int:
    if hasattr(s, "drafted_tokens"):
        # DuoDecoding verifies a draft only after a round whose speculation was used; the drafts it made
        # beside the target's forwards (used or discarded) count too, when the drafter computed them.
        return s.drafted_tokens + (s.speculative_drafts if s.drafter_busy_s > 0 else 0)
    # pb.RequestStats (the gRPC answer) has no drafted_tokens; accepted_per_position is as long as the
    # longest draft verified (core/metrics.py), so it is empty exactly when nothing was drafted.
    return len(s.accepted_per_position)


def _accepted(s) -> int:
    if hasattr(s, "accepted_tokens"):
        return s.accepted_tokens + getattr(s, "speculative_used", 0)
    return sum(s.accepted_per_position)


def assert_drafted(results, accepted: bool = False, all_accepted: bool = False, what: str = "") -> None:
    """One result or several (a prompt set): no request recorded a drafter failure, the drafter
    drafted (summed over the set: prompt lookup may find nothing on one prompt), and with
    `accepted` some drafted tokens were accepted, with `all_accepted` every one of them."""
    runs = [_stats(r) for r in (results if isinstance(results, Iterable) else [results])]
    label = f"{what}: " if what else ""
    assert runs, label + "no results"
    for s in runs:
        faults = fault_events(s)
        assert not faults, f"{label}the drafter failed and decoding fell back to the target alone: {faults}"
    drafted = sum(_drafted(s) for s in runs)
    assert drafted > 0, f"{label}nothing was drafted over {len(runs)} request(s)"
    if accepted or all_accepted:
        assert sum(_accepted(s) for s in runs) > 0, f"{label}{drafted} drafted, none accepted"
    if all_accepted:     # of the drafts verified (DuoDecoding's used speculations are accepted by definition)
        for s in runs:
            verified = s.drafted_tokens if hasattr(s, "drafted_tokens") else len(s.accepted_per_position)
            if verified:
                assert s.acceptance_rate == 1.0, f"{label}acceptance rate {s.acceptance_rate} < 1"
