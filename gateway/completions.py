"""POST /v1/completions: OpenAI's legacy completions over the decoder's Generate RPC (the prompt used as is).

Each prompt of a list is its own Generate call, all run concurrently and read
as one (`MergedCalls`): prompt k's choice i is choice k * n + i, and the usage
is summed. Errors, streaming and disconnects work exactly as in chat (shared
in `gateway.streaming`); `logprobs` is the legacy shape (tokens,
token_logprobs, top_logprobs as {token: logprob}, text_offset).
"""

from __future__ import annotations

import codecs
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from gateway.chat import FINISH, ChatError, usage_json
from gateway.disconnect import ClientDisconnected, ClosingStreamingResponse, unless_disconnected
from gateway.errors import CLIENT_GONE, error_responses
from gateway.schemas import CompletionRequest, CompletionResponse
from gateway.state import Gateway, call_metadata, gateway, tenant
from gateway.streaming import MergedCalls, client_gone, first_message, relay, sse_data
from gateway.translate import completion_prompts, to_completion_request
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.promptsize import check_prompt_size

log = logging.getLogger("mmserve.gateway")
router = APIRouter()

#: The request's name for max tokens, in error messages and `param`.
MAX_TOKENS = "max_tokens"

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": CompletionResponse,
        "description": "The completion; with `stream`, `text/event-stream` chunks of the same shape, then `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **error_responses(400, 401, 404, 413, 429, 503, 504),
    499: CLIENT_GONE,
}


@router.post("/v1/completions", response_model=None, tags=["completions"], responses=RESPONSES)
async def completions(body: CompletionRequest, request: Request, gw: Gateway = Depends(gateway), caller: str = Depends(tenant)) -> Response:
    """OpenAI legacy completions (prompt string or list, streamed or not, logprobs); echo, suffix and best_of > n are 400s."""
    requests = await _generate_requests(body, gw)
    metadata = call_metadata(request, caller)
    timeout = gw.settings.gateway_request_timeout_s
    calls = MergedCalls([gw.decoder.Generate(r, metadata=metadata, timeout=timeout) for r in requests], body.n or 1)
    try:
        first = await first_message(request, calls)
    except grpc.RpcError as exc:
        raise ChatError(_prompt_named(from_rpc_error(exc, peer="decoder"), body, calls.failed), MAX_TOKENS) from None
    except ClientDisconnected:
        return client_gone()
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    model = body.model or await gw.served_model()
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
    want_logprobs = body.logprobs is not None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = sse_events(calls, first, head, include_usage, want_logprobs, gw.settings.sse_keepalive_s)
        return ClosingStreamingResponse(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    try:
        return JSONResponse(await unless_disconnected(request, collect(calls, first, head, want_logprobs)))
    except ClientDisconnected:
        return client_gone()
    except grpc.RpcError as exc:
        raise ChatError(from_rpc_error(exc, peer="decoder"), MAX_TOKENS) from None
    finally:
        calls.cancel()  # no-op when finished; frees the decoder slots if the client went away


async def _generate_requests(body: CompletionRequest, gw: Gateway) -> list[pb.GenerateRequest]:
    """One GenerateRequest per prompt, each through the cheap size guard (no decoder call for a hopeless prompt)."""
    try:
        requests = [to_completion_request(body, prompt) for prompt in completion_prompts(body)]
    except MmserveError as err:
        raise ChatError(err, MAX_TOKENS) from None
    card = await gw.model_card()
    if card is None:  # no decoder answers yet: the Generate call will say so
        return requests
    for k, grpc_request in enumerate(requests):
        try:
            # the gateway does not know the longest token: one character per token, a looser bound than the decoder's
            check_prompt_size(grpc_request, max_chars=card.max_prompt_chars, longest_token_chars=1)
        except MmserveError as err:
            raise ChatError(_prompt_named(err, body, k), MAX_TOKENS) from None
    return requests


def _prompt_named(err: MmserveError, body: CompletionRequest, k: int | None) -> MmserveError:
    """An error about prompt k names `prompt[k]` when the request gave a list (`prompt` for one string)."""
    if err.field == "prompt" and k is not None and not isinstance(body.prompt, str):
        err.field = f"prompt[{k}]"
    return err


class LegacyLogprobs:
    """One choice's logprobs in the legacy shape; `text_offset` counts characters on across streamed chunks."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def of(self, message: pb.GenerateResponse) -> dict[str, list[Any]]:
        """The logprobs of this message's tokens (a token split inside a character has the offset of that character)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in message.logprobs:
            out["tokens"].append(lp.token)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({t.token: t.logprob for t in lp.top})
            out["text_offset"].append(self._chars)
            self._chars += len(self._decoder.decode(lp.bytes))
        return out


def _add_usage(total: pb.Usage, message: pb.GenerateResponse) -> None:
    """Sum the usage of every prompt's call (each reports its own on its last message)."""
    if message.HasField("usage"):
        for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_prompt_tokens"):
            setattr(total, name, getattr(total, name) + getattr(message.usage, name))


async def collect(calls: MergedCalls, first: pb.GenerateResponse, head: dict[str, Any], want_logprobs: bool) -> dict[str, Any]:
    """A whole (non-streamed) completion: every choice of every prompt, in index order."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    logprobs: dict[int, tuple[LegacyLogprobs, dict[str, list[Any]]]] = {}
    usage = pb.Usage()
    message: Any = first
    while message is not grpc.aio.EOF:
        texts.setdefault(message.index, []).append(message.text)
        builder, whole = logprobs.setdefault(message.index, (LegacyLogprobs(), {}))
        for key, values in builder.of(message).items():
            whole.setdefault(key, []).extend(values)
        if message.finish_reason:
            finish[message.index] = FINISH.get(message.finish_reason, "stop")
        _add_usage(usage, message)
        message = await calls.read()
    choices = [
        {
            "text": "".join(texts[i]),
            "index": i,
            "logprobs": logprobs[i][1] if want_logprobs else None,
            "finish_reason": finish.get(i, "stop"),
        }
        for i in sorted(texts)
    ]
    return {**head, "choices": choices, "usage": usage_json(usage)}


def sse_events(
    calls: MergedCalls, first: pb.GenerateResponse, head: dict[str, Any], include_usage: bool, want_logprobs: bool, keepalive_s: float
) -> AsyncGenerator[str, None]:
    """`text_completion` chunks (one piece of one choice each), the usage chunk if asked for, then [DONE]."""
    builders: dict[int, LegacyLogprobs] = {}
    usage = pb.Usage()

    def chunk(choices: list[dict[str, Any]], usage_body: dict[str, Any] | None = None) -> str:
        return sse_data({**head, "choices": choices, **({"usage": usage_body} if include_usage else {})})

    def render(message: pb.GenerateResponse) -> list[str]:
        _add_usage(usage, message)
        if not (message.text or message.finish_reason or message.logprobs):
            return []
        logprobs = builders.setdefault(message.index, LegacyLogprobs()).of(message) if want_logprobs else None
        choice = {"text": message.text, "index": message.index, "logprobs": logprobs, "finish_reason": FINISH.get(message.finish_reason)}
        return [chunk([choice])]

    def end() -> list[str]:
        return [chunk([], usage_json(usage))] if include_usage else []

    return relay(calls, first, keepalive_s, render, end)
