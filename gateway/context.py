"""Per-request context as plain ASGI middleware: the request id, in-flight gauge, metrics and one log line.

Plain ASGI rather than `@app.middleware("http")`: Starlette's BaseHTTPMiddleware
runs the app in a second task behind memory streams, which costs every request
(and copies every body chunk) for what is only a header and a few counters here.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_response
from mmserve.log import request_id_var
from mmserve.metrics import IN_FLIGHT, REQUEST_SECONDS, REQUESTS

log = logging.getLogger("mmserve.gateway")

#: Routes left out of the request metrics and log (probes and scrapes would drown the rest).
QUIET_ROUTES = ("/metrics", "/health")


class RequestContext:
    """`X-Request-Id` taken or generated, set for logs and downstream calls, echoed on the response; timing by route.

    An exception that escapes the app before the response started is a bug:
    it still gets the OpenAI error shape (500, no traceback) and one log line.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        request_id_var.set(rid)
        scope.setdefault("state", {})["request_id"] = rid  # request.state.request_id
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            await send(message)

        IN_FLIGHT.labels("gateway").inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not started:
                response = error_response(f"internal error (request {rid})", status=500, code="internal", request_id=rid)
                await response(scope, receive, send_with_id)
        finally:
            IN_FLIGHT.labels("gateway").dec()
            self._record(scope, status, time.perf_counter() - start)

    @staticmethod
    def _record(scope: Scope, status: int, seconds: float) -> None:
        path = getattr(scope.get("route"), "path", "unmatched")
        if path in QUIET_ROUTES:
            return
        REQUESTS.labels("gateway", path, str(status)).inc()
        REQUEST_SECONDS.labels("gateway", path).observe(seconds)
        log.info(
            "%s %s %d",
            scope.get("method"),
            path,
            status,
            extra={"fields": {"service": "gateway", "route": path, "status": status, "duration_ms": round(seconds * 1000, 1)}},
        )
