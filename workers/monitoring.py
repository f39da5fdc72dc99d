"""Our metrics, exported through Ray (`ray.util.metrics`): Prometheus scrapes them from
each node's metrics export port, and Ray's dashboard and Grafana show them
(docs/monitoring.md; the dashboard JSON is `docs/grafana/specorch.json`).

Exported names carry Ray's `ray_` prefix (counters also a `_total` suffix), e.g.
`ray_specorch_generated_tokens_total{strategy, request_class}`. Without Ray (the
`--in-process` mode, unit tests) every call here is a no-op.

Request class: `greedy` or `sampled`, and `short` or `long` prompt (over 512 tokens),
e.g. `greedy/short`, so a dashboard can split code completion from long-context use.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

LONG_PROMPT_TOKENS = 512
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_lock = threading.Lock()
_metrics = None


def _never_raises(fn):
    """Metrics must never cost a request: a failure here is logged once and ignored."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            if not getattr(wrapper, "warned", False):
                wrapper.warned = True
                logging.getLogger(__name__).exception("metrics: %s failed; continuing without it", fn.__name__)
    return wrapper


def request_class(temperature: float, prompt_tokens: int) -> str:
    return f"{'sampled' if temperature > 0 else 'greedy'}/{'long' if prompt_tokens > LONG_PROMPT_TOKENS else 'short'}"


class _Metrics:
    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = ("strategy", "request_class")
        self.requests = Counter("specorch_requests", "Finished requests by outcome (ok, failed, cancelled, rejected)",
                                tag_keys=("strategy", "outcome"))
        self.tokens = Counter("specorch_generated_tokens", "Generated tokens", tag_keys=tags)
        self.steps = Counter("specorch_verify_steps", "Target verification steps", tag_keys=tags)
        self.drafted = Counter("specorch_drafted_tokens", "Draft tokens proposed (chain or tree depth)", tag_keys=tags)
        self.accepted = Counter("specorch_accepted_tokens", "Draft tokens accepted", tag_keys=tags)
        self.tokens_per_s = Histogram("specorch_request_tokens_per_s", "Per-request decode speed",
                                      boundaries=[0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], tag_keys=tags)
        self.mean_accepted = Histogram("specorch_request_mean_accepted_tokens",
                                       "Per-request mean tokens per step, bonus included",
                                       boundaries=[1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16], tag_keys=tags)
        self.draft_length = Histogram("specorch_request_draft_length", "Per-request mean draft length chosen",
                                      boundaries=[0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32], tag_keys=tags)
        self.ttft = Histogram("specorch_ttft_seconds", "Time to first token", boundaries=_SECONDS, tag_keys=tags)
        self.tpot = Histogram("specorch_time_per_output_token_seconds", "Per-token latency after the first",
                              boundaries=_SECONDS, tag_keys=tags)
        self.in_flight = Gauge("specorch_requests_in_flight", "Admitted requests (decoding or waiting)")
        self.waiting = Gauge("specorch_requests_waiting", "Admitted requests waiting for a decode slot")
        self.verify_batch = Histogram("specorch_verify_batch_size", "Requests per global-verifier forward",
                                      boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64])
        self.verify_queue = Gauge("specorch_verify_queue_depth", "Forwards queued at the global verifier")
        self.sched_draft_length = Gauge("specorch_scheduler_draft_length",
                                        "Mean draft length of the goodput scheduler's last decision")
        self.sched_predicted_step = Gauge("specorch_scheduler_predicted_step_seconds",
                                          "Predicted seconds of the batched forward the scheduler planned")
        self.sched_measured_step = Gauge("specorch_scheduler_measured_step_seconds",
                                         "Seconds of the verifier's last decode forward")
        self.sched_goodput = Gauge("specorch_scheduler_predicted_goodput",
                                   "Expected tokens per second of the scheduler's last plan")
        self.sched_measured_goodput = Gauge("specorch_scheduler_measured_goodput",
                                            "Emitted tokens per second measured in the mode now running")
        self.sched_held_back = Gauge("specorch_scheduler_speculation_held_back",
                                     "1 while drafting is held back because it measured slower at this load")
        self.sched_split = Gauge("specorch_scheduler_split_cohorts",
                                 "1 while the verifier verifies two alternating cohorts (one drafts, one verifies)")
        self.busy = Counter("specorch_worker_busy_seconds", "Seconds a worker spent computing (idle = wall - busy)",
                            tag_keys=("worker", "role"))
        self.lease_wait = Counter("specorch_core_lease_wait_seconds",
                                  "Seconds a worker's forwards waited for CPU cores it shares (runtime.core_lease)",
                                  tag_keys=("worker", "role"))


