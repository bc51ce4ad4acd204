"""Fixtures of the fault tests: a tiny base model in a folder (DOCLORA_BASE_MODEL takes a path), and
one local stack per test module, started by `doclora up --detach` in a state folder of its own with
short ack waits, frequent checkpoints and a quick reconciler, and stopped by `doclora down`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stack.ports import isolated_stack_env
from tests.faults.stack import FaultStack
from tests.test_e2e import _cli, up_or_fail

# the reconciler's timing in these stacks: a session idle this long without work is queued again,
# looked for this often
RECONCILE_IDLE_S = 5
RECONCILE_EVERY_S = 2
CHECKPOINT_EVERY_STEPS = 5


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer (and its chat template), saved as a model
    folder: the stack trains and chats with it in well under a second a step, where quality is
    not what a test is about."""
    from tests.test_model import real_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = real_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    """One `doclora up` stack for the test module (every part its own process, on free ports)."""
    state = tmp_path_factory.mktemp("fault-stack")
    env = isolated_stack_env(
        state,
        DOCLORA_BASE_MODEL=str(tiny_model),
        # a killed worker's message comes back this long after its last heartbeat
        DOCLORA_WORK_ACK_WAIT_S="10",
        DOCLORA_TRAIN_CHECKPOINT_EVERY_STEPS=str(CHECKPOINT_EVERY_STEPS),
        DOCLORA_RECONCILE_IDLE_S=str(RECONCILE_IDLE_S),
        DOCLORA_RECONCILE_EVERY_S=str(RECONCILE_EVERY_S),
        # keep the model work after training small: two exam questions of eight tokens, no embeddings
        DOCLORA_QAGEN_EXAM_PAIRS="2",
        DOCLORA_TRAIN_EVAL_MAX_PAIRS="2",
        DOCLORA_TRAIN_EVAL_MAX_NEW_TOKENS="8",
        DOCLORA_RETRIEVAL_EMBEDDINGS="0",
        DOCLORA_INFERENCE_MAX_NEW_TOKENS="64",
        DOCLORA_FETCH_ALLOW="127.0.0.1",
    )
    up_or_fail(env, state, 300)
    fs = FaultStack(env, state)
    try:
        yield fs
    finally:
        down = _cli(env, "down")
        fs.close()
        assert down.returncode == 0, down.stderr
