"""Discrete-event simulation of a serving replica: queueing, continuous batching, drafting.

Resources are batch servers (`BatchServer`): the verifier (the target's devices; the
global verifier batches every queued request's forward, up to max_batch), the drafters
(each a server; on the local machine one actor drafting one request at a time). On a CPU
node the drafter and the verifier share the cores and one memory bus (`SharedNode`): while both
run, each runs `shared_slowdown` times slower than alone (the factor comes from the node's cores,
each side's threads and bandwidth: placement/capacity.py `cpu_contention`), or, where their forwards
take turns (runtime.core_lease, the default for a drafter actor), one waits for the other.
A request: arrives -> prefill on the verifier (first token) -> steps until its output length:
draft (drafter, or nothing) -> transfer -> verify (verifier) -> host work (a delay) -> emit
`sample_emitted(alpha, gamma)` tokens. DuoDecoding submits the next draft together with the
verification and moves on when both are done.

Jobs of one kind batch together (prefill with prefill, verify with verify, draft with draft),
as the global verifier batches long prompts only with each other. A batch of jobs costs
max(forwards) x step(rows): a draft job is `forwards` sequential one-token drafter steps.
"""
from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from core.cohorts import Cohorts, DraftingRequests
from orchestrator.goodput import STEP_COST_SHAPES, GoodputDraftLength, GoodputScheduler, StepCostModel
from orchestrator.goodput_guard import ModeGuard
from placement.roofline import Row
from placement.speculative_model import RequestTrace, StrategyModel, sample_emitted

StepFn = Callable[[list[Row]], float]      # seconds for one forward of these rows


@dataclass
class Request:
    id: int
    arrival: float
    prompt: int
    output: int
    emitted: int = 0
    first_token: float | None = None
    done: float | None = None
    trace: RequestTrace | None = None          # its measured steps, replayed (None: the strategy's pooled)
    steps: int = 0
    session: str = ""                          # its drafter session (goodput): "", "opening" or "open"
    on_open: Callable[[], None] | None = None  # what waits for the session to open
    opening_s: float | None = None             # the opening's seconds, until reported to the scheduler

    @property
    def context(self) -> int:
        return self.prompt + self.emitted


@dataclass
class Job:
    kind: str                  # "prefill", "verify", "draft", "draft-prefill"
    row: Row
    forwards: float            # sequential forwards this job needs (drafts: draft length)
    on_done: Callable[[], None]
    step: StepFn | None = None  # the model this job runs, when not the server's own (a drafter sharing GPUs)
    owner: int = -1             # request id (the gathering counts the requests of recent batches)
    started: float = 0.0        # when its batch started (set by the server)


class Sim:
    """Event loop: a heap of (time, seq, callback)."""

    def __init__(self):
        self.now = 0.0
        self._events: list = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def run(self) -> None:
        while self._events:
            self.now, _, fn = heapq.heappop(self._events)
            fn()


class SharedNode:
    """Servers on one CPU node (a drafter actor and the verifier): alone, a job takes its solo
    seconds; while another server of the node runs too, it progresses at 1 / its server's
    `shared_slowdown` of its solo speed (compute and memory bus shared; see capacity.cpu_contention).
    Finish times are rescheduled on every start and finish; a superseded finish event is ignored."""

    def __init__(self, sim: Sim, turns: bool = False):
        """turns: the servers' forwards take turns (runtime.core_lease, workers/core_lease.py): a job that
        finds another running waits for it (first come, first served) and then runs at its solo speed."""
        self.sim = sim
        self.turns = turns
        self.active: dict[int, list] = {}       # server id -> [remaining solo s, last update s, version, done, slowdown]
        self.waiting: list[tuple] = []          # turns: (server, work, done) waiting for the running job

    def _rate_divisor(self, job: list) -> float:
        return job[4] if len(self.active) > 1 else 1.0

    def run(self, server: "BatchServer", work: float, done: Callable[[], None]) -> None:
        if self.turns and self.active:
            self.waiting.append((server, work, done))
            return
        self._progress()
        self.active[id(server)] = [work, self.sim.now, 0, done, server.shared_slowdown]
        self._reschedule()

    def _progress(self) -> None:
        for job in self.active.values():
            job[0] -= (self.sim.now - job[1]) / self._rate_divisor(job)
            job[1] = self.sim.now

    def _reschedule(self) -> None:
        for key, job in self.active.items():
            job[2] += 1
            self.sim.at(self.sim.now + max(0.0, job[0]) * self._rate_divisor(job),
                        lambda k=key, v=job[2]: self._finish(k, v))

    def _finish(self, key: int, version: int) -> None:
        job = self.active.get(key)
        if job is None or job[2] != version:
            return
        self._progress()
        del self.active[key]
        self._reschedule()
        if self.turns and self.waiting:
            self.run(*self.waiting.pop(0))
        job[3]()


