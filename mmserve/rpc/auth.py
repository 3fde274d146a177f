"""Service-to-service authentication: a shared secret in gRPC metadata (MMSERVE_SERVICE_TOKEN).

The encoder and decoder take the tenant of a call from its metadata, so a
caller that can reach their ports must prove it is one of the stack's own
processes (the gateway, a decoder calling an encoder, an operator's CLI)
before anything it sends is believed. Servers check the token in
`ServiceInterceptor` (constant-time compare; health and reflection stay
open); clients add it to every call through `token_interceptors`, so no call
site can forget it. No token configured: nothing is checked (local/dev only).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from mmserve.config import Settings
from mmserve.errors import Reason, Unauthenticated

log = logging.getLogger("mmserve.rpc")

SERVICE_TOKEN_KEY = "x-mmserve-service-token"


def service_token(settings: Settings) -> str | None:
    """The configured token (MMSERVE_SERVICE_TOKEN, else MMSERVE_SERVICE_TOKEN_FILE's contents), or None when calls are not authenticated."""
    if settings.service_token is not None:
        return settings.service_token.get_secret_value()
    if settings.service_token_file is not None:
        token = settings.service_token_file.read_text().strip()  # a missing file fails the start: better than an open port
        if not token:
            raise ValueError(f"the service token file {settings.service_token_file} is empty")
        return token
    return None


def write_token_file(path: Path) -> bool:
    """Create `path` with a random token (owner-only) unless it exists; True if it was created."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return True


def token_command(argv: list[str]) -> int:
    """Write a random service token to FILE unless it exists (compose's token job)."""
    import argparse

    parser = argparse.ArgumentParser(prog="mmserve token", description=token_command.__doc__)
    parser.add_argument("file", type=Path)
    ns = parser.parse_args(argv)
    made = write_token_file(ns.file)
    print(f"{'wrote a new' if made else 'kept the'} service token in {ns.file}")
    return 0


def check_token(metadata: dict[str, str], expected: str) -> None:
    """Raise Unauthenticated unless `metadata` carries the token (compared in constant time)."""
    given = metadata.get(SERVICE_TOKEN_KEY, "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Unauthenticated(
            f"missing or wrong service token: calls to this service need {SERVICE_TOKEN_KEY} metadata (MMSERVE_SERVICE_TOKEN)",
            reason=Reason.SERVICE_TOKEN_INVALID,
        )


def warn_if_open(service: str, settings: Settings) -> None:
    """Say loudly at start that a service without a token serves anyone, as any tenant."""
    if service_token(settings) is None:
        log.warning(
            "MMSERVE_SERVICE_TOKEN is unset: the %s serves every caller that reaches its port and believes the tenant "
            "it claims; fine for local development only, set a shared token anywhere else",
            service,
        )


def token_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Metadata for a synchronous client's calls (the CLI): the token, if one is configured."""
    token = service_token(settings)
    return ((SERVICE_TOKEN_KEY, token),) if token else ()


class _AddToken:
    """Adds the service token to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(SERVICE_TOKEN_KEY, self._token)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]  # a namedtuple; grpc-stubs say a plain class


# One class per call kind: a grpc.aio channel files each interceptor under the first kind it implements only.
class _UnaryUnary(_AddToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_AddToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_AddToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: grpc.aio.ClientCallDetails, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_AddToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: grpc.aio.ClientCallDetails, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def token_interceptors(settings: Settings) -> Sequence[grpc.aio.ClientInterceptor]:
    """Client interceptors for an aio channel to mmserve services (every call kind): none without a token."""
    token = service_token(settings)
    if not token:
        return []
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
