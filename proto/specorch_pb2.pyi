from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Chat(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "chat", "sampling", "max_new_tokens", "strategy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    chat: Chat
    sampling: SamplingParams
    max_new_tokens: int
    strategy: str
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[Chat, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., strategy: _Optional[str] = ...) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("strategy", "finish_reason", "prompt_tokens", "generated_tokens", "steps", "mean_accepted_tokens", "acceptance_rate", "tokens_per_s", "ttft_s", "total_s", "draft_s", "verify_s", "accepted_per_position", "events")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    DRAFT_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_S_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_POSITION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    steps: int
    mean_accepted_tokens: float
    acceptance_rate: float
    tokens_per_s: float
    ttft_s: float
    total_s: float
    draft_s: float
    verify_s: float
    accepted_per_position: _containers.RepeatedScalarFieldContainer[int]
    events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, strategy: _Optional[str] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., mean_accepted_tokens: _Optional[float] = ..., acceptance_rate: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., ttft_s: _Optional[float] = ..., total_s: _Optional[float] = ..., draft_s: _Optional[float] = ..., verify_s: _Optional[float] = ..., accepted_per_position: _Optional[_Iterable[int]] = ..., events: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "chunk", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: TokenChunk
    stats: RequestStats
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., stats: _Optional[_Union[RequestStats, _Mapping]] = ...) -> None: ...

class GenerateBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GenerateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[GenerateRequest, _Mapping]]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    stats: RequestStats
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., stats: _Optional[_Union[RequestStats, _Mapping]] = ...) -> None: ...

class GenerateBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GenerateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[GenerateResult, _Mapping]]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StrategyStats(_message.Message):
    __slots__ = ("strategy", "requests", "generated_tokens", "mean_tokens_per_s", "mean_accepted_tokens", "acceptance_rate")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    requests: int
    generated_tokens: int
    mean_tokens_per_s: float
    mean_accepted_tokens: float
    acceptance_rate: float
    def __init__(self, strategy: _Optional[str] = ..., requests: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., mean_tokens_per_s: _Optional[float] = ..., mean_accepted_tokens: _Optional[float] = ..., acceptance_rate: _Optional[float] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("strategies", "requests_total", "requests_failed", "requests_cancelled", "default_strategy", "requests_rejected", "requests_in_flight", "scheduler")
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    strategies: _containers.RepeatedCompositeFieldContainer[StrategyStats]
    requests_total: int
    requests_failed: int
    requests_cancelled: int
    default_strategy: str
    requests_rejected: int
    requests_in_flight: int
    scheduler: SchedulerStats
    def __init__(self, strategies: _Optional[_Iterable[_Union[StrategyStats, _Mapping]]] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_cancelled: _Optional[int] = ..., default_strategy: _Optional[str] = ..., requests_rejected: _Optional[int] = ..., requests_in_flight: _Optional[int] = ..., scheduler: _Optional[_Union[SchedulerStats, _Mapping]] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("decisions", "last_draft_lengths", "mean_draft_length", "predicted_step_s", "measured_step_s", "predicted_goodput", "forwards", "speculation_held_back", "measured_goodput", "split_cohorts")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_DRAFT_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    MEAN_DRAFT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_STEP_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_STEP_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_GOODPUT_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_HELD_BACK_FIELD_NUMBER: _ClassVar[int]
    MEASURED_GOODPUT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_COHORTS_FIELD_NUMBER: _ClassVar[int]
    decisions: int
    last_draft_lengths: _containers.RepeatedScalarFieldContainer[int]
    mean_draft_length: float
    predicted_step_s: float
    measured_step_s: float
    predicted_goodput: float
    forwards: int
    speculation_held_back: bool
    measured_goodput: float
    split_cohorts: bool
    def __init__(self, decisions: _Optional[int] = ..., last_draft_lengths: _Optional[_Iterable[int]] = ..., mean_draft_length: _Optional[float] = ..., predicted_step_s: _Optional[float] = ..., measured_step_s: _Optional[float] = ..., predicted_goodput: _Optional[float] = ..., forwards: _Optional[int] = ..., speculation_held_back: _Optional[bool] = ..., measured_goodput: _Optional[float] = ..., split_cohorts: _Optional[bool] = ...) -> None: ...
