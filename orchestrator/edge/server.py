"""gRPC front door (grpc.aio): Generate (streaming), GenerateBatch, GetStats, health, reflection.

Servicer methods are thin: admit (a bounded number in flight), validate
(orchestrator/edge/validation.py), run the engine in a decode thread, stream tokens back.
Up to `server.concurrency` requests decode at once; their target forwards meet in
the global verifier. The engines' target and drafters are in this process or in
Ray actors (orchestrator/ray_runtime.py); the server does not care which.

Failure isolation: a malformed message is parsed leniently (orchestrator/edge/wire.py)
so it gets INVALID_ARGUMENT naming the field, never INTERNAL; a request whose
worker died gets UNAVAILABLE; any other failure fails that request alone.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.errors import WorkerUnavailable
from core.metrics import AggregateStats, RequestStats
from orchestrator.build import Built
from orchestrator.edge.security import BearerTokenInterceptor, load_auth_token, server_credentials
from orchestrator.edge.validation import RequestError, ValidRequest, validate_request
from orchestrator.edge.wire import MalformedRequest, lenient_parser
from orchestrator.global_verifier import GlobalVerifier
from proto import specorch_pb2 as pb
from proto import specorch_pb2_grpc as pb_grpc
from workers import monitoring

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecDecode"].full_name


class _Stop(Exception):
    """Raised inside the decode loop when the client went away or the deadline passed."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def stats_message(strategy: str, finish: str, s: RequestStats) -> pb.RequestStats:
    return pb.RequestStats(
        strategy=strategy, finish_reason=finish, prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
        steps=s.steps, mean_accepted_tokens=s.mean_accepted_tokens, acceptance_rate=s.acceptance_rate,
        tokens_per_s=s.tokens_per_s, ttft_s=s.ttft_s, total_s=s.total_s, draft_s=s.draft_s, verify_s=s.verify_s,
        accepted_per_position=s.accepted_per_position, events=s.events)


