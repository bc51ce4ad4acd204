"""The parse sandbox: time-outs kill the worker, memory hogs are stopped, errors keep their message.

The functions the sandbox runs live at module level so that the worker process can import them.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.ingest.sandbox import run_sandboxed, warm_up


def hang() -> None:
    while True:
        time.sleep(0.05)


def spin() -> None:
    while True:
        pass


def hog_at_once(megabytes: int) -> int:
    return len(bytearray(megabytes * 1024 * 1024))


def hog_slowly() -> int:
    hoard = []
    while True:
        hoard.append(bytearray(16 * 1024 * 1024))


def refuse(message: str) -> None:
    raise ResourceExhausted(message)


def blunder() -> None:
    {}["missing key"]


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def pid() -> int:
    return os.getpid()


def add(a: int, b: int, *, times: int = 1) -> int:
    return (a + b) * times


@pytest.fixture(scope="module", autouse=True)
def warm():
    warm_up()


def test_a_result_comes_back_with_args_and_kwargs():
    """Positional and keyword arguments reach the worker; the result comes back."""
    assert run_sandboxed(add, 2, 3, times=4) == 20


def test_a_hanging_parse_is_killed_at_the_timeout():
    """Sleeping or spinning, the parse is stopped at its deadline with a message that says so."""
    for fn in (hang, spin):
        started = time.monotonic()
        with pytest.raises(InvalidArgument, match=r"the document took longer than 0.5 s to parse"):
            run_sandboxed(fn, timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_a_memory_hog_is_stopped_at_the_cap():
    """One huge allocation and many small ones both end as "needs more than N MB"."""
    with pytest.raises(InvalidArgument, match="the document needs more than 128 MB to parse"):
        run_sandboxed(hog_at_once, 512, memory_mb=128)
    with pytest.raises(InvalidArgument, match="the document needs more than 128 MB to parse"):
        run_sandboxed(hog_slowly, memory_mb=128, timeout_s=20)
    assert run_sandboxed(hog_at_once, 32, memory_mb=128) == 32 * 1024 * 1024


def test_domain_errors_cross_the_process_boundary_with_type_and_message():
    """A ResourceExhausted raised in the worker is raised again here, same message."""
    with pytest.raises(ResourceExhausted, match="^the archive is too large$"):
        run_sandboxed(refuse, "the archive is too large")


def test_unexpected_exceptions_become_invalid_argument_with_their_reason():
    """A parser bug triggered by a bad file is the file's failure, named, not a crash of the service."""
    with pytest.raises(InvalidArgument, match=r"could not be parsed \(KeyError: 'missing key'\)"):
        run_sandboxed(blunder)


def test_a_crashing_worker_is_reported_and_replaced():
    """A segfault is reported as a crash; the next parse gets a fresh worker."""
    with pytest.raises(InvalidArgument, match=r"crashed on this document \(signal 11\)"):
        run_sandboxed(crash)
    assert run_sandboxed(add, 1, 1) == 2


def test_a_warm_worker_is_reused_and_a_failed_one_is_not():
    """Successive parses share a worker; after a time-out the worker is a new process."""
    first = run_sandboxed(pid)
    assert run_sandboxed(pid) == first
    with pytest.raises(InvalidArgument):
        run_sandboxed(hang, timeout_s=0.2)
    assert run_sandboxed(pid) != first


def test_the_warm_call_overhead_is_small():
    """A round trip to a warm worker costs milliseconds, not a process start."""
    run_sandboxed(add, 0, 0)
    started = time.perf_counter()
    for _ in range(20):
        run_sandboxed(add, 1, 2)
    assert (time.perf_counter() - started) / 20 < 0.05
