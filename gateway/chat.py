"""POST /v1/chat/completions and GET /v1/models.

Streaming: the gRPC call is started and its first message awaited *before*
the HTTP response begins, so every media or validation error (decided by the
decoder before its first message) is a real HTTP error. After that, SSE
chunks follow the OpenAI format; an error mid-stream becomes an
`data: {"error": ...}` event; long silences get `: keep-alive` comments; a
client that disconnects cancels the gRPC call, which frees the decoder slot.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.disconnect import ClientDisconnected, ClosingStreamingResponse, unless_disconnected
from gateway.embeds import chat_part_type, json_field
from gateway.errors import CLIENT_GONE, error_responses
from gateway.schemas import ChatCompletionRequest, ModelList, ModelObject
from gateway.state import Gateway, call_metadata, gateway, tenant
from gateway.streaming import client_gone, first_message, relay, sse_data
from gateway.translate import to_generate_request
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.modality import BY_PROTO
from mmserve.promptsize import check_prompt_size

log = logging.getLogger("mmserve.gateway")
router = APIRouter()

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALLS: "tool_calls"}


class ChatError(Exception):
    """An error with the request's own name for max tokens (max_tokens or max_completion_tokens)."""

    def __init__(self, error: MmserveError, max_tokens_name: str) -> None:
        self.error, self.max_tokens_name = error, max_tokens_name


