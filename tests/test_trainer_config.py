"""LoRA settings scaled to the data size and the precision choice (services/trainer/config.py)."""

from __future__ import annotations

import pytest
import torch

import services.trainer.config as train_config
from services.common.config import Settings
from services.common.errors import InvalidArgument
from services.trainer.config import LoraTrainConfig, auto_config, autocast_dtype
from services.trainer.loop import train_lora
from tests.test_lora import FAST, PAIRS
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.parametrize(
    ("n", "rank", "dropout", "epochs"),
    [
        (6, 8, 0.0, 3.0),
        (199, 8, 0.0, 3.0),
        (500, 16, 0.0, 3.0),
        (5000, 32, 0.05, 2.0),
        (50_000, 64, 0.05, 1.0),
    ],
)
def test_lora_defaults_grow_with_the_data(n, rank, dropout, epochs):
    """More pairs get a larger rank, dropout and fewer epochs; alpha is twice the rank."""
    cfg = auto_config(LoraTrainConfig(), n)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.epochs, cfg.min_steps) == (
        rank,
        2 * rank,
        dropout,
        epochs,
        50,
    )


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
    monkeypatch.setattr(train_config, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None
    monkeypatch.setattr(train_config, "cpu_has_native_bf16", lambda: False)
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


def test_gradient_checkpointing_is_automatic_on_cuda_for_large_models_and_can_be_forced():
    """ "auto" recomputes activations only on CUDA for a model of a billion parameters or more;
    "on" and "off" win everywhere."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    big, small = train_config.GRADIENT_CHECKPOINTING_MIN_PARAMS, 135_000_000
    assert train_config.use_gradient_checkpointing("auto", cuda, big)
    assert not train_config.use_gradient_checkpointing("auto", cuda, small)
    assert not train_config.use_gradient_checkpointing("auto", cpu, big)
    assert train_config.use_gradient_checkpointing("on", cpu, small)
    assert not train_config.use_gradient_checkpointing("off", cuda, big)
    with pytest.raises(InvalidArgument):
        train_config.use_gradient_checkpointing("sometimes", cpu, small)
    assert LoraTrainConfig.from_settings(Settings()).gradient_checkpointing == "auto"


def test_forced_gradient_checkpointing_gives_the_same_losses_and_is_undone_afterwards(tmp_path, monkeypatch):
    """With checkpointing on, layers run under torch's checkpoint and the losses equal the run
    without it (it only trades memory for compute); the metrics say it was on, and the borrowed
    model comes back without it."""
    import transformers.modeling_utils as modeling_utils

    calls = []
    real = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = real_tokenizer()
    runs, counted = {}, {}
    for choice in ("off", "on"):
        model = tiny_llama(len(tok))
        cfg = LoraTrainConfig(max_steps=3, gradient_checkpointing=choice, precision="fp32", **FAST)
        runs[choice] = train_lora(model, tok, PAIRS, tmp_path / choice, cfg)
        counted[choice] = len(calls)
        assert not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
        assert getattr(model, "_require_grads_hook", None) is None
    assert counted == {"off": 0, "on": 3 * 2}  # 3 steps, 2 layers
    assert runs["on"]["gradient_checkpointing"] is True and runs["off"]["gradient_checkpointing"] is False
    assert runs["on"]["losses"] == pytest.approx(runs["off"]["losses"], rel=1e-5)


@pytest.mark.parametrize(
    ("choice", "device", "has_bnb", "size", "expected"),
    [
        ("auto", "cuda", True, 16 * 1024**3, "nf4"),  # a 7B model on a GPU with bitsandbytes
        ("auto", "cuda", True, None, "nf4"),  # size unknown: counted as large
        ("auto", "cuda", True, 270 * 1024**2, None),  # the 135M default: not worth it
        ("auto", "cuda", False, 16 * 1024**3, None),  # no bitsandbytes
        ("auto", "cpu", True, 16 * 1024**3, None),  # no CUDA
        ("4bit", "cuda", True, 270 * 1024**2, "nf4"),  # forced: any size
        ("4bit", "cpu", False, None, None),  # forced but impossible: a warning, unquantised
        ("off", "cuda", True, 16 * 1024**3, None),
    ],
)
def test_qlora_is_chosen_only_with_cuda_and_bitsandbytes(choice, device, has_bnb, size, expected):
    """The choice logic only: this machine has no GPU, so the 4-bit load itself is not run here."""
    from services.trainer.base_weights import choose_quantization

    assert choose_quantization(choice, device, has_bnb, size) == expected


def test_an_unknown_quantization_choice_is_refused():
    from services.trainer.base_weights import choose_quantization

    with pytest.raises(InvalidArgument):
        choose_quantization("2bit", "cuda", True, None)


def test_on_a_cpu_the_training_model_is_the_plain_base_model(monkeypatch, caplog):
    """load_training_model falls back to load_base_model, with a warning, when 4-bit is forced
    where it cannot run."""
    from types import SimpleNamespace

    import services.common.model as model_module
    from services.trainer import base_weights

    calls = []
    monkeypatch.setattr(
        model_module,
        "load_base_model",
        lambda s, for_training=False: calls.append(for_training) or ("m", "t"),
    )
    settings = SimpleNamespace(device="cpu", train_quantization="4bit")
    assert base_weights.load_training_model(settings) == ("m", "t") and calls == [True]
    assert "4-bit training needs CUDA" in caplog.text


def test_a_time_budget_shortens_a_derived_run_after_timing_its_first_steps(tmp_path):
    """With steps derived from epochs, a budget far below one step's time ends the run at the
    minimum length, the progress reports that length, and the schedule still decays to its end."""
    tok = real_tokenizer()
    many = PAIRS * 10  # 60 examples, 3 epochs in batches of 3: 60 derived steps
    reports = []
    cfg = LoraTrainConfig(epochs=3, min_steps=0, time_budget_s=1e-6, progress_interval_s=0.0, **FAST)
    metrics = train_lora(tiny_llama(len(tok)), tok, many, tmp_path / "a", cfg, progress=reports.append)
    assert metrics["total_steps"] == metrics["steps"] == train_config.BUDGET_MIN_STEPS
    assert reports[-1]["step"] == reports[-1]["total_steps"] == train_config.BUDGET_MIN_STEPS
    assert reports[0]["total_steps"] == 60  # planned before the steps were timed
    assert reports[-1]["lr"] < 0.2 * FAST["lr"]  # the cosine ran to the shortened end


def test_a_time_budget_leaves_explicit_step_counts_and_roomy_budgets_alone(tmp_path):
    """max_steps is taken exactly whatever the budget; a budget with room changes nothing."""
    tok = real_tokenizer()
    exact = LoraTrainConfig(max_steps=14, time_budget_s=1e-6, **FAST)
    assert train_lora(tiny_llama(len(tok)), tok, PAIRS, tmp_path / "a", exact)["total_steps"] == 14
    roomy = LoraTrainConfig(epochs=4, min_steps=0, time_budget_s=3600.0, **FAST)
    assert train_lora(tiny_llama(len(tok)), tok, PAIRS, tmp_path / "b", roomy)["total_steps"] == 8
    assert LoraTrainConfig.from_settings(Settings(train_time_budget_s=99.0)).time_budget_s == 99.0


def test_a_run_shortened_by_its_budget_resumes_at_the_same_length(tmp_path):
    """A checkpoint of a shortened run resumes to that run's end, with its losses."""
    tok = real_tokenizer()
    many = PAIRS * 10
    cfg = LoraTrainConfig(epochs=3, min_steps=0, time_budget_s=1e-6, checkpoint_every_steps=6, **FAST)
    saved = []
    full = train_lora(tiny_llama(len(tok)), tok, many, tmp_path / "a", cfg, on_checkpoint=saved.append)
    assert [s["step"] for s in saved] == [6]
    resumed = train_lora(tiny_llama(len(tok)), tok, many, tmp_path / "b", cfg, resume=saved[0])
    assert resumed["resumed_from_step"] == 6 and resumed["total_steps"] == train_config.BUDGET_MIN_STEPS
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5)
