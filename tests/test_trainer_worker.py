"""The train stage (services/trainer/worker.py) against a real nats-server and SeaweedFS, with the
tiny Llama standing in for the base model: a crashed job resumes from its stored checkpoint, a
held-out split is evaluated, and a cancelled session stops within seconds."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from doclora.v1 import session_pb2
from services.common import keys
from services.common.jsonl import to_jsonl
from services.common.runtime import Runtime
from services.common.sessions import SessionRepo
from services.trainer import checkpoint, worker
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
S = session_pb2.SessionState
TENANT = "default"

# ten pairs from five chunks: with the thresholds below, one chunk (two pairs) is held out
PAIRS = [
    {
        "pair_id": f"p{i}",
        "chunk_id": f"c{i // 2}",
        "question": f"What is the code of crate {i}?",
        "answer": f"Crate {i} has the code {1000 + 37 * i}.",
    }
    for i in range(10)
]


class Crash(RuntimeError):
    """Stands in for the trainer process dying right after a checkpoint reached the store."""


@pytest.fixture
def tokenizer():
    return real_tokenizer()


@pytest.fixture
def rt(bus, store, s3_settings, tokenizer, monkeypatch):
    import services.common.model as model_module

    monkeypatch.setattr(
        model_module, "load_base_model", lambda settings, for_training=False: (tiny_llama(len(tokenizer)), tokenizer)
    )
    monkeypatch.setattr(worker, "CHECKPOINT_EVERY_STEPS", 2)
    monkeypatch.setattr(worker, "EVAL_MIN_PAIRS", 8)
    monkeypatch.setattr(worker, "EVAL_FRACTION", 0.2)
    monkeypatch.setattr(worker, "EVAL_MAX_NEW_TOKENS", 4)
    monkeypatch.setattr(worker, "CANCEL_POLL_S", 0.2)
    return Runtime(settings=s3_settings, bus=bus, store=store, sessions=SessionRepo(bus))


async def _session(rt: Runtime, sid: str, max_steps: int) -> session_pb2.Session:
    rt.store.put_bytes(keys.qa_pairs(TENANT, sid), to_jsonl(PAIRS))
    rec = session_pb2.Session(
        session_id=sid,
        tenant=TENANT,
        state=S.SESSION_STATE_TRAINING,
        options=session_pb2.SessionOptions(max_steps=max_steps),
    )
    return await rt.sessions.create(rec)


def _item(sid: str):
    from doclora.v1 import events_pb2

    return events_pb2.WorkItem(session_id=sid, tenant=TENANT, stage=session_pb2.STAGE_TRAIN)


async def test_a_redelivered_job_resumes_from_the_stored_checkpoint(rt, monkeypatch):
    """The first attempt dies after its step-4 checkpoint; the second starts at step 4, ends with
    the full 6 steps, stores an adapter with a held-out evaluation, and deletes the checkpoints."""
    sid = "s-resume01"
    rec = await _session(rt, sid, max_steps=6)
    real_put = rt.store.put_bytes
    ckpt_key = worker.checkpoint_key(TENANT, sid)

    def crash_after_step_4(key, data, **kwargs):
        result = real_put(key, data, **kwargs)
        if key == ckpt_key and checkpoint.from_bytes(data)["step"] >= 4:
            raise Crash("trainer died")
        return result

    monkeypatch.setattr(rt.store, "put_bytes", crash_after_step_4)
    with pytest.raises(Crash):
        await worker.train_session(rt, _item(sid), rec)
    assert checkpoint.from_bytes(rt.store.get_bytes(ckpt_key))["step"] == 4
    assert (await rt.sessions.get(sid)).state == S.SESSION_STATE_TRAINING

    monkeypatch.setattr(rt.store, "put_bytes", real_put)
    await worker.train_session(rt, _item(sid), await rt.sessions.get(sid))
    final = await rt.sessions.get(sid)
    assert final.state == S.SESSION_STATE_READY
    assert final.train.steps == final.train.total_steps == 6
    metrics = json.loads(rt.store.get_bytes(keys.adapter_prefix(TENANT, final.adapter_id) + "metrics.json"))
    assert metrics["resumed_from_step"] == 4 and len(metrics["losses"]) == 6
    assert metrics["examples"] == 8 and metrics["eval_count"] == 2
    for key in ("eval_base_f1", "eval_adapter_f1", "eval_base_em", "eval_adapter_em", "eval_loss"):
        assert metrics[key] is not None, key
    assert rt.store.list(keys.checkpoints(TENANT, sid)) == []


async def test_cancelling_a_running_training_stops_it_within_seconds(rt):
    """A session set CANCELLED mid-run ends its training thread soon after, stores no adapter,
    keeps its CANCELLED state and leaves no checkpoints behind."""
    sid = "s-cancel01"
    rec = await _session(rt, sid, max_steps=100_000)
    task = asyncio.create_task(worker.train_session(rt, _item(sid), rec))
    deadline = time.monotonic() + 60
    while not rt.store.list(keys.checkpoints(TENANT, sid)):  # training is under way
        assert not task.done() and time.monotonic() < deadline
        await asyncio.sleep(0.2)
    await rt.sessions.transition(sid, S.SESSION_STATE_CANCELLED)
    cancelled_at = time.monotonic()
    await asyncio.wait_for(task, timeout=30)
    assert time.monotonic() - cancelled_at < 5
    assert (await rt.sessions.get(sid)).state == S.SESSION_STATE_CANCELLED
    assert rt.store.list(keys.adapter_prefix(TENANT, sid)) == []
    assert rt.store.list(keys.checkpoints(TENANT, sid)) == []


def test_small_sessions_keep_every_pair_for_training():
    """Below EVAL_MIN_PAIRS nothing is held out; above it whole chunks are."""
    train, held = worker.split_for_eval(PAIRS[:5], seed=1)
    assert train == PAIRS[:5] and held == []
    many = [
        {"pair_id": f"q{i}", "chunk_id": f"c{i // 3}", "question": f"Q{i}?", "answer": f"Answer {i}."}
        for i in range(30)
    ]
    train, held = worker.split_for_eval(many, seed=1)
    assert held and len(train) + len(held) == len(many)
    assert {p["chunk_id"] for p in train}.isdisjoint({p["chunk_id"] for p in held})
