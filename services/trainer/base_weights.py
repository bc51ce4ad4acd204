"""The base model a training run borrows: as it is, or 4-bit (QLoRA) on a CUDA GPU.

QLoRA (Dettmers et al. 2023) keeps the frozen base weights in 4-bit NormalFloat with double
quantisation and trains the LoRA weights in full precision on top, computing in bf16: a 7B model
trains in about 6 GB of GPU memory instead of about 16. It needs bitsandbytes and CUDA; "auto"
uses it there for models whose weights take at least QLORA_MIN_WEIGHT_BYTES (a small model gains
nothing from it but slower matmuls). The adapter it writes is a standard PEFT folder, served on
the unquantised base model like any other.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)

CHOICES = ("auto", "4bit", "off")
# about 2B parameters in bf16: below this the base model fits a GPU comfortably as it is
QLORA_MIN_WEIGHT_BYTES = 4 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def choose_quantization(
    choice: str, device_type: str, has_bitsandbytes: bool, weight_bytes: int | None
) -> str | None:
    """ "nf4" to load the base model in 4 bits for this run, or None to load it as it is.

    choice "off": never; "4bit": whenever CUDA and bitsandbytes are there (else a warning and
    None: the run goes on unquantised); "auto": there, and only for a model whose weight files
    take at least QLORA_MIN_WEIGHT_BYTES (`weight_bytes` None = unknown, counted as large).
    """
    choice = (choice or "auto").strip().lower()
    if choice not in CHOICES:
        raise InvalidArgument(f"unknown training quantization {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "off":
        return None
    if device_type != "cuda" or not has_bitsandbytes:
        if choice == "4bit":
            log.warning(
                "4-bit training needs CUDA and bitsandbytes (%s); training the unquantised model",
                "no CUDA device" if device_type != "cuda" else "bitsandbytes is not installed",
            )
        return None
    if choice == "auto" and weight_bytes is not None and weight_bytes < QLORA_MIN_WEIGHT_BYTES:
        return None
    return "nf4"


def weight_bytes(folder: Path) -> int | None:
    """Bytes of a local model folder's weight files; None when it has none we recognise."""
    sizes = [f.stat().st_size for f in folder.glob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    return sum(sizes) if sizes else None


def load_training_model(settings: Any) -> tuple[Any, Any]:
    """(model, tokenizer) for a training run: 4-bit when `choose_quantization` says so, else the
    plain base model of `services.common.model.load_base_model`."""
    from services.common import model as model_module

    device, _ = model_module.pick_device(settings)
    choice = settings.train_quantization
    quant = None
    if device.type == "cuda" or str(choice).strip().lower() == "4bit":
        has_bnb = bitsandbytes_available()
        size = (
            weight_bytes(model_module.resolve_base_model(settings))
            if device.type == "cuda" and has_bnb
            else None
        )
        quant = choose_quantization(choice, device.type, has_bnb, size)
    if quant is None:
        return model_module.load_base_model(settings, for_training=True)
    return load_4bit(settings, device)


def load_4bit(settings: Any, device: Any) -> tuple[Any, Any]:
    """The base model with 4-bit NF4 weights (double quantisation, bf16 compute) on `device`."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from services.common import model as model_module

    path = model_module.resolve_base_model(settings)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    tokenizer = model_module.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map={"": device}, dtype=compute
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # norms to fp32 and frozen weights; gradient checkpointing is train_lora's own choice
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.train()
    log.info("loaded base model %s in 4-bit NF4 on %s (compute %s)", path, device, compute)
    return model, tokenizer
