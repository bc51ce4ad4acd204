"""Process helpers shared by the local launcher and the services that watch another process."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (one of another user's counts as alive); a zombie, dead
    but not yet reaped by its parent, does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # the command name (field 2) is in parentheses and may hold spaces or ')'
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc here: the signal said it exists
