"""The local stack: nats-server, SeaweedFS's S3 server, every service as its own process, and the
gateway, supervised by one `doclora up` process and stopped by it on SIGTERM.

Every part is restarted when it dies, on the same ports and data folders (nats-server comes back
with its streams and KV buckets, SeaweedFS with its bucket), after a back-off that doubles from
1 s to 30 s. A part that needs more than `stack_restart_max` restarts within
`stack_restart_window_s` seconds is given up: an error line in the stack's log, and
`doclora status` shows it.

`<state>/stack.json` says what runs where: each part's identity (PID, start time, command line;
see identity.py), state, restarts, port and Prometheus metrics address (a free loopback port per
service, kept across its restarts). `doclora down` and `doclora status` trust a PID only while its
identity matches, and a part is healthy only while its own process holds its port and answers, not
some other process on that port. Logs go to `<state>/logs/<part>.log`.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from services.common.config import Settings
from services.stack.identity import holds_port, identify, same_process
from services.stack.ports import LOOPBACK, free_ports

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

# (name, module, settings field with its address)
SERVICES = [
    ("ingest", "services.ingest", "ingest_addr"),
    ("qagen", "services.qagen", "qagen_addr"),
    ("trainer", "services.trainer", "trainer_addr"),
    ("inference", "services.inference", "inference_addr"),
]
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
POLL_S = 0.5

RUNNING, RESTARTING, GIVEN_UP = "running", "restarting", "given up"


def state_dir(settings: Settings) -> Path:
    return Path(settings.state_dir).expanduser().resolve()


def stack_file(settings: Settings) -> Path:
    return state_dir(settings) / "stack.json"


def read_stack(settings: Settings) -> dict | None:
    try:
        return json.loads(stack_file(settings).read_text())
    except (OSError, ValueError):
        return None


def supervisor_running(info: dict | None) -> bool:
    """Whether the supervisor that wrote `info` (a stack.json) still runs (identity checked)."""
    return bool(info) and same_process(info.get("supervisor"))


# ---------------------------------------------------------------------------------------- health


def grpc_healthy(addr: str, timeout: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(addr) as ch:
            request = health_pb2.HealthCheckRequest(service="")
            resp = health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 500
    except urllib.error.HTTPError as err:  # it answered: a 403 from an S3 root is healthy
        return err.code < 500
    except OSError:
        return False


def _tcp_ok(url: str) -> bool:
    import socket

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or 4222), timeout=1.0):
            return True
    except OSError:
        return False


def part_ports(settings: Settings) -> dict[str, int]:
    """The port each part listens on, by part name."""
    ports = {
        "nats": urlparse(settings.nats_url).port or 4222,
        "s3": int(settings.s3_endpoint.rsplit(":", 1)[1]),
    }
    for name, _module, field_name in SERVICES:
        ports[name] = int(getattr(settings, field_name).rsplit(":", 1)[1])
    ports["gateway"] = settings.gateway_port
    return ports


@dataclass(frozen=True)
class PartHealth:
    ok: bool
    detail: str  # why not, or what runs ("pid 123")


def part_health(settings: Settings) -> dict[str, PartHealth]:
    """Each part's health: keys nats, s3, each service, gateway. A part this stack runs (in
    stack.json) is healthy when its recorded process still runs, holds its port and answers; a part
    run elsewhere (DOCLORA_EMBEDDED_*=0) when its address answers."""
    info = read_stack(settings) or {}
    parts = info.get("parts", {}) if supervisor_running(info) else {}
    scheme = "https" if settings.s3_secure else "http"
    nats_monitor = info.get("nats_monitor") if parts.get("nats") else None
    if nats_monitor:
        nats_probe = functools.partial(http_ok, nats_monitor + "/healthz")
    else:
        nats_probe = functools.partial(_tcp_ok, settings.nats_url)
    probes: dict[str, Callable[[], bool]] = {
        "nats": nats_probe,
        "s3": functools.partial(http_ok, f"{scheme}://{settings.s3_endpoint}/"),
    }
    for name, _module, field_name in SERVICES:
        probes[name] = functools.partial(grpc_healthy, getattr(settings, field_name))
    probes["gateway"] = functools.partial(
        http_ok, f"http://{settings.gateway_host}:{settings.gateway_port}/healthz"
    )
    ports = part_ports(settings)
    out = {}
    for name, probe in probes.items():
        out[name] = _one_health(parts.get(name), ports[name], probe)
    return out


def _one_health(rec: dict | None, port: int, probe: Callable[[], bool]) -> PartHealth:
    if rec is None:
        return PartHealth(True, "answers") if probe() else PartHealth(False, "not answering")
    if rec.get("state") == GIVEN_UP:
        return PartHealth(False, f"given up after {rec.get('restarts', 0)} restarts (log {rec.get('log')})")
    if not same_process(rec):
        if rec.get("state") == RESTARTING:
            return PartHealth(False, f"restarting (exited with {rec.get('exit_code')})")
        return PartHealth(False, "not running")
    if holds_port(int(rec["pid"]), port) is False:
        answered = " (another process answers there)" if probe() else ""
        return PartHealth(False, f"pid {rec['pid']} does not hold port {port} (yet){answered}")
    if not probe():
        return PartHealth(False, f"pid {rec['pid']} not answering yet")
    return PartHealth(True, f"pid {rec['pid']}")


def health(settings: Settings) -> dict[str, bool]:
    """Is each part of the stack up (see `part_health`)? Keys: nats, s3, each service, gateway."""
    return {name: h.ok for name, h in part_health(settings).items()}


# ---------------------------------------------------------------------------------------- parts


class RestartBudget:
    """At most `max_restarts` restarts within any `window_s` seconds, each after a back-off that
    doubles with the restarts in the window (from `first_s` up to `max_s`)."""

    def __init__(
        self,
        max_restarts: int,
        window_s: float,
        *,
        first_s: float = BACKOFF_FIRST_S,
        max_s: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.first_s = first_s
        self.max_s = max_s
        self.clock = clock
        self._recent: collections.deque[float] = collections.deque()

    def recent(self) -> int:
        """Restarts within the window now."""
        now = self.clock()
        while self._recent and self._recent[0] <= now - self.window_s:
            self._recent.popleft()
        return len(self._recent)

    def take(self) -> float | None:
        """Take one restart: the seconds to wait before it, or None when the budget is spent."""
        count = self.recent()
        if count >= self.max_restarts:
            return None
        self._recent.append(self.clock())
        return min(self.first_s * 2**count, self.max_s)


class Running(Protocol):
    """A started part: its process and how to stop it (and clean up after it)."""

    @property
    def proc(self) -> subprocess.Popen: ...

    def stop(self, grace: float) -> int | None: ...


class ChildProcess:
    """A service or the gateway: a plain child process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def stop(self, grace: float) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class Part:
    """One supervised process of the stack."""

    name: str
    launch: Callable[[], Running]
    budget: RestartBudget
    log_path: Path
    port: int
    metrics_addr: str = ""
    running: Running | None = None
    identity: dict | None = None
    state: str = "starting"
    restarts: int = 0
    exit_code: int | None = None
    restart_at: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self.running = self.launch()
        self.identity = identify(self.running.proc.pid)
        self.state, self.restart_at = RUNNING, None

    def alive(self) -> bool:
        return self.running is not None and self.running.proc.poll() is None

    def stop(self, grace: float) -> None:
        if self.running is not None:
            self.running.stop(grace)

    def record(self) -> dict:
        return {
            **(self.identity or {"pid": self.running.proc.pid if self.running else None}),
            "state": self.state,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "port": self.port,
            "log": str(self.log_path),
            **({"metrics": self.metrics_addr} if self.metrics_addr else {}),
        }