class BatchServer:
    """A model that runs queued jobs of one kind as one batch. Gathering as the global verifier does
    (orchestrator/global_verifier.py): while fewer jobs are queued than requests took part in the
    last two batches, wait for the others up to max(batch_wait_s, gather_fraction x the last
    batch's seconds), starting at once when they are all there."""

    def __init__(self, sim: Sim, step: StepFn, max_batch: int, batch_wait_s: float = 0.0, name: str = "",
                 bus: SharedNode | None = None, shared_slowdown: float = 2.0, gather_fraction: float = 0.0):
        self.sim, self.step, self.max_batch, self.batch_wait_s, self.name = sim, step, max_batch, batch_wait_s, name
        self.gather_fraction = gather_fraction
        self.bus = bus
        self.shared_slowdown = shared_slowdown      # solo time x this while another server of the node runs
        self.queue: list[Job] = []
        self.busy = False
        self.waiting = False
        self._wait_version = 0
        self.recent: list[set[int]] = []            # owners of the last two batches
        self.last_duration = 0.0
        self.batches: dict[str, list[int]] = {}     # kind -> batch sizes
        self.busy_s = 0.0
        self.observers: list = []                   # called (rows, tokens, seconds) per verify batch
        self.wait_hints: list = []                  # as GlobalVerifier.wait_hints: seconds worth waiting
        self.split_hints: list = []                 # as GlobalVerifier.split_hints: two alternating cohorts
        self.cohorts = Cohorts()
        # As GlobalVerifier.wait_for_drafting: verify batches wait for requests drafting now (owner -> since).
        self.wait_for_drafting = False
        self.drafting = DraftingRequests()

    def draft_begins(self, owner: int) -> None:
        self.drafting.begin(owner, self.sim.now)

    def draft_ends(self, owner: int, setup_s: float = 0.0) -> None:
        """The draft is done and its verification submitted at once. setup_s: seconds of the draft spent
        opening a drafter session (not counted, as served)."""
        self.drafting.end(owner, self.sim.now, setup_s)
        self.drafting.arrived(owner)

    def _drafting_until(self) -> float:
        return self.drafting.until(self.sim.now, self.batch_wait_s)

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self.sim.at(self.sim.now, self._try_start)    # after this instant's other submissions

    def _try_start(self, waited: bool = False) -> None:
        if self.busy or not self.queue:
            return
        kind = self.queue[0].kind
        same = [j for j in self.queue if j.kind == kind]
        expected = min(len(set().union(*self.recent)), self.max_batch)
        if kind == "verify" and any(h() for h in self.split_hints):     # the first job's cohort only
            for owner in sorted(set().union(*self.recent)):             # entering the split: halve them
                self.cohorts.of(owner)
            cohort = self.cohorts.of(self.queue[0].owner)
            same = [j for j in same if self.cohorts.of(j.owner) == cohort]
            expected = min(self.cohorts.expected(cohort, set().union(*self.recent)), self.max_batch)
        drafts_until = (self._drafting_until() if kind == "verify" and self.wait_for_drafting
                        and len(same) < self.max_batch else 0.0)
        if self.waiting and not waited and (len(same) < expected or drafts_until > self.sim.now):
            return                                    # still gathering
        # Wait briefly for requests that are between steps when fewer are queued than recently ran.
        wait = max(self.batch_wait_s, self.gather_fraction * self.last_duration,
                   max((h() for h in self.wait_hints), default=0.0) if kind == "verify" else 0.0)
        if not waited and not self.waiting and (wait > 0 and len(same) < expected or drafts_until > self.sim.now):
            self.waiting = True
            self._wait_version += 1
            until = max(self.sim.now + wait if len(same) < expected else 0.0, drafts_until)
            self.sim.at(until, lambda v=self._wait_version: self._wake(v))
            return
        self.waiting = False
        batch = same[: self.max_batch]
        for j in batch:
            self.queue.remove(j)
            j.started = self.sim.now
        self.recent = (self.recent + [{j.owner for j in batch}])[-2:]
        self.cohorts.ran(j.owner for j in batch)
        self.batches.setdefault(kind, []).append(len(batch))
        duration = max(j.forwards for j in batch) * (batch[0].step or self.step)([j.row for j in batch])
        self.last_duration = duration
        if kind == "verify":
            for observe in self.observers:
                observe(len(batch), sum(j.row.new for j in batch), duration)   # packed, as forward_many
        self.busy = True
        self.busy_s += duration
        if self.bus is not None:
            self.bus.run(self, duration, lambda: self._finish(batch))
        else:
            self.sim.at(self.sim.now + duration, lambda: self._finish(batch))

    def _wake(self, version: int) -> None:
        if not self.waiting or version != self._wait_version:
            return                                    # the batch started before the deadline
        self._try_start(waited=True)

    def _finish(self, batch: list[Job]) -> None:
        self.busy = False
        for j in batch:
            j.on_done()
        self._try_start()

    def mean_batch(self, kind: str) -> float:
        sizes = self.batches.get(kind, [])
        return sum(sizes) / len(sizes) if sizes else 0.0


