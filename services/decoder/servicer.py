"""DecoderService over gRPC: validate, resolve media, build the prompt, stream the completion."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from typing import Any

import grpc

from mmserve.config import Settings
from mmserve.decoder.v1 import decoder_service_pb2 as pb
from mmserve.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.errors import InvalidArgument, NotFound, Unavailable
from mmserve.log import note
from mmserve.mediainput import MODALITY_NAMES
from mmserve.metrics import E2E, GENERATION_TOKENS, ITL, PROMPT_TOKENS, TTFT
from mmserve.models.loading import LoadedModel
from mmserve.rpc.metadata import remaining_timeout, tenant_var
from services.decoder.conversation import Conversation, SamplingConfig, parse_conversation, parse_sampling
from services.decoder.engine import Engine
from services.decoder.media import MediaResolver
from services.decoder.sampling import Sampler
from services.decoder.textstream import TextStream


class DecoderServicer(pb_grpc.DecoderServiceServicer):
    """Implements mmserve.decoder.v1.DecoderService."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ready: tuple[LoadedModel, Engine, MediaResolver] | None = None

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
        model, _, _ = self.parts
        card = pb.ModelCard(
            id=model.served_name,
            created=int(model.loaded_at),
            owned_by="mmserve",
            source=model.source.requested,
            family=model.family.name,
            modalities=sorted(model.family.modalities),
            max_model_len=self._context_limit(model),
            random_weights=model.source.random_weights,
            model_fingerprint=model.fingerprint,
        )
        return pb.ListModelsResponse(models=[card])

    # --- Generate -------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        model, engine, resolver = self.parts
        family = model.family
        start = time.perf_counter()
        if request.model and request.model not in {model.served_name, model.source.requested}:
            raise NotFound(f"model {request.model!r} is not served here (serving {model.served_name!r})", field="model", reason="MODEL_NOT_FOUND")
        sampling = parse_sampling(request.sampling)

        def chat_part(modality: int, field: str) -> dict[str, Any]:
            family.check_modality(modality, f"{field}.modality")
            return family.chat_part(modality)

        conversation = parse_conversation(request, chat_part=chat_part, reserved=family.reserved_strings())
        self._check_item_limits(conversation)
        media = await resolver.resolve(conversation.media, tenant=tenant_var.get() or self.settings.tenant, timeout=remaining_timeout(context))
        inputs = await engine.run(family.prefill_inputs, conversation.messages, media.embeddings)
        prompt_tokens = int(inputs.input_ids.shape[1])
        max_tokens = self._max_tokens(model, sampling, prompt_tokens)
        note(prompt_tokens=prompt_tokens, media=len(media.embeddings), cached_media=media.cached)
        PROMPT_TOKENS.inc(prompt_tokens)

        sampler = Sampler(sampling, family.device)
        async with engine.slot():
            seqs, tokens = await engine.run(engine.prefill, inputs, sampler, sampling.n)
            first = time.perf_counter()
            TTFT.observe(first - start)
            streams = [TextStream(family.tokenizer, sampling.stop) for _ in range(sampling.n)]
            finished: list[int] = [pb.FINISH_REASON_UNSPECIFIED] * sampling.n
            counts = [0] * sampling.n
            eos = frozenset() if sampling.ignore_eos else family.eos_token_ids
            last = first
            while True:
                out: list[pb.GenerateResponse] = []
                for i, token in enumerate(tokens):
                    if finished[i]:
                        continue
                    counts[i] += 1
                    stream = streams[i]
                    if token in eos:
                        text, finished[i] = stream.finish(), pb.FINISH_REASON_STOP
                    else:
                        text = stream.push(token)
                        if stream.stopped:
                            finished[i] = pb.FINISH_REASON_STOP
                        elif counts[i] >= max_tokens:
                            text += stream.finish()
                            finished[i] = pb.FINISH_REASON_LENGTH
                    out.append(pb.GenerateResponse(index=i, text=text, token_ids=[token], finish_reason=finished[i]))
                done = all(finished)
                if done:
                    completion = sum(counts)
                    out[-1].usage.CopyFrom(pb.Usage(
                        prompt_tokens=prompt_tokens, completion_tokens=completion,
                        total_tokens=prompt_tokens + completion, cached_media=media.cached,
                    ))
                for response in out:
                    yield response
                if done:
                    break
                tokens = await engine.run(engine.step, seqs, tokens)
                now = time.perf_counter()
                ITL.observe(now - last)
                last = now
        GENERATION_TOKENS.inc(sum(counts))
        E2E.observe(time.perf_counter() - start)
        note(completion_tokens=sum(counts), ttft_ms=round((first - start) * 1000, 1))

    # --- helpers --------------------------------------------------------------------------
    def _context_limit(self, model: LoadedModel) -> int:
        return min(self.settings.max_model_len, model.family.max_context)

    def _max_tokens(self, model: LoadedModel, sampling: SamplingConfig, prompt_tokens: int) -> int:
        limit = self._context_limit(model)
        room = limit - prompt_tokens
        if room < 1:
            raise InvalidArgument(f"the prompt has {prompt_tokens} tokens; this model's context is {limit} tokens", field="messages")
        if sampling.max_tokens is None:
            return min(self.settings.default_max_tokens, room)
        if sampling.max_tokens > room:
            raise InvalidArgument(
                f"max_tokens {sampling.max_tokens} + {prompt_tokens} prompt tokens exceeds this model's context of {limit} tokens",
                field="sampling.max_tokens",
            )
        return sampling.max_tokens

    def _check_item_limits(self, conversation: Conversation) -> None:
        tally = Tally(MODALITY_NAMES[p.item.modality] for p in conversation.media)
        for name, limit in self.settings.item_limits().items():
            if tally[name] > limit:
                raise InvalidArgument(f"too many {name} items: {tally[name]} (limit {limit} per request)", field="messages")