class Stack:
    """Start, supervise and stop the local stack in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = state_dir(settings)
        self.logs = self.dir / "logs"
        self.nats = None  # the running NatsServerProcess / SeaweedProcess, once started
        self.s3 = None
        self.parts: list[Part] = []
        self.env = self._child_env()
        ports = part_ports(settings)
        # fixed for the stack's life, so a restarted part is found where it was
        # (not one of the ports handed to the parts: those are free until the parts bind them)
        taken = set(ports.values())
        spare = iter([p for p in free_ports(len(SERVICES) + 1 + len(taken)) if p not in taken])
        self.nats_http_port = next(spare)
        self.metrics = {name: f"{LOOPBACK}:{next(spare)}" for name, _m, _f in SERVICES}
        if settings.embedded_nats:
            self.parts.append(self._part("nats", self._launch_nats, ports["nats"]))
        if settings.embedded_s3:
            self.parts.append(self._part("s3", self._launch_s3, ports["s3"]))
        py = sys.executable
        for name, module, _f in SERVICES:
            env = {**self.env, "DOCLORA_METRICS_ADDR": self.metrics[name]}
            launch = self._launcher([py, "-m", module], env, self.logs / f"{name}.log")
            self.parts.append(self._part(name, launch, ports[name], metrics_addr=self.metrics[name]))
        # the gateway serves /metrics on its own port
        env = {k: v for k, v in self.env.items() if k != "DOCLORA_METRICS_ADDR"}
        launch = self._launcher([py, "-m", "gateway"], env, self.logs / "gateway.log")
        self.parts.append(self._part("gateway", launch, ports["gateway"]))

    def _part(self, name: str, launch: Callable[[], Running], port: int, metrics_addr: str = "") -> Part:
        s = self.settings
        budget = RestartBudget(s.stack_restart_max, s.stack_restart_window_s)
        log_path = self.logs / f"{name}.log"
        return Part(name, launch, budget, log_path, port, metrics_addr=metrics_addr)

    def _child_env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["DOCLORA_STATE_DIR"] = str(self.dir)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def _launcher(self, argv: list[str], env: dict, log_path: Path) -> Callable[[], Running]:
        def launch() -> Running:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(
                    argv,
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            return ChildProcess(proc)

        return launch

    def _launch_nats(self) -> Running:
        from services.stack.natsd import start_nats_server

        s = self.settings
        self.nats = start_nats_server(
            self.dir / "nats",
            port=part_ports(s)["nats"],
            http_port=self.nats_http_port,
            log_path=self.logs / "nats.log",
            sync_interval=s.nats_sync_interval,
            user=s.nats_user,
            password=s.nats_password.get_secret_value(),
        )
        return self.nats

    def _launch_s3(self) -> Running:
        from services.stack.s3d import start_seaweedfs

        s = self.settings
        self.s3 = start_seaweedfs(
            self.dir / "s3",
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key.get_secret_value(),
            s3_port=part_ports(s)["s3"],
            log_path=self.logs / "s3.log",
            # every other port of the stack: a service that has not bound its port (or its metrics
            # port) yet must not find SeaweedFS on it
            avoid_ports={
                *part_ports(s).values(),
                self.nats_http_port,
                *(int(addr.rsplit(":", 1)[1]) for addr in self.metrics.values()),
            },
        )
        return self.s3

    def _by_name(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)

    def start_infra(self) -> None:
        """Start nats-server and SeaweedFS (those embedded) and wait until they answer."""
        for name, timeout in (("nats", 30), ("s3", 60)):
            part = self._by_name(name)
            if part is not None:
                part.start()
                part.running.wait_ready(timeout)
        self.write_state()

    def start_services(self) -> None:
        for part in self.parts:
            if part.name not in ("nats", "s3"):
                part.start()
        self.write_state()

    def write_state(self) -> None:
        s = self.settings
        parts = {p.name: p.record() for p in self.parts}
        info = {
            "supervisor": identify(os.getpid()),
            "supervisor_pid": os.getpid(),
            "state_dir": str(self.dir),
            "nats_url": s.nats_url,
            "nats_monitor": f"http://{LOOPBACK}:{self.nats_http_port}" if s.embedded_nats else None,
            "s3_endpoint": s.s3_endpoint,
            "gateway": f"http://{s.gateway_host}:{s.gateway_port}",
            "logs": str(self.logs),
            "pids": {name: rec["pid"] for name, rec in parts.items() if rec["pid"]},
            "metrics": dict(self.metrics),
            "parts": parts,
        }
        tmp = stack_file(s).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(stack_file(s))

    def check(self, now: float) -> bool:
        """One round of supervision: notice parts that died, restart those whose back-off is over,
        give up those over budget. Whether anything changed."""
        changed = False
        for part in self.parts:
            if part.state in (GIVEN_UP, "starting") or part.alive():
                continue
            if part.state == RUNNING:  # just died
                part.exit_code = part.running.proc.returncode if part.running else None
                part.stop(0)  # reaps it and removes what a killed server leaves behind
                delay = part.budget.take()
                if delay is None:
                    part.state = GIVEN_UP
                    log.error(
                        "%s exited with %s and keeps failing: %d restarts within %.0f s; given up "
                        "(its log: %s). Fix it, then `doclora down` and `doclora up`",
                        part.name,
                        part.exit_code,
                        part.budget.max_restarts,
                        part.budget.window_s,
                        part.log_path,
                    )
                else:
                    part.state, part.restart_at = RESTARTING, now + delay
                    log.warning(
                        "%s exited with %s; restart %d of %d within %.0f s, in %.0f s (log %s)",
                        part.name,
                        part.exit_code,
                        part.budget.recent(),
                        part.budget.max_restarts,
                        part.budget.window_s,
                        delay,
                        part.log_path,
                    )
                changed = True
            elif part.state == RESTARTING and part.restart_at is not None and now >= part.restart_at:
                part.restarts += 1
                try:
                    part.start()
                except Exception:  # noqa: BLE001 - e.g. a binary gone: counts as one more failure
                    log.exception("restarting %s failed", part.name)
                    part.state, part.running = RUNNING, None
                else:
                    log.info("%s restarted (pid %d)", part.name, part.running.proc.pid)
                changed = True
        return changed

    def supervise(self, stop: threading.Event) -> None:
        """Restart parts that die (see `check`), until `stop` is set."""
        while not stop.wait(POLL_S):
            if self.check(time.monotonic()):
                self.write_state()

    def stop(self) -> None:
        grace = self.settings.grpc_grace_s + 5
        # gateway first, then services, then the infrastructure they need to drain: SIGTERM to all
        # the services at once, so their graces run together
        services = [p for p in reversed(self.parts) if p.name not in ("nats", "s3")]
        for part in services:
            if part.alive():
                part.running.proc.send_signal(signal.SIGTERM)
        infra = [p for p in reversed(self.parts) if p.name in ("nats", "s3")]
        for part in [*services, *infra]:  # one part failing to stop must not leave the rest running
            try:
                part.stop(grace)
            except Exception:  # noqa: BLE001
                log.exception("stopping %s failed", part.name)
        try:
            stack_file(self.settings).unlink()
        except OSError:
            pass
