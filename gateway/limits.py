"""Request limits: the body's size cap and deadline, checked before FastAPI parses anything."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response


class BodyLimit:
    """413 for bodies over the limit (announced by Content-Length or streamed chunked); 408 for bodies too slow.

    The whole body is read here, before the app sees it, within `timeout_s` of
    the request's start: FastAPI's body parser turns any exception raised while
    it reads the body into a 400, and a client trickling a body one byte at a
    time would otherwise hold a connection (and a task) as long as it likes.
    A 408 closes the connection (the rest of the body is never read); after a
    413 the server may drain the rest, within the next request's header deadline
    (`gateway.server`), so the client can read the answer.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = 30.0) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send, 413, f"request body exceeds {self.limit} bytes", "body_too_large")
            return
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    body += message.get("body", b"")
                    if len(body) > self.limit:
                        await self._reject(scope, receive, send, 413, f"request body exceeds {self.limit} bytes", "body_too_large")
                        return
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._reject(scope, receive, send, 408, f"the request body did not arrive within {self.timeout_s:g} s", "request_timeout")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect, for streaming responses
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, status: int, message: str, code: str) -> None:
        response = error_response(message, status=status, code=code)
        if status == 408:
            response.headers["connection"] = "close"
        await response(scope, receive, send)
