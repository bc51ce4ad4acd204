"""The doclora stack the harness talks to, and the public HTTP API calls it makes.

`LocalStack` starts the whole stack as tests/test_e2e.py does (`doclora up --detach` with its own
state dir and free ports: nats-server, SeaweedFS, the four services, the gateway) and stops it.
`PageServer` is a web server on 127.0.0.1 (a real socket) for documents given as links; the stack
started here may fetch from it (`DOCLORA_FETCH_ALLOW=127.0.0.1`). `Api` wraps the HTTP calls.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from services.stack.ports import isolated_stack_env
from tests.fixtures.web import DocsServer

ROOT = Path(__file__).resolve().parents[2]
FINAL = {"READY", "FAILED", "CANCELLED"}


class LocalStack:
    def __init__(self, up_timeout: float = 600, prefix: str = "doclora-knowledge-", **env: str):
        """`env`: more DOCLORA_* settings for every part of the stack."""
        self.state = Path(tempfile.mkdtemp(prefix=prefix))
        self.env = isolated_stack_env(self.state, DOCLORA_FETCH_ALLOW="127.0.0.1", **env)
        self.url = f"http://127.0.0.1:{self.env['DOCLORA_GATEWAY_PORT']}"
        self.up_timeout = up_timeout

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "services.stack.cli", *args]
        return subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def up(self) -> None:
        print(f"starting the stack (state in {self.state}) ...", flush=True)
        res = self._cli("up", "--detach", "--timeout", str(self.up_timeout), timeout=self.up_timeout + 60)
        if res.returncode != 0:
            logs = "".join(
                f"--- {p.name}\n{p.read_text()[-2000:]}\n"
                for p in sorted((self.state / "logs").glob("*.log"))
            )
            self.down()
            raise RuntimeError(f"doclora up failed:\n{res.stdout}{res.stderr}\n{logs}")
        print(res.stdout.strip(), flush=True)

    def down(self) -> None:
        res = self._cli("down", timeout=180)
        print(f"stack stopped (logs in {self.state / 'logs'})" if res.returncode == 0 else res.stderr)


class PageServer(DocsServer):
    """The test suite's document web server (tests/fixtures/web.py), adding files by name."""

    def add(self, name: str, ctype: str, body: bytes) -> str:
        self.pages[f"/{name}"] = (ctype, body)
        return self.url(f"/{name}")


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Api:
    """The public HTTP API of one gateway; every call has a timeout."""

    def __init__(self, url: str, read_timeout: float = 600):
        self.c = httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=read_timeout))

    def _ok(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise RuntimeError(
                f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {resp.text}"
            )
        return resp.json()

    def upload(self, filename: str, data: bytes, ctype: str) -> str:
        return self._ok(self.c.post("/api/v1/uploads", files={"file": (filename, data, ctype)}))["upload_id"]

    def create(self, name: str, max_steps: int | None, upload_id: str = "", url: str = "") -> str:
        body: dict = {
            "name": name,
            "upload_ids": [upload_id] if upload_id else [],
            "urls": [url] if url else [],
        }
        if max_steps:
            body["max_steps"] = max_steps
        return self._ok(self.c.post("/api/v1/sessions", json=body))["session_id"]

    def session(self, sid: str) -> dict:
        return self._ok(self.c.get(f"/api/v1/sessions/{sid}"))

    def wait_exam(self, sid: str, timeout: float) -> dict:
        """Poll until the READY session's exam is no longer being taken (an error after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            sess = self.session(sid)
            if not ((sess.get("train") or {}).get("exam") or {}).get("pending"):
                return sess
            if time.monotonic() > deadline:
                raise TimeoutError(f"the exam of session {sid} not done after {timeout:.0f} s")
            time.sleep(3)

    def wait_ready(self, sid: str, timeout: float) -> dict:
        """Poll until the session is READY (or FAILED/CANCELLED, or the timeout: an error)."""
        deadline, last, shown = time.monotonic() + timeout, "", 0.0
        while True:
            sess = self.session(sid)
            state = sess["state"].removeprefix("SESSION_STATE_")
            train = sess.get("train") or {}
            note = f"{state} pairs={sess.get('qa', {}).get('pairs', 0)} step={train.get('steps', 0)}/{train.get('total_steps', 0)}"
            if note != last and (not last.startswith(state) or time.monotonic() - shown > 60):
                print(f"  {time.strftime('%H:%M:%S')} {note}", flush=True)
                last, shown = note, time.monotonic()
            if state in FINAL:
                if state != "READY":
                    raise RuntimeError(f"session {sid} ended {state}: {sess.get('error')}")
                return sess
            if time.monotonic() > deadline:
                raise TimeoutError(f"session {sid} not READY after {timeout:.0f} s (it is {state})")
            time.sleep(3)

    def cancel(self, sid: str) -> None:
        self.c.post(f"/api/v1/sessions/{sid}/cancel")  # best effort: it may have ended already

    def text(self, sid: str, doc_id: str) -> str:
        return self._ok(self.c.get(f"/api/v1/sessions/{sid}/documents/{doc_id}/text"))["text"]

    def pairs(self, sid: str) -> list[dict]:
        out, token = [], ""
        for _ in range(10_000):
            page = self._ok(
                self.c.get(f"/api/v1/sessions/{sid}/qa", params={"page_size": 500, "page_token": token})
            )
            out += page["pairs"]
            token = page.get("next_page_token", "")
            if not token:
                break
        return out

    def chat(self, bot: str, question: str, mode: str | None, max_tokens: int) -> dict:
        """A greedy, non-streamed answer: {"content", "citations", "finish_reason"}."""
        body = {
            "messages": [{"role": "user", "content": question}],
            "stream": False,
            "temperature": 0.0,
            "seed": 0,
            "max_tokens": max_tokens,
        }
        if mode:
            body["mode"] = mode
        return self._ok(self.c.post(f"/api/v1/bots/{bot}/chat", json=body))

    def close(self) -> None:
        self.c.close()
