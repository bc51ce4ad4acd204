"""`doclora` for scripts and terminals: --version, `config` with secrets masked, --json on sessions,
qa and status (one JSON document on stdout, nothing else), `cancel`, progress bars with an ETA, and
an SSE reader that skips keep-alive comments. The stack commands run against the real local stack."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time

import httpx

from services.stack import cli
from services.stack.client import Rates, _sse
from tests.test_e2e import TIMEOUT, docs_server, stack  # noqa: F401


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`doclora ARGS` in this process: exit status, stdout, stderr."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse's --version; a gateway error is a message, as Python shows it
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_is_the_package_version(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"doclora {importlib.metadata.version('doclora')}"


def test_config_prints_the_effective_settings_with_secrets_masked(capsys, monkeypatch):
    """Values from the environment show by their variables; a set secret is `****`, never itself."""
    monkeypatch.setenv("DOCLORA_QAGEN_OPENAI_KEY", "sk-very-secret-value")
    monkeypatch.setenv("DOCLORA_GATEWAY_PORT", "18123")
    code, out, _ = run_cli(capsys, "config")
    assert code == 0
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines["DOCLORA_GATEWAY_PORT"] == "18123"
    assert lines["DOCLORA_QAGEN_OPENAI_KEY"] == "****"
    code, out, _ = run_cli(capsys, "config", "--json")
    assert code == 0 and json.loads(out) == lines
    assert "sk-very-secret-value" not in out


def test_config_names_a_bad_variable(capsys, monkeypatch):
    monkeypatch.setenv("DOCLORA_GATEWAY_PORT", "not-a-port")
    code, out, err = run_cli(capsys, "config")
    assert code == 2 and out == "" and "DOCLORA_GATEWAY_PORT" in err


class Lines:
    """A response whose body is these lines, as httpx's iter_lines gives them."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def iter_lines(self):
        return iter(self.lines)


def test_the_sse_reader_skips_keep_alive_comments():
    """`: ping` comment lines, alone or inside an event, are not events and do not break one."""
    body = [": ping", "", "event: progress", ": ping", 'data: {"done": 1}', "", ":", "", 'data: {"x": 2}', ""]
    assert list(_sse(Lines(body))) == [("progress", {"done": 1}), (None, {"x": 2})]


def test_progress_bars_show_an_eta():
    """The ETA an event carries, else the rate measured since the stage's first event."""
    now = [100.0]
    rates = Rates(clock=lambda: now[0])
    first = rates.line({"stage": "STAGE_QAGEN", "done": "2", "total": "12", "message": "chunks"})
    assert first.startswith("qagen   [") and "2/12" in first and "ETA" not in first
    now[0] = 110.0  # 3 more chunks in 10 s: 7 left take about 23 s
    assert "ETA 0m23s" in rates.line({"stage": "STAGE_QAGEN", "done": "5", "total": "12"})
    carried = {"stage": "STAGE_TRAIN", "done": "10", "total": "100", "eta_s": 3725.0, "loss": 1.2}
    assert "ETA 1h02m" in rates.line(carried)
    assert "ETA 0m00s" in rates.line({"stage": "STAGE_QAGEN", "done": "12", "total": "12"})


def test_scripts_read_sessions_pairs_and_status_as_json_and_cancel(stack, capsys, monkeypatch):  # noqa: F811
    """Against the real stack: `sessions --json`, `qa --json` and `status --json` print one JSON
    document each; `cancel` stops a session, and cancelling it again is an error on stderr."""
    env, base = stack
    for name, value in env.items():
        if name.startswith("DOCLORA_"):
            monkeypatch.setenv(name, value)
    rows = [
        {"question": f"What opens door {i}?", "answer": f"The key numbered {i} opens it."} for i in range(3)
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as c:
        resp = c.post(
            "/api/v1/sessions/upload",
            files=[("files", ("doors.jsonl", data, "application/jsonl"))],
            data={"name": "doors", "review": "true"},
        )
        assert resp.status_code == 201, resp.text
        sid = resp.json()["session_id"]
        deadline = time.monotonic() + 120
        while c.get(f"/api/v1/sessions/{sid}").json()["state"] != "SESSION_STATE_AWAITING_REVIEW":
            assert time.monotonic() < deadline, c.get(f"/api/v1/sessions/{sid}").json()
            time.sleep(0.3)

    code, out, _ = run_cli(capsys, "sessions", "--json")
    assert code == 0 and sid in {s["session_id"] for s in json.loads(out)["sessions"]}
    code, out, _ = run_cli(capsys, "qa", sid, "--json")
    pairs = json.loads(out)
    assert code == 0 and pairs["total"] == 3
    assert sorted(p["answer"] for p in pairs["pairs"]) == sorted(r["answer"] for r in rows)
    code, out, _ = run_cli(capsys, "status", "--json")
    status = json.loads(out)
    assert code == 0 and status["healthy"] is True and status["running"] is True
    assert set(status["parts"]) >= {"nats", "s3", "ingest", "qagen", "trainer", "inference", "gateway"}

    code, out, _ = run_cli(capsys, "cancel", sid)
    assert code == 0 and out.split() == [sid, "CANCELLED"]
    code, out, err = run_cli(capsys, "cancel", sid, "--json")
    assert code == 1 and out == "" and "409" in err
