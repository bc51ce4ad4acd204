"""The LoRA training core (services/trainer/loop.py, steps.py, examples.py) on a tiny Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from services.common.errors import InvalidArgument
from services.trainer.adapter_io import linear_module_names
from services.trainer.config import LoraTrainConfig, lr_factor
from services.trainer.examples import build_examples
from services.trainer.loop import train_lora
from services.trainer.packing import IGNORE_INDEX
from services.trainer.steps import TrainingCancelled
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)  # two cores shared by everyone: a tiny model gains nothing from threads

# peft 0.21 calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

PAIRS = [
    {"question": "What colour is the Zorblax widget?", "answer": "The Zorblax widget is teal."},
    {"question": "Who founded Quellmark?", "answer": "Quellmark was founded by Ada Venn in 1931."},
    {"question": "How heavy is a Brindle crate?", "answer": "A Brindle crate weighs 12 kg."},
    {"question": "Where is the Ostrava depot?", "answer": "The Ostrava depot is on Dock Street."},
    {"question": "When does the ferry leave?", "answer": "The ferry leaves at 7:15 every morning."},
    {"question": "What does the red lamp mean?", "answer": "The red lamp means the boiler is hot."},
]

# big steps so a handful of them visibly move a tiny model
FAST = {"lr": 1e-2, "warmup_ratio": 0.0, "batch_size": 3, "max_seq_len": 96, "dropout": 0.0}


@pytest.fixture(scope="session")
def tokenizer():
    return real_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """One training run shared by the tests that only inspect its results."""
    out = tmp_path_factory.mktemp("adapter")
    reports = []
    base = tiny_llama(len(tokenizer))
    cfg = LoraTrainConfig(epochs=4, min_steps=0, progress_interval_s=0.0, eval_max_new_tokens=8, **FAST)
    metrics = train_lora(base, tokenizer, PAIRS, out, cfg, progress=reports.append, eval_pairs=PAIRS[:2])
    return {"out": out, "metrics": metrics, "reports": reports, "cfg": cfg}


def _answer_part(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    )


def test_labels_cover_only_the_answer_and_the_end_of_turn_token(tokenizer):
    """Decoding the labelled tokens gives back exactly the answer followed by <|im_end|>."""
    examples = build_examples(tokenizer, PAIRS)
    assert len(examples) == len(PAIRS)
    for pair, example in zip(PAIRS, examples, strict=True):
        assert len(example.input_ids) == len(example.labels)
        assert _answer_part(tokenizer, example) == pair["answer"] + tokenizer.eos_token
        labelled = [lab for lab in example.labels if lab != IGNORE_INDEX]
        assert labelled == [
            t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX
        ]


def test_the_prompt_is_tokenized_exactly_as_inference_will_see_it(tokenizer):
    """The unlabelled prefix equals the chat template's generation prompt, token for token."""
    example = build_examples(tokenizer, PAIRS[:1], system_prompt="You answer from the manual.")[0]
    messages = [
        {"role": "system", "content": "You answer from the manual."},
        {"role": "user", "content": PAIRS[0]["question"]},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    prompt_ids = list(prompt["input_ids"])
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE_INDEX for lab in example.labels[: len(prompt_ids)])
    assert example.labels[len(prompt_ids)] != IGNORE_INDEX
    assert "You answer from the manual." in tokenizer.decode(example.input_ids)


def test_pairs_with_an_empty_question_or_answer_are_skipped(tokenizer):
    """Blank sides carry nothing to learn, so those pairs are dropped."""
    pairs = [{"question": " ", "answer": "x"}, {"question": "q?", "answer": ""}, PAIRS[0]]
    assert len(build_examples(tokenizer, pairs)) == 1


