"""One OpenMP team per process: torch's intra-op threads belong to the model thread alone.

libgomp keeps a team's threads spinning for ~3 ms after a parallel region so
that the next one starts at once, but only while it manages no more threads
than there are CPUs. Every OS thread that runs a multi-threaded torch op gets a
team of its own that lives as long as that thread; with a second team alive
libgomp falls back to a ~100-spin wait, and each of the thousands of small
parallel regions of a forward pass pays a futex wake-up. Seen on 2 cores: the
tiny Qwen2.5-Omni vision tower took 20 ms instead of 12 once a preprocessing
thread had run one torchvision op with 2 threads, and 200 small element-wise
ops 50 ms instead of 9.

So in a service process: the model thread (the encoder's tower, the decoder's
scheduler) runs torch with `threads`; every other thread that may touch torch
(the event loop, `asyncio.to_thread` workers) runs it with one thread, which
creates no team; work that precedes the model thread (loading) runs in a
thread that exits afterwards and takes its team with it.

The count is set with OpenMP's own per-thread call (through threadpoolctl),
never with `torch.set_num_threads`: besides the calling thread's OpenMP count,
that one stores a process-wide default and resizes torch's process-wide
pthreadpool, so helper threads starting up while the model thread runs would
keep resizing a pool under it. MKL and oneDNN follow the calling thread's
OpenMP count, as torch's own parallel loops do.

Across processes, the encoder and decoder commands also make idle OpenMP
threads sleep after a short spin instead of ~3 ms (`mmserve.cli.OPENMP_WAIT`,
set before torch loads; its figures in docs/engine.md): two
processes' teams spinning after every parallel region took turns burning the
same two cores under load, while sleeping at once made every region of a
forward pass pay a wake-up (the tiny vision tower took 19.9 ms instead of 9.6).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from threadpoolctl import ThreadpoolController

T = TypeVar("T")

#: torch's own default (OMP_NUM_THREADS, else the cores this process may use), read before anything changes it.
DEFAULT_THREADS = torch.get_num_threads()
#: The OpenMP runtime torch loaded (found once: a lookup scans every loaded library, ~1 ms).
_OPENMP = ThreadpoolController().select(user_api="openmp")


def set_thread_torch_threads(threads: int | None) -> None:
    """Intra-op threads for the calling thread alone (None: torch's default).

    torch sets a thread's OpenMP count lazily, at its first parallel op; `get_num_threads` runs that first,
    so the count set here is not overwritten later.
    """
    torch.get_num_threads()
    _OPENMP.limit(limits=threads or DEFAULT_THREADS)


def model_executor(name: str, threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread of this process that runs torch with several intra-op threads (`threads`, None: the default)."""
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=set_thread_torch_threads, initargs=(threads,))


_confined: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def confine_torch_threads(loop: asyncio.AbstractEventLoop) -> None:  # from a coroutine on `loop`
    """Make the event loop thread and its default executor's threads run torch single-threaded (see the module docstring).

    Called by every service that loads a model; once per loop (services started in one process share it).
    """
    if loop in _confined:
        return
    _confined.add(loop)
    set_thread_torch_threads(1)  # called on the loop's own thread
    workers = min(32, (os.cpu_count() or 1) + 4)  # asyncio's own default size
    loop.set_default_executor(
        ThreadPoolExecutor(workers, thread_name_prefix="mmserve-worker", initializer=set_thread_torch_threads, initargs=(1,))
    )


async def in_passing_thread(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` with torch's default threads in a thread of its own that has exited when this returns,
    so that the OpenMP team it made does not outlive it."""
    executor = ThreadPoolExecutor(1, thread_name_prefix="mmserve-load", initializer=set_thread_torch_threads, initargs=(None,))
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        await asyncio.to_thread(executor.shutdown, True)
