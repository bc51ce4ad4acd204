"""Base model resolution, device choice and loading (services/common/model.py).

Fast tests use a tiny Llama built from a config with the real SmolLM2 tokenizer; the one slow test
converts and loads the real bundled model.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.model import (
    BUNDLED_DIR,
    _ensure_converted,
    bundled_gguf_path,
    load_base_model,
    load_tokenizer,
    pick_device,
    resolve_base_model,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.cache
def real_tokenizer():
    """The SmolLM2 tokenizer: from the converted model cache when there (<1 s), else from the GGUF (~12 s)."""
    converted = Path(Settings.from_env().model_cache).expanduser() / BUNDLED_DIR
    if (converted / "tokenizer.json").is_file():
        return load_tokenizer(converted)
    from transformers import AutoTokenizer

    gguf = bundled_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def tiny_llama(vocab_size: int, seed: int = 0):
    """A 2-layer, 64-wide Llama with SmolLM2's vocabulary and special token ids: fast on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# a stack on `save_tiny_model`'s folder keeps the model work after training small too: two exam
# questions of eight tokens, no embeddings (the fault tests and the soak run it so)
TINY_STACK_ENV = {
    "DOCLORA_QAGEN_EXAM_PAIRS": "2",
    "DOCLORA_TRAIN_EVAL_MAX_PAIRS": "2",
    "DOCLORA_TRAIN_EVAL_MAX_NEW_TOKENS": "8",
    "DOCLORA_RETRIEVAL_EMBEDDINGS": "0",
}


def save_tiny_model(folder: Path) -> Path:
    """`tiny_llama` with the SmolLM2 tokenizer (and its chat template) saved as a model folder, for
    DOCLORA_BASE_MODEL: a stack trains and chats with it in well under a second a step."""
    tokenizer = real_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return real_tokenizer()


def test_the_bundled_gguf_is_found_without_importing_its_package():
    """The default model's GGUF file is located through the package spec."""
    path = bundled_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"


def test_an_existing_local_model_folder_is_returned_as_is(tmp_path):
    """A base_model that is a folder with config.json resolves to that folder."""
    (tmp_path / "config.json").write_text("{}")
    assert resolve_base_model(Settings(base_model=str(tmp_path), model_cache=str(tmp_path / "c"))) == tmp_path


def test_a_folder_without_config_is_rejected(tmp_path):
    """A folder that is not a transformers model is an invalid argument."""
    with pytest.raises(InvalidArgument, match="config.json"):
        resolve_base_model(Settings(base_model=str(tmp_path), model_cache=str(tmp_path / "c")))


def test_a_missing_local_path_is_not_found(tmp_path):
    """A path-like base_model that does not exist is reported as such."""
    with pytest.raises(NotFound, match="does not exist"):
        resolve_base_model(Settings(base_model=str(tmp_path / "nope"), model_cache=str(tmp_path)))


def test_a_hub_id_missing_from_the_cache_fails_clearly_without_downloading(tmp_path, monkeypatch):
    """An id not in the local HF cache raises NotFound that says how to fetch it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(base_model="doclora-tests/not-a-cached-model", model_cache=str(tmp_path))
    with pytest.raises(NotFound, match="never downloads"):
        resolve_base_model(settings)


def test_a_model_folder_inside_the_model_cache_is_found_by_name(tmp_path):
    """base_model 'org/name' finds model_cache/org/name before looking at the HF cache."""
    folder = tmp_path / "org" / "name"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_base_model(Settings(base_model="org/name", model_cache=str(tmp_path))) == folder


def test_racing_callers_convert_only_once_and_all_see_a_whole_folder(tmp_path):
    """Many threads asking for one conversion run it once, under the lock, and all get the folder."""
    target = tmp_path / "model"
    calls = []

    def convert(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.2)
        (tmp / "weights").write_text("w")
        (tmp / "config.json").write_text("{}")

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(_ensure_converted(target, convert))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 6
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "weights"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_conversion_leaves_nothing_behind_and_can_be_retried(tmp_path):
    """An error during conversion removes its temp folder; the next call converts again."""
    target = tmp_path / "model"

    def broken(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _ensure_converted(target, broken)
    assert not target.exists() and not list(tmp_path.glob(".tmp-*"))
    _ensure_converted(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (target / "config.json").is_file()


def test_leftovers_of_a_crashed_conversion_are_cleaned_up(tmp_path):
    """Temp folders from a crashed run are removed by the next conversion."""
    stale = tmp_path / ".tmp-model-abc123"
    stale.mkdir()
    _ensure_converted(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not stale.exists()


def test_a_converted_folder_is_readable_by_other_users(tmp_path):
    """The cache folder is not left with mkdtemp's owner-only permissions."""
    target = _ensure_converted(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    assert target.stat().st_mode & 0o777 == 0o755
    assert (target / "config.json").stat().st_mode & 0o777 == 0o644


def test_the_cpu_setting_gives_cpu_and_fp32():
    """device=cpu always means CPU with fp32 weights."""
    assert pick_device(Settings(device="cpu")) == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback")
def test_auto_falls_back_to_cpu_fp32_without_cuda():
    """device=auto on a machine without CUDA picks CPU fp32."""
    assert pick_device(Settings(device="auto")) == (torch.device("cpu"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_picks_cuda_with_bf16_when_present():
    """device=auto on a GPU host picks CUDA, bf16 where the GPU supports it."""
    device, dtype = pick_device(Settings(device="auto"))
    assert device.type == "cuda"
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_asking_for_cuda_without_a_gpu_fails_clearly():
    """device=cuda on a machine without CUDA is a failed precondition, not a silent CPU run."""
    with pytest.raises(FailedPrecondition, match="CUDA"):
        pick_device(Settings(device="cuda"))


def test_an_unknown_device_is_rejected():
    """Only auto, cpu and cuda are accepted."""
    with pytest.raises(InvalidArgument):
        pick_device(Settings(device="tpu"))


def test_a_local_model_loads_in_eval_mode_with_a_pad_token(tmp_path, tokenizer):
    """load_base_model returns an eval-mode fp32 CPU model and a tokenizer with a pad token."""
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    settings = Settings(base_model=str(tmp_path), model_cache=str(tmp_path / "cache"), device="cpu")
    model, tok = load_base_model(settings)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None and tok.chat_template
    train_model, _ = load_base_model(settings, for_training=True)
    assert train_model.training


@pytest.mark.slow
def test_the_real_default_model_converts_once_then_loads_fast_and_answers(tmp_path):
    """smollm2 converts from GGUF into an empty cache, loads again fast, and answers a question."""
    settings = Settings(model_cache=str(tmp_path), device="cpu")
    started = time.monotonic()
    model, tok = load_base_model(settings)
    first = time.monotonic() - started
    folder = tmp_path / BUNDLED_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    del model

    started = time.monotonic()
    model, tok = load_base_model(settings)
    second = time.monotonic() - started
    print(f"\nconversion + first load {first:.1f} s, second load {second:.2f} s")
    assert second < 10.0

    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    print(f"answer: {text!r}")
    assert text
    assert "Paris" in text
