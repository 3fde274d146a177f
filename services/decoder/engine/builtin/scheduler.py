"""The scheduler loop: one thread owns the model and advances every admitted request.

Each iteration: take new requests and aborts; admit waiting requests while
the KV budget holds their worst case (prompt + max_tokens per choice; the
prefix cache gives way first); run at most `prefill_chunk_tokens` of prompt
(one prompt per forward, a long prompt in several chunks, so decoding
requests wait at most one chunk); then advance every decoding choice of
every request by one token in one batched forward. Finished and aborted
requests leave at the step boundary and their KV is freed at once. Calls
that need the model or tokenizer (prompt rendering) run on this thread too,
between iterations.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mmserve.metrics import (
    BATCH_SIZE,
    ENGINE_STEP_SECONDS,
    PREFIX_CACHE_HITS,
    PREFIX_CACHE_QUERIES,
)
from mmserve.models.families import Family, PrefillInputs
from mmserve.models.threads import DEFAULT_THREADS, set_thread_torch_threads
from services.decoder.engine.base import EngineRequest, Logprob, StepOutput
from services.decoder.engine.builtin.kv import GROUPS_KWARG, BatchKV, KVShape, SequenceKV
from services.decoder.engine.builtin.prefix import PrefixCache
from services.decoder.engine.builtin.sampling import Sampler
from services.decoder.engine.outputs import RequestOutput

#: A prompt forward of at least this many tokens runs on all cores even when decode steps use fewer.
WIDE_FORWARD_TOKENS = 64

log = logging.getLogger("mmserve.decoder.engine")

Emit = Callable[[list[StepOutput] | BaseException], None]


def chunk_end(groups: torch.Tensor | None, start: int, end: int) -> int:
    """`end` moved off the inside of a bidirectional block: back to the block's start, or past its end when the
    chunk starts inside it (a block's tokens see each other, so one forward must hold all of those not yet cached)."""
    if groups is None or end >= groups.shape[0] or end <= start:
        return end
    group = int(groups[end])
    if group < 0 or int(groups[end - 1]) != group:
        return end
    inside = (groups == group).nonzero().view(-1)
    first, last = int(inside[0]), int(inside[-1]) + 1
    return first if first > start else last


@dataclass
class BuiltinPrompt:
    """A rendered prompt: the prefill inputs and the prefix-cache keys of its blocks."""

    inputs: PrefillInputs
    block_keys: list[bytes]

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.input_ids.shape[1])


@dataclass
class Job:
    """One request inside the scheduler."""

    request: EngineRequest
    prompt: BuiltinPrompt
    output: RequestOutput
    sampler: Sampler
    emit: Emit
    rows: list[SequenceKV | None] = field(default_factory=list)  # one per choice, None once finished
    prefilled: int = 0  # prompt tokens in rows[0]
    reserved: int = 0  # KV tokens held
    next_tokens: list[int] = field(default_factory=list)  # per choice: the token to feed next
    held: dict[int, StepOutput] = field(default_factory=dict)  # final_only: per choice, what it made since its first output
    started: bool = False  # an output was handed over

    def __post_init__(self) -> None:
        self.next_tokens = [0] * self.n

    @property
    def n(self) -> int:
        return self.request.sampling.n

    @property
    def worst_case(self) -> int:
        return self.n * (self.prompt.num_tokens + self.request.max_tokens)


