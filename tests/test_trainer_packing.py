"""Sequence packing (services/trainer/packing.py) on a tiny Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.trainer.examples import build_examples, step_batches
from services.trainer.packing import (
    IGNORE_INDEX,
    attention_kind,
    block_causal_mask,
    pack,
    packed_loss,
    per_example_losses,
)
from tests.test_lora import PAIRS
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    return build_examples(tokenizer, PAIRS)


def _model(tokenizer, impl: str):
    model = tiny_llama(len(tokenizer))
    model.config._attn_implementation = impl
    return model.eval()


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_the_loss_it_has_alone(tokenizer, examples, impl, share_prefix):
    """Six examples in one row score exactly as each run on its own: no attention leaks between them."""
    model = _model(tokenizer, impl)
    kind = attention_kind(model)
    with torch.no_grad():
        packed = per_example_losses(model, pack(examples, kind=kind, share_prefix=share_prefix))
        alone = [per_example_losses(model, pack([e], kind=kind))[0] for e in examples]
    assert packed == pytest.approx(alone, abs=1e-5)


def test_without_the_block_mask_later_examples_see_earlier_ones(tokenizer, examples):
    """The check above can fail: plain causal attention over the row changes the later losses."""
    model = _model(tokenizer, "sdpa")
    batch = pack(examples, kind="bool", share_prefix=False)
    leaky = dataclasses.replace(batch, attention_mask=None, position_ids=torch.arange(batch.tokens)[None])
    with torch.no_grad():
        right, wrong = per_example_losses(model, batch), per_example_losses(model, leaky)
    assert right[0] == pytest.approx(wrong[0], abs=1e-5)  # the first example sees nothing before it
    assert max(abs(a - b) for a, b in zip(right[1:], wrong[1:], strict=True)) > 1e-4


def test_the_packed_loss_equals_the_padded_batch_loss_of_transformers(tokenizer, examples):
    """The step objective is unchanged: the token-weighted mean over answers of a padded batch."""
    model = _model(tokenizer, "sdpa")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    with torch.no_grad():
        padded = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        packed = float(packed_loss(model, pack(examples, kind="bool")))
    assert packed == pytest.approx(padded, abs=1e-5)


def test_a_packed_row_holds_only_real_tokens_and_restarts_positions(examples):
    """No padding: the row is the examples end to end, each counting positions from 0."""
    batch = pack(examples[:3], kind="bool", share_prefix=False)
    lengths = [len(e.input_ids) for e in examples[:3]]
    assert batch.tokens == sum(lengths)
    assert batch.input_ids[0].tolist() == [t for e in examples[:3] for t in e.input_ids]
    assert batch.position_ids[0].tolist() == [p for n in lengths for p in range(n)]
    assert batch.segments == [
        (0, lengths[0]),
        (lengths[0], lengths[0] + lengths[1]),
        (sum(lengths[:2]), sum(lengths)),
    ]


def test_only_answer_tokens_are_targets_and_never_across_examples(tokenizer, examples):
    """The targets decode to each answer and its end-of-turn token; no target is an example's first token."""
    batch = pack(examples, kind="bool")
    assert batch.prefix > 0
    starts = {start for start, _ in batch.segments}
    targets = batch.targets.tolist()
    assert sum(e.label_count for e in examples) == len(targets)
    assert not any(p + 1 in starts or p < batch.prefix for p in batch.loss_positions.tolist())
    text = tokenizer.decode(targets)
    assert text == "".join(p["answer"] + tokenizer.eos_token for p in PAIRS)


def test_the_shared_prompt_prefix_runs_once_and_examples_keep_their_positions(tokenizer, examples):
    """The system prompt and user header open the row once; each example goes on from there at the
    positions it has alone, and the row holds every other token exactly once."""
    batch = pack(examples, kind="bool")
    p = batch.prefix
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert tokenizer.decode(examples[0].input_ids[:p]) in prompt and p >= 10
    assert batch.input_ids[0, :p].tolist() == examples[0].input_ids[:p]
    assert batch.tokens == p + sum(len(e.input_ids) - p for e in examples)
    assert batch.example_tokens == sum(len(e.input_ids) for e in examples)
    for e, (start, end) in zip(examples, batch.segments, strict=True):
        assert batch.input_ids[0, start:end].tolist() == e.input_ids[p:]
        assert batch.position_ids[0, start:end].tolist() == list(range(p, len(e.input_ids)))
    mask = batch.attention_mask[0, 0]
    (s0, e0), (s1, _) = batch.segments[:2]
    assert bool(mask[s1, :p].all()) and not bool(mask[s1, s0:e0].any())


def test_sharing_the_prefix_leaves_the_loss_and_the_gradients_unchanged(tokenizer, examples):
    """The adapter gradients of a step are the same with the prefix shared or repeated per example."""
    from peft import LoraConfig, get_peft_model

    from services.trainer.adapter_io import linear_module_names

    base = _model(tokenizer, "sdpa")
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=linear_module_names(base), init_lora_weights=False)
    )
    grads = []
    for share in (True, False):
        model.zero_grad()
        loss = packed_loss(model, pack(examples, kind="bool", share_prefix=share))
        loss.backward()
        grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        grads.append((float(loss.detach()), grad))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_the_block_mask_is_causal_inside_examples_and_blank_between_them():
    """Lengths 2 and 3 give two lower triangles on the diagonal; the additive form is 0 / -inf."""
    allowed = block_causal_mask([2, 3], "bool")[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    additive = block_causal_mask([2, 3], "additive", torch.float32)[0, 0]
    assert torch.equal(additive == 0, torch.tensor(allowed, dtype=torch.bool))
    assert float(additive.min()) == torch.finfo(torch.float32).min
    shared = block_causal_mask([1, 2], "bool", prefix=2)[0, 0].int().tolist()
    assert shared == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ]


def test_flash_style_attention_gets_positions_and_no_mask(tokenizer, examples):
    """Implementations that read packing from position ids get no 4D mask."""
    model = tiny_llama(len(tokenizer))
    model.config._attn_implementation = "flash_attention_2"
    assert attention_kind(model) == "positions"
    assert pack(examples, kind="positions").attention_mask is None


def test_the_step_order_is_a_seeded_shuffle_per_epoch():
    """One seed, one order; each epoch visits every example once; another seed, another order."""

    def take(seed, n=6):
        it = step_batches(10, 4, seed)
        return [next(it) for _ in range(n)]

    first = take(3)
    assert first == take(3) and first != take(4)
    epoch = [i for b in first[:3] for i in b]
    assert sorted(epoch) == list(range(10)) and [len(b) for b in first[:3]] == [4, 4, 2]
