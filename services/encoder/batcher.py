"""Batch concurrent tower calls onto one model thread.

Concurrent Encode calls each submit their prepared items; a worker per
modality takes whatever has queued (what arrived while the tower was busy,
optionally waiting `MMSERVE_ENCODER_BATCH_WAIT_MS` for more: by default it does
not, since a lone request should not pay for batching), then runs them through
the tower together (one forward pass amortises kernel launch and Python
overhead) on a single dedicated thread, so torch's own intra-op threads get
the cores and towers never run concurrently with themselves. An item submitted
alone runs alone, which keeps "encoded alone" bit-exact with the reference.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mmserve.metrics import ENCODE_SECONDS, ENCODED_ITEMS
from mmserve.modality import name_of
from mmserve.models.families import EncodedItem, PreparedItem

log = logging.getLogger("mmserve.encoder.batcher")

RunBatch = Callable[[int, list[PreparedItem]], list[EncodedItem]]
_Pending = tuple[PreparedItem, "asyncio.Future[EncodedItem]"]


class Batcher:
    """Per-modality queues feeding one tower thread."""

    def __init__(self, run: RunBatch, *, max_batch: int, wait_s: float, executor: ThreadPoolExecutor) -> None:
        self._run = run
        self._max_batch = max(1, max_batch)
        self._wait_s = max(0.0, wait_s)
        self._executor = executor  # the process's model thread (mmserve.models.threads)
        self._queues: dict[int, asyncio.Queue[_Pending]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self.batches_run = 0

    async def submit(self, modality: int, item: PreparedItem) -> EncodedItem:
        """Encode one item, batched with whatever else arrives at the same time."""
        queue = self._queues.get(modality)
        if queue is None:
            queue = self._queues[modality] = asyncio.Queue()
            # A fresh context: the worker serves many requests and must not log under the first one's id.
            self._workers[modality] = asyncio.create_task(
                self._work(modality, queue), name=f"batcher-{modality}", context=contextvars.Context()
            )
        future: asyncio.Future[EncodedItem] = asyncio.get_running_loop().create_future()
        await queue.put((item, future))
        return await future

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        batch = [await queue.get()]
        deadline = time.monotonic() + self._wait_s
        while len(batch) < self._max_batch:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return [(item, fut) for item, fut in batch if not fut.done()]

    async def _work(self, modality: int, queue: asyncio.Queue[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        name = name_of(modality)
        while True:
            batch = await self._collect(queue)
            if not batch:
                continue
            items = [item for item, _ in batch]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, modality, items)
            except Exception as exc:
                log.exception("tower failed on a batch of %d %s items", len(items), name)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            ENCODE_SECONDS.labels(name).observe(time.perf_counter() - start)
            ENCODED_ITEMS.labels(name).inc(len(items))
            self.batches_run += 1
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
