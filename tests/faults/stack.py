"""A local stack (`doclora up --detach`) seen from a fault test: find a part's pid in `stack.json`,
signal it, wait for the supervisor to bring it back, follow a session through the gateway while
parts come and go, and check what a finished session left in the object store.

Every wait is bounded and ends, when it fails, with what a person needs to see why: the session
record, its last events and the tail of the logs of the parts involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from unittest import mock

import httpx
import pytest

from services.common import keys
from services.common.config import Settings
from services.common.procs import pid_alive
from services.common.store import ArtifactStore
from services.stack import supervisor
from services.trainer.plan import checkpoint_key

READY = "SESSION_STATE_READY"
FINAL = {READY, "SESSION_STATE_FAILED", "SESSION_STATE_CANCELLED"}
# what a READY session leaves: per document, per session, per adapter (keys.py)
DOC_FILES = {"original", "text.md", "pages.json"}
ADAPTER_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.json",
    "doclora.json",
    "README.md",
}
SERVICES = ("ingest", "qagen", "trainer", "inference", "gateway")


def settings_of(env: dict[str, str]) -> Settings:
    """The settings the stack's processes read from `env` (the same `Settings.from_env`)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings.from_env()


class FaultStack:
    """One `doclora up` stack under `state`, started with `env`."""

    def __init__(self, env: dict[str, str], state: Path):
        self.env = env
        self.state = state
        self.logs = state / "logs"
        self.settings = settings_of(env)
        self.base = f"http://127.0.0.1:{env['DOCLORA_GATEWAY_PORT']}"
        # generating requests may wait on two cores that are training at the same time
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30.0, read=120.0))
        self.store = ArtifactStore.from_settings(self.settings)

    def close(self) -> None:
        self.http.close()
        self.store.close()

    # -- parts --------------------------------------------------------------------------------

    def pid(self, part: str) -> int:
        """The pid `stack.json` lists for `part` (nats, s3, ingest, ..., gateway)."""
        info = json.loads((self.state / "stack.json").read_text())
        return int(info["pids"][part])

    def up(self, part: str) -> bool:
        return supervisor.health(self.settings)[part]

    def down_parts(self) -> list[str]:
        return [part for part, ok in supervisor.health(self.settings).items() if not ok]

    def kill(self, part: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to `part`; returns its pid."""
        pid = self.pid(part)
        os.kill(pid, sig)
        return pid

    def kill_mid_work(self, part: str, still_working: Callable[[], bool], work: str) -> int:
        """SIGKILL `part` while it is doing `work`: it is frozen (SIGSTOP) first, `still_working()`
        checks in the store that the work is not done, then it is killed; returns its pid."""
        pid = self.kill(part, signal.SIGSTOP)
        try:
            working = still_working()
        except BaseException:
            os.kill(pid, signal.SIGCONT)
            raise
        if not working:
            os.kill(pid, signal.SIGCONT)
            pytest.fail(f"{part} had finished {work} before the test could kill it: make the work bigger")
        os.kill(pid, signal.SIGKILL)
        return pid

    def came_back(self, part: str, old_pid: int, timeout: float = 60.0) -> bool:
        """Whether `part` (killed as `old_pid`) runs again, under a new pid, and answers within
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, KeyError, ValueError):
                pid = self.pid(part)
                if pid != old_pid and pid_alive(pid) and self.up(part):
                    return True
            time.sleep(0.5)
        return False

    def wait_back(self, part: str, old_pid: int, timeout: float = 60.0) -> None:
        """Fail unless `part` (killed as `old_pid`) is restarted within `timeout` seconds."""
        if not self.came_back(part, old_pid, timeout):
            pytest.fail(
                f"{part} (killed as pid {old_pid}) was not restarted within {timeout:.0f} s\n"
                + self.log_tails([part, "stack"])
            )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """Every part answers (a test starts on a whole stack, whatever the one before it did)."""
        deadline = time.monotonic() + timeout
        while (down := self.down_parts()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if down:
            pytest.fail(f"parts of the stack are down: {down}\n" + self.log_tails([*down, "stack"]))

    # -- diagnostics --------------------------------------------------------------------------

    def log_tail(self, part: str, lines: int = 30) -> str:
        try:
            text = (self.logs / f"{part}.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def log_tails(self, parts: Iterable[str], lines: int = 30) -> str:
        return "\n".join(f"--- tail of {part}.log\n{self.log_tail(part, lines)}" for part in parts)

    def events(self, sid: str, last: int = 12, listen_s: float = 1.5) -> list[str]:
        """The session's last events as the gateway streams them (what it replays in `listen_s`)."""
        out: list[str] = []
        with contextlib.suppress(httpx.HTTPError):
            timeout = httpx.Timeout(5.0, read=listen_s)
            with httpx.Client(base_url=self.base, timeout=timeout) as c:
                with c.stream("GET", f"/api/v1/sessions/{sid}/events") as resp:
                    kind = ""
                    for line in resp.iter_lines():
                        if line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data = json.loads(line[5:])
                            ev = data.get("event", {})
                            out.append(f"{kind}: {json.dumps(ev.get(kind, ev))[:300]}")
        return out[-last:]

    def report(self, sid: str, parts: Iterable[str]) -> str:
        """The session, its last events and the log tails of `parts`, for a failure message."""
        sess = self.session(sid)
        brief = (
            {k: sess.get(k) for k in ("state", "error", "round", "documents", "qa", "adapter_id")}
            if sess
            else None
        )
        return (
            f"session {sid}: {json.dumps(brief, indent=1)[:3000]}\n"
            f"last events:\n  " + "\n  ".join(self.events(sid)) + "\n" + self.log_tails([*parts, "stack"])
        )

    # -- sessions -----------------------------------------------------------------------------

    def create(self, body: dict) -> str:
        """A new session from a JSON body; its id."""
        resp = self.http.post("/api/v1/sessions", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]

    def upload(self, files: list, data: dict) -> str:
        """A new session from uploaded files; its id."""
        resp = self.http.post("/api/v1/sessions/upload", files=files, data=data)
        assert resp.status_code == 201, resp.text
        return resp.json()["session_id"]

    def session(self, sid: str) -> dict | None:
        """The record, or None while the gateway cannot read it (the front door restarting)."""
        try:
            resp = self.http.get(f"/api/v1/sessions/{sid}", timeout=10.0)
        except httpx.HTTPError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def wait_for(
        self,
        sid: str,
        done: Callable[[dict], bool],
        what: str,
        timeout: float,
        parts: Iterable[str] = SERVICES,
        poll_s: float = 0.1,
    ) -> dict:
        """Poll the record until `done(record)`; fail after `timeout` seconds with a report."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sess = self.session(sid)
            if sess is not None and done(sess):
                return sess
            time.sleep(poll_s)
        pytest.fail(f"session {sid} did not reach {what} within {timeout:.0f} s\n" + self.report(sid, parts))

    def wait_final(self, sid: str, timeout: float, parts: Iterable[str] = SERVICES) -> dict:
        """The record once the session is READY, FAILED or CANCELLED."""
        return self.wait_for(sid, lambda s: s["state"] in FINAL, "a final state", timeout, parts, poll_s=0.3)

    def assert_ready(self, sess: dict, parts: Iterable[str] = SERVICES) -> None:
        """READY, and no document of it failed."""
        sid = sess["session_id"]
        assert sess["state"] == READY, f"session ended {sess['state']}\n" + self.report(sid, parts)
        failed = {d["name"]: d["error"] for d in sess["documents"] if d["status"] != "DOCUMENT_STATUS_READY"}
        assert not failed, f"documents did not become READY: {failed}\n" + self.report(sid, parts)

    # -- the store ----------------------------------------------------------------------------

    def checkpoint_keys(self, sess: dict) -> list[str]:
        return self.store.list(keys.checkpoints(sess["tenant"], sess["session_id"]))

    def adapter_metrics(self, sess: dict) -> dict:
        return self.store.get_json(keys.adapter_prefix(sess["tenant"], sess["adapter_id"]) + "metrics.json")

    def assert_artifacts_once(self, sess: dict) -> None:
        """What a READY session left in the store is each artifact once, under the keys the record
        names: the files of its documents, one chunks and one pairs file (no pair or chunk in them
        twice), its round's checkpoint at most, and one adapter, the record's."""
        tenant, sid = sess["tenant"], sess["session_id"]
        docs = {d["doc_id"] for d in sess["documents"]}
        prefix = keys.session_prefix(tenant, sid)
        found = self.store.list(prefix)
        allowed = {keys.chunks(tenant, sid), keys.qa_pairs(tenant, sid), keys.qa_state(tenant, sid)}
        allowed |= {keys.doc_prefix(tenant, sid, d) + f for d in docs for f in (*DOC_FILES, "qa.jsonl")}
        # checkpoints are dropped just after READY is written: the round's may be there for a moment
        allowed.add(checkpoint_key(tenant, sid, sess.get("round", 0)))
        strays = [k for k in found if k not in allowed]
        assert not strays, f"objects of session {sid} under keys its record does not name: {strays}"
        for d in sess["documents"]:
            have = {
                k.rsplit("/", 1)[1] for k in found if k.startswith(keys.doc_prefix(tenant, sid, d["doc_id"]))
            }
            assert DOC_FILES <= have, (d["name"], sorted(have))
        pairs = [
            json.loads(x) for x in self.store.get_bytes(keys.qa_pairs(tenant, sid)).splitlines() if x.strip()
        ]
        ids = [p["pair_id"] for p in pairs]
        assert len(ids) == len(set(ids)) == sess["qa"]["pairs"], (
            len(ids),
            len(set(ids)),
            sess["qa"]["pairs"],
        )
        chunk_rows = self.store.get_bytes(keys.chunks(tenant, sid)).splitlines()
        chunk_ids = [json.loads(x)["chunk_id"] for x in chunk_rows if x.strip()]
        assert len(chunk_ids) == len(set(chunk_ids)), "a chunk is in chunks.jsonl twice"
        adapters: dict[str, set[str]] = {}
        for key in self.store.list(keys.adapters_prefix(tenant)):
            adapter_id, name = key.removeprefix(keys.adapters_prefix(tenant)).split("/", 1)
            if keys.session_of_adapter(adapter_id) == sid:
                adapters.setdefault(adapter_id, set()).add(name)
        assert set(adapters) == {sess["adapter_id"]}, f"adapters of session {sid}: {sorted(adapters)}"
        assert adapters[sess["adapter_id"]] == ADAPTER_FILES, sorted(adapters[sess["adapter_id"]])
