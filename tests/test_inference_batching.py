"""Continuous batching in the chat engine: requests for different adapters decode in one forward per
step, join and leave between steps, and each gets exactly the answer it gets alone.

Fixtures (tiny random Llama, real tokenizer, random LoRA adapters, `generate` references) come from
test_engine.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import torch

from services.common.errors import ResourceExhausted
from services.inference import kv, packed
from services.inference.engine import ChatStats, GenerationParams
from services.inference.fastpath import LOGIT_TOLERANCE, logit_gap
from tests import test_engine as base
from tests.test_engine import CHAT, GREEDY, N, idle, wait_until

# test_engine's fixtures, shared by name (session-scoped ones are built again for this module)
_one_torch_thread = base._one_torch_thread
tokenizer = base.tokenizer
adapter_dirs = base.adapter_dirs
reference = base.reference
make_engine = base.make_engine

CHATS = [
    CHAT,
    [{"role": "user", "content": "Summarize the refund policy in one line."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who signs off on overtime, and where is the form kept?"},
        {"role": "assistant", "content": "Your manager, on the intranet."},
        {"role": "user", "content": "And for contractors?"},
    ],
]
LONG = 40  # tokens per answer in the mixed runs, so requests overlap for many steps


def run_alone(engine, jobs):
    """Each (chat, adapter) answered on its own, one after another."""
    return ["".join(engine.stream_chat(CHATS[c], a, GenerationParams(max_new_tokens=LONG))) for c, a in jobs]


def run_staggered(engine, jobs, join_steps):
    """Start job i in its own thread once the scheduler has run `join_steps[i]` decode steps."""
    answers: list[str | None] = [None] * len(jobs)
    started_at: list[int] = [-1] * len(jobs)

    def chat(i: int) -> None:
        c, a = jobs[i]
        answers[i] = "".join(engine.stream_chat(CHATS[c], a, GenerationParams(max_new_tokens=LONG)))

    threads = []
    for i, step in enumerate(join_steps):
        assert wait_until(lambda step=step: engine.scheduler.steps >= step), f"stalled before job {i}"
        started_at[i] = engine.scheduler.steps
        threads.append(threading.Thread(target=chat, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=60)
    return answers, started_at


def test_staggered_requests_over_two_adapters_and_the_base_each_get_their_answer_alone(
    make_engine, reference
):
    """Five chats (adapters a, b and the base, three prompts) join a running batch at different steps;
    every answer equals that chat run alone, and the batch really held several requests at once."""
    jobs = [(0, "a"), (1, None), (2, "b"), (0, None), (1, "a")]
    # a small prefill chunk makes the longer prompts prefill over several steps, between decode steps
    engine, _ = make_engine(capacity=2, prefill_chunk=16)
    alone = run_alone(engine, jobs)
    assert alone[0].startswith(reference["a"]) and alone[3].startswith(reference[None])
    steps_alone = engine.scheduler.steps

    engine.scheduler.max_rows_seen = 0
    answers, started_at = run_staggered(engine, jobs, [steps_alone + k for k in (0, 0, 4, 9, 15)])
    assert answers == alone
    assert engine.scheduler.max_rows_seen >= 3
    # batching saved steps: five 40-token answers in fewer decode steps than run one by one
    assert engine.scheduler.steps - steps_alone < steps_alone * 0.7
    assert started_at[-1] > started_at[0] and idle(engine)


@pytest.mark.parametrize("int8", [False, True])
def test_a_mixed_batch_matches_each_model_alone_and_pefts_own_mixed_batch(make_engine, tokenizer, int8):
    """One decode forward over rows for a, b and the base (the lean LoRA layers) gives each row the
    logits it gets alone (bit for bit with int8 or packed fp32 weights; MKL's fp32 kernels vary with
    the row count), and in fp32 the logits PEFT's own `adapter_names` path gives (within the packed
    step's tolerance)."""
    engine, _ = make_engine(capacity=2, int8=int8)
    for adapter in ("a", "b"):  # load both adapters
        list(engine.stream_chat(CHAT, adapter, GenerationParams(max_new_tokens=1)))
    cache = engine.adapters
    names = [cache._names["a"], "__base__", cache._names["b"]]
    prompts = [tokenizer(f"Question {i}: what is in chapter {i}?")["input_ids"] for i in range(3)]

    def forward(rows: list[kv.RequestKV], idx: list[int], ids: list[list[int]], peft: bool) -> torch.Tensor:
        inputs = dict(
            input_ids=torch.tensor(ids),
            position_ids=torch.tensor([list(range(r.length, r.length + len(ids[0]))) for r in rows]),
            cache=kv.BatchKV(rows), logits_to_keep=1,
        )  # fmt: skip
        with torch.inference_mode():
            if peft:
                logits = cache.forward_model()(**inputs, adapter_names=[names[i] for i in idx]).logits
            else:
                logits = cache.run([names[i] for i in idx], **inputs)
        kv.BatchKV(rows).advance(len(ids[0]))
        return logits[:, -1]

    def decode(idx: list[int], peft: bool = False) -> torch.Tensor:
        rows = [kv.RequestKV(len(prompts[i]) + 1) for i in idx]
        for i, row in zip(idx, rows, strict=True):
            forward([row], [i], [prompts[i]], peft)
        return forward(rows, idx, [[7] for _ in idx], peft)

    together = decode([0, 2, 1, 0])
    exact = int8 or (engine.packed_bytes > 0 and packed.rows_independent())
    if not int8:  # PEFT's forward: the model's own kernels (packed fp32 sums in another order)
        ref = decode([0, 2, 1, 0], peft=True)
        assert logit_gap(together, ref) < (LOGIT_TOLERANCE if engine.packed_bytes else 1e-30)
    for row, i in enumerate([0, 2, 1, 0]):
        alone = decode([i])[0]
        if exact:
            assert torch.equal(together[row], alone), row
        else:
            assert logit_gap(together[row], alone) < 1e-5, (row, logit_gap(together[row], alone))
    assert not torch.allclose(together[0], together[2])


