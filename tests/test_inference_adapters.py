"""The adapter cache under load: bounded by bytes as well as by count, never evicting what a running
chat uses, and loading a cold adapter without pausing the chats already decoding.

Fixtures (tiny random Llama, real tokenizer, random LoRA adapters, `generate` references) come from
test_engine.py. Adapter sizes there (fp32, rank 8, two layers): a (q, v) 14 KiB, b (all seven
linear layers) 64 KiB, c (o, down) 20 KiB.
"""

from __future__ import annotations

import threading
import time

import peft.utils.save_and_load
from safetensors.torch import load_file

from services.inference.engine import GenerationParams
from tests import test_engine as base
from tests.test_engine import CHAT, GREEDY, idle, wait_until

_one_torch_thread = base._one_torch_thread
tokenizer = base.tokenizer
adapter_dirs = base.adapter_dirs
reference = base.reference
make_engine = base.make_engine

LONG = GenerationParams(max_new_tokens=900, temperature=1.0, seed=1)


def file_bytes(folder) -> int:
    """Bytes of an adapter's tensors as saved (fp32 here, as loaded)."""
    return sum(t.numel() * t.element_size() for t in load_file(folder / "adapter_model.safetensors").values())


def test_the_cache_evicts_least_recently_used_adapters_to_stay_within_its_bytes(
    make_engine, adapter_dirs, reference
):
    """With room for eight adapters but bytes for only b and c, loading a third evicts the least
    recently used until the tensors fit; the cache counts each adapter's bytes exactly."""
    size = {k: file_bytes(adapter_dirs[k]) for k in "abc"}
    assert size["a"] < size["c"] < size["b"]
    engine, fetch = make_engine(capacity=8, max_bytes=size["b"] + size["c"])
    cache = engine.adapters
    say = lambda adapter: "".join(engine.stream_chat(CHAT, adapter, GREEDY))  # noqa: E731

    assert say("a") == reference["a"] and say("b") == reference["b"]
    assert cache.loaded() == ["a", "b"] and cache.nbytes() == size["a"] + size["b"]
    assert {k: cache.nbytes(k) for k in "ab"} == {"a": size["a"], "b": size["b"]}
    assert say("c") == reference["c"]  # a + b + c is over: a, used longest ago, goes
    assert cache.loaded() == ["b", "c"] and cache.nbytes() == size["b"] + size["c"]
    assert say("a") == reference["a"]  # b + c + a is over: b goes, c + a fits
    assert cache.loaded() == ["c", "a"] and cache.nbytes() == size["c"] + size["a"]
    assert set(cache._slots.peft.peft_config) == {cache._names["c"], cache._names["a"]}  # gone from the model
    assert fetch.calls == ["a", "b", "c", "a"] and idle(engine)


def test_a_running_chats_adapter_is_never_evicted_for_bytes_the_newcomer_waits(
    make_engine, adapter_dirs, reference
):
    """Bytes for b + a only: while a chat with b runs, a (fits) loads beside it, c (doesn't fit
    beside b) waits in the queue rather than evicting b; when b's chat ends, c loads."""
    size = {k: file_bytes(adapter_dirs[k]) for k in "abc"}
    engine, _ = make_engine(capacity=8, max_bytes=size["b"] + size["a"])
    cache = engine.adapters
    cancel = threading.Event()
    running = engine.stream_chat(CHAT, "b", LONG, cancel=cancel)
    next(running)
    assert "".join(engine.stream_chat(CHAT, "a", GREEDY)) == reference["a"]
    assert cache.loaded() == ["b", "a"]

    result: list[str] = []
    other = threading.Thread(target=lambda: result.append("".join(engine.stream_chat(CHAT, "c", GREEDY))))
    other.start()
    assert wait_until(lambda: engine.scheduler.counts()["queued"] == 1)
    loads = cache._staging._loads
    assert wait_until(lambda: loads.get("c") is not None and loads["c"].done())  # prepared
    steps = engine.scheduler.steps
    assert wait_until(lambda: engine.scheduler.steps > steps + 5)  # b keeps decoding meanwhile
    assert "c" not in cache and cache.pinned() == {"b": 1} and not result
    cancel.set()
    assert list(running) == []
    other.join(timeout=60)
    assert result == [reference["c"]]
    assert cache.loaded() == ["a", "c"] and cache.nbytes() == size["a"] + size["c"] and idle(engine)


def test_a_cold_adapter_load_does_not_pause_a_running_chat(make_engine, reference, monkeypatch):
    """A request for an adapter whose download and weight reading are slow (a second each) joins
    while another chat decodes: that chat's pieces keep coming with no gap near the load's length,
    and the newcomer still gets its adapter's exact answer."""
    slow = 1.0
    engine, fetch = make_engine(capacity=4)
    # b wraps every linear layer, so later adapters are prepared off the lock and moved in
    assert "".join(engine.stream_chat(CHAT, "b", GREEDY)) == reference["b"]

    def slow_fetch(adapter_id):
        time.sleep(slow)
        return fetch(adapter_id)

    real_read = peft.utils.save_and_load.safe_load_file

    def slow_read(*args, **kwargs):
        time.sleep(slow)
        return real_read(*args, **kwargs)

    engine.adapters._staging.fetch = slow_fetch
    monkeypatch.setattr(peft.utils.save_and_load, "safe_load_file", slow_read)

    stamps: list[float] = []
    cancel = threading.Event()

    def chat() -> None:
        for _ in engine.stream_chat(CHAT, "b", LONG, cancel=cancel):
            stamps.append(time.monotonic())

    runner = threading.Thread(target=chat)
    runner.start()
    try:
        assert wait_until(lambda: len(stamps) >= 5)
        started = time.monotonic()
        answer = "".join(engine.stream_chat(CHAT, "a", GREEDY))
        finished = time.monotonic()
    finally:
        cancel.set()
        runner.join(timeout=60)
    assert answer == reference["a"]
    assert finished - started >= 2 * slow  # the load really was slow
    during = [started] + [s for s in stamps if started < s <= finished]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert len(gaps) > 10 and max(gaps) < 0.4 * slow, (len(gaps), max(gaps, default=None))
    assert idle(engine)