@dataclass
class Replica:
    """One serving replica: what a request's steps cost and where they run."""
    strategy: StrategyModel
    verify_step: StepFn
    max_batch: int = 16
    batch_wait_s: float = 0.0                  # the gathering's least wait (BatchServer)
    gather_fraction: float = 0.0               # ... and its share of the last batch's seconds (server config)
    verify_cohorts: bool = True                # the goodput scheduler may split the batch (server config)
    draft_step: StepFn | None = None           # one drafter forward of these rows
    draft_prefill_step: StepFn | None = None   # the drafter's prefill of the prompt (None: not modelled);
                                               # the engine runs it after the first token, before step 1
    drafter_servers: int = 1
    drafter_max_batch: int = 1                 # 1: a drafter drafts one request at a time
    drafter_shared: bool = False               # drafter on the verifier's devices: its jobs queue there
    transfer_s: float = 0.0                    # draft -> verifier, per step
    host_s: float = 0.0                        # per request-step host work (each request's own thread)
    shared_bus: bool = False                   # drafters and verifier share one CPU node (cores + memory bus)
    verify_shared_slowdown: float = 2.0        # shared node: the verifier's solo time x this while a drafter runs
    draft_shared_slowdown: float = 2.0         # shared node: a drafter's solo time x this while the verifier runs
    shared_turns: bool = False                 # shared node: their forwards take turns instead (runtime.core_lease)
    devices: float = 1.0                       # devices held, for device-hours
    wait_for_drafting: bool = False            # verify batches wait for drafting requests (server config)
    # Requests decoding at once (server.concurrency); later arrivals wait for a slot before their prefill,
    # as the server's admission queue holds them. None: max_batch. Without the limit a queue past
    # capacity starves decoding: every step waits behind the prefills of all earlier arrivals.
    concurrency: int | None = None


@dataclass
class Arrivals:
    kind: str                  # "poisson" (rate req/s) or "closed" (concurrency clients)
    requests: int
    rate: float = 0.0
    concurrency: int = 1
    # Closed loop: client i sends its first request at i x stagger_s. Real clients never arrive at one
    # instant: the first request finds the verifier idle and prefills alone, the others queue behind it
    # and prefill together (every measured wave of docs/capacity.md shows it).
    stagger_s: float = 0.0


@dataclass
class Result:
    throughput: float                          # output tokens / s (closed loop: over the run; open: while arriving)
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float                            # per-token latency after the first token
    tpot_p99: float
    device_hours_per_mtok: float
    makespan: float
    tokens: int
    mean_verify_batch: float
    requests: list[Request] = field(repr=False, default_factory=list)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def draft_charged_from(rep: Replica, job: Job, asked: float) -> float:
    """When the goodput scheduler's draft cost of a step starts: when the draft was asked for, or, for a
    drafter on the verifier's devices, when its batch started. Its queueing behind their forwards stands
    for the GPU's time slicing between two processes in a real deployment, not a draft cost (those
    forwards' seconds are in the step cost already): charged as drafting, it kept the scheduler from
    drafting on 8xA100, where fixed drafting halved the per-token latency."""
    return job.started if rep.drafter_shared else asked


