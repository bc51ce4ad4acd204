"""Fixtures of the fault tests: a tiny base model in a folder (DOCLORA_BASE_MODEL takes a path), and
one local stack per test module, started by `doclora up --detach` in a state folder of its own with
short ack waits, frequent checkpoints and a quick reconciler, and stopped by `doclora down`."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stack.ports import isolated_stack_env
from tests.faults.stack import FaultStack
from tests.test_e2e import _cli, up_or_fail
from tests.test_model import TINY_STACK_ENV, save_tiny_model

# the reconciler's timing in these stacks: a session idle this long without work is queued again,
# looked for this often
RECONCILE_IDLE_S = 5
RECONCILE_EVERY_S = 2
CHECKPOINT_EVERY_STEPS = 5


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


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
        **TINY_STACK_ENV,
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
