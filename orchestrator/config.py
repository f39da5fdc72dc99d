"""Typed configuration, validated at the edge (unknown keys are errors).

This is the engine part of a cluster config: which models, which strategies,
how to run locally. Errors name the file and the dotted key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    source: str = Field(description="Embedded model name (e.g. qwen2.5-coder-1.5b), a HF directory, or a .gguf file")
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights and compute dtype")
    size_hint: tuple[int, int] | None = Field(
        None, description="(parameters, layers) for planning a model that is not on this machine")
    quantize: Literal["none", "int8"] = Field(
        "none", description="Weight-only int8 (drafters only: lowers acceptance a little, never changes output)")


class FixedLength(_Strict):
    policy: Literal["fixed"] = "fixed"
    k: int = Field(4, ge=1, le=64, description="Tokens drafted per step")


class AdaptiveLength(_Strict):
    policy: Literal["adaptive"]
    k_init: int = Field(4, ge=1, le=64, description="Draft length before anything is measured")
    k_max: int = Field(12, ge=1, le=64, description="Upper bound on the draft length")


class GoodputLength(_Strict):
    """Every live request's draft length chosen together to maximise the batch's expected tokens per
    second (SmartSpec; orchestrator/goodput.py): long drafts when the verifier's batch is small,
    shorter ones down to 0 (plain decoding) as verification turns compute-bound."""
    policy: Literal["goodput"]
    k_max: int = Field(10, ge=1, le=64, description="Upper bound on any request's draft length")


DraftLength = Annotated[Union[FixedLength, AdaptiveLength, GoodputLength], Field(discriminator="policy")]


class LookupFirst(_Strict):
    """Copy from the context when its suffix n-gram occurred before; draft with the model otherwise."""
    max_ngram: int = Field(3, ge=1, le=16, description="Longest context n-gram to match")
    min_ngram: int = Field(2, ge=1, le=16, description="Shorter matches fall through to the model")
    k: int = Field(10, ge=1, le=64, description="Tokens copied per lookup draft")

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self


class DraftModelStrategy(_Strict):
    name: str = Field(description="Row name in reports and the value of a request's strategy override")
    kind: Literal["draft_model"]
    drafter: str = Field(description="Key of models.drafters")
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Stop a draft after a token the drafter gave less than this probability (0 = off)"))
    draft_vocab: int = Field(0, ge=0, description=(
        "> 0: the drafter scores only the draft_vocab lowest token ids plus the prompt's tokens "
        "(a cheaper output head; output unchanged, acceptance may drop). 0 = full vocabulary"))
    lookup_first: LookupFirst | None = Field(None, description="Prompt lookup before the model (a hybrid)")
    draft_length: DraftLength = Field(default_factory=FixedLength)


class PromptLookupStrategy(_Strict):
    name: str
    kind: Literal["prompt_lookup"]
    max_ngram: int = Field(3, ge=1, le=16, description="Longest context n-gram to match")
    min_ngram: int = Field(1, ge=1, le=16)
    num_candidates: int = Field(1, ge=1, le=16, description="Matches merged into a tree draft (1 = a chain)")
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=8))


class EasySpecStrategy(_Strict):
    name: str
    kind: Literal["easyspec"]
    drafter: str = Field(description="Key of models.drafters: the model whose layers are grouped")
    degree: int = Field(2, ge=1, le=16, description="Layers per fused group (the parallel degree)")
    mode: Literal["attn_only", "direct_mlp"] = "attn_only"
    calibration: Literal["never", "prefill_only", "every_round", "every_mismatch"] = "every_mismatch"
    groups: list[list[int]] | None = Field(None, description="Explicit layer groups (default: the paper's)")
    workers: int = Field(1, ge=1, le=16, description="1 = group members computed one after another in one "
                         "process; N > 1 = N Ray actors with the full draft weights, joined by torch.distributed")
    draft_length: DraftLength = Field(default_factory=FixedLength)

    @model_validator(mode="after")
    def _workers_cover_groups(self):
        largest = max((len(g) for g in self.groups), default=1) if self.groups else self.degree
        if self.workers > 1 and self.workers != largest:
            raise ValueError(f"workers ({self.workers}) must be 1 (in process) or the largest layer group's size "
                             f"({largest}: {'groups' if self.groups else 'degree'}), one worker per group member")
        return self


class MaGSpec(_Strict):
    """CS-Drafting's statistical bottom level (workers/mag.py)."""
    table: str | None = Field(None, description=(
        "Bigram table from `launch.py mag-table` (None = bigrams of the request's own context)"))
    max_ngram: int = Field(8, ge=1, le=64, description="Longest context suffix matched before copying")
    min_ngram: int = Field(1, ge=1, le=64, description="Shorter suffixes fall through to the bigram table")

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self


