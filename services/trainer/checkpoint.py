"""Resumable training state: what a checkpoint holds, how it is (de)serialised and matched to a run.

A checkpoint is one dict: the adapter's trainable tensors, the optimizer and scheduler states, the
step reached, the RNG states, the losses and token counts so far, and a fingerprint of the run
(tokenized examples + every setting that shapes the schedule). `train_lora` resumes only from a
state whose fingerprint matches its own run, so a checkpoint left by a run on other data or other
settings is ignored rather than mixed in. Under torch.distributed the number of processes is
part of the fingerprint (each step's batch is `batch_size` examples per process), so a job resumes
only on as many processes as it ran on and starts over on any other number; one state (rank 0's)
resumes every process, as they hold the same weights and draw their dropout per step. It travels
as one object (one atomic write: a reader never sees half of one), loaded with
`torch.load(weights_only=True)`, which runs no pickled code.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

VERSION = 1
STATE_FILE = "state.pt"

# LoraTrainConfig fields that change the arithmetic of a run; the rest (progress interval,
# checkpoint interval, eval sizes) may differ between an interrupted run and its resumption
SCHEDULE_FIELDS = (
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "lr",
    "warmup_ratio",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "batch_size",
    "max_seq_len",
    "seed",
    "system_prompt",
    "precision",
)


def fingerprint(examples: Sequence[Any], cfg: Mapping[str, Any], total_steps: int, model_id: str) -> str:
    """A hex digest naming one run: its tokenized data, schedule settings, step count and model."""
    h = hashlib.sha256()
    head = {k: cfg.get(k) for k in SCHEDULE_FIELDS}
    head.update(total_steps=total_steps, model=model_id, version=VERSION)
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    for e in examples:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


def to_bytes(state: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError("not a doclora training checkpoint of this version")
    return state
