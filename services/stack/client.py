"""The `doclora` commands that use a running stack through the gateway's HTTP API: learn, approve,
retrain, cancel, qa, exam, chat, sessions, delete, download, share and keys, with the progress
follower they share. Each sends DOCLORA_API_KEY as its bearer token when set. Stack control
(up, down, status) and config are in cli.py, which wires both into one command line."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from services.common.config import Settings

FINAL = {"READY", "FAILED", "CANCELLED"}


def gateway_url(settings: Settings) -> str:
    return os.environ.get("DOCLORA_GATEWAY_URL") or f"http://{settings.gateway_host}:{settings.gateway_port}"


def _client(settings: Settings):
    import httpx

    key = settings.api_key.get_secret_value()
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return httpx.Client(
        base_url=gateway_url(settings), timeout=httpx.Timeout(30.0, read=None), headers=headers
    )


def _check(resp) -> dict:
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
            msg = f"{err['code']}: {err['message']}"
        except (ValueError, KeyError):
            msg = resp.text
        raise SystemExit(f"error {resp.status_code}: {msg}")
    return resp.json()


def print_json(obj) -> None:
    """`--json` output: one JSON document on stdout, nothing else."""
    print(json.dumps(obj, ensure_ascii=False, indent=2))


def _sse(resp):
    """(event, data) of each Server-Sent Event; comment lines (`: ping` keep-alives) are skipped."""
    event, data = None, []
    for line in resp.iter_lines():
        if line.startswith(":"):
            continue
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


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"ETA {s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"ETA {s // 60}m{s % 60:02d}s"


class Rates:
    """Each stage's ETA: the one its progress events carry, else the rate measured here since the
    stage's first event (steps done over the time they took)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.first: dict[str, tuple[float, int]] = {}  # stage -> (time, done) of its first event

    def eta(self, p: dict) -> float | None:
        stage, done, total = p.get("stage", ""), int(p.get("done", 0)), int(p.get("total", 0))
        now = self.clock()
        t0, d0 = self.first.get(stage, (now, done))
        if done < d0:  # the stage started again
            t0, d0 = now, done
        self.first[stage] = (t0, d0)
        if p.get("eta_s") is not None:
            return float(p["eta_s"])
        if total and done >= total:
            return 0.0
        if done > d0 and now > t0 and total:
            return (total - done) * (now - t0) / (done - d0)
        return None

    def line(self, p: dict) -> str:
        """The progress bar of one progress event, with its stage and ETA."""
        stage = p.get("stage", "").removeprefix("STAGE_").lower()
        bar = _bar(int(p.get("done", 0)), int(p.get("total", 0)))
        return " ".join(x for x in (f"{stage:<7}", bar, _eta(self.eta(p)), p.get("message", "")) if x)


def follow(settings: Settings, sid: str, out=sys.stdout, stop_at=None) -> str:
    """Print a session's progress until it ends (or reaches a state in `stop_at`); returns the
    state name it stopped at."""
    stop_at = FINAL | set(stop_at or ())
    state = ""
    rates = Rates()
    with _client(settings) as c, c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        for _kind, payload in _sse(resp):
            ev, sess = payload["event"], payload["session"]
            state = sess["state"].removeprefix("SESSION_STATE_")
            if "progress" in ev:
                out.write("\r" + rates.line(ev["progress"])[:119].ljust(119))
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
    if exam.get("pending"):
        return [
            f"exam: being taken ({exam['reworded']} reworded questions about trained facts);"
            " the bot answers meanwhile"
        ]
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
    lines.append(
        f"  missed in {exam.get('mode') or 'adapter'} mode: {exam.get('missed', 0)} of {exam['reworded']}"
    )
    for m in (exam.get("misses") or [])[:misses]:
        lines.append(f"  - {m['question']}\n    expected: {m['expected']}\n    answered: {m['answer']}")
    return lines


EXAM_POLL_S = 2.0


def cmd_exam(args) -> int:
    """Show how the bot did on its exam after its last training (waiting for an exam still being
    taken, unless --no-wait)."""
    settings = Settings.from_env()
    with _client(settings) as c:
        rec = _check(c.get(f"/api/v1/sessions/{args.session}"))
        exam = rec.get("train", {}).get("exam") or {}
        if exam.get("pending") and not getattr(args, "no_wait", False):
            if not args.json:
                print(exam_lines(exam)[0], file=sys.stderr)
            while exam.get("pending"):
                time.sleep(EXAM_POLL_S)
                rec = _check(c.get(f"/api/v1/sessions/{args.session}"))
                exam = rec.get("train", {}).get("exam") or {}
    if args.json:
        print_json(exam)
        return 0
    for line in exam_lines(exam):
        print(line)
    return 0


def cmd_cancel(args) -> int:
    """Stop a session that is not finished yet."""
    settings = Settings.from_env()
    with _client(settings) as c:
        sess = _check(c.post(f"/api/v1/sessions/{args.session}/cancel"))
    if args.json:
        print_json(sess)
    else:
        print(f"{sess['session_id']}  {sess['state'].removeprefix('SESSION_STATE_')}")
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
    if args.json:
        print_json(data)
        return 0
    for p in data["pairs"]:
        print(f"Q: {p['question']}\nA: {p['answer']}\n")
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
    if args.json:
        print_json(data)
        return 0
    for s in data["sessions"]:
        print(f"{s['session_id']}  {s['state'].removeprefix('SESSION_STATE_'):<10} {s['name']}")
    return 0


