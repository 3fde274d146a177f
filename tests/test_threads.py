"""A thread's torch intra-op count is its own: setting it for a helper thread changes nothing process-wide.

(`torch.set_num_threads` would: it also stores the default that every new thread starts from and resizes a
process-wide pool, which is what mmserve.models.threads must not do while a model thread runs.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from mmserve.models.threads import set_thread_torch_threads


def in_new_thread(fn: Callable[[], int]) -> int:
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_helper_threads_count_is_its_own() -> None:
    fresh = in_new_thread(torch.get_num_threads)  # what a new thread starts with
    if fresh == 1:
        pytest.skip("one intra-op thread by default here: nothing to tell apart")
    main = torch.get_num_threads()

    def helper() -> int:
        set_thread_torch_threads(1)
        torch.randn(256, 256).exp().sum()  # a parallel op: torch's lazy per-thread setup must not undo it
        return torch.get_num_threads()

    assert in_new_thread(helper) == 1
    assert torch.get_num_threads() == main
    assert in_new_thread(torch.get_num_threads) == fresh  # the process-wide default is untouched

    def model_thread() -> int:
        set_thread_torch_threads(None)  # torch's default
        return torch.get_num_threads()

    assert in_new_thread(model_thread) == fresh
