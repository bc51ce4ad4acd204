"""`doclora`: run the local stack (up / down / status) and use it (learn / qa / chat / sessions)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.common.config import Settings

FINAL = {"READY", "FAILED", "CANCELLED"}


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wanted_ports(settings: Settings) -> list[tuple[str, str, int]]:
    from urllib.parse import urlparse

    from services.stack.supervisor import SERVICES

    out = []
    if settings.embedded_nats:
        out.append(("nats", "127.0.0.1", urlparse(settings.nats_url).port or 4222))
    if settings.embedded_s3:
        out.append(("s3", "127.0.0.1", int(settings.s3_endpoint.rsplit(":", 1)[1])))
    for name, _m, field in SERVICES:
        host, port = getattr(settings, field).rsplit(":", 1)
        out.append((name, host, int(port)))
    out.append(("gateway", settings.gateway_host, settings.gateway_port))
    return out


def _print_status(state: dict[str, bool]) -> None:
    for name, ok in state.items():
        print(f"  {name:<10} {'up' if ok else 'DOWN'}")


def cmd_up(args) -> int:
    from services.common.procs import pid_alive
    from services.stack.supervisor import Stack, health, read_stack, state_dir

    settings = Settings.from_env()
    info = read_stack(settings)
    if info and pid_alive(info.get("supervisor_pid", -1)):
        print(f"doclora is already running (pid {info['supervisor_pid']}); `doclora status` shows it")
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
        while not stop.is_set() and not all(health(settings).values()):
            if time.monotonic() > deadline:
                print("some parts did not come up in time:", file=sys.stderr)
                _print_status(health(settings))
                return 1
            stop.wait(1.0)
        if not stop.is_set():
            print(f"doclora is up: http://{settings.gateway_host}:{settings.gateway_port}", flush=True)
        stack.supervise(stop)
    finally:
        stack.stop()
    return 0


def _wait_healthy(settings: Settings, timeout: float, proc: subprocess.Popen) -> int:
    from services.stack.supervisor import health, state_dir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"doclora failed to start; see {state_dir(settings) / 'logs'}", file=sys.stderr)
            return 1
        state = health(settings)
        if all(state.values()):
            print(f"doclora is up: http://{settings.gateway_host}:{settings.gateway_port}")
            print(f"logs: {state_dir(settings) / 'logs'}")
            return 0
        time.sleep(1.0)
    print("doclora did not come up in time:", file=sys.stderr)
    _print_status(health(settings))
    return 1


def cmd_down(args) -> int:
    from services.common.procs import pid_alive
    from services.stack.supervisor import read_stack, stack_file

    settings = Settings.from_env()
    info = read_stack(settings)
    if not info:
        print("doclora is not running")
        return 0
    pid = info.get("supervisor_pid", -1)
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    # whatever outlived its supervisor (a crash, a timeout) is stopped by force
    for name, child in (info.get("pids") or {}).items():
        if pid_alive(child):
            print(f"killing {name} (pid {child})")
            os.kill(child, signal.SIGKILL)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    stack_file(settings).unlink(missing_ok=True)
    print("doclora stopped")
    return 0


def cmd_status(args) -> int:
    from services.stack.supervisor import health, read_stack

    settings = Settings.from_env()
    info = read_stack(settings)
    state = health(settings)
    print("doclora " + ("running" if info else "not started by `doclora up` here"))
    _print_status(state)
    return 0 if all(state.values()) else 1


# ---- client commands, over the gateway's HTTP API ----


def _gateway(settings: Settings) -> str:
    return os.environ.get("DOCLORA_GATEWAY_URL") or f"http://{settings.gateway_host}:{settings.gateway_port}"


def _client(settings: Settings):
    import httpx

    return httpx.Client(base_url=_gateway(settings), timeout=httpx.Timeout(30.0, read=None))


def _check(resp) -> dict:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            msg = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError):
            msg = resp.text
        raise SystemExit(f"error {resp.status_code}: {msg}")
    return resp.json()


def _sse(resp):
    event, data = None, []
    for line in resp.iter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def _bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 0.0
    fill = int(frac * width)
    return "[" + "#" * fill + "-" * (width - fill) + f"] {done}/{total}"


def follow(settings: Settings, sid: str, out=sys.stdout, stop_at=None) -> str:
    """Print a session's progress until it ends (or reaches a state in `stop_at`); returns the
    state name it stopped at."""
    stop_at = FINAL | set(stop_at or ())
    state = ""
    with _client(settings) as c, c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        for _kind, payload in _sse(resp):
            ev, sess = payload["event"], payload["session"]
            state = sess["state"].removeprefix("SESSION_STATE_")
            if "progress" in ev:
                p = ev["progress"]
                stage = p.get("stage", "").removeprefix("STAGE_").lower()
                line = f"\r{stage:<7} {_bar(int(p.get('done', 0)), int(p.get('total', 0)))} {p.get('message', '')}"
                out.write(line[:120].ljust(120))
            else:
                out.write(f"\n{state}")
                if state == "FAILED":
                    out.write(f": {sess.get('error', {}).get('message', '')}")
            out.flush()
            if state in stop_at:
                break
    out.write("\n")
    return state


def cmd_learn(args) -> int:
    """Sources may be files (uploaded), http(s) links, or text; all go into one session."""
    settings = Settings.from_env()
    files, urls, texts = [], [], []
    for source in args.sources:
        if source.startswith(("http://", "https://")):
            urls.append(source)
        elif len(source) < 4096 and Path(source).is_file():
            files.append(Path(source))
        else:
            texts.append(source)
    form = {"name": args.name, "urls": urls, "password": args.password}
    if texts:
        form["text"] = "\n\n".join(texts)
    if args.max_steps:
        form["max_steps"] = str(args.max_steps)
    if args.review:
        form["review"] = "true"
    with _client(settings) as c:
        handles = [open(p, "rb") for p in files]  # streamed by httpx, never read whole here
        try:
            sess = _check(
                c.post(
                    "/api/v1/sessions/upload",
                    data=form,
                    files=[("files", (p.name, h)) for p, h in zip(files, handles, strict=True)],
                )
            )
        finally:
            for h in handles:
                h.close()
    sid = sess["session_id"]
    print(f"session {sid}")
    if args.no_wait:
        return 0
    state = follow(settings, sid, stop_at={"AWAITING_REVIEW"})
    with _client(settings) as c:
        for d in _check(c.get(f"/api/v1/sessions/{sid}"))["documents"]:
            if d["status"] == "DOCUMENT_STATUS_FAILED":
                print(f"  skipped {d['name']}: {d['error']}")
    return _next_step(state, sid, settings)


def _next_step(state: str, sid: str, settings: Settings) -> int:
    if state == "AWAITING_REVIEW":
        print(f"review the pairs: doclora qa {sid} (or the web UI), then: doclora approve {sid}")
        return 0
    if state == "READY":
        with _client(settings) as c:
            exam = _check(c.get(f"/api/v1/sessions/{sid}"))["train"].get("exam") or {}
        for line in exam_lines(exam, misses=3):
            print(line)
        print(f"ready: doclora chat {sid}")
        return 0
    return 1


def _f1(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def exam_lines(exam: dict, misses: int = 10) -> list[str]:
    """The session's exam (TrainStats.exam as JSON) for a terminal: token-F1 of each way of
    answering on reworded questions about trained facts, declines of out-of-document questions,
    and the first `misses` questions the bot still gets wrong."""
    if not exam.get("reworded"):
        return ["exam: none (no reworded questions were kept for it)"]
    lines = [
        f"exam: {exam['reworded']} reworded questions about trained facts, token-F1"
        f" base {_f1(exam.get('base_f1'))}, adapter {_f1(exam.get('adapter_f1'))},"
        f" base reading passages {_f1(exam.get('retrieval_f1'))},"
        f" adapter reading passages {_f1(exam.get('both_f1'))}"
    ]
    if exam.get("absent"):
        lines.append(
            f"  out-of-document questions declined: {exam.get('retrieval_declined', 0):.0%} reading passages,"
            f" {exam.get('both_declined', 0):.0%} with the adapter (of {exam['absent']})"
        )
    lines.append(f"  missed in {exam.get('mode') or 'adapter'} mode: {exam.get('missed', 0)} of {exam['reworded']}")
    for m in (exam.get("misses") or [])[:misses]:
        lines.append(f"  - {m['question']}\n    expected: {m['expected']}\n    answered: {m['answer']}")
    return lines


def cmd_exam(args) -> int:
    """Show how the bot did on its exam after its last training."""
    settings = Settings.from_env()
    with _client(settings) as c:
        rec = _check(c.get(f"/api/v1/sessions/{args.session}"))
    if args.json:
        print(json.dumps(rec.get("train", {}).get("exam") or {}, ensure_ascii=False, indent=2))
        return 0
    for line in exam_lines(rec.get("train", {}).get("exam") or {}):
        print(line)
    return 0


def cmd_approve(args) -> int:
    """Approve a reviewed session's pairs and follow its training."""
    settings = Settings.from_env()
    with _client(settings) as c:
        _check(c.post(f"/api/v1/sessions/{args.session}/approve"))
    if args.no_wait:
        return 0
    return _next_step(follow(settings, args.session), args.session, settings)


