"""One training job of the trainer service over several processes: torchrun as a child process.

With `train_processes` > 1 (`DOCLORA_TRAIN_PROCESSES`; "auto" = one per CUDA device) the worker
calls `train_in_processes` where it would call the in-thread `train_lora`, with the same inputs and
callbacks. It writes the job's inputs to a folder of its own and starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m services.trainer.ddp ...

in a session of its own (the service's signals do not reach it), then, until it ends, reads the
JSON lines rank 0 appends (ddp.py `--events`): progress dicts go to `progress`, each checkpoint
(written by rank 0 atomically) goes to `on_checkpoint` as bytes, the final metrics are returned.

Stopping: when `should_stop()` turns true, SIGTERM goes to torchrun and to its workers (they agree
to stop before the same step, see ddp.py), SIGKILL after STOP_GRACE_S, and TrainingCancelled is
raised. A job whose processes fail (a non-zero exit: an exception, the OOM killer) raises
TrainingProcessFailed with the tail of their output. Workers are killed with torchrun's agent
(ddp.py) and stop when this process is gone, so none outlives the service.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.config import Settings, settings_env

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the events file, should_stop and the process are looked at
TREE_POLL_S = 1.0  # how often torchrun's worker processes are listed (to signal them directly)
STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL after this long
TAIL_LINES = 40  # of the job's output, in the error of a failed job
TAIL_CHARS = 4000


class TrainingProcessFailed(RuntimeError):
    """The training processes exited with an error before writing the adapter. Not a domain error:
    the stage redelivers the job (it resumes from its last checkpoint), and after
    `work_max_deliver` attempts the session fails with this message."""


def process_count(settings: Any) -> int:
    """Processes per training job from the `train_processes` setting: a whole number >= 1, or
    "auto" = one per CUDA device (1 without CUDA, or with `device` = cpu). ValueError otherwise."""
    raw = str(settings.train_processes or "1").strip().lower()
    if raw == "auto":
        if str(settings.device).strip().lower() == "cpu":
            return 1
        import torch

        return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"train_processes must be a whole number >= 1 or 'auto', got {raw!r}")
    return count


def command(processes: int, args: Sequence[str]) -> list[str]:
    """The torchrun command line of one job on this host."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "services.trainer.ddp",
        *args,
    ]


def child_env(settings: Any) -> dict[str, str]:
    """This environment with every setting as its `DOCLORA_*` variable (ddp.py reads them back with
    Settings.from_env, so the job sees the service's settings, not only its environment's), the
    owner pid, and the folders `services` and `doclora` are imported from on PYTHONPATH."""
    from services.trainer.ddp import OWNER_ENV

    env = dict(os.environ)
    if isinstance(settings, Settings):
        env.update(settings_env(settings))  # secrets revealed: the job is this service's own process
    env[OWNER_ENV] = str(os.getpid())
    roots = []
    for package in ("services", "doclora"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            root = str(Path(location).resolve().parent)
            if root not in roots:
                roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


class _EventReader:
    """The complete JSON lines appended to a file since the last read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("ignoring a malformed line from the training processes: %r", line[:200])
        return out


def _proc_table() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, start time)} of every process, from /proc (empty where there is none)."""
    table = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry.name)] = (int(rest[1]), rest[19].decode())
    return table