class CascadeStrategy(_Strict):
    """CS-Drafting (docs/cascade.md): target <- drafters (top-down) <- MaG."""
    name: str
    kind: Literal["cascade"]
    drafters: list[str] = Field(default_factory=list, description=(
        "Keys of models.drafters, largest first; each reviews the level below ([] = MaG alone)"))
    mag: MaGSpec = Field(default_factory=MaGSpec)
    k_matrix: list[list[int]] = Field(description=(
        "Square, one row per reviewer (the target, then each drafter), one column per drafting level "
        "(each drafter, then MaG); entries are draft-length increments, left of the diagonal 0"))
    leniency: list[float] | None = Field(None, description=(
        "Per drafter (>= 1): it accepts x with probability min(1, leniency * p(x) / q(x)); "
        "never applies to the target. None = all 1"))
    draft_length: DraftLength = Field(default_factory=lambda: FixedLength(k=64), description=(
        "Caps the k_matrix draft (the schedule sets its length)"))

    @model_validator(mode="after")
    def _shapes(self):
        from workers.cascade import validate_k_matrix

        validate_k_matrix(self.k_matrix, len(self.drafters) + 1)   # its errors start with "k_matrix"
        if self.leniency is not None and (len(self.leniency) != len(self.drafters)
                                          or any(x < 1 for x in self.leniency)):
            raise ValueError(f"leniency: one value >= 1 per drafter ({len(self.drafters)}), got {self.leniency}")
        return self


class DuoDecodingStrategy(_Strict):
    """DuoDecoding (orchestrator/duo.py): the drafter drafts round i+1 in its own process while the
    target verifies round i; multi-sequence drafts; a draft budget matched to measured times."""
    name: str
    kind: Literal["duodecoding"]
    drafter: str = Field(description="Key of models.drafters")
    backend: Literal["torch", "llama_cpp"] = Field("torch", description=(
        "Drafter runtime: torch (transformers weights via the model store) or llama_cpp (llama-cpp-python "
        "reading the GGUF directly; the optional extra `llama`)"))
    process: Literal["actor", "thread", "inline"] = Field("actor", description=(
        "Where the drafter runs: its own Ray actor process with its own torch threads (pipelined), a thread "
        "of this process (pipelined, one shared torch pool), or inline (sequential, same outputs; tests)"))
    threads: int = Field(1, ge=1, le=256, description="torch threads of the drafter actor's process")
    target_threads: int | None = Field(None, ge=1, le=256, description=(
        "torch threads of the target while a DuoDecoding request decodes (None: runtime.threads). When the "
        "drafter shares the target's cores, target + drafter threads should not exceed them. Process-wide: "
        "requests of other strategies decoding in this process at the same time run with it too"))
    gamma_init: int = Field(4, ge=1, le=64, description="Draft budget (tokens per round) before any measurement")
    gamma_min: int = Field(1, ge=1, le=64, description="Smallest budget the controller may choose")
    gamma_max: int = Field(16, ge=1, le=64, description="Largest budget the controller may choose")
    multi_sequence: bool = Field(True, description=(
        "Dynamic multi-sequence drafting (k sequences of budget/k tokens; False = one chain)"))
    top_alternatives: int = Field(8, ge=1, le=32, description=(
        "First-token candidates considered, x1 included (at most this many sequences)"))
    calibration_steps: int = Field(4, ge=0, le=64, description=(
        "Timed drafter/target steps at start-up that seed the budget (0 = start from gamma_init)"))

    @model_validator(mode="after")
    def _gamma_range(self):
        if not self.gamma_min <= self.gamma_init <= self.gamma_max:
            raise ValueError(f"need gamma_min <= gamma_init <= gamma_max, got {self.gamma_min}, "
                             f"{self.gamma_init}, {self.gamma_max}")
        return self


