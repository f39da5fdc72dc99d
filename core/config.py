"""The config schema's pure pieces, validated at the edge (unknown keys are errors): models, draft
lengths, runtime, cluster, node pools, placement, server, main job; and the YAML loader whose errors
name the file and the dotted key.

Each strategy kind's own model lives in its module (orchestrator/strategies/); the whole file's model,
`EngineConfig`, is assembled from both in orchestrator/config.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.paths import LocalPath, ModelSource


class ConfigError(ValueError):
    pass


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    source: ModelSource = Field(description=(
        "Embedded model name (e.g. qwen2.5-coder-1.5b), a HF directory, or a .gguf file (a relative path is read "
        "from the working directory of the process that loads the config, also in Ray actors: core/paths.py)"))
    dtype: Literal["bfloat16", "float16", "float32"] = Field("bfloat16", description="Weights and compute dtype")
    size_hint: tuple[int, int] | None = Field(
        None, description="(parameters, layers) for planning a model that is not on this machine")
    quantize: Literal["none", "int8"] = Field(
        "none", description="Weight-only int8 (drafters only: lowers acceptance a little, never changes output)")


class FixedLength(Strict):
    policy: Literal["fixed"] = "fixed"
    k: int = Field(4, ge=1, le=64, description="Tokens drafted per step")


class AdaptiveLength(Strict):
    policy: Literal["adaptive"]
    k_init: int = Field(4, ge=1, le=64, description="Draft length before anything is measured")
    k_max: int = Field(12, ge=1, le=64, description="Upper bound on the draft length")


class GoodputLength(Strict):
    """Every live request's draft length chosen together to maximise the batch's expected tokens per
    second (SmartSpec; orchestrator/goodput.py): long drafts when the verifier's batch is small,
    shorter ones down to 0 (plain decoding) as verification turns compute-bound."""
    policy: Literal["goodput"]
    k_max: int = Field(10, ge=1, le=64, description="Upper bound on any request's draft length")


class NgramRange(Strict):
    """A context-matching level's n-gram range: a subclass defines `min_ngram` and `max_ngram`."""

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        return self


class HeuristicLength(Strict):
    """Hugging Face's assisted-generation schedule: +2 after a draft accepted whole, -1 otherwise."""
    policy: Literal["heuristic"]
    k_init: int = Field(5, ge=1, le=64, description="Draft length before anything is verified")
    k_max: int = Field(64, ge=1, le=64, description="Upper bound on the draft length")


class ThompsonLength(Strict):
    """EESD's rule: per draft position, a rate drawn from a Beta posterior of the acceptance; draft on
    while the draw beats `threshold`."""
    policy: Literal["thompson"]
    k_max: int = Field(16, ge=1, le=64, description="Upper bound on the draft length")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Draw needed to draft one more token")
    prior_accepted: float = Field(1.0, gt=0.0, description="Beta prior: pseudo-count of accepted tokens")
    prior_rejected: float = Field(1.0, gt=0.0, description="Beta prior: pseudo-count of rejections")


class AdlLength(Strict):
    """DiffuSpec's adaptive draft length: k = clip(floor(ema_gen) + delta * [ema_acc >= ema_gen]), with
    ema_gen the drafter's realised draft length (it must stop early when unsure: min_confidence) and
    ema_acc the accepted length (core/draft_length.py: AdaptiveDraftLengthADL)."""
    policy: Literal["adl"]
    k_init: int = Field(4, ge=1, le=64, description="Draft length before anything is verified")
    k_min: int = Field(1, ge=1, le=64, description="Lower bound on the draft length")
    k_max: int = Field(16, ge=1, le=64, description="Upper bound on the draft length")
    delta: int = Field(1, ge=0, le=16, description="Growth while acceptance keeps up with the drafts")
    beta: float = Field(0.5, ge=0.0, lt=1.0, description="EMA weight of the past (0 = the last step only)")

    @model_validator(mode="after")
    def _bounds(self):
        if not self.k_min <= self.k_init <= self.k_max:
            raise ValueError(f"need k_min <= k_init <= k_max, got {self.k_min}, {self.k_init}, {self.k_max}")
        return self


