"""Run a parse in a separate process with a wall-clock timeout and a memory cap.

A hostile document can make a parser loop forever, eat all memory or crash in C code. Parsing in
a worker process confines that: on timeout the worker is killed, an address-space limit
(RLIMIT_AS) turns runaway allocation into a MemoryError in the worker, and a crash only loses the
worker. Each failure becomes an `InvalidArgument` that says what happened in words; domain errors
raised by the parse cross the process boundary unchanged.

Workers come from a `forkserver` that has already imported the parsers, so starting one costs
milliseconds, and a warm idle worker is kept for the next call (one per concurrent caller, up to
`MAX_IDLE`). A worker that failed in any way is never reused.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from services.common.errors import DocloraError, InvalidArgument

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_IDLE = 2
# a worker is retired after this many parses: Python rarely returns freed memory to the system,
# so a long-lived worker's baseline would creep towards the cap
MAX_TASKS_PER_WORKER = 50
# imported once in the forkserver so that every worker starts with them loaded
PRELOAD = [
    "services.ingest.extract",
    "services.ingest.formats.pdf",
    "services.ingest.formats.docx",
    "services.ingest.formats.html",
    "services.ingest.formats.qa",
    "pypdf",
    "docx",
]


def _vm_bytes() -> int:
    """This process's current address-space size (what RLIMIT_AS counts)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive (fn, args, kwargs, memory_mb), reply ("ok", result) or a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which kills us
    # a crashing parser must not leave a core file (with the user's document in it) behind
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if task is None:
            return
        fn, args, kwargs, memory_mb = task
        # the cap is the parse's own budget on top of what the worker holds already (code,
        # libraries, the document's bytes)
        limit = _vm_bytes() + memory_mb * 1024 * 1024
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        try:
            reply: tuple = ("ok", fn(*args, **kwargs))
        except MemoryError:
            reply = ("memory",)
        except DocloraError as exc:
            reply = ("domain", type(exc).__name__, exc.message)
        except BaseException as exc:  # anything the parser throws is reported
            reply = ("error", type(exc).__name__, str(exc)[:500], traceback.format_exc()[-4000:])
        try:
            conn.send(reply)
        except MemoryError:
            conn.send(("memory",))
        except Exception as exc:  # an unpicklable result
            conn.send(("error", type(exc).__name__, f"the parse result could not be returned: {exc}", ""))
        if reply[0] == "memory":
            return  # the heap may be in a sorry state; the parent starts a fresh worker
        # lift the cap between tasks so that the next document's bytes can arrive
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="doclora-parse")
        self.process.start()
        child.close()
        self.tasks = 0

    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.conn.send(None)
            self.process.join(timeout=1)
        except (OSError, ValueError, BrokenPipeError):
            pass
        if self.process.is_alive():
            self.kill()
        else:
            self.conn.close()


class _Pool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._ctx = None

    def _context(self):
        if self._ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            # a no-op if this process's forkserver already runs (then workers import on demand)
            ctx.set_forkserver_preload(PRELOAD)
            self._ctx = ctx
        return self._ctx

    def take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                worker.kill()
            ctx = self._context()
        return _Worker(ctx)

    def give_back(self, worker: _Worker) -> None:
        worker.tasks += 1
        with self._lock:
            if worker.tasks < MAX_TASKS_PER_WORKER and len(self._idle) < MAX_IDLE and worker.alive():
                self._idle.append(worker)
                return
        worker.close()

    def warm(self) -> None:
        """Start a worker now so that the first parse does not pay for the forkserver."""
        worker = self.take()
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(worker)
                return
        worker.close()

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_pool = _Pool()
atexit.register(_pool.shutdown)


def warm_up() -> None:
    """Start the forkserver and one idle worker ahead of the first document (e.g. at service start)."""
    _pool.warm()


def shutdown() -> None:
    """Stop the idle workers (also done at exit)."""
    _pool.shutdown()


def _domain_error(name: str, message: str) -> DocloraError:
    from services.common import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, DocloraError):
        return cls(message)
    return InvalidArgument(message)


def run_sandboxed(
    fn: Callable[..., T], *args: Any, timeout_s: float = 60, memory_mb: int = 1024, **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)` in a worker process, limited to `timeout_s` wall-clock seconds and
    `memory_mb` MB of address space on top of what the worker holds when the parse starts.

    `fn` must be importable by name (a module-level function) and its arguments and result
    picklable. Raises InvalidArgument when the parse runs out of time or memory, crashes or
    throws an unexpected exception, and re-raises the parse's own domain errors with their message.
    Blocking: call it from a thread (e.g. `Runtime.io`), never on the event loop.
    """
    deadline = time.monotonic() + timeout_s
    worker = _pool.take()
    try:
        worker.conn.send((fn, args, kwargs, memory_mb))
        ready = worker.conn.poll(max(0.0, deadline - time.monotonic()))
        reply = worker.conn.recv() if ready else None
    except (EOFError, OSError):
        reply = ("died",)
    except BaseException:
        worker.kill()  # e.g. KeyboardInterrupt while waiting: never leave a parse running
        raise

    if reply is None:
        worker.kill()
        raise InvalidArgument(f"the document took longer than {timeout_s:g} s to parse")
    kind = reply[0]
    if kind == "ok":
        _pool.give_back(worker)
        return reply[1]
    if kind == "domain":
        _pool.give_back(worker)
        raise _domain_error(reply[1], reply[2])
    worker.kill()
    if kind == "memory":
        raise InvalidArgument(f"the document needs more than {memory_mb} MB to parse")
    if kind == "error":
        log.warning("parse failed with %s: %s\n%s", reply[1], reply[2], reply[3])
        raise InvalidArgument(f"the document could not be parsed ({reply[1]}: {reply[2]})")
    code = worker.process.exitcode
    how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    raise InvalidArgument(f"the parser crashed on this document ({how}); the file is probably malformed")
