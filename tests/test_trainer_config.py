"""LoRA settings scaled to the data size and the precision choice (services/trainer/lora.py)."""

from __future__ import annotations

import pytest
import torch

import services.trainer.lora as lora
from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.trainer.lora import LoraTrainConfig, auto_config, autocast_dtype, train_lora
from tests.test_lora import FAST, PAIRS
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize(
    ("n", "rank", "dropout", "epochs"),
    [(6, 8, 0.0, 3.0), (199, 8, 0.0, 3.0), (500, 16, 0.0, 3.0), (5000, 32, 0.05, 2.0), (50_000, 64, 0.05, 1.0)],
)
def test_lora_defaults_grow_with_the_data(n, rank, dropout, epochs):
    """More pairs get a larger rank, dropout and fewer epochs; alpha is twice the rank."""
    cfg = auto_config(LoraTrainConfig(), n)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.epochs, cfg.min_steps) == (rank, 2 * rank, dropout, epochs, 50)


def test_every_automatic_setting_can_be_overridden():
    cfg = auto_config(LoraTrainConfig(rank=4, alpha=4, dropout=0.2, epochs=7.0, min_steps=0), 50_000)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.epochs, cfg.min_steps) == (4, 4, 0.2, 7.0, 0)
    assert auto_config(LoraTrainConfig(rank=32), 10).alpha == 64  # alpha follows an overridden rank


def test_settings_left_at_their_defaults_mean_automatic():
    """Default rank and epochs settings leave the choice to the data size; others are taken as set."""
    cfg = LoraTrainConfig.from_settings(Settings())
    assert cfg.rank is None and cfg.alpha is None and cfg.epochs is None and cfg.precision == "auto"
    cfg = LoraTrainConfig.from_settings(Settings(train_lora_rank=4), precision="fp32")
    assert (cfg.rank, cfg.alpha, cfg.precision) == (4, 8, "fp32")


def test_the_resolved_settings_are_recorded(tmp_path):
    """metrics["config"] holds the values the run used, not the Nones it was given."""
    tok = real_tokenizer()
    metrics = train_lora(tiny_llama(len(tok)), tok, PAIRS, tmp_path, LoraTrainConfig(max_steps=1, **FAST))
    assert metrics["config"]["rank"] == 8 and metrics["config"]["alpha"] == 16
    assert metrics["config"]["epochs"] == 3.0


def test_precision_auto_uses_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(lora, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None
    monkeypatch.setattr(lora, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("AUTO", torch.device("cuda")) is None  # a GPU model is loaded in bf16 already
    with pytest.raises(InvalidArgument):
        autocast_dtype("fp8", cpu)


def test_bf16_autocast_trains_fp32_adapters_with_a_loss_close_to_fp32(tmp_path):
    """Forced bf16 (emulated where the CPU lacks it) keeps fp32 adapter weights, and its losses
    follow the fp32 run's."""
    tok = real_tokenizer()
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = LoraTrainConfig(max_steps=4, precision=precision, **FAST)
        runs[precision] = train_lora(tiny_llama(len(tok)), tok, PAIRS, tmp_path / precision, cfg)
    assert runs["bf16"]["precision"] == "bf16-autocast" and runs["fp32"]["precision"] == "model-dtype"
    assert runs["bf16"]["dtype"] == "float32"
    assert runs["bf16"]["losses"] == pytest.approx(runs["fp32"]["losses"], rel=0.02)