def test_cancelling_one_request_takes_it_out_without_disturbing_the_others(make_engine):
    """A request cancelled mid-batch leaves within a step or two; the others finish with their answers."""
    engine, _ = make_engine(capacity=2)
    jobs = [(0, "a"), (2, "b"), (1, None)]
    alone = run_alone(engine, jobs)
    cancel, victim = threading.Event(), ChatStats()
    answers: list[str | None] = [None, None, None]

    def chat(i: int) -> None:
        c, a = jobs[i]
        answers[i] = "".join(engine.stream_chat(CHATS[c], a, GenerationParams(max_new_tokens=LONG)))

    threads = [threading.Thread(target=chat, args=(i,)) for i in (0, 2)]
    for t in threads:
        t.start()
    long = GenerationParams(max_new_tokens=900, temperature=1.0, seed=5)
    stream = engine.stream_chat(CHATS[2], "b", long, cancel=cancel, stats=victim)
    got = [next(stream) for _ in range(3)]
    cancel.set()
    at_cancel = victim.completion_tokens
    assert list(stream) == [] and got
    # at most the step already running when cancel was set
    assert victim.finish_reason == "cancelled" and victim.completion_tokens - at_cancel <= 1
    for t in threads:
        t.join(timeout=60)
    assert answers[0] == alone[0] and answers[2] == alone[2]
    assert idle(engine)


