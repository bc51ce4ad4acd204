"""The local supervisor on a real stack (`doclora up --detach`, every part its own process): it
restarts nats-server and SeaweedFS on their stores, gives up a part that keeps crashing within its
restart window and says so, gives each service a metrics port, does not take another process on a
part's port for the part, and `doclora down` signals only processes it can prove are its own,
SIGTERM first. The stack's NATS and S3 server require the credentials its services read from
settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest

from services.common import errors
from services.common.bus import WORK_STREAM, Bus
from services.common.config import Settings
from services.common.store import ArtifactStore
from services.stack.identity import identify, same_process
from services.stack.ports import isolated_stack_env
from services.stack.supervisor import SERVICES, RestartBudget, health, part_health
from tests.faults.stack import settings_of
from tests.test_e2e import _cli, up_or_fail

pytestmark = pytest.mark.e2e

NATS_USER = "stack-svc"
NATS_PASSWORD = "stack-nats-secret"
S3_KEY, S3_SECRET = "stack-key", "stack-s3-secret"
RESTART_MAX, RESTART_WINDOW_S = 2, 120
PARTS = ("nats", "s3", *(name for name, _m, _f in SERVICES), "gateway")


def stack_info(state: Path) -> dict:
    return json.loads((state / "stack.json").read_text())


def wait_until(check: Callable[[], object], what: str, timeout: float = 60.0, logs: Path | None = None):
    """`check()`'s first truthy value within `timeout` seconds, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, KeyError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    tail = (logs / "stack.log").read_text()[-3000:] if logs else ""
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail}")


def restarted(state: Path, part: str, old_pid: int) -> dict | None:
    """The part's record once it runs again under another pid."""
    rec = stack_info(state)["parts"][part]
    return rec if rec["pid"] != old_pid and rec["state"] == "running" and same_process(rec) else None


class Stack:
    def __init__(self, env: dict, state: Path):
        self.env, self.state, self.logs = env, state, state / "logs"
        self.settings: Settings = settings_of(env)

    def info(self) -> dict:
        return stack_info(self.state)

    def kill(self, part: str) -> int:
        pid = self.info()["parts"][part]["pid"]
        os.kill(pid, signal.SIGKILL)
        return pid

    def wait_restarted(self, part: str, old_pid: int) -> dict:
        rec = wait_until(lambda: restarted(self.state, part, old_pid), f"{part} restarted", logs=self.logs)
        wait_until(lambda: health(self.settings)[part], f"{part} answering again", logs=self.logs)
        return rec


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    state = tmp_path_factory.mktemp("supervised")
    env = isolated_stack_env(
        state,
        DOCLORA_NATS_USER=NATS_USER,
        DOCLORA_NATS_PASSWORD=NATS_PASSWORD,
        DOCLORA_S3_ACCESS_KEY=S3_KEY,
        DOCLORA_S3_SECRET_KEY=S3_SECRET,
        DOCLORA_STACK_RESTART_MAX=str(RESTART_MAX),
        DOCLORA_STACK_RESTART_WINDOW_S=str(RESTART_WINDOW_S),
        DOCLORA_GRPC_GRACE_S="2",
    )
    up_or_fail(env, state, 240)
    yield Stack(env, state)
    _cli(env, "down")