class LearnedLength(Strict):
    """AdaEAGLE's learned draft length: an MLP reads the drafter's hidden state and the newest token's
    embedding each step and predicts how many tokens will be accepted (core/length_predictor.py;
    weights from `launch.py train-draft-length`, docs/draft_length.md). Drafters that draft one token
    at a time with a model only (kind draft_model without lookup_first)."""
    policy: Literal["learned"]
    weights: LocalPath = Field(description=(
        "Predictor weights (.pt) from `launch.py train-draft-length`; a relative path is read from the working "
        "directory of the process that loads the config, also through Ray (core/paths.py)"))
    k_min: int = Field(1, ge=0, le=64, description="Lower bound on the draft length (0 allows plain steps)")
    k_max: int = Field(10, ge=1, le=64, description="Upper bound (at most the k_max the weights were trained for)")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description=(
        "Draft position j while the predicted P(accepted >= j) is at least this (0.5: the predicted median)"))

    @model_validator(mode="after")
    def _bounds_and_file(self):
        if self.k_min > self.k_max:
            raise ValueError(f"need k_min <= k_max, got {self.k_min}, {self.k_max}")
        if not Path(self.weights).is_file():
            raise ValueError(f"weights: file not found: {self.weights} (train it with "
                             "`python launch.py train-draft-length`, docs/draft_length.md)")
        return self


DraftLength = Annotated[Union[FixedLength, AdaptiveLength, GoodputLength, HeuristicLength, ThompsonLength,
                              AdlLength, LearnedLength],
                        Field(discriminator="policy")]


class ModelsConfig(Strict):
    target: ModelSpec
    drafters: dict[str, ModelSpec] = Field(default_factory=dict)


class RuntimeConfig(Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None = torch default)")
    core_lease: bool = Field(True, description=(
        "Where a drafter actor runs on the CPU cores of a node that also runs a target shard, their forwards "
        "take turns (workers/core_lease.py) instead of overlapping (overlapping, their thread pools "
        "oversubscribe the cores). Pays with server.wait_for_drafting (lockstep), loses without it "
        "(docs/scheduler.md)"))


class BenchConfig(Strict):
    hf_peers: list[Literal["plain", "assisted", "prompt_lookup", "universal_assisted"]] = Field(
        default_factory=lambda: ["plain", "assisted", "prompt_lookup"],
        description="Hugging Face generate() rows measured in the same run (universal_assisted: needs "
                    "hf_universal_assistant)")
    hf_assistant: str | None = Field(None, description="models.drafters key used for HF assisted generation")
    hf_universal_assistant: str | None = Field(
        None, description="models.drafters key (a model with another tokenizer than the target's) for HF's "
                          "universal assisted generation: generate(assistant_model, tokenizer, assistant_tokenizer)")
    hf_prompt_lookup_tokens: int = Field(10, ge=1, description="prompt_lookup_num_tokens for the HF peer row")


class ClusterSection(Strict):
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


class NodePool(Strict):
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


class TargetPlacement(Strict):
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


class DrafterPlacement(Strict):
    pool: str
    device: Literal["gpu", "cpu"] = "cpu"
    replicas: int = Field(1, ge=1)
    cpus: int = Field(1, ge=1, description="CPU cores per drafter actor")
    colocate: list[str] = Field(default_factory=list, description=(
        "Other models.drafters keys loaded in the same actor(s) (e.g. the bf16 and int8 variants of one "
        "model): each actor hosts the strategies of every drafter it loads, on the same cores; their "
        "weights count towards its memory. A colocated key has no placement entry of its own"))


class PlacementSection(Strict):
    target: TargetPlacement
    drafters: dict[str, DrafterPlacement] = Field(default_factory=dict, description="Keyed by models.drafters")
    memory_headroom: float = Field(0.2, ge=0, lt=1, description="Fraction of each device kept for KV cache and activations")

    def host_of(self, key: str) -> str | None:
        """The placement.drafters key whose actors load drafter `key` (itself, or the entry colocating it)."""
        if key in self.drafters:
            return key
        return next((host for host, d in self.drafters.items() if key in d.colocate), None)


class TlsSection(Strict):
    cert_file: str = Field(description="PEM certificate chain the server presents")
    key_file: str = Field(description="PEM private key of that certificate")
    client_ca_file: str | None = Field(None, description="PEM CA bundle; set = clients must present a certificate")


class ServerSection(Strict):
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
    verify_cohorts: bool = Field(True, description=(
        "With a `goodput` strategy whose drafter runs on hardware of its own: let the scheduler verify the "
        "batch as two alternating cohorts, one drafting while the other verifies, where it predicts more "
        "goodput than lockstep (docs/scheduler.md)"))
    wait_for_drafting: Literal["auto", "on", "off"] = Field("auto", description=(
        "The global verifier's batch of decode steps waits for the requests drafting now (each up to 1.5x "
        "the recent longest draft + 5 ms): lockstep. auto = where a drafter shares the target's CPU cores (there "
        "a forward beside drafting runs at the speed of both sharing the cores, and splits the batch)"))
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


class MainJobSection(Strict):
    strategies: list[str] | None = Field(None, description=(
        "Strategies the main job (`launch.py --cluster FILE` without --strategies) runs beside plain "
        "decoding; None = every configured strategy (as `--strategies all`)"))
    max_new_tokens: int = Field(32, ge=1, description=(
        "New tokens per sample prompt in the main job (--max-new-tokens overrides)"))


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
