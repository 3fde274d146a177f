"""The engine boundary: what the decoder servicer asks of whatever makes the tokens.

Like vLLM's EngineClient: the servicer validates, admits, resolves media and
maps engine output to protobuf; an engine turns a prepared prompt and
sampling parameters into a stream of step outputs and owns everything about
how (batching, KV cache, prefix reuse, the model itself). The built-in
transformers engine implements it (`services.decoder.engine.builtin`); a vLLM
engine plugs in the same way without the servicer or gateway changing.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from mmserve.errors import Reason, ResourceExhausted
from mmserve.metrics import QUEUE_SECONDS
from mmserve.models.families import ChatPrompt
from mmserve.store import StoredEmbedding
from services.decoder.conversation import SamplingConfig


class Finish(StrEnum):
    """Why a sequence ended (the OpenAI `finish_reason` values)."""

    STOP = "stop"
    LENGTH = "length"


@dataclass
class Usage:
    """Token counts of a whole request (all its choices)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: The logprob reported for a token that could not be sampled (-inf is not JSON; OpenAI and vLLM use this too).
MIN_LOGPROB = -9999.0


@dataclass
class Logprob:
    """A sampled token's log probability and the most likely alternatives at its position ((id, logprob), best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepOutput:
    """What one engine step produced for one choice of a request."""

    index: int  # choice index (0..n-1)
    token_ids: list[int]
    text: str  # whole characters only, stop strings cut out
    finish: Finish | None = None
    usage: Usage | None = None  # on the request's very last output
    logprobs: list[Logprob] | None = None  # one per token id, when the request asked for them

    def merged(self, later: StepOutput) -> StepOutput:
        """This output followed by a later one of the same choice, as one."""
        logprobs = None if self.logprobs is None or later.logprobs is None else self.logprobs + later.logprobs
        return StepOutput(self.index, self.token_ids + later.token_ids, self.text + later.text, later.finish, later.usage, logprobs)


@dataclass
class EngineRequest:
    """A prepared request: the engine's own prompt object plus validated sampling."""

    request_id: str
    prompt: Any  # what `Engine.prepare` returned
    sampling: SamplingConfig
    max_tokens: int  # resolved: within the context
    grammar: str | None = None  # llguidance grammar the output must follow (structured outputs, tool calls)
    #: The caller wants each choice whole when it ends (a non-streamed completion): an engine may then hand over
    #: the first output at once (time to first token) and the rest merged when each choice finishes, instead of one
    #: hand-off per token, as vLLM's RequestOutputKind.FINAL_ONLY.
    final_only: bool = False


@dataclass
class EngineStats:
    """A snapshot for metrics and health."""

    running: int
    waiting: int
    kv_tokens_used: int
    kv_tokens_free: int


class Admission:
    """The per-decoder queue limit, checked before any work: `max_running` at once, `max_waiting` queued, 429 beyond.

    A request holds its place from before media are resolved until its last
    token, so a queued request holds nothing but its message.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._slots = asyncio.Semaphore(max_running)
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.waiting >= self.max_waiting and self._slots.locked():
            raise ResourceExhausted(f"the decoder is busy: {self.max_waiting} requests are already waiting", reason=Reason.QUEUE_FULL)
        self.waiting += 1
        start = time.perf_counter()
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        QUEUE_SECONDS.observe(time.perf_counter() - start)
        try:
            yield
        finally:
            self._slots.release()


class Engine(ABC):
    """What the decoder servicer drives."""

    #: A warm-up prompt every engine renders before SERVING.
    WARMUP_PROMPT = ChatPrompt([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    #: Prompt plus completion tokens one request may use.
    context_limit: int
    admission: Admission

    @abstractmethod
    async def start(self) -> None:
        """Start the engine's loop and warm the model (before the service reports SERVING)."""

    @abstractmethod
    async def prepare(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> Any:
        """Render the prompt with its media (stored embeddings, prompt order); the result has `num_tokens`."""

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        """Step outputs of every choice until each has finished; closing the iterator aborts the request."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request now and free what it holds (idempotent)."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Running and waiting requests, KV cache use."""

    @abstractmethod
    def check_capacity(self, prompt_tokens: int, max_tokens: int, n: int) -> None:
        """Refuse (400) a request that could never fit this engine's KV cache."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the loop; requests still running end."""
