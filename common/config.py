"""Every setting of every process, declared once (see common/settings.py for the machinery).

Small groups hold the settings several processes share; each process's config is the union
of the groups it needs plus its own settings (frozen, keyword-only dataclasses, so fields
read flat: `config.block_size`):

    group            settings                                          used by
    ModelSource      model, served_model_name                          all
    ContextConfig    max_model_len                                     gateway, scheduler, engine
    SchedulingConfig max_num_seqs, max_num_batched_tokens, prefix cache scheduler, engine
    BlockConfig      block_size                                        scheduler, worker, engine
    CacheConfig      + kv_cache_memory_gb, gpu_memory_utilization      worker, engine
    DeviceConfig     device, dtype, seed, enforce_eager                worker, engine
    ParallelConfig   tensor_parallel_size, pipeline_parallel_size      scheduler, worker, engine
    DistConfig       dist_timeout_s                                    worker
    StepTimeoutConfig step_timeout_s                                   scheduler
    BodyLimitConfig  max_body_bytes                                    gateway
    LogConfig        log_format, log_prompts                           services
    RecoveryConfig   request_timeout_s                                 scheduler, serve
    DataParallelConfig data_parallel_size                              scheduler, serve
    SpeculationConfig speculative_config (n-gram speculative decoding)  scheduler, engine
    AccessConfig     api_key, tenants_file, limits, TLS                gateway (serve)
    InternalTLSConfig internal_tls_*: mTLS of the worker gRPC port     scheduler, worker (serve)

`EngineConfig` is the offline `LLM`'s, `ServeConfig` (`tessera serve`) is an EngineConfig plus
every other group and the stack's own settings, from which each child's flags are generated (`settings.to_argv`).
The values derived from settings (the served model name, the clamp of max_model_len) are
computed here and nowhere else; common/limits.py checks prompts against them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from dataclasses import dataclass

from common.logging_setup import LOG_FORMATS
from common.settings import Settings, setting

DTYPES = ("float32", "bfloat16", "float16")


def served_model_name(model: str, name: str | None = None) -> str:
    """The model's name in the APIs and in Redis keys: `name`, else the model directory's
    name as the user wrote the path (a symlink keeps its own name; `.` is the working
    directory as the OS reports it): every service derives it here, so separately started
    services agree."""
    if name:
        return name
    return os.path.basename(os.path.abspath(model)) or "model"


def resolve_max_model_len(requested: int | None, limit: int) -> int:
    """The context length a deployment serves: `requested` (default: the model's `limit`,
    its max_position_embeddings), which must lie in [1, limit]."""
    if requested is None:
        return limit
    if not 1 <= requested <= limit:
        raise ValueError(f"max_model_len must be in [1, {limit}] for this model, got {requested}")
    return requested


def parse_rank(value: str | int) -> int:
    """`--rank N`, or `--rank hostname`: a StatefulSet pod's ordinal ("workers-g0-3" -> 3)."""
    if value != "hostname":
        return int(value)
    name = os.environ.get("HOSTNAME") or socket.gethostname()
    tail = name.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"--rank hostname: {name!r} does not end in -<ordinal>")
    return int(tail)


# Keyword-only: a config lists its groups most general last, so that the model comes first in
# --help (dataclasses collect fields from the last base to the first).
GROUPS = dict(frozen=True, kw_only=True)


@dataclass(**GROUPS)
class ModelSource(Settings):
    model: str = setting(help="local Hugging Face model directory")
    served_model_name: str | None = setting(
        None, "the model's name in the APIs and in Redis keys (default: the directory's name)")

    @property
    def model_name(self) -> str:
        return served_model_name(self.model, self.served_model_name)


@dataclass(**GROUPS)
class ContextConfig(Settings):
    max_model_len: int | None = setting(
        None, "longest sequence (prompt + output) served, in tokens (default: the model's "
        "max_position_embeddings)", min=1)