def cmd_retrain(args) -> int:
    """Train a finished session again from its stored pairs."""
    settings = Settings.from_env()
    body: dict = {"from_scratch": args.from_scratch}
    if args.max_steps:
        body["max_steps"] = args.max_steps
    with _client(settings) as c:
        _check(c.post(f"/api/v1/sessions/{args.session}/retrain", json=body))
    if args.no_wait:
        return 0
    return _next_step(follow(settings, args.session, stop_at={"AWAITING_REVIEW"}), args.session, settings)


def cmd_qa(args) -> int:
    settings = Settings.from_env()
    if args.export:
        with (
            _client(settings) as c,
            c.stream(
                "GET", f"/api/v1/sessions/{args.session}/qa/export", params={"format": args.export}
            ) as resp,
        ):
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            for piece in resp.iter_bytes():
                sys.stdout.buffer.write(piece)
        sys.stdout.flush()
        return 0
    with _client(settings) as c:
        data = _check(c.get(f"/api/v1/sessions/{args.session}/qa", params={"page_size": args.limit}))
    for p in data["pairs"]:
        if args.json:
            print(json.dumps(p, ensure_ascii=False))
        else:
            print(f"Q: {p['question']}\nA: {p['answer']}\n")
    if not args.json:
        print(f"({len(data['pairs'])} of {data['total']} pairs)")
    return 0


