"""The adapter's shape and files: which layers get LoRA (`linear_module_names`, `lora_config`),
reading a stored PEFT adapter to continue from (`read_adapter`, `load_init_adapter`), and writing
the trained one as a PEFT folder (`save_adapter`: adapter_config.json + adapter_model.safetensors,
byte-identical for one seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.trainer.config import LoraTrainConfig


@dataclass(frozen=True)
class InitAdapter:
    """A stored PEFT adapter a run starts from instead of freshly initialised LoRA weights."""

    rank: int
    alpha: float
    target_modules: list[str]
    weights: dict[str, torch.Tensor]
    digest: str  # sha256 of the weights file: part of the checkpoint fingerprint


def read_adapter(folder: str | Path) -> InitAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) to continue from."""
    import hashlib

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        data = (folder / "adapter_model.safetensors").read_bytes()
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"not a PEFT adapter folder: {exc}") from exc
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidArgument(f"can only continue from a LoRA adapter, not {config.get('peft_type')}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return InitAdapter(
        rank=int(config["r"]),
        alpha=float(config.get("lora_alpha") or config["r"]),
        target_modules=sorted(targets or []),
        weights=weights,
        digest=hashlib.sha256(data).hexdigest(),
    )


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted short names of the model's nn.Linear layers, the output head excepted.

    Resolving "all-linear" here rather than in peft keeps adapter_config.json short and readable.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        }
    )


def lora_config(cfg: LoraTrainConfig, model: torch.nn.Module) -> Any:
    """The peft LoraConfig of a run of the resolved `cfg` (see `config.auto_config`) on `model`."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=linear_module_names(model)
        if cfg.target_modules == "all-linear"
        else cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_init_adapter(peft_model: Any, init: InitAdapter) -> None:
    """Copy a stored adapter's weights into the freshly injected LoRA layers (same shape)."""
    from peft import set_peft_model_state_dict

    expected = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(peft_model, init.weights)
    except RuntimeError as exc:  # a size mismatch: another base model, or another rank
        raise InvalidArgument(f"the adapter to continue from does not fit this model: {exc}") from exc
    missing = expected & set(getattr(result, "missing_keys", ()) or ())
    if missing or getattr(result, "unexpected_keys", None):
        raise InvalidArgument(
            "the adapter to continue from does not fit this model: "
            f"{len(missing)} LoRA weights missing, {len(result.unexpected_keys or ())} unknown"
        )


def save_adapter(peft_model: Any, out: Path) -> None:
    """Write the adapter as a PEFT folder in `out` (created if need be)."""
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    _sort_target_modules(out / "adapter_config.json")


def _sort_target_modules(path: Path) -> None:
    """peft stores target_modules as a set, so its order varies with the hash seed; sort it so one
    seed gives one byte-identical adapter folder."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))