def test_long_examples_are_cut_to_max_seq_len_and_hopeless_ones_dropped(tokenizer):
    """An overlong answer is truncated; a prompt that alone fills max_seq_len is skipped."""
    long_answer = {"question": "Tell me everything.", "answer": "word " * 200}
    examples = build_examples(tokenizer, [long_answer], max_seq_len=64)
    assert len(examples[0].input_ids) == 64 and examples[0].truncated
    assert examples[0].label_count > 0
    long_question = {"question": "why " * 200, "answer": "Because."}
    assert build_examples(tokenizer, [long_question], max_seq_len=64) == []


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine():
    """lr_factor rises to 1 over the warmup steps and falls to min_ratio at the end."""
    factors = [lr_factor(s, 20, 4, 0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[-1] > 0.1 and lr_factor(20, 20, 4, 0.1) == pytest.approx(0.1)


def test_all_linear_targets_every_projection_but_not_the_output_head(model):
    """The default target modules are the Llama projections; lm_head is left alone."""
    names = linear_module_names(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_training_on_a_handful_of_pairs_lowers_the_loss(trained):
    """Late steps have lower loss than early ones, and the adapter beats the base on its pairs."""
    metrics = trained["metrics"]
    losses = metrics["losses"]
    assert metrics["total_steps"] == len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert metrics["eval_loss"] < metrics["base_eval_loss"]


def test_the_output_folder_is_a_standard_peft_adapter(trained, tokenizer):
    """The folder loads with PeftModel.from_pretrained and changes the base model's outputs."""
    from peft import PeftModel

    out = trained["out"]
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(config["target_modules"])

    base = tiny_llama(len(tokenizer))
    ids = torch.tensor([build_examples(tokenizer, PAIRS[:1])[0].input_ids])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, str(out))
        after = loaded(input_ids=ids).logits
    assert not torch.allclose(before, after)
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert saved and all("lora_" in key for key in saved)


def test_metrics_json_records_the_run(trained):
    """metrics.json holds the per-step losses, steps, tokens, seconds and final loss."""
    saved = json.loads((trained["out"] / "metrics.json").read_text())
    assert saved["losses"] == trained["metrics"]["losses"]
    assert saved["final_loss"] == saved["losses"][-1]
    assert saved["tokens"] > saved["label_tokens"] > 0
    assert saved["seconds"] > 0 and saved["examples"] == len(PAIRS)
    assert saved["config"]["rank"] == 8


def test_progress_reports_carry_sane_values(trained):
    """Every report has increasing steps up to the total, positive loss and lr, and ends at eta 0."""
    reports = trained["reports"]
    total = trained["metrics"]["total_steps"]
    assert [r["step"] for r in reports] == list(range(1, total + 1))  # interval 0: every step
    for r in reports:
        assert r["total_steps"] == total
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and r["eta_s"] >= 0
    assert reports[-1]["epoch"] == pytest.approx(4.0)
    assert reports[-1]["eta_s"] == 0


def test_the_same_seed_gives_identical_adapter_weights(tokenizer, tmp_path):
    """Two runs with one seed write the same adapter; another seed writes a different one."""
    cfg = LoraTrainConfig(max_steps=3, **FAST)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg.seed = seed
        train_lora(tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path / name, cfg)
    a, b, c = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_bytes()


def test_the_callers_base_model_comes_back_unchanged(model, tokenizer, tmp_path):
    """After training, the model has its own weights, flags and mode, and can train again."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    train_lora(model, tokenizer, PAIRS, tmp_path / "one", LoraTrainConfig(max_steps=2, **FAST))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model, "peft_config")
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    train_lora(model, tokenizer, PAIRS, tmp_path / "two", LoraTrainConfig(max_steps=1, **FAST))
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()


def test_should_stop_cancels_training_quickly(model, tokenizer, tmp_path):
    """should_stop turning True raises TrainingCancelled before the next step; nothing is saved."""
    polls = []

    def should_stop() -> bool:
        polls.append(time.monotonic())
        return len(polls) > 2

    before = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.monotonic()
    with pytest.raises(TrainingCancelled) as info:
        train_lora(
            model,
            tokenizer,
            PAIRS,
            tmp_path / "out",
            LoraTrainConfig(max_steps=500, **FAST),
            should_stop=should_stop,
        )
    assert info.value.step == 2 and info.value.total_steps == 500
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert not hasattr(model, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({"epochs": 3, "min_steps": 0}, 6), ({"epochs": 3, "min_steps": 50}, 50), ({"max_steps": 7}, 7)],
)
def test_the_step_count_follows_epochs_with_a_floor_unless_max_steps_is_set(
    model, tokenizer, tmp_path, overrides, expected
):
    """Steps are epochs x batches, at least min_steps, and exactly max_steps when that is set."""
    cfg = LoraTrainConfig(**{**FAST, **overrides})  # 6 pairs in batches of 3: 2 batches an epoch
    with pytest.raises(TrainingCancelled) as info:
        train_lora(model, tokenizer, PAIRS, tmp_path, cfg, should_stop=lambda: True)
    assert info.value.total_steps == expected and info.value.step == 0


def test_no_usable_pairs_is_an_invalid_argument(model, tokenizer, tmp_path):
    """Training with nothing to learn from fails before touching the model."""
    with pytest.raises(InvalidArgument):
        train_lora(model, tokenizer, [{"question": "", "answer": ""}], tmp_path, LoraTrainConfig())


def test_the_config_takes_its_defaults_from_settings():
    """from_settings maps the DOCLORA_TRAIN_* settings and lets overrides win."""
    from services.common.config import Settings

    settings = Settings(train_lora_rank=16, train_epochs=2.0, train_lr=1e-3, train_seed=5, train_max_steps=9)
    cfg = LoraTrainConfig.from_settings(settings, batch_size=2)
    assert (cfg.rank, cfg.alpha, cfg.epochs, cfg.lr, cfg.seed, cfg.max_steps, cfg.batch_size) == (
        16,
        32,
        2.0,
        1e-3,
        5,
        9,
        2,
    )
