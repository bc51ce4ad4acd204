"""`doclora`: run the local stack (up / down / status / config, here) and use it (learn / qa / exam /
chat / sessions / cancel, in client.py, over the gateway's HTTP API)."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from services.common.config import Settings, SettingsError, effective_settings
from services.stack.client import (
    cmd_approve,
    cmd_cancel,
    cmd_chat,
    cmd_delete,
    cmd_download,
    cmd_exam,
    cmd_keys,
    cmd_learn,
    cmd_qa,
    cmd_retrain,
    cmd_sessions,
    cmd_share,
    gateway_url,
    print_json,
)


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wanted_ports(settings: Settings) -> list[tuple[str, str, int]]:
    from services.stack.supervisor import SERVICES, part_ports

    ports = part_ports(settings)
    out = []
    if settings.embedded_nats:
        out.append(("nats", "127.0.0.1", ports["nats"]))
    if settings.embedded_s3:
        out.append(("s3", "127.0.0.1", ports["s3"]))
    for name, _m, field in SERVICES:
        out.append((name, getattr(settings, field).rsplit(":", 1)[0], ports[name]))
    out.append(("gateway", settings.gateway_host, settings.gateway_port))
    return out


def _print_status(settings: Settings, info: dict | None = None) -> None:
    from services.stack.supervisor import part_health

    parts = (info or {}).get("parts", {})
    for name, h in part_health(settings).items():
        metrics = parts.get(name, {}).get("metrics")
        extra = f"  metrics http://{metrics}/metrics" if metrics else ""
        print(f"  {name:<10} {'up' if h.ok else 'DOWN':<5} {h.detail}{extra}")


def cmd_up(args) -> int:
    from services.stack.supervisor import GIVEN_UP, Stack, health, read_stack, state_dir, supervisor_running

    settings = Settings.from_env()
    info = read_stack(settings)
    if supervisor_running(info):
        print(f"doclora is already running (pid {info['supervisor']['pid']}); `doclora status` shows it")
        return 0
    busy = [
        f"{name} ({host}:{port})" for name, host, port in _wanted_ports(settings) if _port_busy(host, port)
    ]
    if busy:
        print("cannot start: these ports are in use: " + ", ".join(busy), file=sys.stderr)
        print("stop what holds them, or set DOCLORA_* addresses (see README)", file=sys.stderr)
        return 1

    if args.detach:
        logs = state_dir(settings) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "stack.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.stack.cli", "up", "--timeout", str(args.timeout)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return _wait_healthy(settings, args.timeout, proc)

    from services.common.logging import setup_logging

    setup_logging("stack", level=settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = Stack(settings)
    try:
        stack.start_infra()
        stack.start_services()
        print(f"doclora starting; logs in {stack.logs}", flush=True)
        deadline = time.monotonic() + args.timeout
        # healthy = each part's own process holds its port and answers (not another stack's)
        while not stop.is_set() and not all(health(settings).values()):
            if time.monotonic() > deadline:
                print("some parts did not come up in time:", file=sys.stderr)
                _print_status(settings, read_stack(settings))
                return 1
            if stack.check(time.monotonic()):  # restart what died while starting
                stack.write_state()
            if any(part.state == GIVEN_UP for part in stack.parts):
                print("some parts keep failing:", file=sys.stderr)
                _print_status(settings, read_stack(settings))
                return 1
            stop.wait(1.0)
        if not stop.is_set():
            print(f"doclora is up: http://{settings.gateway_host}:{settings.gateway_port}", flush=True)
        stack.supervise(stop)
    finally:
        stack.stop()
    return 0


def _wait_healthy(settings: Settings, timeout: float, proc: subprocess.Popen) -> int:
    """Wait until the supervisor `proc` started has every part up; fail early if it exits or
    gives a part up."""
    from services.stack.supervisor import GIVEN_UP, health, read_stack, state_dir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"doclora failed to start; see {state_dir(settings) / 'logs'}", file=sys.stderr)
            return 1
        info = read_stack(settings) or {}
        ours = (info.get("supervisor") or {}).get("pid") == proc.pid
        if ours and any(p.get("state") == GIVEN_UP for p in info.get("parts", {}).values()):
            print("doclora started, but some parts keep failing:", file=sys.stderr)
            _print_status(settings, info)
            return 1
        if ours and all(health(settings).values()):
            print(f"doclora is up: http://{settings.gateway_host}:{settings.gateway_port}")
            print(f"logs: {state_dir(settings) / 'logs'}")
            return 0
        time.sleep(1.0)
    print("doclora did not come up in time:", file=sys.stderr)
    _print_status(settings, read_stack(settings))
    return 1


def cmd_down(args) -> int:
    """Stop the stack: SIGTERM to its supervisor, which stops every part; then SIGTERM, and SIGKILL
    after a grace, to any part that outlived it. Only processes whose identity (PID, start time,
    command line) is still the recorded one are signalled: a reused PID is someone else's."""
    from services.stack.identity import same_process, signal_if_same, stop_processes
    from services.stack.supervisor import read_stack, stack_file

    settings = Settings.from_env()
    info = read_stack(settings)
    if not info:
        print("doclora is not running")
        return 0
    supervisor = info.get("supervisor") or {"pid": info.get("supervisor_pid")}
    if signal_if_same(supervisor, signal.SIGTERM):
        deadline = time.monotonic() + args.timeout
        while same_process(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
    elif supervisor.get("pid"):
        print(f"the stack's supervisor (pid {supervisor['pid']}) is not running")
    # whatever outlived its supervisor (a crash, a timeout)
    stop_processes(info.get("parts") or {}, grace_s=settings.grpc_grace_s + 5)
    if signal_if_same(supervisor, signal.SIGKILL):
        print(
            f"killed the supervisor (pid {supervisor['pid']}): still running {args.timeout:.0f}s after SIGTERM"
        )
    stack_file(settings).unlink(missing_ok=True)
    print("doclora stopped")
    return 0


def cmd_status(args) -> int:
    from services.stack.supervisor import part_health, read_stack, supervisor_running

    settings = Settings.from_env()
    info = read_stack(settings)
    running = supervisor_running(info)
    parts = part_health(settings)
    healthy = all(h.ok for h in parts.values())
    if args.json:
        details = (info or {}).get("parts", {}) if running else {}
        print_json(
            {
                "running": running,
                "healthy": healthy,
                "parts": {name: h.ok for name, h in parts.items()},
                "details": {
                    name: {"up": h.ok, "detail": h.detail, **details.get(name, {})}
                    for name, h in parts.items()
                },
            }
        )
    else:
        if running:
            print(
                f"doclora running (supervisor pid {info['supervisor']['pid']}, state {info.get('state_dir')})"
            )
        else:
            print("doclora not started by `doclora up` here")
        _print_status(settings, info if running else None)
    return 0 if healthy else 1


def cmd_config(args) -> int:
    """The settings in effect (environment over defaults), by variable, with secrets masked."""
    values = effective_settings(Settings.from_env())
    if args.json:
        print_json(values)
    else:
        for name, value in values.items():
            print(f"{name}={value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="doclora", description="Turn documents into a chat bot that knows them.")
    p.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('doclora')}")
    sub = p.add_subparsers(dest="cmd", required=True)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    up = sub.add_parser("up", help="start the local stack")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every part")
    up.set_defaults(fn=cmd_up)
    down = sub.add_parser("down", help="stop the local stack")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(fn=cmd_down)
    sub.add_parser("status", parents=[as_json], help="health of each part").set_defaults(fn=cmd_status)
    sub.add_parser("config", parents=[as_json], help="the settings in effect, secrets masked").set_defaults(
        fn=cmd_config
    )
    learn = sub.add_parser("learn", help="learn a bot from files, links or text")
    learn.add_argument(
        "sources", nargs="+", help="file paths (PDF, DOCX, HTML, TXT, MD, QA JSONL/CSV), links, or text"
    )
    learn.add_argument("--name", default="")
    learn.add_argument("--password", default="", help="password of encrypted PDFs")
    learn.add_argument("--max-steps", type=int, default=0, help="training steps (default: from the data)")
    learn.add_argument("--no-wait", action="store_true")
    learn.add_argument("--review", action="store_true", help="stop after generation to review the pairs")
    learn.set_defaults(fn=cmd_learn)
    qa = sub.add_parser("qa", parents=[as_json], help="show a session's question-answer pairs")
    qa.add_argument("session")
    qa.add_argument("--limit", type=int, default=100)
    qa.add_argument(
        "--export", choices=("openai", "alpaca", "sharegpt"), help="write every pair as JSON lines"
    )
    qa.set_defaults(fn=cmd_qa)
    approve = sub.add_parser("approve", help="approve a reviewed session's pairs; training starts")
    approve.add_argument("session")
    approve.add_argument("--no-wait", action="store_true")
    approve.set_defaults(fn=cmd_approve)
    retrain = sub.add_parser("retrain", help="train a finished session again from its pairs")
    retrain.add_argument("session")
    retrain.add_argument(
        "--from-scratch", action="store_true", help="start from the base model, not the adapter"
    )
    retrain.add_argument("--max-steps", type=int, default=0)
    retrain.add_argument("--no-wait", action="store_true")
    retrain.set_defaults(fn=cmd_retrain)
    exam = sub.add_parser(
        "exam",
        parents=[as_json],
        help="how a bot did on its exam after training, and what it still gets wrong",
    )
    exam.add_argument("session")
    exam.add_argument(
        "--no-wait", action="store_true", help="show it now, also while the exam is still being taken"
    )
    exam.set_defaults(fn=cmd_exam)
    chat = sub.add_parser("chat", help="chat with a bot ('base' for the base model)")
    chat.add_argument("bot")
    chat.add_argument("-m", "--message", help="one message, then exit")
    chat.add_argument("--max-tokens", type=int, default=0)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(fn=cmd_chat)
    sub.add_parser("sessions", parents=[as_json], help="list sessions").set_defaults(fn=cmd_sessions)
    cancel = sub.add_parser("cancel", parents=[as_json], help="stop a session that is not finished")
    cancel.add_argument("session")
    cancel.set_defaults(fn=cmd_cancel)
    delete = sub.add_parser(
        "delete", parents=[as_json], help="delete a bot with everything of it, or one document"
    )
    delete.add_argument("session")
    delete.add_argument("--document", default="", help="delete only this document (its id)")
    delete.set_defaults(fn=cmd_delete)
    download = sub.add_parser("download", help="save a bot's adapter (zip) or dataset (JSON lines)")
    download.add_argument("session")
    download.add_argument("what", choices=("adapter", "dataset"))
    download.add_argument("--format", choices=("openai", "alpaca", "sharegpt"), default="openai")
    download.add_argument("-o", "--output", default="", help="file to write (default: the server's name)")
    download.set_defaults(fn=cmd_download)
    share = sub.add_parser("share", parents=[as_json], help="make, list or revoke a bot's share links")
    share.add_argument("session", nargs="?", default="")
    share.add_argument(
        "--citations", action="store_true", help="answers through the link show their passages"
    )
    share.add_argument("--name", default="")
    share.add_argument("--list", action="store_true", help="list the bot's links")
    share.add_argument("--revoke", default="", metavar="SHARE_ID")
    share.set_defaults(fn=cmd_share)
    keys = sub.add_parser("keys", parents=[as_json], help="API keys: create, list, revoke (admins)")
    keys.add_argument("action", choices=("create", "list", "revoke"))
    keys.add_argument("key_id", nargs="?", default="")
    keys.add_argument(
        "--tenant", default="", help="the key's tenant (create; default: yours) or a filter (list)"
    )
    keys.add_argument("--role", choices=("member", "admin"), default="member")
    keys.add_argument("--name", default="")
    keys.add_argument("--all", action="store_true", help="list revoked keys too")
    keys.add_argument(
        "--nats",
        default="",
        metavar="URL",
        help="create the key straight in NATS (the first admin key of a server)",
    )
    keys.set_defaults(fn=cmd_keys)
    args = p.parse_args(argv)
    import httpx

    try:
        return args.fn(args)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BrokenPipeError:  # `doclora config | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush at exit
        return 0
    except httpx.ConnectError:
        settings = Settings.from_env()
        print(
            f"cannot reach the doclora gateway at {gateway_url(settings)}; start it with `doclora up`",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