def cmd_delete(args) -> int:
    """Delete a bot (everything of it), or one of its documents with --document."""
    settings = Settings.from_env()
    with _client(settings) as c:
        if args.document:
            out = _check(c.delete(f"/api/v1/sessions/{args.session}/documents/{args.document}"))
        else:
            out = _check(c.delete(f"/api/v1/sessions/{args.session}"))
    if args.json:
        print_json(out)
    else:
        what = f"document {args.document} of {args.session}" if args.document else args.session
        print(f"deleted {what} ({out['objects_deleted']} stored objects)")
    return 0


def cmd_download(args) -> int:
    """Save a bot's adapter (zip with a model card) or its dataset (JSON lines) to a file."""
    settings = Settings.from_env()
    path = "adapter.zip" if args.what == "adapter" else f"qa/export?format={args.format}"
    with _client(settings) as c, c.stream("GET", f"/api/v1/sessions/{args.session}/{path}") as resp:
        if resp.status_code >= 400:
            resp.read()
            _check(resp)
        disposition = resp.headers.get("content-disposition", "")
        name = args.output or (
            disposition.split('filename="')[-1].rstrip('"') if "filename=" in disposition else ""
        )
        name = name or f"{args.session}-{args.what}"
        with open(name, "wb") as f:
            for part in resp.iter_bytes():
                f.write(part)
    print(name)
    return 0


def cmd_share(args) -> int:
    """Make, list or revoke a bot's share links."""
    settings = Settings.from_env()
    with _client(settings) as c:
        if args.revoke:
            out = _check(c.delete(f"/api/v1/shares/{args.revoke}"))
            line = f"revoked {out['share']['share_id']}"
        elif args.list:
            out = _check(c.get(f"/api/v1/sessions/{args.session}/shares"))
            rows = [
                f"{s['share_id']}  citations={'yes' if s['show_citations'] else 'no'}  {s['name']}"
                for s in out["shares"]
            ]
            line = "\n".join(rows) or "no share links"
        else:
            body = {"show_citations": args.citations, "name": args.name}
            out = _check(c.post(f"/api/v1/sessions/{args.session}/shares", json=body))
            out["url"] = gateway_url(settings) + out["url"]
            line = (
                f"{out['url']}\n(shown once; revoke with `doclora share --revoke {out['share']['share_id']}`)"
            )
    if args.json:
        print_json(out)
    else:
        print(line)
    return 0


def key_line(k: dict) -> str:
    revoked = f"  revoked {k['revoked_at']}" if k.get("revoked_at") else ""
    return f"{k['key_id']}  {k['tenant']}  {k['role']}  {k.get('name', '')}{revoked}"


async def _create_key_direct(settings: Settings, nats_url: str, tenant: str, role: str, name: str) -> dict:
    """Create a key straight in the NATS KV bucket (the first admin key of a server that asks for
    keys already), as an admin acting for the CLI."""
    from services.common import access
    from services.common.bus import Bus

    bus = await Bus.connect(nats_url, name="doclora-cli")
    try:
        await bus.ensure_streams(events_max_age_s=settings.events_max_age_s)
        role_value = access.ROLE.ROLE_ADMIN if role == "admin" else access.ROLE.ROLE_MEMBER
        key, token = await access.AccessStore(bus).create_key(tenant, role_value, name)
    finally:
        await bus.close()
    return {
        "key": {"key_id": key.key_id, "tenant": tenant, "role": role, "name": name, "revoked_at": None},
        "token": token,
    }


def cmd_keys(args) -> int:
    """API keys: create (token shown once), list, revoke."""
    import asyncio

    settings = Settings.from_env()
    if args.action == "create" and args.nats:
        out = asyncio.run(
            _create_key_direct(settings, args.nats, args.tenant or settings.tenant, args.role, args.name)
        )
    else:
        with _client(settings) as c:
            if args.action == "create":
                body = {"tenant": args.tenant, "role": args.role, "name": args.name}
                out = _check(c.post("/api/v1/keys", json=body))
            elif args.action == "list":
                out = _check(
                    c.get("/api/v1/keys", params={"tenant": args.tenant, "include_revoked": args.all})
                )
            else:
                if not args.key_id:
                    raise SystemExit("doclora keys revoke KEY_ID")
                out = _check(c.delete(f"/api/v1/keys/{args.key_id}"))
    if args.json:
        print_json(out)
    elif args.action == "create":
        print(out["token"])
        print(
            f"key {out['key']['key_id']} for tenant {out['key']['tenant']} ({out['key']['role']}); "
            "the token is shown once: keep it (DOCLORA_API_KEY)",
            file=sys.stderr,
        )
    elif args.action == "list":
        print("\n".join(key_line(k) for k in out["keys"]) or "no keys")
    else:
        print(f"revoked {out['key']['key_id']}")
    return 0