def test_each_part_is_recorded_by_identity_and_each_service_has_a_metrics_port(stack):
    info = stack.info()
    assert same_process(info["supervisor"])
    for name in PARTS:
        rec = info["parts"][name]
        assert rec["state"] == "running" and same_process(rec), (name, rec)
        assert info["pids"][name] == rec["pid"]
    metrics = info["metrics"]
    assert set(metrics) == {name for name, _m, _f in SERVICES}
    ports = {int(addr.rsplit(":", 1)[1]) for addr in metrics.values()}
    assert all(addr.startswith("127.0.0.1:") for addr in metrics.values()) and len(ports) == len(SERVICES)
    assert not ports & {rec["port"] for rec in info["parts"].values()}
    for name, addr in metrics.items():
        environ = Path(f"/proc/{info['parts'][name]['pid']}/environ").read_bytes().split(b"\0")
        assert f"DOCLORA_METRICS_ADDR={addr}".encode() in environ, name
    gateway_env = Path(f"/proc/{info['parts']['gateway']['pid']}/environ").read_bytes()
    assert b"DOCLORA_METRICS_ADDR=" not in gateway_env  # it serves /metrics on its own port
    url = f"http://{metrics['ingest']}/metrics"
    wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, f"{url} answering")

    status = _cli(stack.env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name, addr in metrics.items():
        line = next(row for row in status.stdout.splitlines() if row.split()[:1] == [name])
        assert "up" in line.split() and f"metrics http://{addr}/metrics" in line, line
    details = json.loads(_cli(stack.env, "status", "--json").stdout)["details"]
    assert {name: details[name]["metrics"] for name in metrics} == metrics


async def test_the_stacks_nats_and_s3_require_the_credentials_its_services_read(stack):
    s = stack.settings
    with pytest.raises(errors.Unauthenticated):
        await Bus.connect(s.nats_url, name="no-credentials", user="", password="", connect_timeout_s=1.0)
    # the services made their streams with the credentials from their settings
    async with await Bus.connect(
        s.nats_url, name="with-credentials", user=NATS_USER, password=NATS_PASSWORD
    ) as bus:
        assert (await bus.js.stream_info(WORK_STREAM)).config.name == WORK_STREAM
    default = ArtifactStore.from_settings(Settings(s3_endpoint=s.s3_endpoint), retries=0)
    ours = ArtifactStore.from_settings(s, retries=0)
    try:
        with pytest.raises(errors.Unauthenticated):
            default.get_bytes("anything")
        assert not ours.exists("anything")  # the bucket the services made exists
    finally:
        default.close()
        ours.close()


async def test_a_killed_nats_server_is_restarted_on_its_store(stack):
    """SIGKILL nats-server: the supervisor starts it again on the same port and folder; what was
    stored is there, and the services reconnect (the gateway lists sessions through ingest)."""
    s = stack.settings
    async with await Bus.connect(s.nats_url, name="probe", user=NATS_USER, password=NATS_PASSWORD) as bus:
        await bus.js.add_stream(name="PROBE", subjects=["probe.>"])
        await bus.js.publish("probe.kept", b"kept")
    pid = stack.kill("nats")
    stack.wait_restarted("nats", pid)
    async with await Bus.connect(s.nats_url, name="again", user=NATS_USER, password=NATS_PASSWORD) as bus:
        assert (await bus.js.get_msg("PROBE", seq=1)).data == b"kept"
        await bus.js.delete_stream("PROBE")
    gateway = f"http://127.0.0.1:{s.gateway_port}"
    wait_until(
        lambda: httpx.get(f"{gateway}/api/v1/sessions", timeout=5).status_code == 200, "sessions listed"
    )
    assert f"nats exited with -9; restart 1 of {RESTART_MAX}" in (stack.logs / "stack.log").read_text()


def test_a_killed_s3_server_is_restarted_with_its_bucket(stack):
    store = ArtifactStore.from_settings(stack.settings, retries=0)
    try:
        store.put_bytes("supervisor-probe/kept.txt", b"kept")
        pid = stack.kill("s3")
        stack.wait_restarted("s3", pid)
        assert (
            wait_until(lambda: store.get_bytes("supervisor-probe/kept.txt"), "the object read back")
            == b"kept"
        )
    finally:
        store.close()


class _Impostor(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _bind(port: int, timeout: float = 5.0) -> HTTPServer:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return HTTPServer(("127.0.0.1", port), _Impostor)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_another_process_answering_on_the_gateway_port_is_not_the_gateway(stack):
    """The gateway dies and another server takes its port and answers /healthz: the stack is not
    healthy (`doclora up` would not report success, `status` says why) until its own gateway holds
    the port again."""
    port = stack.settings.gateway_port
    pid = stack.kill("gateway")
    impostor = _bind(port)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        # the restarted gateway cannot bind the port and exits
        wait_until(
            lambda: (rec := stack.info()["parts"]["gateway"])["pid"] != pid and not same_process(rec),
            "the restarted gateway failing to bind",
            logs=stack.logs,
        )
        gateway = part_health(stack.settings)["gateway"]
        assert not gateway.ok, gateway
        status = _cli(stack.env, "status")
        assert status.returncode == 1
        assert "DOWN" in next(row for row in status.stdout.splitlines() if row.split()[:1] == ["gateway"])
    finally:
        impostor.shutdown()
        impostor.server_close()
    wait_until(
        lambda: part_health(stack.settings)["gateway"].ok, "our gateway back on its port", logs=stack.logs
    )


def test_a_part_that_keeps_crashing_is_given_up_and_status_says_so(stack):
    pid = stack.kill("qagen")
    for _ in range(RESTART_MAX):
        pid = wait_until(lambda old=pid: restarted(stack.state, "qagen", old), "qagen restarted")["pid"]
        os.kill(pid, signal.SIGKILL)
    rec = wait_until(
        lambda: (r := stack.info()["parts"]["qagen"])["state"] == "given up" and r, "qagen given up"
    )
    assert rec["restarts"] == RESTART_MAX
    log = (stack.logs / "stack.log").read_text()
    assert (
        f"qagen exited with -9 and keeps failing: {RESTART_MAX} restarts within {RESTART_WINDOW_S} s" in log
    )
    time.sleep(1.5)  # no further restart
    assert stack.info()["parts"]["qagen"]["pid"] == pid and not same_process(stack.info()["parts"]["qagen"])
    status = _cli(stack.env, "status")
    assert status.returncode == 1
    line = next(row for row in status.stdout.splitlines() if row.split()[:1] == ["qagen"])
    assert "DOWN" in line and "given up" in line, line
    assert health(stack.settings)["ingest"]  # the rest runs on


def test_down_after_the_supervisor_died_stops_each_part_with_sigterm_first(stack):
    info = stack.info()
    os.kill(info["supervisor"]["pid"], signal.SIGKILL)
    wait_until(lambda: not same_process(info["supervisor"]), "the supervisor gone")
    running = {name: rec for name, rec in info["parts"].items() if same_process(rec)}
    assert {"nats", "s3", "ingest", "gateway"} <= set(running)
    down = _cli(stack.env, "down", "--timeout", "5")
    assert down.returncode == 0, down.stderr
    assert not [name for name, rec in running.items() if same_process(rec)], down.stdout
    assert 'Trapped "terminated" signal' in (stack.logs / "nats.log").read_text()
    assert "killed nats" not in down.stdout and "killed ingest" not in down.stdout, down.stdout
    assert not (stack.state / "stack.json").exists()


def test_down_leaves_alone_a_pid_that_is_no_longer_the_stacks(tmp_path):
    """stack.json names a PID that now belongs to another process (same number, another start
    time): `doclora down` does not signal it, whether the record has an identity or only a PID."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        me = identify(stranger.pid)
        old = {
            "pid": stranger.pid,
            "started": "ticks:1",
            "cmdline": [sys.executable, "-m", "services.ingest"],
        }
        (tmp_path / "stack.json").write_text(
            json.dumps(
                {
                    "supervisor": {**me, "started": "ticks:1"},
                    "supervisor_pid": stranger.pid,
                    "pids": {"ingest": stranger.pid, "nats": stranger.pid},
                    "parts": {"ingest": old, "nats": {"pid": stranger.pid}},
                }
            )
        )
        down = _cli({**os.environ, "DOCLORA_STATE_DIR": str(tmp_path)}, "down", "--timeout", "2")
        assert down.returncode == 0, down.stderr
        time.sleep(0.2)
        assert stranger.poll() is None, down.stdout
        assert f"pid {stranger.pid} is no longer this stack's ingest: left alone" in down.stdout
    finally:
        stranger.kill()
        stranger.wait()


def test_the_restart_budget_is_a_window_with_a_doubling_back_off():
    now = [0.0]
    budget = RestartBudget(3, 60.0, first_s=1.0, max_s=3.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(4)] == [1.0, 2.0, 3.0, None]
    now[0] = 30.0
    assert budget.take() is None  # still three within the last minute
    now[0] = 60.5
    assert budget.take() == 1.0  # the first three have left the window
    assert budget.recent() == 1


def test_seaweedfs_never_picks_a_port_handed_to_another_part():
    """The stack hands ports to services (gRPC, metrics) before they bind them: SeaweedFS, started
    first, must not take one (a metrics port taken by weed's gRPC port kept the trainer from
    starting through all its restarts)."""
    from services.stack.ports import free_ports
    from services.stack.s3d import _pick_ports

    avoid = frozenset(free_ports(200))  # free now, as a not-yet-started service's ports are
    ports = _pick_ports(None, avoid)
    assert not set(ports.values()) & avoid
