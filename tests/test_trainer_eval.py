"""Held-out evaluation of base vs adapter (services/trainer/evaluate.py) and its wiring into
train_lora. The proof that an adapter beats its base model uses the real default model and is
marked slow."""

from __future__ import annotations

import json
import time

import pytest
import torch

from services.trainer.config import LoraTrainConfig
from services.trainer.evaluate import (
    exact_match,
    generate_answers,
    normalize_answer,
    score,
    split_by_chunk,
    token_f1,
)
from services.trainer.loop import train_lora
from tests.test_lora import FAST, PAIRS
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


def test_answers_are_normalised_before_they_are_compared():
    """Case, punctuation, articles and spacing do not count."""
    assert normalize_answer("  The Zorblax widget is TEAL! ") == "zorblax widget is teal"
    assert exact_match("the zorblax widget is teal", "The Zorblax widget is teal.") == 1.0
    assert exact_match("It is teal.", "The Zorblax widget is teal.") == 0.0


def test_token_f1_balances_precision_and_recall():
    """F1 is 1 for the same tokens, 0 for none shared, and the harmonic mean in between."""
    assert token_f1("Ada Venn", "Ada Venn") == 1.0
    assert token_f1("Bob", "Ada Venn") == 0.0
    # 2 shared tokens; precision 2/4, recall 2/2
    assert token_f1("Ada Venn founded it", "Ada Venn") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # repeated tokens counted as a multiset


def test_scores_are_means_over_pairs():
    f1, em = score(["Ada Venn", "blue"], ["Ada Venn", "teal"])
    assert (f1, em) == (0.5, 0.5)


def test_held_out_pairs_are_whole_chunks_chosen_by_the_seed():
    """No chunk is on both sides; about the fraction asked for is held out; one seed, one split."""
    pairs = [
        {"pair_id": f"p{i}", "chunk_id": f"c{i // 3}", "question": f"q{i}", "answer": "a"} for i in range(30)
    ]
    train, held = split_by_chunk(pairs, 0.2, seed=3)
    assert {p["chunk_id"] for p in train}.isdisjoint({p["chunk_id"] for p in held})
    assert len(held) == 6 and len(train) == 24
    assert split_by_chunk(pairs, 0.2, seed=3) == (train, held)
    assert split_by_chunk(pairs, 0.2, seed=4) != (train, held)
    one_chunk = [dict(p, chunk_id="c") for p in pairs]
    assert split_by_chunk(one_chunk, 0.5, seed=3) == (one_chunk, [])


def test_generation_is_greedy_and_batches_do_not_change_answers(tokenizer):
    """Left-padded batches give the answers each question gets alone (greedy, deterministic), in
    the order asked, though batches are formed by prompt length."""
    model = tiny_llama(len(tokenizer)).eval()
    side = tokenizer.padding_side
    questions = [p["question"] for p in PAIRS[:3]]
    questions += ["Why? " * 12 + questions[0], "Ok?", questions[1] + " Please say more." * 3]
    together = generate_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=2)
    alone = [generate_answers(model, tokenizer, [q], max_new_tokens=6)[0] for q in questions]
    assert together == alone and len(together) == 6
    assert tokenizer.padding_side == side  # put back as it was