CHAT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The chat completion; with `stream`, `text/event-stream` `chat.completion.chunk` events, then `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 404, 409, 413, 422, 429, 503, 504),
    499: CLIENT_GONE,
}


@router.post("/v1/chat/completions", response_model=None, tags=["chat"], responses=CHAT_RESPONSES)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, gw: Gateway = Depends(gateway), caller: str = Depends(tenant)
) -> Response:
    """OpenAI chat completions, streamed (SSE) or not, over the decoder's Generate RPC."""
    max_tokens_name = "max_tokens" if body.max_tokens is not None and body.max_completion_tokens is None else "max_completion_tokens"
    try:
        grpc_request = to_generate_request(body)
    except MmserveError as err:
        raise ChatError(err, max_tokens_name) from None
    card = await gw.model_card()
    if card is not None:
        try:
            # the gateway does not know the longest token: media count as one character, a looser bound
            check_prompt_size(grpc_request, max_chars=card.max_prompt_chars, longest_token_chars=1)
        except MmserveError as err:
            raise ChatError(err, max_tokens_name) from None
    call = gw.decoder.Generate(grpc_request, metadata=call_metadata(request, caller), timeout=gw.settings.gateway_request_timeout_s)
    try:
        first = await first_message(request, call)
    except grpc.RpcError as exc:
        failed = from_rpc_error(exc, peer="decoder")
        failed.field = json_field(failed.field, chat_part_type(body.messages))  # a client embedding's field in JSON terms
        raise ChatError(failed, max_tokens_name) from None
    except ClientDisconnected:
        return client_gone()
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or await gw.served_model()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = sse_events(call, first, completion_id, created, model, include_usage, gw.settings.sse_keepalive_s)
        return ClosingStreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    try:
        whole = collect(call, first, completion_id, created, model, logprobs=bool(body.logprobs))
        return JSONResponse(await unless_disconnected(request, whole))
    except ClientDisconnected:
        return client_gone()
    except grpc.RpcError as exc:
        raise ChatError(from_rpc_error(exc, peer="decoder"), max_tokens_name) from None
    finally:
        call.cancel()  # no-op when finished; frees the decoder slot if the client went away


@router.get("/v1/models", response_model=ModelList, tags=["models"], responses=error_responses(401, 503, 504))
async def list_models(request: Request, gw: Gateway = Depends(gateway), caller: str = Depends(tenant)) -> JSONResponse:
    """The served model(s), with mmserve's extra fields (modalities, random_weights, ...)."""
    try:
        reply = await gw.decoder.ListModels(pb.ListModelsRequest(), timeout=10, metadata=call_metadata(request, caller))
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, peer="decoder") from None
    data = [
        ModelObject(
            id=m.id,
            created=m.created,
            owned_by=m.owned_by,
            random_weights=m.random_weights,
            family=m.family,
            modalities=[BY_PROTO[x].name for x in m.modalities if x in BY_PROTO],
            max_model_len=m.max_model_len,
        )
        for m in reply.models
    ]
    return JSONResponse(ModelList(data=data).model_dump())


def usage_json(usage: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def logprobs_content(message: pb.GenerateResponse) -> list[dict[str, Any]]:
    """The OpenAI `logprobs.content` entries of a message's tokens."""
    return [
        {
            "token": lp.token,
            "logprob": lp.logprob,
            "bytes": list(lp.bytes),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top],
        }
        for lp in message.logprobs
    ]


def tool_call(call: pb.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def assistant_message(text: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The reply message; with tool calls and no text, content is null (as OpenAI returns it)."""
    message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


async def collect(
    call: Any, first: pb.GenerateResponse, completion_id: str, created: int, model: str, *, logprobs: bool = False
) -> dict[str, Any]:
    """A whole (non-streamed) completion."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage: dict[str, Any] = {}
    tokens: dict[int, list[dict[str, Any]]] = {}
    calls: dict[int, list[dict[str, Any]]] = {}
    message: Any = first
    while message is not grpc.aio.EOF:
        texts.setdefault(message.index, []).append(message.text)
        calls.setdefault(message.index, []).extend(tool_call(c) for c in message.tool_calls)
        tokens.setdefault(message.index, []).extend(logprobs_content(message))
        if message.finish_reason:
            finish[message.index] = FINISH.get(message.finish_reason, "stop")
        if message.HasField("usage"):
            usage = usage_json(message.usage)
        message = await read_rest(call, whole=bool(usage))
    choices = [
        {
            "index": i,
            "message": assistant_message("".join(texts[i]), calls[i]),
            "logprobs": {"content": tokens[i]} if logprobs else None,
            "finish_reason": finish.get(i, "stop"),
        }
        for i in sorted(texts)
    ]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage}


async def read_rest(call: Any, *, whole: bool) -> Any:
    """The call's next message, or EOF if the decoder vanished after the request's last output (the one with usage).

    That output ends every choice, so the answer is complete: a replica killed before its status
    went out must not turn a finished non-streamed completion into a 503.
    """
    try:
        return await call.read()
    except grpc.RpcError as exc:
        if whole and exc.code() == grpc.StatusCode.UNAVAILABLE:
            return grpc.aio.EOF
        raise


def sse_events(
    call: Any, first: pb.GenerateResponse, completion_id: str, created: int, model: str, include_usage: bool, keepalive_s: float
) -> AsyncGenerator[str, None]:
    """OpenAI chat.completion.chunk events, keep-alives, and [DONE]; cancels the call on disconnect."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return sse_data(body)

    started: set[int] = set()
    calls_sent: dict[int, int] = {}
    usage: list[dict[str, Any]] = []

    def render(message: pb.GenerateResponse) -> list[str]:
        events = []
        if message.index not in started:
            started.add(message.index)
            events.append(chunk([{"index": message.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        if message.text or message.finish_reason or message.logprobs or message.tool_calls:
            delta: dict[str, Any] = {"content": message.text} if message.text else {}
            if message.tool_calls:
                first_call = calls_sent.get(message.index, 0)
                delta["tool_calls"] = [{"index": first_call + k, **tool_call(c)} for k, c in enumerate(message.tool_calls)]
                calls_sent[message.index] = first_call + len(message.tool_calls)
            choice = {"index": message.index, "delta": delta, "finish_reason": FINISH.get(message.finish_reason)}
            if message.logprobs:
                choice["logprobs"] = {"content": logprobs_content(message)}
            events.append(chunk([choice]))
        if message.HasField("usage"):
            usage[:] = [usage_json(message.usage)]
        return events

    def end() -> list[str]:
        return [chunk([], usage[0])] if include_usage and usage else []

    return relay(call, first, keepalive_s, render, end)
