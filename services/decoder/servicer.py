"""DecoderService over gRPC: validate, admit, resolve media, and map the engine's outputs to protobuf.

Order matters: everything that costs nothing (parsing, item limits, the
prompt-size guard, the queue limit) comes before anything that costs memory
or time (the encoder, the store, tokenization); the engine reserves KV only
for a request that fits. How tokens are made is the engine's business.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.config import Settings
from mmserve.errors import InvalidArgument, NotFound, Reason, Unavailable
from mmserve.log import note
from mmserve.metrics import E2E, GENERATION_TOKENS, ITL, PROMPT_TOKENS, TTFT
from mmserve.modality import check_item_limits
from mmserve.models.families import ChatPrompt, Family
from mmserve.models.loading import LoadedModel
from mmserve.promptsize import check_prompt_size, max_prompt_chars, prompt_field
from mmserve.rpc.metadata import remaining_timeout, tenant_var
from services.decoder.conversation import SamplingConfig, check_token_ids, parse_conversation, parse_sampling
from services.decoder.engine import Engine, EngineRequest, Finish, StepOutput
from services.decoder.engine.tokentext import TokenText
from services.decoder.guidance import checked_grammar, grammar_for
from services.decoder.media import MediaResolver
from services.decoder.tools import ToolCallParser, ToolSpec, parse_tools, tool_grammar

FINISH = {Finish.STOP: pb.FINISH_REASON_STOP, Finish.LENGTH: pb.FINISH_REASON_LENGTH}


class DecoderServicer(pb_grpc.DecoderServiceServicer):
    """Implements mmserve.decoder.v1.DecoderService."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready: tuple[LoadedModel, Engine, MediaResolver] | None = None
        self._tokens: TokenText | None = None

    def attach(self, model: LoadedModel, engine: Engine, resolver: MediaResolver) -> None:
        """Start serving (the server runs, NOT_SERVING, while the model loads)."""
        self._ready = (model, engine, resolver)

    @property
    def parts(self) -> tuple[LoadedModel, Engine, MediaResolver]:
        if self._ready is None:
            raise Unavailable("the decoder is still loading its model")
        return self._ready

    # --- ListModels -----------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        model, engine, _ = self.parts
        card = pb.ModelCard(
            id=model.served_name,
            created=int(model.loaded_at),
            owned_by="mmserve",
            source=model.source.requested,
            family=model.family.name,
            modalities=sorted(model.family.modalities),
            max_model_len=engine.context_limit,
            random_weights=model.source.random_weights,
            model_fingerprint=model.fingerprint,
            max_prompt_chars=self._max_prompt_chars(model, engine),
        )
        return pb.ListModelsResponse(models=[card])

    # --- Generate -------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        model, engine, resolver = self.parts
        family = model.family
        start = time.perf_counter()
        if request.model and request.model not in {model.served_name, model.source.requested}:
            raise NotFound(
                f"model {request.model!r} is not served here (serving {model.served_name!r})", field="model", reason=Reason.MODEL_NOT_FOUND
            )
        sampling = parse_sampling(request.sampling)
        check_token_ids(sampling, len(family.tokenizer))
        tools = parse_tools(request, family)
        grammar = self._grammar(sampling, tools, family)
        check_prompt_size(request, max_chars=self._max_prompt_chars(model, engine), longest_token_chars=family.longest_token_chars)

        def chat_part(modality: int, field: str) -> dict[str, Any]:
            family.check_modality(modality, f"{field}.modality")
            return family.chat_part(modality)

        conversation = parse_conversation(request, chat_part=chat_part, reserved=family.reserved_strings())
        check_item_limits((p.item.modality for p in conversation.media), self.settings, "messages")
        async with engine.admission.slot():
            admitted = time.perf_counter()
            media = await resolver.resolve(
                conversation.media, tenant=tenant_var.get() or self.settings.tenant, timeout=remaining_timeout(context)
            )
            resolved = time.perf_counter()
            chat = (
                ChatPrompt(text=request.prompt)
                if request.HasField("prompt")
                else ChatPrompt(conversation.messages, tools.shown if tools else None)
            )
            prompt = await engine.prepare(chat, media.embeddings)
            prompt_tokens = int(prompt.num_tokens)
            note(
                queue_ms=round((admitted - start) * 1000, 1),
                resolve_ms=round((resolved - admitted) * 1000, 1),
                prepare_ms=round((time.perf_counter() - resolved) * 1000, 1),
            )
            max_tokens = self._max_tokens(engine, sampling, prompt_tokens, prompt_field(request))
            engine.check_capacity(prompt_tokens, max_tokens, sampling.n)
            note(prompt_tokens=prompt_tokens, media=len(media.embeddings), cached_media=media.cached)
            PROMPT_TOKENS.inc(prompt_tokens)
            completion = cached_prompt = 0
            first = last = 0.0
            held: dict[int, StepOutput] = {}
            parsers = self._parsers(tools, family, sampling.n)
            outputs = engine.generate(
                EngineRequest(uuid.uuid4().hex, prompt, sampling, max_tokens, grammar, final_only=request.whole_choices)
            )
            async with aclosing(outputs):  # a cancel or a failed write aborts the engine request now, not at GC
                async for out in outputs:
                    now = time.perf_counter()
                    if not first:
                        first = now
                        TTFT.observe(first - start)
                    elif out.index == 0:
                        for _ in out.token_ids:  # a merged output (whole_choices) stands for len(token_ids) gaps
                            ITL.observe((now - last) / len(out.token_ids))
                    last = now
                    completion += len(out.token_ids)
                    if out.usage is not None:
                        cached_prompt = out.usage.cached_prompt_tokens
                    if request.whole_choices:
                        out = held.pop(out.index).merged(out) if out.index in held else out
                        if out.finish is None:
                            held[out.index] = out
                            continue
                    yield self._response(out, media.cached, self._token_text(model), parsers.get(out.index))
        GENERATION_TOKENS.inc(completion)
        E2E.observe(time.perf_counter() - start)
        note(completion_tokens=completion, cached_prompt_tokens=cached_prompt, ttft_ms=round((first - start) * 1000, 1))

    # --- helpers --------------------------------------------------------------------------
    def _token_text(self, model: LoadedModel) -> TokenText:
        if self._tokens is None:
            self._tokens = TokenText(model.family.tokenizer, model.family.token_bytes)
        return self._tokens

    @staticmethod
    def _grammar(sampling: SamplingConfig, tools: ToolSpec | None, family: Family) -> str | None:
        """The grammar the output must follow: response_format's, or a required/named tool call's (not both)."""
        called = tool_grammar(tools, family.tool_call_format) if tools and family.tool_call_format else None
        if called and sampling.guidance:
            raise InvalidArgument("response_format cannot be combined with a required or named tool_choice", field="sampling.guidance")
        if sampling.guidance:
            return checked_grammar(grammar_for(sampling.guidance), family.tokenizer)
        return checked_grammar(called, family.tokenizer, field="tools") if called else None

    @staticmethod
    def _parsers(tools: ToolSpec | None, family: Family, n: int) -> dict[int, ToolCallParser]:
        """A tool-call parser per choice when the model may call tools."""
        fmt = family.tool_call_format
        if tools is None or tools.choice == "none" or fmt is None:
            return {}
        return {i: ToolCallParser(fmt) for i in range(n)}

    @staticmethod
    def _response(out: StepOutput, cached_media: int, tokens: TokenText, parser: ToolCallParser | None) -> pb.GenerateResponse:
        response = pb.GenerateResponse(
            index=out.index,
            text=out.text,
            token_ids=out.token_ids,
            finish_reason=FINISH[out.finish] if out.finish else pb.FINISH_REASON_UNSPECIFIED,
        )
        if parser is not None:
            text, calls = parser.feed(out.text)
            if out.finish:
                tail, more = parser.finish()
                text, calls = text + tail, calls + more
                if parser.calls and out.finish == Finish.STOP:
                    response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
            response.text = text
            response.tool_calls.extend(calls)
        for lp in out.logprobs or ():
            text, raw = tokens.of(lp.token_id)
            entry = response.logprobs.add(token=text, bytes=raw, logprob=lp.logprob)
            for token_id, logprob in lp.top:
                text, raw = tokens.of(token_id)
                entry.top.add(token_id=token_id, token=text, bytes=raw, logprob=logprob)
        if out.usage is not None:
            response.usage.CopyFrom(
                pb.Usage(
                    prompt_tokens=out.usage.prompt_tokens,
                    completion_tokens=out.usage.completion_tokens,
                    total_tokens=out.usage.total_tokens,
                    cached_media=cached_media,
                    cached_prompt_tokens=out.usage.cached_prompt_tokens,
                )
            )
        return response

    @staticmethod
    def _max_prompt_chars(model: LoadedModel, engine: Engine) -> int:
        return max_prompt_chars(engine.context_limit, model.family.longest_token_chars)

    def _max_tokens(self, engine: Engine, sampling: SamplingConfig, prompt_tokens: int, field: str) -> int:
        limit = engine.context_limit
        room = limit - prompt_tokens
        if room < 1:
            raise InvalidArgument(f"the prompt has {prompt_tokens} tokens; this model's context is {limit} tokens", field=field)
        if sampling.max_tokens is None:
            return min(self.settings.default_max_tokens, room)
        if sampling.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens {sampling.max_tokens} + {prompt_tokens} prompt tokens exceeds this model's context of {limit} tokens",
                field="sampling.max_tokens",
            )
        return sampling.max_tokens
