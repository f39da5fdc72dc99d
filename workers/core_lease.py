"""One forward at a time on CPU cores that several model processes share.

On one CPU node the target's actor and a drafter actor each run torch with as many threads as the
node has cores (their own forwards are fastest so). Whenever their forwards overlap, the two thread
pools oversubscribe the cores and each spins in the other's way: measured here (2 cores, a 1.5B bf16
target forward of 4 rows beside a 0.5B int8 drafter forward, 2 threads each) the target's forward
took 2.77 s instead of 0.114 s and the drafter's 1.85 s instead of 0.024 s. Taking turns costs the
sum of the two (0.131 s and 0.034 s measured, the rest of each turn being the other's). Overlap
happens in serving as soon as two requests are in flight: one drafts while the other verifies, or
a new request's prefill lands in the middle of drafting.

It pays only together with lockstep (`server.wait_for_drafting`: the verifier waits for the requests
drafting now). Alone, served on that machine (2 requests per client, 64 tokens) the lease made drafting
slower: requests out of step draft while others verify, and a draft of k tokens waits for up to k of
the target's forwards (the hybrid 11.3 tok/s against 12.4 without it at two clients, 13.6 against 15.1
at four). In lockstep what is left to overlap is little (a new request's prefill, a session's
opening), and taking turns there made the hybrid 15.5 tok/s against 14.6 at two clients and 21.0
against 19.6 at four (one run each; docs/scheduler.md). `runtime.core_lease` (default on).

`CoreLease(path)` is that turn-taking: an exclusive `flock` on a file every process of the node
opens (the placement gives them the same path), re-entrant within a process (a one-request
forward_many runs forward) and shared by its threads (a drafter actor serving calls in parallel
threads would oversubscribe the cores by itself). `NO_LEASE` is the no-op for hardware of its own.
"""
from __future__ import annotations

import fcntl
import os
import threading
import time


class CoreLease:
    """Exclusive use of the node's cores for the duration of a `with` block."""

    def __init__(self, path: str, on_wait=None):
        """on_wait(seconds): called after each turn that had to wait (a worker's metric)."""
        self.path = path
        self.on_wait = on_wait
        self._lock = threading.RLock()
        self._depth = 0
        self._file = None
        self.waited_s = 0.0          # total seconds waiting for the lease (another process's or thread's turn)
        self.turns = 0

    def __enter__(self) -> "CoreLease":
        t0 = time.perf_counter()
        self._lock.acquire()
        if self._depth == 0:
            try:
                if self._file is None:   # opened lazily: a lease pickled into an actor opens its own file
                    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                    self._file = open(self.path, "a+")
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._lock.release()     # the process's other threads must not wait on a lease never taken
                raise
            waited = time.perf_counter() - t0
            self.waited_s += waited
            self.turns += 1
            if self.on_wait is not None and waited > 0:
                self.on_wait(waited)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._lock.release()

    def __getstate__(self) -> dict:      # travels to an actor as its path; the file is opened there
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class _NoLease:
    waited_s = 0.0
    turns = 0

    def __enter__(self) -> "_NoLease":
        return self

    def __exit__(self, *exc) -> None:
        return None


NO_LEASE = _NoLease()
