"""A finished run's metrics (see loop.train_lora) as the session's TrainStats. Pure: no I/O."""

from __future__ import annotations

from doclora.v1 import session_pb2


def precision_label(metrics: dict) -> str:
    """What TrainStats.precision shows: "bf16" (autocast or bf16 weights), "fp32", "fp16", or
    "nf4+bf16" style for a 4-bit base model with its compute dtype."""
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    compute = (
        "bf16" if metrics.get("precision") == "bf16-autocast" else dtype.get(metrics.get("dtype", ""), "")
    )
    quant = metrics.get("quantization")
    if quant:
        return f"{quant}+{compute}" if compute else str(quant)
    return compute or str(metrics.get("dtype", ""))


def train_stats(metrics: dict, seconds: float, started_from: str) -> session_pb2.TrainStats:
    """The session's TrainStats from a run's metrics (see loop.train_lora)."""
    stats = session_pb2.TrainStats(
        steps=int(metrics.get("steps", 0)),
        total_steps=int(metrics.get("total_steps", 0)),
        final_loss=float(metrics.get("final_loss", 0.0)),
        seconds=seconds,
        tokens=int(metrics.get("tokens", 0)),
        eval_count=int(metrics.get("eval_count") or 0),
        precision=precision_label(metrics),
        device=str(metrics.get("device", "")).split(":", 1)[0],
        started_from=started_from,
    )
    stats.eval_passages_count = int(metrics.get("eval_passages_count") or 0)
    for key in (
        "eval_base_f1", "eval_adapter_f1", "eval_base_em", "eval_adapter_em", "eval_loss",
        "eval_passages_base_f1", "eval_passages_adapter_f1", "eval_passages_base_em", "eval_passages_adapter_em",
    ):  # fmt: skip
        value = metrics.get(key)
        if value is not None and value == value:  # None or NaN: left unset
            setattr(stats, key, float(value))
    return stats
