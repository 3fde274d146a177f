"""Request limits: the body size cap, checked before FastAPI parses anything."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response


class BodyLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed chunked.

    A body without Content-Length (chunked) is read here, up to the limit, before
    the app sees it: FastAPI's body parser turns any exception raised while it
    reads the body into a 400, so the limit cannot be enforced from inside it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                await self._reject(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server delivers exactly Content-Length bytes
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._reject(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # e.g. http.disconnect, for streaming responses
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(f"request body exceeds {self.limit} bytes", status=413, code="body_too_large")
        await response(scope, receive, send)