Strategy = Annotated[Union[DraftModelStrategy, PromptLookupStrategy, EasySpecStrategy, CascadeStrategy,
                           DuoDecodingStrategy],
                     Field(discriminator="kind")]
StrategyAdapter = TypeAdapter(Strategy)   # validates one strategy dict (e.g. inside a Ray actor)


class ModelsConfig(_Strict):
    target: ModelSpec
    drafters: dict[str, ModelSpec] = Field(default_factory=dict)


class RuntimeConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None = torch default)")


class BenchConfig(_Strict):
    hf_peers: list[Literal["plain", "assisted", "prompt_lookup"]] = Field(
        default_factory=lambda: ["plain", "assisted", "prompt_lookup"],
        description="Hugging Face generate() rows measured in the same run")
    hf_assistant: str | None = Field(None, description="models.drafters key used for HF assisted generation")
    hf_prompt_lookup_tokens: int = Field(10, ge=1, description="prompt_lookup_num_tokens for the HF peer row")


class ClusterSection(_Strict):
    address: str | None = Field(None, description="Address of an existing Ray cluster; None starts a local head")
    dashboard_host: str = Field("127.0.0.1", description="Ray dashboard bind address")
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description=(
        "Port of the local head's Prometheus metrics endpoint (None = Ray picks one; launch.py prints it)"))
    actor_max_restarts: int = Field(3, ge=0, description=(
        "Times Ray restarts a crashed shard or drafter actor (its per-request state is lost: "
        "in-flight requests fail with UNAVAILABLE or fall back to target-only steps)"))
    actor_call_timeout_s: float = Field(300.0, gt=0, description=(
        "Longest wait for one actor call before the request fails with UNAVAILABLE"))


class NodePool(_Strict):
    name: str
    count: int = Field(1, ge=1, description="Nodes in the pool")
    cpus: int = Field(ge=1, description="CPU cores per node")
    memory_gb: float = Field(gt=0, description="Host memory per node")
    accelerator: str | None = Field(None, description="Device name from placement/hardware.py (e.g. A100-80GB)")
    accelerators_per_node: int = Field(0, ge=0)
    accelerator_memory_gb: float | None = Field(None, gt=0, description="Override the table's device memory")
    memory_bw_gbs: float | None = Field(None, gt=0, description="Device (or, for CPU pools, host) memory bandwidth")
    bf16_tflops: float | None = Field(None, gt=0)
    network_gbs: float = Field(12.5, gt=0, description="Node-to-node bandwidth (100 Gb/s = 12.5 GB/s)")


class TargetPlacement(_Strict):
    pool: str = Field(description="node_pools name")
    device: Literal["gpu", "cpu"] = "gpu"
    tensor_parallel: int = Field(1, ge=1, description="Devices per tensor-parallel group")
    pipeline_parallel: int = Field(1, ge=1, description="Pipeline stages (contiguous layer ranges)")
    stage_transport: Literal["auto", "ray"] = Field("auto", description=(
        "How hidden states move between stages: auto = torch.distributed (gloo / NCCL) for hops of at "
        "least link_min_tokens tokens, Ray's object store below; ray = always the object store"))
    link_min_tokens: int = Field(1, ge=1, description=(
        "Smallest hop (tokens, summed over a batch) sent over torch.distributed; gloo measured faster "
        "than the object store at every size here (docs/distributed.md)"))


