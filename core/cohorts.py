"""Two cohorts of a verifier's decode requests, verified in alternation (issue 16; docs/scheduler.md).

In lockstep every live request verifies in one batched forward, then every one drafts, so a drafter on
hardware of its own and the target take turns idling: a cycle of T(n) + D(n). Split in two cohorts, one
cohort drafts while the other verifies (DuoDecoding's overlap, applied to a whole batch): a cycle of
max(2 T(n/2), 2 D(n/2)), since each of target and drafter serves both cohorts once per cycle. That pays
where the target's forward is compute-bound (T(n/2) well under T(n)) and drafting takes long enough to
hide (between the forward's fixed part and T(n)); where forwards stream weights, T(n/2) ~ T(n) and the
split pays two forwards for one. Whether to split is the goodput scheduler's call (orchestrator/goodput.py
`choose_cohort_lengths`); this module only keeps the membership.

Each request (a batch `owner`: the global verifier uses its KV cache) joins the smaller cohort when first
seen and keeps it (the verifier registers the requests of its recent batches as it enters the split, so
they are halved); newcomers refill the smaller cohort, and where requests leave without newcomers
the larger cohort's just-verified requests move over. An owner not seen for `forget_after` batches is forgotten (its request ended). Pure Python: the global verifier and the simulator's verifier
(placement/simulate.py) gather with it alike.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable

# Lockstep on shared cores (GlobalVerifier.wait_for_drafting; the simulator's verifier alike): a batch
# waits for a drafting request up to DRAFT_WAIT_FACTOR x the recent longest draft, a maximum decayed by
# DRAFT_DECAY per draft (so one long draft, a session's opening, does not set the wait for good).
DRAFT_WAIT_FACTOR = 1.5
DRAFT_DECAY = 0.95
STALE_S = 1.0             # a draft ended this long ago whose forward never came: its request left


class DraftingRequests:
    """Who drafts now, and until when a batch should wait for them (see the constants above). A draft
    that has ended still counts for `gather_s` until its forward arrives (`arrived`): its request is
    building the forward's input. Times are the caller's clock (wall seconds, or simulated)."""

    def __init__(self):
        self._entries: dict[Hashable, list] = {}     # owner -> [draft began, draft ended or None]
        self.longest_s = 0.0                          # the recent longest draft (decayed maximum)

    def begin(self, owner: Hashable, now: float) -> None:
        self._entries[owner] = [now, None]

    def end(self, owner: Hashable, now: float, setup_s: float = 0.0, timed: bool = True) -> None:
        """The draft is done. setup_s: its seconds spent opening a drafter session, and timed=False (a
        context copy): neither counts toward the longest draft."""
        entry = self._entries.get(owner)
        if entry is None:
            return
        entry[1] = now
        if timed:
            self.longest_s = max(now - entry[0] - setup_s, DRAFT_DECAY * self.longest_s)

    def arrived(self, owner: Hashable) -> None:
        """The owner's forward has come (or its draft failed): nothing more to wait for."""
        self._entries.pop(owner, None)

    def until(self, now: float, gather_s: float, counts=lambda owner: True) -> float:
        """When the last drafting owner for which counts(owner) is no longer worth waiting for: a draft
        under way up to DRAFT_WAIT_FACTOR x the longest draft + gather_s, one just ended gather_s more."""
        allowance = DRAFT_WAIT_FACTOR * self.longest_s + gather_s
        last = 0.0
        for owner, (began, ended) in list(self._entries.items()):
            if ended is not None and now - ended > STALE_S:
                self._entries.pop(owner, None)
            elif counts(owner):
                last = max(last, began + allowance if ended is None else ended + gather_s)
        return last


class Cohorts:
    def __init__(self, forget_after: int = 8):
        self.forget_after = forget_after
        self._member: dict[Hashable, list[int]] = {}     # owner -> [cohort, number of the last batch it ran in]
        self._batches = 0

    def of(self, owner: Hashable) -> int:
        """The owner's cohort (0 or 1); a new owner joins the smaller one."""
        entry = self._member.get(owner)
        if entry is None:
            first, second = self.sizes()
            entry = self._member[owner] = [0 if first <= second else 1, self._batches]
        return entry[0]

    def expected(self, cohort: int, recent: Iterable[Hashable]) -> int:
        """How many of the recently batched owners belong to `cohort` (the ones worth waiting for)."""
        return sum(1 for owner in recent if owner in self._member and self._member[owner][0] == cohort)

    def ran(self, owners: Iterable[Hashable]) -> None:
        """A batch ran with these owners; owners absent for `forget_after` batches are forgotten, and
        where that leaves the cohorts more than one apart, owners of the larger one that just ran move
        to the smaller (each has just been verified, so it drafts now and joins its new cohort's next
        batch: half a cycle late, once)."""
        self._batches += 1
        owners = list(owners)
        for owner in owners:
            if owner in self._member:
                self._member[owner][1] = self._batches
        for owner in [o for o, (_, last) in self._member.items() if self._batches - last > self.forget_after]:
            del self._member[owner]
        first, second = self.sizes()
        larger = 0 if first > second else 1
        movable = [o for o in owners if o in self._member and self._member[o][0] == larger]
        for owner in movable[: abs(first - second) // 2]:
            self._member[owner][0] = 1 - larger

    def sizes(self) -> tuple[int, int]:
        counts = [0, 0]
        for cohort, _ in self._member.values():
            counts[cohort] += 1
        return counts[0], counts[1]