class _TextStream:
    """Incremental detokenisation: emit only text that can no longer change.

    Only the tokens since the last emitted newline are decoded again (a window that
    restarts at line ends, as HF's TextStreamer does), so streaming stays linear in
    the output length.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.window, self.sent = tokenizer, [], 0

    def push(self, new: list[int], final: bool = False) -> str:
        self.window.extend(new)
        text = self.tokenizer.decode(self.window, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):       # an incomplete multi-byte character
            return ""
        out, self.sent = text[self.sent:], len(text)
        if text.endswith("\n"):
            self.window, self.sent = [], 0
        return out


class SpecDecodeService(pb_grpc.SpecDecodeServicer):
    def __init__(self, built: Built):
        self.built = built
        self.cfg = built.config.server
        self.tokenizer = built.tokenizer
        # Each request decodes in its own thread; with batch_verification their target forwards
        # meet in the global verifier and run as one batch.
        self.executor = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="decode")
        self.verifier = None
        self.engines = dict(built.engines)
        if self.cfg.batch_verification and self.cfg.concurrency > 1:
            self.verifier = GlobalVerifier(built.target, max_batch=self.cfg.max_verify_batch,
                                           gather_fraction=self.cfg.verify_gather_factor)
            self.engines = {name: e.with_target(self.verifier) for name, e in built.engines.items()}
            self.verifier.observers.append(built.scheduler.observe_forward)
            self.verifier.wait_hints.append(built.scheduler.draft_wait_s)
            built.scheduler.cohorts = self.cfg.verify_cohorts
            self.verifier.split_hints.append(built.scheduler.split_cohorts)
            self.verifier.wait_for_drafting = self.cfg.wait_for_drafting == "on" or (
                self.cfg.wait_for_drafting == "auto" and built.scheduler.drafter_shares_target)
            self.verifier.observers.append(lambda *_: monitoring.record_scheduler(built.scheduler.stats))
        if self.cfg.profile_step_cost and any(getattr(getattr(s, "draft_length", None), "policy", "") == "goodput"
                                              for s in built.config.strategies if s.name in built.engines):
            from orchestrator.machine_profile import profile_step_cost

            cost = profile_step_cost(built.target, built.target.vocab_size)
            if cost.profile is not None:
                built.scheduler.cost = cost
                coef = cost.profile
                shape = ", ".join(f"{t:g}: {r * 1e3:+.1f}" for t, r in cost.shape)
                print(f"goodput scheduler: step cost profiled as {coef[0] * 1e3:.1f} ms + {coef[1] * 1e3:.2f} ms "
                      f"per token + {coef[2] * 1e3:.2f} ms per request + {coef[3] * 1e3:.1f} ms past one token; "
                      f"shape by tokens (ms) {{{shape}}}", flush=True)
        self.stats: dict[str, AggregateStats] = defaultdict(AggregateStats)
        self.failed = self.cancelled = self.rejected = 0
        self.in_flight = 0                      # admitted requests (decoding or waiting); event-loop only
        self.decoding = 0                       # requests in a decode thread now
        self._decoding_lock = threading.Lock()
        self.max_in_flight = self.cfg.concurrency + self.cfg.max_queue
        self.max_context = getattr(built.target_model.config, "max_position_embeddings", 1 << 30)

    # ------------------------------------------------------------ helpers
    @contextlib.asynccontextmanager
    async def _admitted(self, context, n: int = 1):
        """Hold `n` admission slots for the block; a full server answers RESOURCE_EXHAUSTED at once."""
        if self.in_flight + n > self.max_in_flight:
            self.rejected += 1
            monitoring.record_outcome("", "rejected", n)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server overloaded: {self.in_flight} requests in flight, limit "
                                f"{self.max_in_flight} (server.concurrency + server.max_queue); retry later")
        self.in_flight += n
        monitoring.set_queue(self.in_flight, self.in_flight - self.decoding)
        try:
            yield
        finally:
            self.in_flight -= n
            monitoring.set_queue(self.in_flight, self.in_flight - self.decoding)

    @staticmethod
    async def _reject_malformed(request, context) -> None:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field or 'request'}: {request.message}")

    async def _fail(self, context, exc: BaseException, strategy: str) -> None:
        """Answer a request that failed during decoding (never re-raises into the server)."""
        if isinstance(exc, _Stop):
            self.cancelled += 1
            monitoring.record_outcome(strategy, "cancelled")
            await context.abort(exc.code, str(exc))
        self.failed += 1
        if isinstance(exc, WorkerUnavailable):
            monitoring.record_outcome(strategy, "unavailable")
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker unavailable: {exc}")
        monitoring.record_outcome(strategy, "failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(exc).__name__}: {exc}")

    def _validate(self, req, prefix: str = "") -> ValidRequest:
        return validate_request(req, strategies=set(self.built.engines), default_strategy=self.cfg.default_strategy,
                                max_new_tokens_limit=self.cfg.max_new_tokens, prefix=prefix)

    def _encode(self, v: ValidRequest, prefix: str = "") -> list[int]:
        if v.chat is not None:
            ids = self.tokenizer.apply_chat_template(v.chat, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = self.tokenizer(v.prompt).input_ids
        if not ids:
            raise RequestError("INVALID_ARGUMENT", prefix + ("chat" if v.chat is not None else "prompt"),
                               "encodes to no tokens")
        if len(ids) + v.max_new_tokens > self.max_context:
            raise RequestError("OUT_OF_RANGE", prefix + ("chat" if v.chat is not None else "prompt"),
                               f"{len(ids)} prompt tokens + max_new_tokens {v.max_new_tokens} exceed the model's "
                               f"context of {self.max_context}")
        return ids

    async def _abort(self, context, err: RequestError):
        await context.abort(getattr(grpc.StatusCode, err.code), str(err))

    def _run(self, v: ValidRequest, ids: list[int], on_tokens):
        with self._decoding_lock:
            self.decoding += 1
        try:
            result = self.engines[v.strategy].generate(ids, v.max_new_tokens, v.sampling, on_tokens=on_tokens)
        finally:
            with self._decoding_lock:
                self.decoding -= 1
        monitoring.record_request(v.strategy, v.sampling.temperature, result.stats)
        return result

    async def _generate(self, v: ValidRequest, ids: list[int], context):
        """Run one request in the decode thread; yields ("tokens", list) then ("done", GenerationResult)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else None

        def on_tokens(tokens):
            if gone.is_set():
                raise _Stop(grpc.StatusCode.CANCELLED, "client cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise _Stop(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded during decoding")
            loop.call_soon_threadsafe(queue.put_nowait, ("tokens", list(tokens)))

        future = loop.run_in_executor(self.executor, self._run, v, ids, on_tokens)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(queue.put_nowait, ("done", f)))
        try:
            while True:
                kind, value = await queue.get()
                if kind == "tokens":
                    yield kind, value
                else:
                    result = value.result()          # re-raises _Stop or the engine's error
                    self.stats[v.strategy].add(result.stats)
                    yield kind, result
                    return
        finally:
            gone.set()      # the decode thread stops at its next step and frees the request's KV cache
            # Nobody reads the queue any more: retrieve the thread's outcome so it is not logged as lost.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    # ------------------------------------------------------------ RPCs
    async def Generate(self, request, context):
        await self._reject_malformed(request, context)
        async with self._admitted(context):
            try:
                v = self._validate(request)
                ids = self._encode(v)
            except RequestError as err:
                await self._abort(context, err)
            text = _TextStream(self.tokenizer)
            try:
                async for kind, value in self._generate(v, ids, context):
                    if kind == "tokens":
                        yield pb.GenerateResponse(request_id=v.request_id, chunk=pb.TokenChunk(
                            token_ids=value, text=text.push(value)))
                    else:
                        result = value
            except asyncio.CancelledError:  # the client went away
                self.cancelled += 1
                monitoring.record_outcome(v.strategy, "cancelled")
                raise
            except Exception as exc:  # a failed request never takes the server down
                await self._fail(context, exc, v.strategy)
            tail = text.push([], final=True)
            if tail:
                yield pb.GenerateResponse(request_id=v.request_id, chunk=pb.TokenChunk(token_ids=[], text=tail))
            yield pb.GenerateResponse(request_id=v.request_id,
                                      stats=stats_message(v.strategy, result.finish_reason, result.stats))

    async def GenerateBatch(self, request, context):
        await self._reject_malformed(request, context)
        if len(request.requests) > self.cfg.max_batch:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"requests: {len(request.requests)} exceeds the batch limit of {self.cfg.max_batch}")
        if not request.requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "requests: must not be empty")
        async with self._admitted(context, len(request.requests)):
            try:  # validate everything before decoding anything
                jobs = []
                for i, r in enumerate(request.requests):
                    v = self._validate(r, prefix=f"requests[{i}].")
                    jobs.append((v, self._encode(v, prefix=f"requests[{i}].")))
            except RequestError as err:
                await self._abort(context, err)

            async def one(v, ids):
                async for _kind, res in self._generate(v, ids, context):
                    pass            # the last item is ("done", result)
                return pb.GenerateResult(
                    request_id=v.request_id, token_ids=res.tokens,
                    text=self.tokenizer.decode(res.tokens, skip_special_tokens=True),
                    stats=stats_message(v.strategy, res.finish_reason, res.stats))

            tasks = [asyncio.ensure_future(one(v, ids)) for v, ids in jobs]
            try:   # up to server.concurrency of them decode at once (the executor's size)
                results = await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                self.cancelled += 1
                monitoring.record_outcome("batch", "cancelled")
                raise
            except Exception as exc:
                await self._fail(context, exc, "batch")
            finally:
                for t in tasks:    # after a failure the others stop at their next step and free their state
                    t.cancel()
            return pb.GenerateBatchResponse(results=results)

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def GetStats(self, request, context):
        await self._reject_malformed(request, context)
        out = pb.GetStatsResponse(default_strategy=self.cfg.default_strategy, requests_failed=self.failed,
                                  requests_cancelled=self.cancelled, requests_rejected=self.rejected,
                                  requests_in_flight=self.in_flight)
        for name, agg in sorted(self.stats.items()):
            s = agg.summary()
            out.strategies.append(pb.StrategyStats(
                strategy=name, requests=s["requests"], generated_tokens=s["generated_tokens"],
                mean_tokens_per_s=s["mean_tokens_per_s"], mean_accepted_tokens=s["mean_accepted_tokens"],
                acceptance_rate=s["acceptance_rate"]))
            out.requests_total += s["requests"]
        sched = self.built.scheduler.stats
        out.scheduler.CopyFrom(pb.SchedulerStats(
            decisions=sched.decisions, last_draft_lengths=sched.last_draft_lengths,
            mean_draft_length=sched.mean_draft_length, predicted_step_s=sched.predicted_step_s,
            measured_step_s=sched.measured_step_s, predicted_goodput=sched.predicted_goodput,
            forwards=sched.forwards, speculation_held_back=sched.speculation_held_back,
            measured_goodput=sched.measured_goodput, split_cohorts=sched.split_cohorts))
        return out


def _service_handler(service: SpecDecodeService) -> grpc.GenericRpcHandler:
    """The SpecDecode handlers, as the generated helper makes them but with lenient request parsing."""
    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler}
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["SpecDecode"].methods:
        request_cls, response_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = kinds[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(service, m.name), request_deserializer=lenient_parser(request_cls),
                                response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


async def start_server(built: Built, host: str | None = None, port: int | None = None):
    """Start serving; returns (server, bound port, service). Security settings are checked first."""
    cfg = built.config.server
    token = load_auth_token(cfg)
    credentials = server_credentials(cfg)
    limit = cfg.max_message_bytes
    interceptors = [BearerTokenInterceptor(token, exempt_health=not cfg.auth_health)] if token else []
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    service = SpecDecodeService(built)
    server.add_generic_rpc_handlers((_service_handler(service),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{host or cfg.host}:{cfg.port if port is None else port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, service