class DrafterPlacement(_Strict):
    pool: str
    device: Literal["gpu", "cpu"] = "cpu"
    replicas: int = Field(1, ge=1)
    cpus: int = Field(1, ge=1, description="CPU cores per drafter actor")
    colocate: list[str] = Field(default_factory=list, description=(
        "Other models.drafters keys loaded in the same actor(s) (e.g. the bf16 and int8 variants of one "
        "model): each actor hosts the strategies of every drafter it loads, on the same cores; their "
        "weights count towards its memory. A colocated key has no placement entry of its own"))


class PlacementSection(_Strict):
    target: TargetPlacement
    drafters: dict[str, DrafterPlacement] = Field(default_factory=dict, description="Keyed by models.drafters")
    memory_headroom: float = Field(0.2, ge=0, lt=1, description="Fraction of each device kept for KV cache and activations")

    def host_of(self, key: str) -> str | None:
        """The placement.drafters key whose actors load drafter `key` (itself, or the entry colocating it)."""
        if key in self.drafters:
            return key
        return next((host for host, d in self.drafters.items() if key in d.colocate), None)


class TlsSection(_Strict):
    cert_file: str = Field(description="PEM certificate chain the server presents")
    key_file: str = Field(description="PEM private key of that certificate")
    client_ca_file: str | None = Field(None, description="PEM CA bundle; set = clients must present a certificate")


class ServerSection(_Strict):
    host: str = Field("127.0.0.1", description="gRPC bind address (loopback unless set otherwise)")
    port: int = Field(50051, ge=0, le=65535, description="0 = pick a free port")
    default_strategy: str = Field("plain", description="Strategy used when a request names none")
    max_new_tokens: int = Field(2048, ge=1, description="Upper limit on a request's max_new_tokens")
    max_batch: int = Field(64, ge=1, description="Most requests in one GenerateBatch")
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="gRPC send/receive message size limit")
    concurrency: int = Field(8, ge=1, description="Requests decoded at the same time (one thread each)")
    batch_verification: bool = Field(True, description=(
        "Batch the target forwards of concurrent requests into one (the global verifier)"))
    max_verify_batch: int = Field(16, ge=1, description="Most requests in one batched target forward")
    verify_gather_factor: float = Field(0.1, ge=0, le=1, description=(
        "The global verifier waits for requests of its last two batches that are between steps, up to "
        "this fraction of the last forward's time (at least 5 ms); like vLLM's scheduler_delay_factor. "
        "It re-merges batches that split when per-request host work outlasts a fixed wait"))
    profile_step_cost: bool = Field(True, description=(
        "With a `goodput` strategy configured: time a few batched decode-step shapes of the target when the "
        "server starts, as the goodput scheduler's first cost model (it is corrected online either way)"))
    batch_drafting: bool = Field(True, description=(
        "Drafter actors run concurrent requests' draft steps as one batched forward of the draft model"))
    max_queue: int = Field(64, ge=0, description=(
        "Requests admitted beyond `concurrency` to wait for a decode slot; more get RESOURCE_EXHAUSTED"))
    tls: TlsSection | None = Field(None, description="Serve TLS instead of plaintext")
    auth_token_env: str | None = Field(None, description=(
        "Name of the environment variable holding the bearer token every RPC must carry "
        "(the token itself never appears in a config file or a log)"))
    auth_health: bool = Field(True, description=(
        "Also require the token for the health service (false lets load balancers probe without it)"))


class MainJobSection(_Strict):
    strategies: list[str] | None = Field(None, description=(
        "Strategies the main job (`launch.py --cluster FILE` without --strategies) runs beside plain "
        "decoding; None = every configured strategy (as `--strategies all`)"))
    max_new_tokens: int = Field(32, ge=1, description=(
        "New tokens per sample prompt in the main job (--max-new-tokens overrides)"))