def _chat_once(c, bot: str, history: list[dict], args) -> str:
    body = {"messages": history, "stream": True, "temperature": args.temperature}
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    answer, cites = [], []
    with c.stream("POST", f"/api/v1/bots/{bot}/chat", json=body) as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        for kind, payload in _sse(resp):
            if kind == "citations":
                cites = payload["citations"]
            elif kind == "delta":
                answer.append(payload["delta"])
                sys.stdout.write(payload["delta"])
                sys.stdout.flush()
            elif kind == "error":
                raise SystemExit(f"\nerror: {payload['error']['message']}")
    sys.stdout.write("\n")
    for ci in cites:
        print(f"  [{ci['index']}] {ci['doc_name']}, p. {ci['page']}")
    return "".join(answer)


def cmd_chat(args) -> int:
    settings = Settings.from_env()
    history: list[dict] = []
    with _client(settings) as c:
        if args.message:
            history.append({"role": "user", "content": args.message})
            _chat_once(c, args.bot, history, args)
            return 0
        print("chat with", args.bot, "(empty line to quit)")
        while True:
            try:
                q = input("> ").strip()
            except EOFError:
                return 0
            if not q:
                return 0
            history.append({"role": "user", "content": q})
            history.append({"role": "assistant", "content": _chat_once(c, args.bot, history, args)})


def cmd_sessions(args) -> int:
    settings = Settings.from_env()
    with _client(settings) as c:
        data = _check(c.get("/api/v1/sessions"))
    for s in data["sessions"]:
        print(f"{s['session_id']}  {s['state'].removeprefix('SESSION_STATE_'):<10} {s['name']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(prog="doclora", description="Turn documents into a chat bot that knows them.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the local stack")
    up.add_argument("-d", "--detach", action="store_true", help="run in the background")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every part")
    up.set_defaults(fn=cmd_up)
    down = sub.add_parser("down", help="stop the local stack")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(fn=cmd_down)
    sub.add_parser("status", help="health of each part").set_defaults(fn=cmd_status)
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
    qa = sub.add_parser("qa", help="show a session's question-answer pairs")
    qa.add_argument("session")
    qa.add_argument("--limit", type=int, default=100)
    qa.add_argument("--json", action="store_true")
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
    exam = sub.add_parser("exam", help="how a bot did on its exam after training, and what it still gets wrong")
    exam.add_argument("session")
    exam.add_argument("--json", action="store_true", help="the exam as JSON")
    exam.set_defaults(fn=cmd_exam)
    chat = sub.add_parser("chat", help="chat with a bot ('base' for the base model)")
    chat.add_argument("bot")
    chat.add_argument("-m", "--message", help="one message, then exit")
    chat.add_argument("--max-tokens", type=int, default=0)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(fn=cmd_chat)
    sub.add_parser("sessions", help="list sessions").set_defaults(fn=cmd_sessions)
    args = p.parse_args(argv)
    import httpx

    try:
        return args.fn(args)
    except httpx.ConnectError:
        settings = Settings.from_env()
        print(
            f"cannot reach the doclora gateway at {_gateway(settings)}; start it with `doclora up`",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