async def test_a_full_queue_raises_resource_exhausted_at_once(make_engine, reference):
    """With the batch and the queue full, a new chat is refused immediately; once they drain it runs."""
    engine, _ = make_engine(capacity=2, max_batch=1, max_queue=2)
    long = GenerationParams(max_new_tokens=900)
    streams = [engine.astream_chat(CHAT, adapter, long) for adapter in ("a", "b", None)]
    first = await anext(streams[0])  # running: the batch (of one) is full
    assert first
    waiting = [asyncio.create_task(anext(s)) for s in streams[1:]]  # queued behind it
    assert await asyncio.to_thread(wait_until, lambda: engine.scheduler.counts()["queued"] == 2), (
        engine.scheduler.counts()
    )

    started = time.monotonic()
    with pytest.raises(ResourceExhausted):
        await anext(engine.astream_chat(CHAT, "a", GREEDY))
    assert time.monotonic() - started < 0.5

    await streams[0].aclose()  # frees the batch: the queued ones run in turn
    for task, stream in zip(waiting, streams[1:], strict=True):
        assert await task
        await stream.aclose()
    pieces = [p async for p in engine.astream_chat(CHAT, "a", GREEDY)]
    assert "".join(pieces) == reference["a"] and idle(engine)


async def test_queue_places_are_given_back_by_failed_and_cancelled_requests(make_engine):
    """Requests that fail to prepare or are cancelled while queued don't keep their queue place."""
    engine, _ = make_engine(capacity=2, max_batch=1, max_queue=1)
    for _ in range(3):
        with pytest.raises(Exception, match="not found"):
            await anext(engine.astream_chat(CHAT, "missing", GREEDY))
    running = engine.astream_chat(CHAT, "a", GenerationParams(max_new_tokens=900))
    await anext(running)
    for _ in range(3):
        queued = engine.astream_chat(CHAT, "b", GREEDY)
        task = asyncio.create_task(anext(queued))
        await asyncio.to_thread(wait_until, lambda: engine.scheduler.counts()["queued"] == 1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await queued.aclose()
        assert engine.scheduler.counts()["queued"] == 0
    await running.aclose()
    assert idle(engine)


def test_a_running_requests_adapter_is_pinned_and_a_request_for_another_waits(make_engine, reference):
    """Capacity one: while a chat with a runs, b is not loaded over it; b runs when a's chat ends."""
    engine, fetch = make_engine(capacity=1)
    cache = engine.adapters
    cancel = threading.Event()
    first = engine.stream_chat(CHAT, "a", GenerationParams(max_new_tokens=900), cancel=cancel)
    next(first)
    assert cache.pinned() == {"a": 1}
    result: list[str] = []
    other = threading.Thread(target=lambda: result.append("".join(engine.stream_chat(CHAT, "b", GREEDY))))
    other.start()
    assert wait_until(lambda: engine.scheduler.counts()["queued"] == 1)
    time.sleep(0.05)
    assert cache.loaded() == ["a"] and fetch.calls == ["a", "b"] and not result  # b fetched, not loaded
    cancel.set()
    assert list(first) == []
    other.join(timeout=30)
    assert result == [reference["b"]] and cache.loaded() == ["b"] and not cache.pinned()
    assert len(cache._slots.peft.peft_config) == 1


def test_evicting_a_pinned_adapter_waits_for_its_chat_to_end(make_engine, reference):
    """evict() on an adapter in use drops it from the index now and from the model when its chat ends."""
    engine, fetch = make_engine(capacity=2)
    cache = engine.adapters
    pieces = []
    stream = engine.stream_chat(CHAT, "a", GREEDY)
    pieces.append(next(stream))
    assert cache.evict("a") and "a" not in cache
    assert len(cache._slots.peft.peft_config) == 1  # still there: the running chat uses it
    pieces.extend(stream)
    assert "".join(pieces) == reference["a"]
    assert cache.loaded() == [] and not cache.pinned()
    assert "".join(engine.stream_chat(CHAT, "a", GREEDY)) == reference["a"] and fetch.calls == ["a", "a"]
    assert cache.loaded() == ["a"] and len(cache._slots.peft.peft_config) == 1  # the old copy is gone now
    assert cache.evict("a") and "".join(engine.stream_chat(CHAT, None, GREEDY)) == reference[None]


def test_a_sliding_window_model_answers_like_generate(tokenizer):
    """Row attention honours a sliding window: a tiny Mistral with a short window matches `generate`."""
    from transformers import MistralConfig, MistralForCausalLM

    from services.inference.engine import AdapterCache, ChatEngine

    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=9,
        initializer_range=0.3, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False
        )
    expected = tokenizer.decode(
        out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    engine = ChatEngine(model, tokenizer, AdapterCache(lambda _: None), "cpu", prefill_chunk=7)
    try:
        assert "".join(engine.stream_chat(CHAT, None, GREEDY)) == expected
    finally:
        engine.close()


def test_int8_weights_keep_each_answer_independent_of_its_batch(make_engine):
    """With int8 weights (activations quantized per row in a decode step) batched answers still equal
    the answers alone, adapters included, and `close` gives back plain fp32 layers."""
    from services.inference.int8 import Int8Linear

    jobs = [(0, "a"), (1, None), (2, "b")]
    engine, _ = make_engine(capacity=2, int8=True)
    assert engine.int8 and any(isinstance(m, Int8Linear) for m in engine.model.modules())
    alone = run_alone(engine, jobs)
    steps_alone = engine.scheduler.steps
    answers, _ = run_staggered(engine, jobs, [steps_alone + k for k in (0, 2, 5)])
    assert answers == alone and engine.scheduler.max_rows_seen >= 2
    engine.close()
    assert not any(isinstance(m, Int8Linear) for m in engine.model.modules())


def test_an_int8_linear_stays_close_to_fp32():
    """The int8 forward of a linear layer is within a few percent of fp32 on ordinary activations."""
    from services.inference.int8 import quantize_int8

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(96, 80))
    x = torch.randn(3, 5, 96)
    expected = layer(x)
    assert quantize_int8(layer) == 1
    got = layer(x)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_a_dora_adapter_takes_pefts_own_path_and_still_batches_exactly(
    make_engine, tokenizer, tmp_path, reference
):
    """An adapter the lean LoRA layers don't cover (DoRA, which PEFT can't mix in a batch) makes each
    step one forward per adapter: its answer is `generate`'s, and every chat still answers as alone."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(4)
    dora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    get_peft_model(base.tiny_base(tokenizer), dora).save_pretrained(tmp_path / "d")
    text = tokenizer.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    model = PeftModel.from_pretrained(base.tiny_base(tokenizer), tmp_path / "d").eval()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=LONG, do_sample=False
        )
    expected = tokenizer.decode(
        out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )

    engine, fetch = make_engine(capacity=3)
    fetch.dirs = {**fetch.dirs, "d": tmp_path / "d"}
    jobs = [(1, "d"), (0, "a"), (2, None)]
    alone = run_alone(engine, jobs)
    assert alone[0] == expected and alone[1].startswith(reference["a"])
    assert engine.adapters._names["d"] not in engine.adapters._slots.vanilla
    steps_alone = engine.scheduler.steps
    answers, _ = run_staggered(engine, jobs, [steps_alone + k for k in (0, 3, 6)])
    assert answers == alone and engine.scheduler.max_rows_seen >= 2


def test_a_closed_engine_gives_the_model_back_for_another(tokenizer, adapter_dirs, reference):
    """close() takes the adapters, the row attention and int8 out again: a second engine on the same
    model object answers like the first, adapters included."""
    from services.inference.engine import AdapterCache, ChatEngine

    model = base.tiny_base(tokenizer)
    for int8 in (True, False):
        engine = ChatEngine(model, tokenizer, AdapterCache(base.Fetch(adapter_dirs), 2), "cpu", int8=int8)
        try:
            answers = {a: "".join(engine.stream_chat(CHAT, a, GREEDY)) for a in ("a", "b", None)}
        finally:
            engine.close()
        if not int8:
            assert answers == {a: reference[a] for a in ("a", "b", None)}
        assert (
            not hasattr(model, "peft_config") and model.config._attn_implementation != kv.ATTN_IMPLEMENTATION
        )
        assert all(
            type(m).__module__.startswith("torch") for m in model.modules() if "Linear" in type(m).__name__
        )
