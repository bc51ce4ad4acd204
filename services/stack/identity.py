"""Which process is which: identities that survive PID reuse, and who holds a listening port.

A PID alone names a process only while it lives; once it exits the kernel hands the number to the
next process. So the local stack records each process it starts as an identity, its PID with its
start time and command line, and signals a PID only while all three still match (`same_process`).
On Linux both come from /proc (`/proc/<pid>/stat` field 22, the start time in clock ticks since
boot, and `/proc/<pid>/cmdline`); elsewhere from `ps` (start time to the second).

`holds_port` tells whether a process owns the listening socket of a TCP port (Linux: the socket's
inode in /proc/net/tcp{,6} among the process's open files), so a health check that another
process answered on that port is not taken for this stack's part.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from services.common.procs import pid_alive

_PROC = Path("/proc")
_TCP_LISTEN = "0A"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time) from /proc/<pid>/stat."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')': split after the last
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], "ticks:" + fields[19]


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="replace") for arg in raw.split(b"\0")[:-1]]


def _ps(pid: int, column: str) -> str | None:
    try:
        out = subprocess.run(
            ["ps", "-p", str(pid), "-o", f"{column}="], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def identify(pid: int, settle_s: float = 1.0) -> dict | None:
    """The identity of a running process: `{"pid", "started", "cmdline"}`, or None if it is gone
    or a zombie. A process that has just been started may show no command line for a moment (the
    kernel sets it late in `exec`): that is waited out for up to `settle_s` seconds."""
    deadline = time.monotonic() + settle_s
    while True:
        if _PROC.is_dir():
            stat, cmdline = _proc_stat(pid), _proc_cmdline(pid)
            if stat is None or stat[0] in ("Z", "X"):
                return None
            started = stat[1]
        else:
            started, command = _ps(pid, "lstart"), _ps(pid, "command")
            cmdline = command.split() if command else None
            if not started:
                return None
        if cmdline:
            return {"pid": pid, "started": started, "cmdline": cmdline}
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def same_process(recorded: dict | None) -> bool:
    """Whether the process `recorded` by `identify` still runs: same PID, start time and command
    line. A record without an identity (an older stack.json) proves nothing: False."""
    if not recorded or not recorded.get("started") or not recorded.get("cmdline"):
        return False
    try:
        pid = int(recorded["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    now = identify(pid, settle_s=0.0)
    return now is not None and now["started"] == recorded["started"] and now["cmdline"] == recorded["cmdline"]


def signal_if_same(recorded: dict, sig: signal.Signals) -> bool:
    """Send `sig` to the recorded process if it is still that process; whether it was sent. (The
    check and the kill are not atomic, but a PID is reused only after the process is reaped, so the
    window is the few microseconds in which the process exits and another takes its number.)"""
    if not same_process(recorded):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(recorded["pid"]), sig)
        return True
    return False


def stop_processes(records: dict[str, dict], grace_s: float, say=print) -> None:
    """Stop the recorded processes that are still the ones recorded: SIGTERM to each, then SIGKILL
    to those that have not exited after `grace_s` seconds. Others are left alone, with a line."""
    termed = {}
    for name, rec in records.items():
        if signal_if_same(rec, signal.SIGTERM):
            say(f"stopping {name} (pid {rec['pid']})")
            termed[name] = rec
        elif rec.get("pid") and pid_alive(int(rec["pid"])):
            say(f"pid {rec['pid']} is no longer this stack's {name}: left alone")
    deadline = time.monotonic() + grace_s
    while any(same_process(rec) for rec in termed.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for name, rec in termed.items():
        if signal_if_same(rec, signal.SIGKILL):
            say(f"killed {name} (pid {rec['pid']}): still running {grace_s:.0f}s after SIGTERM")


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # fields: sl, local_address (hex ip:port), rem_address, st, ..., inode (10th)
            if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def holds_port(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds a listening TCP socket on `port` (any address); None where that
    cannot be told (no /proc, or its open files are not ours to read)."""
    if not (_PROC / "net" / "tcp").exists():
        return None
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted:
        return False
    fd_dir = _PROC / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    except PermissionError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd_dir / fd) in wanted:
                return True
    return False
