"""services/common/omp.py: a thread that ran parallel torch kernels gives its OpenMP workers back."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.common import omp


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_a_living_thread_gives_back_its_openmp_workers_and_still_computes():
    if omp._pause() is None:
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all")
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(512, 512)
        with ThreadPoolExecutor(1) as pool:  # a worker thread that stays alive, as the engine's do
            pool.submit(lambda: None).result()
            idle = _threads()
            want = pool.submit(lambda: (x @ x).sum().item()).result()
            with_team = _threads()
            assert pool.submit(omp.release_threads).result() is True
            released = _threads()
            again = pool.submit(lambda: (x @ x).sum().item()).result()  # a new team, same numbers
            assert pool.submit(omp.release_threads).result() is True
        assert with_team > idle, "a parallel kernel on the thread started OpenMP workers"
        assert released < with_team, "the workers were given back"
        assert again == want
    finally:
        torch.set_num_threads(before_threads)