def simulate(rep: Replica, arrivals: Arrivals, prompt_len: Callable[[random.Random], int],
             output_len: Callable[[random.Random], int], seed: int = 0) -> Result:
    rng = random.Random(seed)
    sim = Sim()
    s = rep.strategy
    bus = SharedNode(sim, rep.shared_turns) if rep.shared_bus else None
    verifier = BatchServer(sim, rep.verify_step, rep.max_batch, rep.batch_wait_s, "verifier", bus,
                           rep.verify_shared_slowdown, rep.gather_fraction)
    verifier.wait_for_drafting = rep.wait_for_drafting
    drafters = []
    if s.draft_forwards() > 0:
        if rep.draft_step is None:
            raise ValueError(f"strategy {s.name!r} drafts but the replica has no draft_step")
        if rep.drafter_shared:
            drafters = [verifier]
        else:
            # A drafter actor batching concurrent drafts gathers like the verifier (orchestrator/drafter_worker.py).
            drafters = [BatchServer(sim, rep.draft_step, rep.drafter_max_batch,
                                    rep.batch_wait_s if rep.drafter_max_batch > 1 else 0.0, f"drafter-{i}", bus,
                                    rep.draft_shared_slowdown,
                                    rep.gather_fraction if rep.drafter_max_batch > 1 else 0.0)
                        for i in range(rep.drafter_servers)]
    # The goodput strategy: the server's scheduler, fed by the simulated verifier's batches.
    scheduler = None
    if s.goodput:
        # As the server profiles its target at start-up (server.profile_step_cost), so does the simulation.
        scheduler = GoodputScheduler(StepCostModel.fitted(
            (b, b * t, rep.verify_step([Row(t, 128)] * b)) for b, t in STEP_COST_SHAPES),
            guard=ModeGuard(clock=lambda: sim.now))     # its measurements on simulated time
        scheduler.drafter_shares_target = rep.drafter_shared or rep.shared_bus
        verifier.observers.append(scheduler.observe_forward)
        verifier.wait_hints.append(scheduler.draft_wait_s)
        scheduler.cohorts = rep.verify_cohorts
        verifier.split_hints.append(scheduler.split_cohorts)
    policies: dict[int, GoodputDraftLength] = {}
    done: list[Request] = []
    emissions: list[tuple[float, int]] = []     # (time, tokens emitted)
    pending = [arrivals.requests]          # requests not yet issued (closed loop)

    def then_host(req: Request, fn: Callable[[], None]) -> None:
        if rep.host_s > 0:
            sim.at(sim.now + rep.host_s, fn)
        else:
            fn()

    slots = [rep.concurrency or rep.max_batch]     # free decode slots
    admission: deque[Request] = deque()

    def admit(req: Request) -> None:
        if slots[0] == 0:
            admission.append(req)
            return
        slots[0] -= 1
        if scheduler is not None:
            # orchestrator/engine.py: the request's policy joins the scheduler before its prefill, and a
            # drafter actor's session opens beside the prefill when the request will likely draft.
            policy = policies[req.id] = GoodputDraftLength(scheduler, k_max=max(1, s.gamma))
            if policy.drafts_soon():
                open_session(req)
        verifier.submit(Job("prefill", Row(req.prompt, 0), 1, lambda: then_host(req, lambda: emit(req, 1)),
                            owner=req.id))

    def open_session(req: Request) -> None:
        """The drafter prefills the prompt (goodput: ahead of the first draft, or at it)."""
        if req.session:
            return
        req.session = "opening"
        submitted = sim.now

        def opened():
            req.session = "open"
            req.opening_s = sim.now - submitted          # the drafter's prefill, queueing included
            if req.on_open is not None:
                then, req.on_open = req.on_open, None
                then()
        if not drafters or rep.draft_prefill_step is None:       # not modelled: open at once
            opened()
            return
        drafter_for(req).submit(Job("draft-prefill", Row(req.prompt, 0), 1, opened, rep.draft_prefill_step,
                                    req.id))

    def finish(req: Request) -> None:
        req.done = sim.now
        done.append(req)
        if req.id in policies:
            policies.pop(req.id).close()
        slots[0] += 1
        if admission:
            admit(admission.popleft())
        if arrivals.kind == "closed" and pending[0] > 0:
            issue(sim.now)

    def emit(req: Request, n: int) -> None:
        emissions.append((sim.now, min(n, req.output - req.emitted)))
        req.emitted = min(req.output, req.emitted + n)
        first = req.first_token is None
        if first:
            req.first_token = sim.now
        if req.emitted >= req.output:
            finish(req)
        elif first and drafters and rep.draft_prefill_step is not None and scheduler is None:
            # orchestrator/engine.py: the drafter session starts (prefills the prompt) after the first token
            # (goodput: at admission or at the first draft, step_goodput).
            after = lambda: sim.at(sim.now + rep.transfer_s, lambda: step(req))  # noqa: E731
            drafter_for(req).submit(Job("draft-prefill", Row(req.prompt, 0), 1, after, rep.draft_prefill_step,
                                        req.id))
        else:
            step(req)

    def draft_forwards(drafted: int, trace: RequestTrace | None) -> float:
        if s.family == "hybrid":                      # a lookup hit costs nothing, a miss the model's draft
            return s.model_draft_forwards if rng.random() < s.model_share else 0.0
        if trace is not None:                         # this step's draft length, not the pooled gamma
            return s.draft_forwards() * drafted / s.gamma if s.gamma else 0.0
        return s.draft_forwards()

    def drafter_for(req: Request) -> BatchServer:
        return min(drafters, key=lambda d: len(d.queue) + d.busy)

    def step(req: Request) -> None:
        if scheduler is not None:
            step_goodput(req)
            return
        verify_tokens, emitted = s.sample_step(rng, req.trace, req.steps)
        req.steps += 1
        verify_row = Row(verify_tokens, req.context)
        after_verify = lambda: then_host(req, lambda: emit(req, emitted))  # noqa: E731
        forwards = draft_forwards(verify_tokens - 1, req.trace) if drafters else 0.0
        if forwards <= 0:
            verifier.submit(Job("verify", verify_row, 1, after_verify, owner=req.id))
            return
        draft_job = lambda cb: Job("draft", Row(1, req.context), forwards, cb, rep.draft_step, req.id)  # noqa: E731
        if s.overlapped:                              # DuoDecoding: draft next round while verifying
            left = [2]

            def one_done():
                left[0] -= 1
                if left[0] == 0:
                    after_verify()
            drafter_for(req).submit(draft_job(one_done))
            verifier.submit(Job("verify", verify_row, 1, one_done, owner=req.id))
            return

        def to_verifier():
            verifier.draft_ends(req.id)
            verifier.submit(Job("verify", verify_row, 1, after_verify, owner=req.id))
        verifier.draft_begins(req.id)
        drafter_for(req).submit(draft_job(
            lambda: sim.at(sim.now + rep.transfer_s, to_verifier) if rep.transfer_s else to_verifier()))

    def step_goodput(req: Request) -> None:
        """A step whose draft length the scheduler chooses; acceptance drawn for that length."""
        policy = policies[req.id]
        policy.before_step(req.output - req.emitted,
                           bool(drafters) and rep.draft_prefill_step is not None and not req.session)
        k = min(policy.next_k(), max(0, req.output - req.emitted - 1))
        emitted = sample_emitted(s.effective_alpha, k, rng)
        req.steps += 1
        started = [sim.now, sim.now]                 # step start, verify submission
        setup = [0.0]                                # seconds of this step's draft spent on an opening

        def after_verify():
            policy.observe(k, emitted - 1, started[1] - started[0], sim.now - started[1])
            then_host(req, lambda: emit(req, emitted))

        def to_verifier():
            started[1] = sim.now
            verifier.draft_ends(req.id, setup[0])
            verifier.submit(Job("verify", Row(k + 1, req.context), 1, after_verify, owner=req.id))
        forwards = s.draft_forwards() * k / s.gamma if drafters and s.gamma else 0.0
        if forwards <= 0:
            to_verifier()
            return
        verifier.draft_begins(req.id)          # as the engine tells the global verifier (opening included)

        def draft():
            job = Job("draft", Row(1, req.context), forwards, lambda: drafted(job), rep.draft_step, req.id)
            drafter_for(req).submit(job)

        def drafted(job: Job):
            started[0] = draft_charged_from(rep, job, started[0])
            sim.at(sim.now + rep.transfer_s, to_verifier)
        if req.session != "open":
            # The first draft waits for what is left of the session's opening: a one-time cost the
            # scheduler's measured check spreads over requests (ModeGuard.observe_setup).
            def after_opening():
                setup[0] = sim.now - started[0]
                policy.observe_setup(sim.now - started[0], req.opening_s)
                req.opening_s = None
                started[0] = sim.now
                draft()
            req.on_open = after_opening
            open_session(req)
            return
        if req.opening_s is not None:                # opened ahead, and done: its cost all the same
            policy.observe_setup(0.0, req.opening_s)
            req.opening_s = None
        draft()

    next_id = [0]
    saturated: list[bool] = []                     # open loop: requests still waiting for a slot at the last arrival
    traces: list[RequestTrace] = []                # the measured requests' traces, dealt in shuffled rounds

    def next_trace() -> RequestTrace | None:
        if not s.request_mix:
            return None
        if not traces:
            traces.extend(s.request_mix)
            rng.shuffle(traces)
        return traces.pop()

    def issue(t: float) -> None:
        pending[0] -= 1
        req = Request(next_id[0], t, max(1, prompt_len(rng)), max(1, output_len(rng)), trace=next_trace())
        next_id[0] += 1
        sim.at(t, lambda: admit(req))

    if arrivals.kind == "closed":
        for i in range(min(arrivals.concurrency, arrivals.requests)):
            issue(i * arrivals.stagger_s)
    elif arrivals.kind == "poisson":
        t = 0.0
        for _ in range(arrivals.requests):
            t += rng.expovariate(arrivals.rate)
            issue(t)
        sim.at(t, lambda: saturated.append(bool(admission)))    # after the last arrival's admission
    else:
        raise ValueError(f"arrivals.kind: {arrivals.kind!r} (poisson or closed)")
    sim.run()

    start = min(r.arrival for r in done)
    makespan = max(r.done for r in done) - start
    tokens = sum(r.emitted for r in done)
    rate_s = makespan
    if arrivals.kind == "poisson" and len(done) > 1 and not any(saturated):
        # Open loop below capacity: tokens emitted while requests were still arriving, over that window:
        # the drain after the last arrival would otherwise charge every plan for its slowest request.
        # Past capacity (requests still queued for a slot at the last arrival) the server works at
        # capacity through the drain, so all tokens over the whole run measure it; the arrival window
        # alone would mostly measure the ramp-up of a server filling at once.
        end = max(r.arrival for r in done)
        tokens_in = sum(n for t, n in emissions if start <= t <= end)
        rate_s = (end - start) * tokens / max(tokens_in, 1)
    ttft = [r.first_token - r.arrival for r in done]
    tpot = [(r.done - r.first_token) / (r.emitted - 1) for r in done if r.emitted > 1]
    return Result(
        throughput=tokens / rate_s if rate_s > 0 else 0.0,
        ttft_p50=statistics.median(ttft), ttft_p99=_pct(ttft, 0.99),
        tpot_p50=statistics.median(tpot) if tpot else 0.0, tpot_p99=_pct(tpot, 0.99),
        device_hours_per_mtok=rep.devices * rate_s / 3600 / (tokens / 1e6) if tokens else math.inf,
        makespan=makespan, tokens=tokens, mean_verify_batch=verifier.mean_batch("verify"),
        requests=done,
    )


def simulate_repeated(rep: Replica, arrivals: Arrivals, prompt_len, output_len, seeds: range) -> Result:
    """Mean over independent runs (small closed-loop waves are noisy: a 32-token request is a few steps);
    latency percentiles over the pooled requests."""
    runs = [simulate(rep, arrivals, prompt_len, output_len, seed) for seed in seeds]
    pooled = [q for r in runs for q in r.requests]
    ttft = [q.first_token - q.arrival for q in pooled]
    tpot = [(q.done - q.first_token) / (q.emitted - 1) for q in pooled if q.emitted > 1]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Result(
        throughput=mean([r.throughput for r in runs]),
        ttft_p50=statistics.median(ttft), ttft_p99=_pct(ttft, 0.99),
        tpot_p50=statistics.median(tpot) if tpot else 0.0, tpot_p99=_pct(tpot, 0.99),
        device_hours_per_mtok=mean([r.device_hours_per_mtok for r in runs]),
        makespan=mean([r.makespan for r in runs]), tokens=sum(r.tokens for r in runs),
        mean_verify_batch=mean([r.mean_verify_batch for r in runs]), requests=pooled)