@dataclass(**GROUPS)
class SchedulingConfig(ContextConfig):
    max_num_seqs: int = setting(256, "sequences running at once", min=1, max=1 << 16)
    max_num_batched_tokens: int = setting(2048, "tokens per step: the prefill chunk budget", min=1,
                                          max=1 << 20)
    enable_prefix_caching: bool = setting(True, "do not reuse the KV blocks of shared prefixes")


@dataclass(**GROUPS)
class BlockConfig(Settings):
    block_size: int = setting(16, "tokens per KV cache block", min=1, max=1024)


@dataclass(**GROUPS)
class CacheConfig(BlockConfig):
    kv_cache_dtype: str = setting(
        "auto", "KV cache storage dtype; auto: the compute dtype. A half type halves the bytes "
        "attention reads, fp8 (= fp8_e4m3; CPU only) quarters them (computed in float32 on CPU)",
        choices=("auto", *DTYPES, "fp8", "fp8_e4m3", "fp8_e5m2"))
    kv_cache_memory_gb: float = setting(2.0, "KV cache budget on CPU, in GiB", min=1e-6,
                                        max=1 << 20)
    gpu_memory_utilization: float = setting(
        0.9, "fraction of GPU memory a worker may use (weights, activations, KV cache)",
        min=0.01, max=1.0)

    @property
    def kv_cache_memory_bytes(self) -> int:
        return int(self.kv_cache_memory_gb * (1 << 30))


@dataclass(**GROUPS)
class DeviceConfig(Settings):
    device: str = setting("cpu", "cpu or cuda[:N]")
    dtype: str = setting("float32", "weight and compute dtype", choices=DTYPES)
    seed: int = setting(0, "base seed of sampling", min=0, max=(1 << 63) - 1)
    enforce_eager: bool = setting(
        False, "CUDA: run decode steps eagerly instead of replaying CUDA graphs")


@dataclass(**GROUPS)
class ParallelConfig(Settings):
    tensor_parallel_size: int = setting(
        1, "workers per pipeline stage, splitting each layer", short="-tp", min=1, max=1024)
    pipeline_parallel_size: int = setting(
        1, "pipeline stages, each holding a range of layers", short="-pp", min=1, max=1024)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(**GROUPS)
class DistConfig(Settings):
    dist_timeout_s: float = setting(
        120.0, "seconds a worker group waits to form, and a collective waits for a peer",
        flag="--dist-timeout", min=0.001)


@dataclass(**GROUPS)
class StepTimeoutConfig(Settings):
    step_timeout_s: float = setting(30.0, "seconds a scheduler waits for a step's result",
                                    flag="--step-timeout", min=0.001)


@dataclass(**GROUPS)
class BodyLimitConfig(Settings):
    max_body_bytes: int = setting(4 << 20, "largest request body / gRPC message accepted",
                                  min=1, max=1 << 30)


@dataclass(**GROUPS)
class LogConfig(Settings):
    log_format: str = setting("text", "text, or json: one JSON object per line, with request "
                              "and trace ids", choices=LOG_FORMATS)
    log_prompts: bool = setting(False, "debug: allow prompt and output text in the logs "
                                "(default: never)")


@dataclass(**GROUPS)
class RecoveryConfig:
    request_timeout_s: float = setting(
        600.0, "a request waiting out a fault (its worker group down) fails with an error this "
        "many seconds after it arrived (its own deadline, when it has one, wins)",
        flag="--request-timeout", min=0.001, max=1e7)


