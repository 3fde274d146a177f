"""The gateway's HTTP server: uvicorn, with every connection bounded in time.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`), header size
(`h11_max_incomplete_event_size`) and concurrency (`limit_concurrency`), but
not how long a client may take to send its headers: a client trickling one
header byte a second holds a connection forever (slow-loris). `HeaderDeadline`
adds that deadline to uvicorn's h11 protocol; the body's deadline is
`gateway.limits.BodyLimit`'s, in ASGI, where a 408 can still be sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import error_body
from mmserve.config import Settings

log = logging.getLogger("mmserve.gateway")


def _timeout_response() -> bytes:
    body = json.dumps(error_body("the request headers did not arrive in time", status=408, code="request_timeout")).encode()
    head = f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for the request headers, from connection open or the previous response."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._request_running():
            self._disarm()  # headers are in: the app (and BodyLimit's body deadline) has the request now

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_running():
            self._arm()  # the next request's headers get the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_running(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._request_running():
            return
        log.info("closing a connection whose request headers took over %g s", self.header_timeout_s)
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:  # part of a request came
            self.transport.write(_timeout_response())
        self.transport.close()


def protocol_class(header_timeout_s: float) -> type[HeaderDeadline]:
    """`HeaderDeadline` with this process's header deadline (uvicorn builds one protocol per connection)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_timeout_s": header_timeout_s})


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for the gateway: its address, and every connection limit from the settings."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        http=protocol_class(settings.gateway_header_timeout_s),
        timeout_keep_alive=max(1, round(settings.gateway_keepalive_timeout_s)),
        h11_max_incomplete_event_size=settings.gateway_max_header_bytes,
        limit_concurrency=settings.gateway_max_concurrency,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