def test_a_primed_answer_goes_on_from_its_prime_as_chat_does(tokenizer):
    """With a prime (the evidence chat quotes first) the prompt ends with it, in the assistant's
    turn, and the answer is the prime with the model's words after it: the greedy continuation of
    that very prompt. An empty prime is the plain question, batched beside primed ones."""
    from services.common.model import chat_prompt

    model = tiny_llama(len(tokenizer)).eval()
    question, prime = PAIRS[0]["question"], 'The document says: "The widget is teal." [1]\n\n'
    got = generate_answers(
        model, tokenizer, [question, question], max_new_tokens=5, batch_size=2, primes=[prime, ""]
    )
    assert got[1] == generate_answers(model, tokenizer, [question], max_new_tokens=5)[0]
    assert got[0].startswith(prime.strip()) and got[0] != got[1]
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": prime}]
    ids = tokenizer(chat_prompt(tokenizer, msgs), add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    tail = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert got[0] == (prime + tail).strip()


def test_a_stopped_generation_returns_the_leading_answers_only(tokenizer):
    """Stopped between batches, the answers returned are those of a leading run of the questions:
    batches go by length, so a later question may have been answered while an earlier one was not."""
    model = tiny_llama(len(tokenizer)).eval()
    long, short, tiny = "A much longer question than the others, about the manual? " * 3, "Short?", "Tiny?"

    def after_one_batch():
        polls = []
        return lambda: bool(polls.append(1)) or len(polls) > 1

    alone = {q: generate_answers(model, tokenizer, [q], max_new_tokens=4)[0] for q in (short, tiny)}
    # the two short ones go first; the long first question is never answered, so nothing leads
    kw = dict(max_new_tokens=4, batch_size=2)
    assert generate_answers(model, tokenizer, [long, short, tiny], should_stop=after_one_batch(), **kw) == []
    stopped = generate_answers(model, tokenizer, [short, tiny, long], should_stop=after_one_batch(), **kw)
    assert stopped == [alone[short], alone[tiny]]


def test_training_with_eval_pairs_scores_base_and_adapter_into_metrics_json(tokenizer, tmp_path):
    """eval_* keys reach the returned metrics and metrics.json, capped at eval_max_pairs."""
    cfg = LoraTrainConfig(max_steps=2, eval_max_pairs=2, eval_max_new_tokens=4, **FAST)
    metrics = train_lora(
        tiny_llama(len(tokenizer)), tokenizer, PAIRS[:4], tmp_path, cfg, eval_pairs=PAIRS[4:]
    )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("eval_base_f1", "eval_adapter_f1", "eval_base_em", "eval_adapter_em"):
        assert 0.0 <= metrics[key] <= 1.0 and saved[key] == metrics[key]
    assert metrics["eval_count"] == saved["eval_count"] == 2
    assert [s["question"] for s in saved["eval_samples"]] == [p["question"] for p in PAIRS[4:6]]
    assert metrics["eval_loss"] is not None and metrics["base_eval_loss"] is not None


def test_without_eval_pairs_there_is_no_eval(tokenizer, tmp_path):
    metrics = train_lora(
        tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path, LoraTrainConfig(max_steps=1, **FAST)
    )
    assert "eval_count" not in metrics and metrics["eval_loss"] is None


# A made-up catalogue: every fact is new to any model, and each chunk's facts are asked two ways.
_NAMES = [
    "Zorblax",
    "Quellmark",
    "Brindle",
    "Ostrava",
    "Pellucid",
    "Marrow",
    "Tindle",
    "Vexley",
    "Olfin",
    "Crandle",
    "Sorrel",
    "Wimbrel",
    "Gantry",
    "Plover",
    "Drumlin",
    "Fennick",
]
_COLOURS = ["teal", "amber", "violet", "crimson", "olive", "ochre", "indigo", "silver"]


def catalogue_pairs() -> list[dict]:
    pairs = []
    for i, name in enumerate(_NAMES):
        colour, kg = _COLOURS[i % len(_COLOURS)], 3 + (i * 7) % 20
        chunk = f"chunk-{i}"
        pairs.append(
            {
                "pair_id": f"{i}a",
                "chunk_id": chunk,
                "question": f"What colour is the {name} widget?",
                "answer": f"The {name} widget is {colour}.",
            }
        )
        pairs.append(
            {
                "pair_id": f"{i}b",
                "chunk_id": chunk,
                "question": f"How much does the {name} widget weigh?",
                "answer": f"The {name} widget weighs {kg} kg.",
            }
        )
    return pairs


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_adapter_beats_the_base_model_on_held_out_questions(tmp_path):
    """On the real default model, a short run on a synthetic catalogue answers the questions of
    chunks it never saw better than the base model does (token-F1), as the worker measures it."""
    from services.common.config import Settings
    from services.common.model import load_base_model

    model, tok = load_base_model(Settings.from_env(), for_training=True)
    train, held = split_by_chunk(catalogue_pairs(), 0.25, seed=1)
    started = time.monotonic()
    cfg = LoraTrainConfig(max_steps=20, batch_size=4, eval_max_new_tokens=24)
    metrics = train_lora(model, tok, train, tmp_path, cfg, eval_pairs=held)
    print(
        f"\n{len(train)} train / {metrics['eval_count']} held-out pairs, {metrics['total_steps']} steps in "
        f"{metrics['seconds']:.1f} s, eval {metrics['eval_seconds']:.1f} s, total {time.monotonic() - started:.1f} s: "
        f"F1 base {metrics['eval_base_f1']:.3f} adapter {metrics['eval_adapter_f1']:.3f}; "
        f"EM base {metrics['eval_base_em']:.3f} adapter {metrics['eval_adapter_em']:.3f}; "
        f"val loss base {metrics['base_eval_loss']:.3f} adapter {metrics['eval_loss']:.3f}"
    )
    for sample in metrics["eval_samples"][:3]:
        print(sample)
    assert metrics["eval_count"] == len(held) >= 6
    assert metrics["eval_adapter_f1"] > metrics["eval_base_f1"] + 0.2
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
