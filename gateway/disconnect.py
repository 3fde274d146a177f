"""Notice a client that went away while its completion is still being made, and stop the work.

Starlette does not cancel an endpoint when its client disconnects, so a
non-streaming request would otherwise keep its decoder slot until the last
token. After the body is read, the next ASGI message of a request is
`http.disconnect`; waiting for it beside the work tells us when to cancel.

A stream learns of it when a write fails; Starlette then leaves the body
generator suspended (its `finally` would run only at garbage collection), so
`ClosingStreamingResponse` closes it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientDisconnected (with `work` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its generator when the response ends, however it ends."""

    def __init__(self, content: AsyncGenerator[str, None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._generator = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generator.aclose()
