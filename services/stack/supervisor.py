"""The local stack: nats-server, SeaweedFS's S3 server, every service as its own process, and the
gateway, supervised by one `doclora up` process that restarts a part that dies and stops them all
on SIGTERM. Logs go to `<state>/logs/<part>.log`; `<state>/stack.json` says what runs where."""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from services.common.config import Settings

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]

# (name, module, settings field with its address)
SERVICES = [
    ("ingest", "services.ingest", "ingest_addr"),
    ("qagen", "services.qagen", "qagen_addr"),
    ("trainer", "services.trainer", "trainer_addr"),
    ("inference", "services.inference", "inference_addr"),
]
MAX_RESTARTS = 5


def state_dir(settings: Settings) -> Path:
    return Path(settings.state_dir).expanduser().resolve()


def stack_file(settings: Settings) -> Path:
    return state_dir(settings) / "stack.json"


def read_stack(settings: Settings) -> dict | None:
    try:
        return json.loads(stack_file(settings).read_text())
    except (OSError, ValueError):
        return None


def grpc_healthy(addr: str, timeout: float = 1.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
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


def health(settings: Settings) -> dict[str, bool]:
    """Is each part of the stack answering? Keys: nats, s3, each service, gateway."""
    info = read_stack(settings) or {}
    out: dict[str, bool] = {}
    out["nats"] = http_ok(info["nats_monitor"] + "/healthz") if info.get("nats_monitor") else _tcp_ok(settings.nats_url)
    scheme = "https" if settings.s3_secure else "http"
    out["s3"] = http_ok(f"{scheme}://{settings.s3_endpoint}/")
    for name, _module, field_name in SERVICES:
        out[name] = grpc_healthy(getattr(settings, field_name))
    out["gateway"] = http_ok(f"http://{settings.gateway_host}:{settings.gateway_port}/healthz")
    return out


def _tcp_ok(url: str) -> bool:
    import socket

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or 4222), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    def start(self, env: dict) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Stack:
    """Start, supervise and stop the local stack in this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = state_dir(settings)
        self.logs = self.dir / "logs"
        self.nats = None
        self.s3 = None
        self.children: list[Child] = []
        self.env = self._child_env()

    def _child_env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["DOCLORA_STATE_DIR"] = str(self.dir)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return env

    def start_infra(self) -> None:
        s = self.settings
        if s.embedded_nats:
            from services.stack.natsd import start_nats_server

            port = urlparse(s.nats_url).port or 4222
            self.nats = start_nats_server(self.dir / "nats", port=port, log_path=self.logs / "nats.log")
            self.nats.wait_ready(30)
        if s.embedded_s3:
            from services.stack.s3d import start_seaweedfs

            port = int(s.s3_endpoint.rsplit(":", 1)[1])
            self.s3 = start_seaweedfs(
                self.dir / "s3",
                access_key=s.s3_access_key,
                secret_key=s.s3_secret_key.get_secret_value(),
                s3_port=port,
                log_path=self.logs / "s3.log",
            )
            self.s3.wait_ready(60)

    def start_services(self) -> None:
        py = sys.executable
        for name, module, _ in SERVICES:
            self.children.append(Child(name, [py, "-m", module], self.logs / f"{name}.log"))
        self.children.append(Child("gateway", [py, "-m", "gateway"], self.logs / "gateway.log"))
        for child in self.children:
            child.start(self.env)
        self.write_state()

    def write_state(self) -> None:
        s = self.settings
        info = {
            "supervisor_pid": os.getpid(),
            "nats_url": s.nats_url,
            "nats_monitor": self.nats.monitor_url if self.nats else None,
            "s3_endpoint": s.s3_endpoint,
            "gateway": f"http://{s.gateway_host}:{s.gateway_port}",
            "logs": str(self.logs),
            "pids": {c.name: c.proc.pid for c in self.children if c.proc},
        }
        if self.nats:
            info["pids"]["nats"] = self.nats.pid
        if self.s3:
            info["pids"]["s3"] = self.s3.pid
        tmp = stack_file(s).with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(stack_file(s))

    def supervise(self, stop: threading.Event) -> None:
        """Restart a service that dies (with a back-off), until `stop` is set."""
        while not stop.wait(1.0):
            for child in self.children:
                if child.alive() or child.restarts >= MAX_RESTARTS:
                    continue
                code = child.proc.returncode if child.proc else None
                child.restarts += 1
                log.warning("%s exited with %s; restart %d/%d (log %s)", child.name, code, child.restarts,
                            MAX_RESTARTS, child.log_path)
                time.sleep(min(2 ** child.restarts, 30))
                if not stop.is_set():
                    child.start(self.env)
                    self.write_state()

    def stop(self) -> None:
        grace = self.settings.grpc_grace_s + 5
        # gateway first, then services, then the infrastructure they need to drain
        for child in reversed(self.children):
            if child.alive():
                child.proc.send_signal(signal.SIGTERM)
        parts = [functools.partial(child.stop, grace) for child in reversed(self.children)]
        parts += [p.stop for p in (self.s3, self.nats) if p is not None]
        for stop in parts:  # one part failing to stop must not leave the rest running
            try:
                stop()
            except Exception:  # noqa: BLE001
                log.exception("stopping a part of the stack failed")
        try:
            stack_file(self.settings).unlink()
        except OSError:
            pass
