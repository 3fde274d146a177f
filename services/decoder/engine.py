"""Run generation steps for all requests on one model thread.

Each request is a coroutine that submits one step at a time (prefill, then
one decode step per token) to a single-thread executor, so requests
interleave step by step and the model never runs two forwards at once;
torch's intra-op threads get the cores. A cancelled request stops submitting:
it ends within one step and its KV cache is freed with it. `n` > 1 runs the
choices as one batch over a shared prefill.

Admission: at most `max_running_requests` generate at once; up to
`max_waiting_requests` more wait for a slot, beyond that RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mmserve.config import Settings
from mmserve.errors import ResourceExhausted
from mmserve.metrics import QUEUE_SECONDS, RUNNING, WAITING
from mmserve.models.families import Family, PrefillInputs
from services.decoder.sampling import Sampler

T = TypeVar("T")


@dataclass
class Sequences:
    """KV cache and bookkeeping of one request's n sequences (batch rows)."""

    cache: Any
    rope_delta: int
    seen: int  # tokens in the cache per row
    sampler: Sampler
    logits: torch.Tensor  # [n, vocab] for the next token


class Engine:
    """Admission control plus the model thread."""

    def __init__(self, family: Family, settings: Settings) -> None:
        self.family = family
        self.max_running = settings.max_running_requests
        self.max_waiting = settings.max_waiting_requests
        self._slots = asyncio.Semaphore(self.max_running)
        self._waiting = 0
        self.running = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mmserve-llm")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the running slots for the duration of a generation."""
        if self._waiting >= self.max_waiting and self._slots.locked():
            raise ResourceExhausted(f"the decoder is busy: {self.max_waiting} requests are already waiting", reason="QUEUE_FULL")
        self._waiting += 1
        WAITING.inc()
        start = time.perf_counter()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            WAITING.dec()
        QUEUE_SECONDS.observe(time.perf_counter() - start)
        self.running += 1
        RUNNING.inc()
        try:
            yield
        finally:
            self.running -= 1
            RUNNING.dec()
            self._slots.release()

    # --- steps (run on the model thread) ------------------------------------------------
    def prefill(self, inputs: PrefillInputs, sampler: Sampler, n: int) -> tuple[Sequences, list[int]]:
        """Process the prompt once, fan out to n rows, pick the first tokens."""
        with torch.inference_mode():
            cache = self.family.new_cache()
            logits = self.family.forward(inputs.inputs_embeds, inputs.position_ids, cache, inputs.extra)
            if n > 1:
                cache.batch_repeat_interleave(n)
                logits = logits.expand(n, -1)
            seqs = Sequences(cache, inputs.rope_delta, int(inputs.input_ids.shape[1]), sampler, logits)
            return seqs, sampler(logits)

    def step(self, seqs: Sequences, tokens: list[int]) -> list[int]:
        """Feed the last tokens (one per row), return the next ones."""
        with torch.inference_mode():
            ids = torch.tensor([[t] for t in tokens], device=self.family.device)
            positions = self.family.decode_positions(seqs.seen, seqs.rope_delta, len(tokens))
            seqs.logits = self.family.forward(self.family.embed_tokens(ids), positions, seqs.cache, {})
            seqs.seen += 1
            return seqs.sampler(seqs.logits)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
