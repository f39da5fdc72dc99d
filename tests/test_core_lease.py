"""Forwards on shared CPU cores take turns (workers/core_lease.py): across processes, across a
process's threads, re-entrant in one thread, and around every ModelRunner forward."""
import multiprocessing as mp
import threading
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.core_lease import NO_LEASE, CoreLease
from workers.runner import ModelRunner


def _busy_turns(path: str | None, turns: int, out, start) -> None:
    """`turns` busy periods of 30 ms, each under the lease (path None: none), as (start, end) pairs; both
    processes begin together (`start`, a barrier), whatever their start-up took."""
    lease = CoreLease(path) if path else NO_LEASE
    spans = []
    start.wait(timeout=60)
    for _ in range(turns):
        with lease:
            t0 = time.time()
            time.sleep(0.03)
            spans.append((t0, time.time()))
        time.sleep(0.002)
    out.put(spans)


def _overlap_s(spans_a, spans_b) -> float:
    return sum(max(0.0, min(a1, b1) - max(a0, b0)) for a0, a1 in spans_a for b0, b1 in spans_b)


def _two_processes(path: str | None) -> float:
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_busy_turns, args=(path, 10, out, start)) for _ in range(2)]
    for p in procs:
        p.start()
    spans = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return _overlap_s(*spans)


def test_processes_take_turns_and_without_the_lease_they_overlap(tmp_path):
    assert _two_processes(str(tmp_path / "cores.lock")) == 0.0
    # the check can fail: the same two processes without a lease overlap (they start together)
    assert _two_processes(None) > 0.1


def test_threads_of_one_process_take_turns_and_nested_use_is_reentrant(tmp_path):
    lease = CoreLease(str(tmp_path / "cores.lock"))
    spans, lock = [], threading.Lock()

    def work():
        for _ in range(5):
            with lease:
                with lease:             # a forward inside a forward_many
                    t0 = time.time()
                    time.sleep(0.01)
                    with lock:
                        spans.append((t0, time.time()))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 15 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert lease.turns == 15           # one file lock per outermost turn, not per nesting level


def test_every_runner_forward_holds_the_lease(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    runner = ModelRunner(LlamaForCausalLM(cfg).eval(), "cpu")
    held = []

    class Spy(CoreLease):
        def __enter__(self):
            out = super().__enter__()
            held.append(self._depth)
            return out

    runner.lease = Spy(str(tmp_path / "cores.lock"))
    runner.prefill(runner.new_cache(1, 32), 0, [1, 2, 3])
    caches = [runner.new_cache(1, 32) for _ in range(2)]
    runner.forward_many([(c, torch.tensor([[4, 5]]), None, None, None) for c in caches])
    assert held == [1, 1] and runner.lease.turns == 2
    assert ModelRunner.lease is NO_LEASE       # other runners are untouched


def test_a_lease_travels_as_its_path(tmp_path):
    import pickle

    lease = CoreLease(str(tmp_path / "cores.lock"))
    with lease:
        copy = pickle.loads(pickle.dumps(lease))
    assert copy.path == lease.path and copy.turns == 0


def test_a_turn_that_waited_is_reported(tmp_path):
    """on_wait (a worker's specorch_core_lease_wait_seconds) hears of a turn that waited for another's."""
    waits = []
    holder = CoreLease(str(tmp_path / "cores.lock"))
    waiter = CoreLease(str(tmp_path / "cores.lock"), on_wait=waits.append)    # another process's, as it were
    taken = threading.Event()

    def hold():
        with holder:
            taken.set()
            time.sleep(0.05)

    t = threading.Thread(target=hold)
    t.start()
    taken.wait()
    with waiter:
        pass
    t.join()
    assert len(waits) == 1 and waits[0] >= 0.03 and waiter.waited_s == waits[0]
