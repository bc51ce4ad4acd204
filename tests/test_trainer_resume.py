"""Checkpoints, resume and cancel of the LoRA training core (services/trainer/loop.py, checkpoint.py),
including a training process killed with SIGKILL and resumed from its last checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.trainer import checkpoint
from services.trainer.config import LoraTrainConfig, autocast_dtype
from services.trainer.loop import train_lora
from services.trainer.steps import TrainingCancelled
from tests.test_lora import PAIRS
from tests.test_model import real_tokenizer, tiny_llama

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# dropout on, so an exact resume also needs the RNG state back; warmup and cosine, so the schedule too
RUN = dict(max_steps=8, lr=1e-2, warmup_ratio=0.25, batch_size=3, max_seq_len=96, dropout=0.1, seed=11)


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module")
def uninterrupted(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    metrics = train_lora(tiny_llama(len(tokenizer)), tokenizer, PAIRS, out, LoraTrainConfig(**RUN))
    return out, metrics


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa, wb = _adapter(a), _adapter(b)
    assert set(wa) == set(wb)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(
    tokenizer, tmp_path, uninterrupted
):
    """Stopped after 7 of 8 steps with checkpoints every 3, the run resumes at step 6, takes the 2
    steps left, and writes the adapter and losses of the run that was never stopped."""
    full_dir, full = uninterrupted
    saved: list[bytes] = []
    steps_done = []
    cfg = LoraTrainConfig(**RUN, checkpoint_every_steps=3, progress_interval_s=0.0)
    with pytest.raises(TrainingCancelled) as info:
        train_lora(
            tiny_llama(len(tokenizer)),
            tokenizer,
            PAIRS,
            tmp_path / "first",
            cfg,
            progress=lambda p: steps_done.append(p["step"]),
            should_stop=lambda: len(steps_done) >= 7,
            on_checkpoint=lambda state: saved.append(checkpoint.to_bytes(state)),
        )
    assert info.value.step == 7
    states = [checkpoint.from_bytes(b) for b in saved]
    assert [s["step"] for s in states] == [3, 6]

    reports = []
    metrics = train_lora(
        tiny_llama(len(tokenizer)),
        tokenizer,
        PAIRS,
        tmp_path / "resumed",
        cfg,
        progress=reports.append,
        resume=states[-1],
    )
    assert metrics["resumed_from_step"] == 6
    assert [r["step"] for r in reports] == [7, 8]
    assert metrics["steps"] == metrics["total_steps"] == full["total_steps"] == 8
    assert metrics["losses"] == pytest.approx(full["losses"], rel=1e-5)
    assert metrics["tokens"] == full["tokens"]
    _assert_same_adapter(tmp_path / "resumed", full_dir)


def test_a_checkpoint_of_another_run_is_ignored(tokenizer, tmp_path):
    """A state whose data or settings differ (here the seed) does not leak into a new run."""
    saved = []
    cfg = LoraTrainConfig(**{**RUN, "max_steps": 3, "seed": 1}, checkpoint_every_s=1e-9)
    train_lora(tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path / "a", cfg, on_checkpoint=saved.append)
    assert [s["step"] for s in saved] == [1, 2]  # by time: every step but the last
    other = LoraTrainConfig(**{**RUN, "max_steps": 3, "seed": 2})
    metrics = train_lora(
        tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path / "b", other, resume=saved[-1]
    )
    assert metrics["resumed_from_step"] == 0 and len(metrics["losses"]) == 3


def test_a_checkpoint_holds_no_code_and_round_trips(tokenizer, tmp_path):
    """States go through torch.save / weights_only torch.load unchanged."""
    saved = []
    cfg = LoraTrainConfig(**{**RUN, "max_steps": 2}, checkpoint_every_steps=1)
    train_lora(tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path, cfg, on_checkpoint=saved.append)
    state = checkpoint.from_bytes(checkpoint.to_bytes(saved[0]))
    assert state["step"] == 1 and state["fingerprint"] == saved[0]["fingerprint"]
    assert set(state["adapter"]) == set(saved[0]["adapter"]) and all("lora_" in k for k in state["adapter"])
    with pytest.raises(ValueError):
        checkpoint.from_bytes(checkpoint.to_bytes({"version": 999}))


def test_training_stops_within_seconds_of_should_stop_turning_true(tokenizer, tmp_path):
    """A flag set from another thread mid-run ends a 100 000-step run before the next step."""
    flag = threading.Event()
    started = []
    timer = threading.Timer(1.0, flag.set)
    model = tiny_llama(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TrainingCancelled) as info:
            train_lora(
                model,
                tokenizer,
                PAIRS,
                tmp_path,
                LoraTrainConfig(**{**RUN, "max_steps": 100_000}),
                progress=started.append,
                should_stop=flag.is_set,
            )
    finally:
        timer.cancel()
    stopped_after = time.monotonic() - t0
    assert 0 < info.value.step < 100_000
    assert stopped_after < 1.0 + 5.0
    assert not (tmp_path / "metrics.json").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


_CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    torch.set_num_threads(1)
    from services.trainer import checkpoint
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora
    from tests.test_lora import PAIRS
    from tests.test_model import real_tokenizer, tiny_llama
    from tests.test_trainer_resume import KILL_RUN

    folder = sys.argv[1]

    def save(state):
        tmp = os.path.join(folder, "state.tmp")
        with open(tmp, "wb") as f:
            f.write(checkpoint.to_bytes(state))
        os.replace(tmp, os.path.join(folder, checkpoint.STATE_FILE))  # atomic, like one S3 object

    tok = real_tokenizer()
    cfg = LoraTrainConfig(**KILL_RUN, precision=sys.argv[2])
    train_lora(tiny_llama(len(tok)), tok, PAIRS, os.path.join(folder, "never"), cfg,
               progress=lambda p: time.sleep(1.0), on_checkpoint=save)
    """
)
KILL_RUN = dict(RUN, max_steps=12, checkpoint_every_steps=2, progress_interval_s=0.0)


def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint(tokenizer, tmp_path):
    """A training process killed mid-run leaves a checkpoint; the resumed run does not start from
    step 0, ends with the same number of steps and the adapter of an uninterrupted run."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    # "auto" as this process resolves it (the suite may force it: tests/conftest.py), so both agree
    precision = "bf16" if autocast_dtype("auto", torch.device("cpu")) is not None else "fp32"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path), precision], cwd=root, env=env)
    state_file = tmp_path / checkpoint.STATE_FILE
    deadline = time.monotonic() + 120
    try:
        while True:
            assert child.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint at step >= 4 within 120 s"
            if state_file.exists() and checkpoint.from_bytes(state_file.read_bytes())["step"] >= 4:
                break
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "never" / "metrics.json").exists()

    state = checkpoint.from_bytes(state_file.read_bytes())
    cfg = LoraTrainConfig(**KILL_RUN, precision=precision)
    resumed = train_lora(
        tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path / "resumed", cfg, resume=state
    )
    assert 4 <= resumed["resumed_from_step"] < 12
    assert resumed["steps"] == resumed["total_steps"] == 12
    full = train_lora(tiny_llama(len(tokenizer)), tokenizer, PAIRS, tmp_path / "full", cfg)
    assert resumed["losses"] == pytest.approx(full["losses"], rel=1e-5)
    _assert_same_adapter(tmp_path / "resumed", tmp_path / "full")