class Scheduler:
    """See the module docstring. Public methods are thread-safe; everything else runs on the loop thread."""

    def __init__(
        self,
        family: Family,
        shape: KVShape,
        capacity: int,
        *,
        prefill_chunk_tokens: int,
        prefix: PrefixCache | None,
        threads: int | None = None,
    ) -> None:
        self.family = family
        self.shape = shape
        self.capacity = capacity
        self.chunk = prefill_chunk_tokens
        self.prefix = prefix
        self.threads = threads  # intra-op threads of the loop thread for decode steps (None: torch's default)
        self.prefill_threads = DEFAULT_THREADS  # a prompt's forward is wide enough to use every core
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._waiting: deque[Job] = deque()
        self._prefilling: list[Job] = []
        self._running: list[Job] = []
        self._by_id: dict[str, Job] = {}
        self.reserved = 0  # KV tokens held by admitted requests
        self._thread = threading.Thread(target=self._loop, name="mmserve-scheduler", daemon=True)

    # --- thread-safe API ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._post("submit", job)

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run `fn(*args)` on the model thread between iterations."""
        future: Future[Any] = Future()
        self._post("call", (fn, args, future))
        return future

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests, as last seen by the loop."""
        return len(self._prefilling) + len(self._running), len(self._waiting)

    @property
    def kv_used(self) -> int:
        return self.reserved + (self.prefix.tokens if self.prefix else 0)

    def _post(self, kind: str, payload: Any) -> None:
        self._inbox.put((kind, payload))
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        set_thread_torch_threads(self.threads)  # the process's model thread (mmserve.models.threads)
        with torch.inference_mode():
            while not self._stop:
                self._wake.wait()
                self._wake.clear()
                while not self._stop:
                    self._drain_inbox()
                    self._guarded(self._admit, list(self._waiting)[:1])
                    if not (self._prefilling or self._running):
                        break
                    self._guarded(self._prefill_some, self._prefilling)
                    self._guarded(self._decode_step, self._running)
        for job in [*self._waiting, *self._prefilling, *self._running]:
            job.emit(RuntimeError("the decoder is shutting down"))

    def _guarded(self, step: Callable[[], None], jobs: list[Job]) -> None:
        """A failing step (a forward, an allocation) fails the requests it was for, not the loop."""
        try:
            step()
        except Exception as exc:  # reported to each request, logged once here
            log.exception("engine step failed")
            for job in list(jobs):
                self._drop(job)
                job.emit(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._by_id[payload.request.request_id] = payload
                self._waiting.append(payload)
            elif kind == "abort":
                job = self._by_id.get(payload)
                if job is not None:
                    self._drop(job)
            elif kind == "call":
                fn, args, future = payload
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # handed to the caller
                        future.set_exception(exc)

    def _drop(self, job: Job) -> None:
        """Remove a request wherever it is and free its KV."""
        self._by_id.pop(job.request.request_id, None)
        for group in (self._prefilling, self._running):
            if job in group:
                group.remove(job)
        if job in self._waiting:
            self._waiting.remove(job)
        self.reserved -= job.reserved
        job.reserved = 0
        job.rows = []

    # --- admission ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """FIFO: the oldest waiting request goes first; nobody overtakes it."""
        while self._waiting:
            job = self._waiting[0]
            need = job.worst_case
            if self.reserved + need > self.capacity:
                return  # waits for running requests to finish
            prompt = job.prompt
            hit = self.prefix.match(prompt.block_keys, prompt.num_tokens) if self.prefix else 0
            over = self.kv_used + need - self.capacity
            if self.prefix and over > 0:
                freed = self.prefix.evict(over, keep=self.prefix.blocks_for(prompt.block_keys, hit))
                if freed < over:  # only the blocks it would reuse are left: give them up too
                    self.prefix.evict(over - freed)
                    hit = 0
            if self.prefix:
                PREFIX_CACHE_QUERIES.inc(prompt.num_tokens)
                PREFIX_CACHE_HITS.inc(hit)
            self._waiting.popleft()
            try:
                row = SequenceKV(self.shape, prompt.num_tokens + job.request.max_tokens)
                if hit and self.prefix:
                    self.prefix.load(prompt.block_keys, hit, row)
            except Exception as exc:  # e.g. out of device memory: this request fails, the others go on
                log.exception("KV allocation failed")
                self._drop(job)
                job.emit(exc)
                continue
            job.rows = [row]
            job.prefilled = hit
            job.output.cached_prompt_tokens = hit
            job.reserved = need
            self.reserved += need
            self._prefilling.append(job)

    # --- prefill -----------------------------------------------------------------------------
    def _prefill_some(self) -> None:
        """Up to `chunk` prompt tokens this iteration; whole prompts when they fit (exactly the reference's forward)."""
        budget = self.chunk
        for job in list(self._prefilling):
            start, total = job.prefilled, job.prompt.num_tokens
            end = chunk_end(job.prompt.inputs.attention_groups, start, min(total, start + self.chunk))
            if end - start > budget and budget < self.chunk:
                return
            began = time.perf_counter()
            with self._threads_for(end - start):
                logits = self._forward_prompt(job, start, end)
            ENGINE_STEP_SECONDS.labels("prefill").observe(time.perf_counter() - began)
            budget -= end - start
            if end == total:
                self._prefilling.remove(job)
                self._first_tokens(job, logits)
            if budget <= 0:
                return

    @contextmanager
    def _threads_for(self, tokens: int) -> Iterator[None]:
        """All cores for a forward of many tokens when decode steps run on fewer (one thread suits a tiny model's
        one-token steps, not its 300-token prompts)."""
        narrow = self.threads
        if narrow is None or narrow >= self.prefill_threads or tokens < WIDE_FORWARD_TOKENS:
            yield
            return
        set_thread_torch_threads(self.prefill_threads)
        try:
            yield
        finally:
            set_thread_torch_threads(narrow)

    def _forward_prompt(self, job: Job, start: int, end: int) -> torch.Tensor:
        inputs = job.prompt.inputs
        row = job.rows[0]
        assert row is not None
        extra = self.family.slice_extra(inputs.extra, inputs.input_ids, start, end)
        if inputs.attention_groups is not None:  # by absolute position, as the row's keys are
            extra = {**extra, GROUPS_KWARG: inputs.attention_groups[:end]}
        kv = BatchKV([row])
        logits = self.family.forward(inputs.inputs_embeds[:, start:end], inputs.position_ids[..., start:end], kv, extra)
        kv.commit(end - start)
        job.prefilled = end
        return logits

    def _first_tokens(self, job: Job, logits: torch.Tensor) -> None:
        """The prompt is in: fork the choices (sharing that prefill), pick each one's first token."""
        first = job.rows[0]
        assert first is not None
        if self.prefix:
            self.prefix.insert(job.prompt.block_keys, first, room=self.capacity - self.kv_used)
        for _ in range(1, job.n):
            row = SequenceKV(self.shape, first.capacity)
            row.copy_prefix_from(first, first.length)
            job.rows.append(row)
        choices = list(range(job.n))
        tokens, logprobs = job.sampler(logits.expand(job.n, -1), choices)
        self._deliver(job, choices, tokens, logprobs)
        if job.request.request_id in self._by_id:
            self._running.append(job)

    # --- decode ------------------------------------------------------------------------------
    def _decode_step(self) -> None:
        if not self._running:
            return
        began = time.perf_counter()
        rows: list[SequenceKV] = []
        positions: list[int] = []
        tokens: list[int] = []
        spans: list[tuple[Job, list[int]]] = []
        for job in self._running:
            choices = [i for i, row in enumerate(job.rows) if row is not None]
            spans.append((job, choices))
            for i in choices:
                row = job.rows[i]
                assert row is not None
                rows.append(row)
                positions.append(row.length + job.prompt.inputs.rope_delta)
                tokens.append(job.next_tokens[i])
        ids = torch.tensor(tokens, device=self.family.device).view(-1, 1)
        kv = BatchKV(rows)
        logits = self.family.forward(self.family.embed_tokens(ids), self.family.decode_positions(positions), kv, {})
        kv.commit(1)
        BATCH_SIZE.observe(len(rows))
        at = 0
        for job, choices in spans:
            picked, logprobs = job.sampler(logits[at : at + len(choices)], choices)
            at += len(choices)
            self._deliver(job, choices, picked, logprobs)
        ENGINE_STEP_SECONDS.labels("decode").observe(time.perf_counter() - began)

    def _deliver(self, job: Job, choices: list[int], tokens: list[int], logprobs: list[Logprob] | None) -> None:
        """Turn picked tokens into outputs; free the rows that finished; hand the outputs over."""
        outs = []
        for r, (choice, token) in enumerate(zip(choices, tokens, strict=True)):
            out = job.output.append(choice, token, logprobs[r] if logprobs is not None else None)
            outs.append(out)
            job.next_tokens[choice] = token
            if out.finish is not None:
                row = job.rows[choice]
                if row is not None:
                    job.rows[choice] = None
                    freed = row.capacity
                    job.reserved -= freed
                    self.reserved -= freed
        if job.output.finished:
            self._drop(job)
        if job.request.final_only and job.started:
            outs = self._hold(job, outs)
            if not outs:
                return
        job.started = True
        job.emit(outs)

    @staticmethod
    def _hold(job: Job, outs: list[StepOutput]) -> list[StepOutput]:
        """A final-only job's outputs after its first: merged per choice, handed over when the choice ends (one wake-up, not one per token)."""
        ready = []
        for out in outs:
            merged = job.held.pop(out.index).merged(out) if out.index in job.held else out
            if merged.finish is None:
                job.held[out.index] = merged
            else:
                ready.append(merged)
        return ready