def _descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid` (torchrun's workers and their children)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = {}, list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found[child] = table[child][1]
        todo.extend(children.get(child, ()))
    return found


def _signal_job(proc: subprocess.Popen, known: Mapping[int, str], sig: signal.Signals) -> None:
    """`sig` to torchrun's process group (while it has not been reaped) and to each worker seen,
    each in a session of its own, unless its pid now names another process (start time differs)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
    if not known:
        return
    table = _proc_table()
    for pid, started in known.items():
        if pid in table and table[pid][1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def _tail(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.rstrip().splitlines()[-TAIL_LINES:])[-TAIL_CHARS:] or "(no output)"


def _exit_text(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
    return f"exit status {rc}"


def _job_args(
    work: Path,
    pairs: Sequence[Mapping[str, Any]],
    out_dir: Path,
    config: Mapping[str, Any],
    eval_pairs: Sequence[Mapping[str, Any]] | None,
    resume: Mapping[str, Any] | None,
    init_dir: Path | None,
    extra_evals: Mapping[str, Sequence[Mapping[str, Any]]] | None,
) -> list[str]:
    """ddp.py's arguments for one job, its input files written to `work`."""
    from services.trainer import checkpoint

    args = [
        "--pairs", str(_write_jsonl(work / "pairs.jsonl", pairs)),
        "--eval-pairs", str(_write_jsonl(work / "eval.jsonl", eval_pairs or [])),
        "--out", str(out_dir),
        "--config", str(work / "config.json"),
        "--checkpoint-dir", str(work / "checkpoints"),
        "--events", str(work / "events.jsonl"),
    ]  # fmt: skip
    (work / "config.json").write_text(json.dumps(dict(config)))
    for name, rows in (extra_evals or {}).items():
        args += ["--extra-eval", f"{name}={_write_jsonl(work / f'eval-{name}.jsonl', rows)}"]
    if init_dir is not None:
        args += ["--init-adapter", str(init_dir)]
    if resume is not None:
        (work / "resume.pt").write_bytes(checkpoint.to_bytes(resume))
        args += ["--resume", str(work / "resume.pt")]
    return args


class _JobEvents:
    """What rank 0 reported so far (ddp.py `--events`): progress goes to `progress`, the newest
    checkpoint of each read to `on_checkpoint`; keeps the last step and the final metrics."""

    def __init__(
        self,
        path: Path,
        progress: Callable[[dict], None],
        on_checkpoint: Callable[[bytes, int], None] | None,
        resume: Mapping[str, Any] | None,
    ):
        self.reader = _EventReader(path)
        self.progress = progress
        self.on_checkpoint = on_checkpoint
        self.metrics: dict[str, Any] | None = None
        self.last = {"step": int(resume["step"]) if resume else 0, "total_steps": 0}

    def handle(self, upload: bool) -> None:
        """Read the new lines; pass a new checkpoint on only when `upload`."""
        newest = None
        for event in self.reader.read():
            kind = event.pop("kind", None)
            if kind == "progress":
                self.last.update(step=event.get("step", 0), total_steps=event.get("total_steps", 0))
                self.progress(event)
            elif kind == "checkpoint":
                newest = event  # the file holds the newest state: upload it once
            elif kind == "metrics":
                self.metrics = event.get("metrics")
            elif kind == "cancelled":
                self.last.update(step=event.get("step", 0), total_steps=event.get("total_steps", 0))
        if newest is not None and upload and self.on_checkpoint is not None:
            try:
                data = Path(newest["path"]).read_bytes()
            except OSError as exc:
                log.warning("checkpoint at step %s not read: %s", newest.get("step"), exc)
            else:
                self.on_checkpoint(data, int(newest.get("step", 0)))


def _watch(proc: subprocess.Popen, job: _JobEvents, should_stop: Callable[[], bool]) -> float | None:
    """Until torchrun ends: read its events, and when `should_stop()` turns true, SIGTERM the job
    (SIGKILL after STOP_GRACE_S). Returns when the stop was sent (None: not stopped). No process of
    the job is left when it returns, whatever it raises."""
    known: dict[int, str] = {}
    stop_sent = kill_at = None
    listed = 0.0
    try:
        while proc.poll() is None:
            job.handle(upload=stop_sent is None)
            now = time.monotonic()
            if now - listed >= TREE_POLL_S:
                known.update(_descendants(proc.pid))
                listed = now
            if stop_sent is None and should_stop():
                known.update(_descendants(proc.pid))
                _signal_job(proc, known, signal.SIGTERM)
                stop_sent, kill_at = now, now + STOP_GRACE_S
            elif kill_at is not None and now >= kill_at:
                log.warning(
                    "training processes still running %.0f s after SIGTERM: killing them", STOP_GRACE_S
                )
                _signal_job(proc, known, signal.SIGKILL)
                kill_at = None
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:  # an exception here (a failed upload): the job must not stay
            _signal_job(proc, known, signal.SIGKILL)
            proc.wait()
        _signal_job(proc, known, signal.SIGKILL)  # workers left by an agent that died
    return stop_sent


def train_in_processes(
    processes: int,
    settings: Any,
    pairs: Sequence[Mapping[str, Any]],
    out_dir: Path,
    config: Mapping[str, Any],
    progress: Callable[[dict], None],
    should_stop: Callable[[], bool],
    *,
    eval_pairs: Sequence[Mapping[str, Any]] | None = None,
    resume: Mapping[str, Any] | None = None,
    on_checkpoint: Callable[[bytes, int], None] | None = None,
    init_dir: Path | None = None,
    extra_evals: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Train as `processes` torchrun processes; blocks (run it in a thread). The arguments are the
    worker's `_train_blocking`'s: `config` holds LoraTrainConfig fields, `on_checkpoint(data, step)`
    gets each checkpoint serialised. Returns rank 0's metrics; raises TrainingCancelled when
    stopped by `should_stop`, TrainingProcessFailed when the processes fail."""
    from services.trainer.steps import TrainingCancelled

    with tempfile.TemporaryDirectory(prefix="doclora-ddp-") as tmp:
        work = Path(tmp)
        args = _job_args(work, pairs, out_dir, config, eval_pairs, resume, init_dir, extra_evals)
        output = work / "output.log"
        job = _JobEvents(work / "events.jsonl", progress, on_checkpoint, resume)
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                command(processes, args),
                env=child_env(settings),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("training on %d processes: torchrun pid %d", processes, proc.pid)
        stop_sent = _watch(proc, job, should_stop)
        rc = proc.returncode
        job.handle(upload=stop_sent is None and rc != 0)
        if stop_sent is not None or should_stop():
            raise TrainingCancelled(int(job.last["step"]), int(job.last["total_steps"]))
        if rc != 0:
            raise TrainingProcessFailed(
                f"training on {processes} processes failed ({_exit_text(rc)}); the end of its output:\n"
                + _tail(output)
            )
        if job.metrics is not None:
            return job.metrics
        try:
            return json.loads((out_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            raise TrainingProcessFailed(
                "the training processes ended without writing the adapter; the end of their output:\n"
                + _tail(output)
            ) from None