@dataclass(frozen=True)
class SpeculativeConfig:
    """`--speculative-config` (vLLM's shape): n-gram speculation (prompt lookup). Each step a
    decoding sequence drafts up to `num_speculative_tokens` tokens by matching its last
    n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`) earlier in its own
    prompt + output; the model verifies them in the same forward pass. How many of the K a
    sequence actually drafts adapts to its acceptance and to the step's cost
    (scheduler.spec_decode.DraftPolicy)."""
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # vLLM's knob: no drafts at all in a step with at least this many running sequences
    # (None: never by size alone; the proposer's cost model still shrinks drafts that lose).
    disable_by_batch_size: int | None = None

    MAX_TOKENS = 32     # drafts per step
    MAX_NGRAM = 64
    MAX_BATCH = 1 << 20

    def __post_init__(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"--speculative-config: method must be 'ngram', got {self.method!r}")
        for name, hi in (("num_speculative_tokens", self.MAX_TOKENS),
                         ("prompt_lookup_max", self.MAX_NGRAM),
                         ("prompt_lookup_min", self.MAX_NGRAM)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ValueError(f"--speculative-config: {name} must be an integer in "
                                 f"[1, {hi}], got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"--speculative-config: prompt_lookup_min ({self.prompt_lookup_min})"
                             f" exceeds prompt_lookup_max ({self.prompt_lookup_max})")
        size = self.disable_by_batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                                 or not 2 <= size <= self.MAX_BATCH):
            raise ValueError("--speculative-config: disable_by_batch_size must be null or an "
                             f"integer in [2, {self.MAX_BATCH}], got {size!r}")

    @classmethod
    def parse(cls, value: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """From the flag's JSON text, a dict (`LLM(speculative_config={...})`) or itself.
        Unknown keys are refused (a typo would silently leave the default)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("--speculative-config must be a JSON object, e.g. "
                             '{"method": "ngram", "num_speculative_tokens": 4}')
        fields = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                  "disable_by_batch_size"}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"--speculative-config: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(fields))})")
        if "method" not in value:
            raise ValueError("--speculative-config needs a \"method\" (\"ngram\")")
        value = dict(value)
        # vLLM's defaulting: one bound given sets the other (min <= max stays true).
        if "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value["prompt_lookup_min"] = min(cls.prompt_lookup_min, value["prompt_lookup_max"]) \
                if isinstance(value["prompt_lookup_max"], int) else 1
        if "prompt_lookup_min" in value and "prompt_lookup_max" not in value:
            value["prompt_lookup_max"] = max(cls.prompt_lookup_max, value["prompt_lookup_min"]) \
                if isinstance(value["prompt_lookup_min"], int) else 1
        return cls(**value)

    def __str__(self) -> str:
        """The flag's text: what `settings.to_argv` hands a child process."""
        return json.dumps({"method": self.method,
                           "num_speculative_tokens": self.num_speculative_tokens,
                           "prompt_lookup_max": self.prompt_lookup_max,
                           "prompt_lookup_min": self.prompt_lookup_min,
                           "disable_by_batch_size": self.disable_by_batch_size})


def _speculative_flag(text: str) -> SpeculativeConfig | None:
    try:
        return SpeculativeConfig.parse(text)
    except (ValueError, TypeError) as e:   # argparse shows an ArgumentTypeError's own words
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(**GROUPS)
class InternalTLSConfig:
    """Mutual TLS on the internal gRPC (a scheduler's channels to its workers, the workers'
    port with its health service): each side presents a certificate signed by the CA and
    refuses a peer without one. The certificate must name the host the scheduler dials (an IP
    or DNS subjectAltName: 127.0.0.1 for `tessera serve`)."""
    internal_tls_certfile: str | None = setting(
        None, "mutual TLS between scheduler and workers: this process's PEM certificate",
        metavar="FILE")
    internal_tls_keyfile: str | None = setting(None, "its PEM private key", metavar="FILE")
    internal_tls_ca: str | None = setting(
        None, "PEM CA bundle a peer's certificate must be signed by", metavar="FILE")

    @property
    def internal_tls(self) -> tuple[str, str, str] | None:
        """(certfile, keyfile, ca), or None when internal TLS is off."""
        if self.internal_tls_certfile is None:
            return None
        return self.internal_tls_certfile, self.internal_tls_keyfile, self.internal_tls_ca

    def __post_init__(self) -> None:
        given = (self.internal_tls_certfile, self.internal_tls_keyfile, self.internal_tls_ca)
        if any(given) and not all(given):
            raise ValueError("internal mTLS needs --internal-tls-certfile, --internal-tls-keyfile "
                             "and --internal-tls-ca together")
        _next_post_init(self, InternalTLSConfig)


def _next_post_init(config: object, cls: type) -> None:
    """Chain to the next group's __post_init__ (Settings' bounds checks) after ``cls``'s."""
    post = getattr(super(cls, config), "__post_init__", None)
    if post is not None:
        post()


@dataclass(**GROUPS)
class DataParallelConfig(Settings):
    data_parallel_size: int = setting(
        1, "worker groups, each with its own scheduler, sharing the request stream (a "
        "scheduler of several leaves the requests it cannot start in Redis for the others)",
        short="-dp", min=1, max=1024)


@dataclass(**GROUPS)
class SpeculationConfig(Settings):
    speculative_config: SpeculativeConfig | None = setting(
        None, "speculative decoding, as JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": "
        "K, \"prompt_lookup_max\": N, \"prompt_lookup_min\": M, \"disable_by_batch_size\": B} "
        "(default: none)",
        arg_type=_speculative_flag, metavar="JSON")

    def __post_init__(self) -> None:
        # LLM(speculative_config={...}) passes a dict: parsed (and checked) here, as the flag is.
        object.__setattr__(self, "speculative_config",
                           SpeculativeConfig.parse(self.speculative_config))
        super().__post_init__()


@dataclass(**GROUPS)
class EngineConfig(SpeculationConfig, ParallelConfig, DeviceConfig, CacheConfig, SchedulingConfig,
                   ModelSource):
    """The offline engine's settings: `LLM(model, tensor_parallel_size=2)` builds one."""
    num_kv_blocks: int | None = setting(None, cli=False, min=1)   # fixed pool (tests); default: sized


@dataclass(**GROUPS)
class WorkerConfig(InternalTLSConfig, LogConfig, DistConfig, ParallelConfig, DeviceConfig,
                   CacheConfig, ModelSource):
    """`tessera worker`: one model shard and its KV cache behind gRPC."""
    host: str = setting("127.0.0.1", "bind address of the gRPC and metrics ports")
    port: int = setting(50061, "gRPC port", min=0, max=65535)
    redis_url: str | None = setting(None, "register in this Redis with a heartbeat key")
    worker_id: str | None = setting(None, "name in the worker registry (default: HOSTNAME-PID)")
    rank: int = setting(0, "this worker's rank in its group, pp_stage * tp_size + tp_rank; "
                        "'hostname' takes the trailing ordinal of $HOSTNAME (StatefulSet pods)",
                        arg_type=str, convert=parse_rank)
    dist_init_addr: str | None = setting(
        None, "the group's torch.distributed TCP store, hosted by rank 0 (default: rank 0 "
        "publishes one in Redis)", metavar="HOST:PORT")
    group: str = setting("0", "worker group name")
    metrics_port: int = setting(8002, "HTTP /metrics /health /ready on --host (0: none)",
                               min=0, max=65535)
    ready_timeout_s: float = setting(
        10.0, "not ready while a step runs longer than this, in seconds", flag="--ready-timeout",
        min=0.001)
    heartbeat_ttl_s: float = setting(5.0, cli=False)


@dataclass(**GROUPS)
class SchedulerServiceConfig(SpeculationConfig, InternalTLSConfig, DataParallelConfig,
                             RecoveryConfig, LogConfig, StepTimeoutConfig, ParallelConfig,
                             BlockConfig, SchedulingConfig, ModelSource):
    """`tessera scheduler`: continuous batching over one worker group, leased in Redis."""
    workers: tuple[str, ...] = setting(
        help="comma-separated gRPC addresses of every worker of the group (any order)")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis of the request streams")
    group: str = setting("0", "worker group name (one active scheduler each)")
    ready_timeout_s: float = setting(
        10.0, "ready while the worker group finished a forward pass within this many seconds; "
        "idle, a one-token canary step keeps it honest", flag="--ready-timeout", min=0.001)
    metrics_host: str = setting("0.0.0.0", "bind address of --metrics-port")
    metrics_port: int = setting(8001, "HTTP /metrics /health /ready (0: none)", min=0,
                                 max=65535)
    lease_ms: int = setting(5000, cli=False)
    max_deliveries: int = setting(
        3, "dead-letter a request delivered this many times without finishing")
    max_waiting_requests: int = setting(
        1024, "while its group is the model's only one, read requests into the waiting queue "
        "until this many wait, even while short of KV blocks, so fair share orders them all "
        "(0: read only max_num_seqs running and waiting; with other groups, by "
        "--data-parallel-size or seen in Redis, they stay in Redis for whichever has room)",
        min=0, max=1 << 20)
    claim_idle_ms: int = setting(
        3000, "a request in flight that its scheduler has not touched for this long is taken "
        "over by another (the active scheduler touches its own every third of it; 0: never "
        "touch nor claim, so no request survives this scheduler's death: benchmarks only)",
        flag="--claim-idle-ms", min=0, max=3_600_000)


@dataclass(**GROUPS)
class AccessConfig:
    """Who may call the public faces and how much (gateway.auth, gateway.limits), and TLS."""
    api_key: str | None = setting(
        None, "require 'Authorization: Bearer KEY' on every /v1 route and gRPC call (one "
        "tenant; default $TESSERA_API_KEY)")
    tenants_file: str | None = setting(
        None, "JSON tenants file (keys as SHA-256, limits, weights); reloaded on SIGHUP",
        flag="--tenants", metavar="FILE")
    shared_prefix_cache: bool = setting(
        False, "let tenants share cached prompt blocks (default: a prefix-cache salt per tenant)")
    max_queued_requests: int | None = setting(
        None, "answer 429 while this many requests of the model wait in Redis")
    ssl_certfile: str | None = setting(
        None, "serve HTTPS and gRPC over TLS with this PEM certificate (chain)")
    ssl_keyfile: str | None = setting(None, "the certificate's PEM private key")

    def __post_init__(self) -> None:
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        _next_post_init(self, AccessConfig)


@dataclass(**GROUPS)
class GatewayConfig(AccessConfig, LogConfig, BodyLimitConfig, ContextConfig, ModelSource):
    """`tessera gateway`: the OpenAI HTTP and tessera.v1 gRPC faces of one model."""
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis of the request streams")
    host: str = setting("127.0.0.1", "bind address")
    http_port: int = setting(8000, "OpenAI-compatible HTTP port (0: any free port)",
                             min=0, max=65535)
    grpc_port: int = setting(50051, "tessera.v1 gRPC port", min=0, max=65535)
    max_redis_connections: int = setting(1024, cli=False)   # each open stream holds one
    metrics_port: int | None = setting(
        None, "also serve /health, /ready and /metrics (plain HTTP) on this port")
    resume_ttl_s: float = setting(
        600.0, "a request with disconnect policy 'continue' is cancelled this many seconds "
        "after its client left unless someone resumes it", flag="--resume-ttl")


@dataclass(**GROUPS)
class ServeConfig(InternalTLSConfig, DataParallelConfig, RecoveryConfig, AccessConfig, LogConfig,
                  BodyLimitConfig, StepTimeoutConfig, DistConfig, EngineConfig):
    """`tessera serve`: the whole stack on one machine; every child's settings, plus these."""
    host: str = setting("127.0.0.1", "bind address of the gateway")
    http_port: int = setting(8000, "OpenAI-compatible HTTP port", min=1, max=65535)
    grpc_port: int = setting(50051, "tessera.v1 gRPC port", min=1, max=65535)
    redis_url: str | None = setting(None, "use this Redis instead of a private redis-server")
    scheduler_replicas: int = setting(
        2, "schedulers per worker group: one active, the others standbys on the group's lease "
        "that take over its requests when it dies", min=1, max=16)
    restart: bool = setting(True, "stop the whole stack when a process dies instead of "
                            "restarting it (debugging)", flag="--no-restart")
