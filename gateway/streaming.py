"""What chat and legacy completions share about reading Generate calls and relaying them as server-sent events.

The first message is awaited *before* the HTTP response begins, so every
error the decoder decides before generating is a real HTTP error; after
that, events follow, a silence gets `: keep-alive` comments, an error becomes
a `data: {"error": ...}` event, and the end is `data: [DONE]`. However the
stream ends (a client that left included), the gRPC call is cancelled, which
frees its decoder slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import Response

from gateway.disconnect import ClientDisconnected, unless_disconnected
from gateway.errors import error_body, http_status, rest_param
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import MmserveError, from_rpc_error

log = logging.getLogger("mmserve.gateway")

#: A message's events (rendered by the route) and the events after the last message.
Render = Callable[[pb.GenerateResponse], Iterable[str]]
End = Callable[[], Iterable[str]]


def sse_data(body: dict[str, Any]) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def client_gone() -> Response:
    """The client left: the decoder call is cancelled; nobody reads this (499, as nginx logs it)."""
    log.info("client disconnected; generation cancelled")
    return Response(status_code=499)


async def first_message(request: Request, call: Any) -> pb.GenerateResponse:
    """The call's first message, before the HTTP response starts (so its errors are HTTP errors).

    Raises grpc.RpcError for the decoder's error and ClientDisconnected if the
    client left first (the call is then cancelled).
    """
    try:
        first = await unless_disconnected(request, call.read())
    except (asyncio.CancelledError, ClientDisconnected, grpc.RpcError):
        call.cancel()  # a no-op for a call that failed; stops the others of a MergedCalls
        raise
    if first is grpc.aio.EOF:
        raise MmserveError("the decoder ended the stream without a result")
    return first


async def relay(call: Any, first: pb.GenerateResponse, keepalive_s: float, render: Render, end: End) -> AsyncGenerator[str, None]:
    """Every message of the call rendered as events, keep-alives on silences, an error event, then [DONE]."""
    message: Any = first
    pending: asyncio.Future[Any] | None = None
    try:
        while message is not grpc.aio.EOF:
            for event in render(message):
                yield event
            pending = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
                if done:
                    break
                yield ": keep-alive\n\n"
            message, pending = pending.result(), None
        for event in end():
            yield event
    except grpc.RpcError as exc:
        err = from_rpc_error(exc, peer="decoder")
        yield sse_data(error_body(err.message, status=http_status(err), param=rest_param(err.field), code=err.reason.lower()))
    finally:
        if pending is not None:
            pending.cancel()
        call.cancel()  # the client went away (or we are done): free the decoder slot
    yield "data: [DONE]\n\n"


class MergedCalls:
    """Several Generate calls read as one, for a request with several prompts.

    Call k's choice i becomes choice k * n + i (as OpenAI numbers them). The
    first read waits for every call's first message, so an error of any prompt
    is still an HTTP error; `failed` then says which call it was. Reads in
    flight survive a cancelled `read()`, so no message is lost to a keep-alive.
    """

    def __init__(self, calls: list[Any], n: int) -> None:
        self._calls, self._n = calls, n
        self._buffer: list[pb.GenerateResponse] = []
        self._reads: dict[int, asyncio.Future[Any]] = {}
        self._ended: set[int] = set()
        self._primed = False
        self.failed: int | None = None

    async def read(self) -> Any:
        """The next message of any call (indexes offset), or grpc.aio.EOF once all have ended."""
        if not self._primed:
            await self._prime()
        while not self._buffer:
            live = [k for k in range(len(self._calls)) if k not in self._ended]
            if not live:
                return grpc.aio.EOF
            for k in live:
                if k not in self._reads:
                    self._reads[k] = asyncio.ensure_future(self._calls[k].read())
            await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
            for k in sorted(k for k, f in self._reads.items() if f.done()):
                self._take(k, self._reads.pop(k).result())
        return self._buffer.pop(0)

    async def _prime(self) -> None:
        """Every call's first message (the first error wins, and names its call)."""
        for k, call in enumerate(self._calls):
            self._reads[k] = asyncio.ensure_future(call.read())
        pending = set(self._reads.values())
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for k, future in self._reads.items():
                if future in done and future.exception() is not None:
                    self.failed = k
                    raise future.exception()  # type: ignore[misc]
        self._primed = True
        for k in sorted(self._reads):
            self._take(k, self._reads.pop(k).result())

    def _take(self, k: int, message: Any) -> None:
        if message is grpc.aio.EOF:
            self._ended.add(k)
            return
        message.index += k * self._n
        self._buffer.append(message)

    def cancel(self) -> None:
        """Cancel every call (no-op for those that ended) and the reads in flight."""
        for future in self._reads.values():
            future.cancel()
        for call in self._calls:
            call.cancel()
