"""Giving back a thread's OpenMP workers, so the one thread that runs a model's steps gets the cores.

torch runs its CPU kernels on OpenMP (libgomp on Linux), which keeps a team of worker threads for
every thread that ever ran a parallel kernel. Once the process holds more of those threads than the
machine has cores, libgomp stops letting idle workers spin and puts them to sleep after about a
thousand spins, so each of the many small parallel kernels of a decode step pays to wake them. On
a 2-core machine, a thread that loaded the model (or computed embeddings) and stays alive made the
chat scheduler's matmuls 50-70% slower than the same work on a fresh process's only thread
(bench/bench_inference.py; measured while writing this module).

`release_threads()` frees the calling thread's team (OpenMP 5's `omp_pause_resource_all`); a later
parallel kernel on that thread builds a new one. Call it on a thread that did parallel torch work
and will live on without doing more soon. Without a runtime that has the call it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os

log = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1


@functools.cache
def _pause():
    """`omp_pause_resource_all` of the OpenMP runtime torch uses, or None."""
    import torch

    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    candidates = sorted(glob.glob(os.path.join(folder, "libgomp*.so*")))
    candidates += sorted(glob.glob(os.path.join(folder, "libiomp*"))) + sorted(
        glob.glob(os.path.join(folder, "libomp*"))
    )
    for path in candidates:
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release_threads() -> bool:
    """Free the calling thread's OpenMP workers; True when the runtime did."""
    fn = _pause()
    if fn is None:
        return False
    rc = fn(_OMP_PAUSE_SOFT)
    if rc != 0:  # inside a parallel region, or the runtime refused: harmless
        log.debug("omp_pause_resource_all returned %s", rc)
    return rc == 0
