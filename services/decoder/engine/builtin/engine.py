"""The built-in engine: transformers models, continuous batching, a KV budget and a prefix cache (CPU or CUDA).

The asyncio side (this module) hands requests to the scheduler thread and
streams its outputs back; the scheduler (scheduler.py) owns the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path

import torch

from mmserve.config import Settings
from mmserve.errors import InvalidArgument, Reason, Unavailable
from mmserve.metrics import KV_CACHE_TOKENS, KV_CACHE_USAGE, RUNNING, WAITING
from mmserve.models.families import ChatPrompt, Family
from mmserve.models.threads import DEFAULT_THREADS
from mmserve.rpc.metadata import tenant_var
from mmserve.store import StoredEmbedding
from services.decoder.conversation import SamplingConfig
from services.decoder.engine.base import Admission, Engine, EngineRequest, EngineStats, StepOutput
from services.decoder.engine.builtin.kv import KVShape, use_rows_attention
from services.decoder.engine.builtin.linear import onednn_available, use_onednn_linears
from services.decoder.engine.builtin.logits import LogitsProcessors
from services.decoder.engine.builtin.prefix import PrefixCache, block_keys, media_token_key
from services.decoder.engine.builtin.sampling import Sampler
from services.decoder.engine.builtin.scheduler import BuiltinPrompt, Job, Scheduler
from services.decoder.engine.outputs import RequestOutput

log = logging.getLogger("mmserve.decoder.engine")


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the KV cache will live: CUDA free device memory; CPU MemAvailable, within a container's cgroup limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = 4 << 30
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):  # cgroup v2: /proc/meminfo shows the host, not the container
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    return max(free, 0)


def kv_budget_tokens(settings: Settings, shape: KVShape, context_limit: int) -> int:
    """The KV budget in tokens: the setting in tokens or bytes, else a share of free memory (at most what max_running full contexts need)."""
    if settings.kv_cache_tokens is not None:
        return settings.kv_cache_tokens
    if settings.kv_cache_bytes is not None:
        return settings.kv_cache_bytes // shape.bytes_per_token
    share = int(available_memory_bytes(shape.device) * settings.kv_cache_memory_fraction) // shape.bytes_per_token
    return max(1, min(share, settings.max_running_requests * context_limit))


#: Below this many language-model weights, one intra-op thread decodes faster than several (tiny models).
SMALL_LM_WEIGHTS = 8_000_000


def model_threads(settings: Settings, family: Family) -> int | None:
    """Intra-op threads for the model thread: the setting, else 1 for a small LM on CPU, else None (torch's default).

    On a tiny model one decode step is ~1 ms of many small ops; handing each to a
    second OpenMP thread costs more than it saves (measured ~0.4 ms per token on
    the tiny checkpoints; the 88M-weight mid model is faster with all cores).
    """
    if settings.engine_threads:
        return settings.engine_threads
    if family.device.type != "cpu":
        return None
    text = family.text_config
    h, inter = text.hidden_size, text.intermediate_size
    weights = text.num_hidden_layers * (4 * h * h + 3 * h * inter) + text.vocab_size * h
    return 1 if weights < SMALL_LM_WEIGHTS else None


class TransformersEngine(Engine):
    """See the module docstring."""

    def __init__(self, family: Family, settings: Settings) -> None:
        self.family = family
        self.context_limit = min(settings.max_model_len, family.max_context)
        self.admission = Admission(settings.max_running_requests, settings.max_waiting_requests)
        use_rows_attention(family.text_config)
        if family.model is None:
            raise ValueError("the built-in engine runs the LLM: load the decoder part of the model, not the prompt part")
        if settings.onednn_linears and onednn_available(family.device, family.dtype):
            log.info("oneDNN linear layers: %d", use_onednn_linears(family.model, settings.onednn_min_weights))
        self.shape = KVShape.of(family.text_config, family.dtype, family.device)
        self.capacity = kv_budget_tokens(settings, self.shape, self.context_limit)
        self.prefix = PrefixCache(settings.prefix_cache_block_tokens) if settings.prefix_cache else None
        self.scheduler = Scheduler(
            family,
            self.shape,
            self.capacity,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefix=self.prefix,
            threads=model_threads(settings, family),
        )
        self._placeholders = family.placeholder_token_ids()
        log.info(
            "KV cache budget: %d tokens (%.1f MiB, %d bytes per token); prefix cache %s; model threads %s",
            self.capacity,
            self.capacity * self.shape.bytes_per_token / 2**20,
            self.shape.bytes_per_token,
            "on" if self.prefix else "off",
            self.scheduler.threads or DEFAULT_THREADS,
        )

    async def start(self) -> None:
        self.scheduler.start()
        self.export_metrics()
        await self._warmup()

    def export_metrics(self) -> None:
        """Point the process's engine gauges (running, waiting, KV cache) at this engine (one engine per process in production)."""
        RUNNING.set_function(lambda: self.stats().running)
        WAITING.set_function(lambda: self.stats().waiting)
        KV_CACHE_TOKENS.labels("used").set_function(lambda: self.scheduler.kv_used)
        KV_CACHE_TOKENS.labels("total").set_function(lambda: self.capacity)
        KV_CACHE_USAGE.set_function(lambda: self.scheduler.kv_used / self.capacity)

    async def _warmup(self) -> None:
        """One short request through the whole loop (lazy init, allocator) before SERVING; leaves no cache behind."""
        prompt = await self.prepare(self.WARMUP_PROMPT, [])
        config = SamplingConfig(max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=[], n=2, ignore_eos=True)
        async for _ in self.generate(EngineRequest(f"warmup-{uuid.uuid4().hex}", prompt, config, 2)):
            pass
        if self.prefix:
            await asyncio.wrap_future(self.scheduler.call(self.prefix.clear))

    async def prepare(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> BuiltinPrompt:
        # The request's tenant (bound by the service interceptor) salts its prefix-cache keys: no sharing across tenants.
        future = self.scheduler.call(self._render, prompt, media, tenant_var.get() or "")
        return await asyncio.wrap_future(future)

    def _render(self, prompt: ChatPrompt, media: list[StoredEmbedding], tenant: str = "") -> BuiltinPrompt:
        """On the model thread: prefill inputs, and the prefix-cache keys of the prompt's blocks."""
        inputs = self.family.prefill_inputs(prompt, media)
        keys: list[bytes] = []
        if self.prefix:
            keys = block_keys(self._token_keys(inputs.input_ids[0].tolist(), media), self.prefix.block_size, salt=tenant)
        return BuiltinPrompt(inputs, keys)

    def _token_keys(self, ids: list[int], media: list[StoredEmbedding]) -> list[int]:
        """Token ids, with each media placeholder replaced by a key of the item it stands for."""
        items = iter(media)
        left, key = 0, 0
        out = []
        for token in ids:
            if token in self._placeholders:
                if left == 0:
                    stored = next(items)
                    desc = stored.descriptor
                    left = int(desc.token_count)
                    key = media_token_key(
                        f"{desc.content_sha256}|{desc.options_json}|{desc.modality}|{desc.id if not desc.content_sha256 else ''}"
                    )
                out.append(key)
                left -= 1
            else:
                out.append(token)
        return out

    def check_capacity(self, prompt_tokens: int, max_tokens: int, n: int) -> None:
        need = n * (prompt_tokens + max_tokens)
        if need > self.capacity:
            raise InvalidArgument(
                f"this request needs {need} KV cache tokens ({n} x ({prompt_tokens} prompt + {max_tokens} max_tokens)); "
                f"this decoder's KV cache holds {self.capacity}",
                field="sampling.max_tokens",
            )

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        if not self.scheduler.alive:
            raise Unavailable("the decoder's engine has stopped", reason=Reason.ENGINE_STOPPED)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[list[StepOutput] | BaseException] = asyncio.Queue()

        def emit(item: list[StepOutput] | BaseException) -> None:  # called on the scheduler thread
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        sampling = request.sampling
        eos = frozenset() if sampling.ignore_eos else self.family.eos_token_ids
        job = Job(
            request=request,
            prompt=request.prompt,
            output=RequestOutput(sampling.n, self.family.tokenizer, sampling.stop, eos, request.max_tokens, request.prompt.num_tokens),
            sampler=Sampler(sampling, self.family.device, self._processors(request, eos)),
            emit=emit,
        )
        self.scheduler.submit(job)
        done = False
        try:
            while not done:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                for out in item:
                    done = done or out.usage is not None
                    yield out
        finally:
            if not done:
                self.scheduler.abort(request.request_id)

    def _processors(self, request: EngineRequest, eos: frozenset[int]) -> LogitsProcessors | None:
        """The request's logits processors (None when it sets none)."""
        sampling = request.sampling
        if not (sampling.penalized or request.grammar):
            return None
        return LogitsProcessors(
            sampling,
            vocab_size=self.family.text_config.vocab_size,
            eos=eos,
            prompt_ids=request.prompt.inputs.input_ids[0].tolist(),
            grammar=request.grammar,
            tokenizer=self.family.tokenizer,
            device=self.family.device,
        )

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def stats(self) -> EngineStats:
        running, queued = self.scheduler.counts
        used = self.scheduler.kv_used
        return EngineStats(running, self.admission.waiting + queued, used, self.capacity - used)

    async def close(self) -> None:
        self.scheduler.stop()
