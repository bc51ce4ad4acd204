"""One training job over several processes (GPUs) with torch distributed data parallel.

    torchrun --standalone --nproc-per-node 4 -m services.trainer.ddp \
        --pairs pairs.jsonl --out adapter/ [--base-model ID_OR_PATH] [--max-steps N] ...

Every process loads the base model on its own device (CUDA: `cuda:{LOCAL_RANK}`, backend NCCL;
CPU: backend gloo) and runs `loop.train_lora` on the same pairs: each step's batch is
`--batch-size` examples per process, the gradients are all-reduced, and rank 0 evaluates the
held-out pairs and writes the PEFT folder and metrics.json to `--out`. Without torchrun it runs as
one process. Settings not given as flags come from the `DOCLORA_*` environment, as in the service.

The trainer service starts it the same way (launch.py, `DOCLORA_TRAIN_PROCESSES`) and talks to it
through files: `--config` holds the LoraTrainConfig fields the service chose (flags win over
them), `--resume` a checkpoint every process loads, `--checkpoint-dir` receives rank 0's
checkpoints (`state.pt`, replaced atomically), and rank 0 appends JSON lines to `--events`:
`{"kind": "progress", ...}` (train_lora's progress dict), `{"kind": "checkpoint", "step", "path"}`,
`{"kind": "metrics", "metrics"}` at the end, `{"kind": "cancelled", "step", "total_steps"}`.

Stopping: SIGTERM during training (the service cancelling, or torchrun passing its own SIGTERM on)
stops every process before the same step (see `distributed.stop_agreed`) and exits with 143; before
training starts it ends the process at once. On Linux a process dies with torchrun's agent, and
all stop when the process named by DOCLORA_TRAIN_OWNER_PID (the trainer service) is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("services.trainer.ddp")
# the pid of the process that launched this job (the trainer service); when it is gone, stop
OWNER_ENV = "DOCLORA_TRAIN_OWNER_PID"
OWNER_POLL_S = 1.0
EXIT_STOPPED = 128 + signal.SIGTERM


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.trainer.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pairs",
        required=True,
        type=Path,
        help="QA pairs: JSON lines with question and answer, or an OpenAI/Alpaca/ShareGPT export",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the adapter (written by rank 0)")
    p.add_argument("--eval-pairs", type=Path, help="held-out pairs; default: the pairs marked split=eval")
    p.add_argument("--base-model", help="HF id or local folder (default: DOCLORA_BASE_MODEL)")
    p.add_argument("--init-adapter", type=Path, help="a PEFT LoRA folder to continue training from")
    p.add_argument("--max-steps", type=int, help="exact number of steps (default: from epochs and data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="examples per process per step (default 4)")
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int, help="LoRA rank (default: scaled to the data)")
    p.add_argument("--alpha", type=float)
    p.add_argument("--dropout", type=float)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--system-prompt")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"))
    p.add_argument("--no-eval", action="store_true", help="skip the base vs adapter answer evaluation")
    p.add_argument(
        "--extra-eval",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="more held-out pairs to answer and score as eval_NAME_* metrics (repeatable)",
    )
    p.add_argument("--config", type=Path, help="JSON object of LoraTrainConfig fields (the flags win)")
    p.add_argument(
        "--resume", type=Path, help="a checkpoint (state.pt) to continue from, loaded by every process"
    )
    p.add_argument("--checkpoint-dir", type=Path, help="folder where rank 0 keeps its latest checkpoint")
    p.add_argument(
        "--checkpoint-every-steps",
        type=int,
        help="default with --checkpoint-dir: DOCLORA_TRAIN_CHECKPOINT_EVERY_STEPS (50)",
    )
    p.add_argument(
        "--checkpoint-every-s",
        type=float,
        help="default with --checkpoint-dir: DOCLORA_TRAIN_CHECKPOINT_EVERY_S (300)",
    )
    p.add_argument(
        "--events", type=Path, help="file to which rank 0 appends progress, checkpoint and metrics lines"
    )
    return p.parse_args(argv)


def _read_jsonl(path: Path) -> list[dict]:
    """Pairs as stored by doclora (`question`/`answer`), or an export in the OpenAI, Alpaca or
    ShareGPT format (`doclora qa SID --export openai`)."""
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if rows and all("question" in r and "answer" in r for r in rows):
        return rows
    from services.common.pair_formats import import_jsonl

    return [p.to_dict() for p in import_jsonl(text)]


def _die_with_parent() -> None:
    """Under torchrun on Linux: be killed when torchrun's agent dies. Its workers run in sessions
    of their own, so a SIGKILL of the agent (the OOM killer, the service's last resort) would
    otherwise leave them training alone."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before the line above
        os._exit(1)


def _stop_flag() -> threading.Event:
    """An event set by SIGTERM or by the owner's (OWNER_ENV) end; training polls it each step."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        if not stop.is_set():
            log.warning("got %s: stopping before the next step", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    owner = int(os.environ.get(OWNER_ENV) or 0)
    if owner > 0:
        from services.common.procs import pid_alive

        def watch_owner() -> None:
            while not stop.wait(OWNER_POLL_S):
                if not pid_alive(owner):
                    log.warning("the process that launched this job (%d) is gone: stopping", owner)
                    stop.set()

        threading.Thread(target=watch_owner, name="owner-watch", daemon=True).start()
    return stop


def _emitter(path: Path | None) -> Callable[..., None]:
    """emit(kind, **fields): one JSON line appended to `path` and flushed; a no-op without one."""
    if path is None:
        return lambda kind, **fields: None
    f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the life of the process

    def emit(kind: str, **fields) -> None:
        f.write(json.dumps({"kind": kind, **fields}, default=str) + "\n")
        f.flush()

    return emit


def _checkpoint_writer(folder: Path, emit: Callable[..., None]) -> Callable[[dict], None]:
    """on_checkpoint for rank 0: `folder/state.pt` replaced atomically (a reader gets the old
    state or the new one, never half of one), then a "checkpoint" line."""
    from services.trainer import checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / checkpoint.STATE_FILE

    def save(state: dict) -> None:
        tmp = folder / (checkpoint.STATE_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(checkpoint.to_bytes(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        emit("checkpoint", step=state["step"], path=str(target))

    return save


def _init_process(args: argparse.Namespace) -> tuple[Any, int, int]:
    """(settings, world size, rank) of this process: logging set up, the settings from the
    environment with its device (CUDA: `cuda:{LOCAL_RANK}`), the process group joined."""
    import torch
    import torch.distributed as dist

    from services.common.config import Settings

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    settings = Settings.from_env()
    if args.base_model:
        settings = settings.replace(base_model=args.base_model)
    cuda = torch.cuda.is_available() and settings.device.strip().lower() != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
        settings = settings.replace(device=f"cuda:{local_rank}")
    else:
        settings = settings.replace(device="cpu")
    if world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return settings, world, rank


def _read_inputs(
    args: argparse.Namespace, settings: Any
) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """(train pairs, held-out pairs, extra evaluation sets by name) from the files named by the flags."""
    pairs = _read_jsonl(args.pairs)
    if args.eval_pairs:
        train_pairs, eval_pairs = pairs, _read_jsonl(args.eval_pairs)
    else:
        from services.trainer.plan import split_for_eval

        train_pairs, eval_pairs = split_for_eval(pairs, settings)
    extra_evals = {}
    for spec in args.extra_eval:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"--extra-eval wants NAME=PATH, got {spec!r}")
        extra_evals[name] = _read_jsonl(Path(path))
    return train_pairs, eval_pairs, extra_evals


def _overrides(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """The LoraTrainConfig fields over the settings: `--config`, then the flags given."""
    flags = {
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "rank": args.rank,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "max_seq_len": args.max_seq_len,
        "seed": args.seed,
        "system_prompt": args.system_prompt,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    overrides = json.loads(args.config.read_text()) if args.config else {}
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if args.no_eval:
        overrides["eval_generate"] = False
    if args.checkpoint_dir:
        for name in ("checkpoint_every_steps", "checkpoint_every_s"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        if not overrides.get("checkpoint_every_steps") and not overrides.get("checkpoint_every_s"):
            from services.trainer.plan import checkpoint_every

            overrides.update(checkpoint_every(settings))
    return overrides


def _progress_logger(emit: Callable[..., None]) -> Callable[[dict], None]:
    """progress for train_lora: a log line and a "progress" line for each step."""

    def progress(p: dict) -> None:
        log.info(
            "step %d/%d loss %.4f lr %.2e %.0f tokens/s",
            p["step"],
            p["total_steps"],
            p["loss"],
            p["lr"],
            p["tokens_per_s"],
        )
        emit("progress", **p)

    return progress


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _die_with_parent()

    import torch.distributed as dist

    from services.trainer import checkpoint
    from services.trainer.adapter_io import read_adapter
    from services.trainer.base_weights import load_training_model
    from services.trainer.config import LoraTrainConfig
    from services.trainer.loop import train_lora
    from services.trainer.steps import TrainingCancelled

    settings, world, rank = _init_process(args)
    emit = _emitter(args.events if rank == 0 else None)
    try:
        train_pairs, eval_pairs, extra_evals = _read_inputs(args, settings)
        overrides = _overrides(args, settings)
        on_checkpoint = None
        if args.checkpoint_dir and rank == 0:
            on_checkpoint = _checkpoint_writer(args.checkpoint_dir, emit)
        cfg = LoraTrainConfig.from_settings(settings, **overrides)
        resume = checkpoint.from_bytes(args.resume.read_bytes()) if args.resume else None
        model, tokenizer = load_training_model(settings)
        init = read_adapter(args.init_adapter) if args.init_adapter else None
        stop = _stop_flag()
        try:
            metrics = train_lora(
                model,
                tokenizer,
                train_pairs,
                args.out,
                cfg,
                progress=_progress_logger(emit),
                should_stop=stop.is_set,
                eval_pairs=eval_pairs or None,
                resume=resume,
                on_checkpoint=on_checkpoint,
                init_adapter=init,
                extra_evals=extra_evals or None,
            )
        except TrainingCancelled as exc:
            log.info("stopped at step %d/%d", exc.step, exc.total_steps)
            emit("cancelled", step=exc.step, total_steps=exc.total_steps)
            return EXIT_STOPPED
        if rank == 0:
            emit("metrics", metrics=metrics)
            log.info(
                "adapter in %s: %d steps on %d processes, loss %.4f -> %.4f",
                args.out,
                metrics["steps"],
                world,
                metrics["losses"][0],
                metrics["losses"][-1],
            )
    finally:
        # rank 0 may still be evaluating: no collective is left, so the others need not wait
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