def metrics() -> _Metrics | None:
    """The process's metric objects, or None when Ray is not running here."""
    global _metrics
    import ray

    if not ray.is_initialized():
        return None
    with _lock:
        if _metrics is None:
            _metrics = _Metrics()
        return _metrics


@_never_raises
def record_request(strategy: str, temperature: float, stats) -> None:
    """One finished request's RequestStats (core/metrics.py)."""
    m = metrics()
    if m is None:
        return
    tags = {"strategy": strategy, "request_class": request_class(temperature, stats.prompt_tokens)}
    m.requests.inc(1, tags={"strategy": strategy, "outcome": "ok"})
    for counter, value in ((m.tokens, stats.generated_tokens), (m.steps, stats.steps),
                           (m.drafted, stats.drafted_tokens), (m.accepted, stats.accepted_tokens)):
        if value > 0:           # Ray counters take positive increments only
            counter.inc(value, tags=tags)
    if stats.steps:
        m.mean_accepted.observe(stats.mean_accepted_tokens, tags=tags)
        m.draft_length.observe(stats.drafted_tokens / stats.steps, tags=tags)
    if stats.tokens_per_s:
        m.tokens_per_s.observe(stats.tokens_per_s, tags=tags)
    m.ttft.observe(stats.ttft_s, tags=tags)
    if stats.generated_tokens > 1:
        m.tpot.observe((stats.total_s - stats.ttft_s) / (stats.generated_tokens - 1), tags=tags)


@_never_raises
def record_outcome(strategy: str, outcome: str, n: int = 1) -> None:
    m = metrics()
    if m is not None:
        m.requests.inc(n, tags={"strategy": strategy or "unknown", "outcome": outcome})


@_never_raises
def set_queue(in_flight: int, waiting: int) -> None:
    m = metrics()
    if m is not None:
        m.in_flight.set(in_flight)
        m.waiting.set(waiting)


@_never_raises
def record_verify_batch(size: int, queued: int) -> None:
    m = metrics()
    if m is not None:
        m.verify_batch.observe(size)
        m.verify_queue.set(queued)


@_never_raises
def record_scheduler(stats) -> None:
    """The goodput scheduler's SchedulerStats (orchestrator/goodput.py), after each verifier forward."""
    m = metrics()
    if m is not None and stats.decisions:
        m.sched_draft_length.set(stats.mean_draft_length)
        m.sched_predicted_step.set(stats.predicted_step_s)
        m.sched_measured_step.set(stats.measured_step_s)
        m.sched_goodput.set(stats.predicted_goodput)
        m.sched_measured_goodput.set(stats.measured_goodput)
        m.sched_held_back.set(1.0 if stats.speculation_held_back else 0.0)
        m.sched_split.set(1.0 if stats.split_cohorts else 0.0)


class BusyTimer:
    """Accumulates a worker's compute time into specorch_worker_busy_seconds{worker, role}."""

    def __init__(self, role: str, worker: str | None = None):
        self.role, self.worker = role, worker

    def _name(self) -> str:
        if self.worker is None:
            import ray

            name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
            self.worker = name or f"{self.role}-in-process"
        return self.worker

    @_never_raises
    def waited(self, seconds: float) -> None:
        """Seconds this worker waited for the core lease (workers/core_lease.py: its on_wait)."""
        m = metrics()
        if m is not None and seconds > 0:
            m.lease_wait.inc(seconds, tags={"worker": self._name(), "role": self.role})

    @contextlib.contextmanager
    def busy(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            m = metrics()
            elapsed = time.perf_counter() - t0
            if m is not None and elapsed > 0:
                m.busy.inc(elapsed, tags={"worker": self._name(), "role": self.role})