class EngineConfig(_Strict):
    name: str = "local"
    models: ModelsConfig
    strategies: list[Strategy] = Field(default_factory=list)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    node_pools: list[NodePool] = Field(default_factory=list)
    placement: PlacementSection | None = None
    server: ServerSection = Field(default_factory=ServerSection)
    main_job: MainJobSection = Field(default_factory=MainJobSection)

    @model_validator(mode="after")
    def _references(self):
        if self.models.target.quantize != "none":
            raise ValueError("models.target.quantize: only drafters may be quantized (the target defines the output)")
        names = [s.name for s in self.strategies]
        if "plain" in names or len(set(names)) != len(names):
            raise ValueError(f"strategy names must be unique and not 'plain': {names}")
        for i, s in enumerate(self.strategies):
            if (isinstance(s, (DraftModelStrategy, EasySpecStrategy, DuoDecodingStrategy))
                    and s.drafter not in self.models.drafters):
                raise ValueError(
                    f"strategies.{i}.drafter: {s.drafter!r} is not a key of models.drafters "
                    f"({sorted(self.models.drafters)})")
            for j, key in enumerate(getattr(s, "drafters", None) or []):
                if key not in self.models.drafters:
                    raise ValueError(f"strategies.{i}.drafters.{j}: {key!r} is not a key of models.drafters "
                                     f"({sorted(self.models.drafters)})")
        if self.bench.hf_assistant and self.bench.hf_assistant not in self.models.drafters:
            raise ValueError(f"bench.hf_assistant: {self.bench.hf_assistant!r} is not a key of models.drafters")
        if self.server.default_strategy != "plain" and self.server.default_strategy not in names:
            raise ValueError(f"server.default_strategy: {self.server.default_strategy!r} is not a configured strategy")
        pools = {p.name for p in self.node_pools}
        if self.placement is not None:
            if self.placement.target.pool not in pools:
                raise ValueError(f"placement.target.pool: {self.placement.target.pool!r} is not in node_pools ({sorted(pools)})")
            for key, d in self.placement.drafters.items():
                if key not in self.models.drafters:
                    raise ValueError(f"placement.drafters.{key}: not a key of models.drafters")
                if d.pool not in pools:
                    raise ValueError(f"placement.drafters.{key}.pool: {d.pool!r} is not in node_pools ({sorted(pools)})")
            colocated: dict[str, str] = {}
            for key, d in self.placement.drafters.items():
                for j, other in enumerate(d.colocate):
                    where = f"placement.drafters.{key}.colocate.{j}"
                    if other not in self.models.drafters:
                        raise ValueError(f"{where}: {other!r} is not a key of models.drafters "
                                         f"({sorted(self.models.drafters)})")
                    if other == key:
                        raise ValueError(f"{where}: {other!r} is this entry's own drafter")
                    if other in self.placement.drafters:
                        raise ValueError(f"{where}: {other!r} has its own placement.drafters entry; "
                                         "a drafter is placed once (its own entry or one colocate list)")
                    if other in colocated:
                        raise ValueError(f"{where}: {other!r} is already colocated with {colocated[other]!r}")
                    colocated[other] = key
        for i, name in enumerate(self.main_job.strategies or []):
            if name not in names and name != "plain":
                raise ValueError(f"main_job.strategies.{i}: {name!r} is not a configured strategy ({names})")
        if self.bench.hf_assistant and self.models.drafters[self.bench.hf_assistant].quantize != "none":
            raise ValueError("bench.hf_assistant: HF generate() needs an unquantized drafter")
        return self

    def strategy(self, name: str):
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(f"unknown strategy {name!r} (configured: {['plain'] + [s.name for s in self.strategies]})")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_yaml_model(path: str | Path, model_cls, what: str = "config"):
    """Read a YAML file into a pydantic model; every error names the file and the dotted key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return model_cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid {what}\n{_format_errors(e)}") from None


def load_config(path: str | Path) -> EngineConfig:
    return load_yaml_model(path, EngineConfig)
