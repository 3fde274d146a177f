"""Errors that cross service boundaries.

Every failure a client can cause or observe is one of these. Each carries the
gRPC status it maps to, the request field it is about (so a user learns *which*
part was wrong) and a stable machine-readable reason. The gRPC interceptor
turns them into `google.rpc.Status` with `ErrorInfo` and `BadRequest` details;
`from_rpc_error` turns such a status back into the same exception on the
client side, so an encoder error keeps its meaning through the decoder and the
gateway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "mmserve.dev"

log = logging.getLogger("mmserve.errors")

#: What a status that no mmserve service wrote (gRPC's own: a refused connection, a reset stream) tells a client.
_PLAIN = {
    grpc.StatusCode.UNAVAILABLE: "the {peer} is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the {peer} did not answer within the deadline",
    grpc.StatusCode.CANCELLED: "the {peer} stopped before it answered; retry later",
    grpc.StatusCode.UNKNOWN: "the {peer} failed unexpectedly",
    grpc.StatusCode.INTERNAL: "the {peer} failed unexpectedly",
    grpc.StatusCode.DATA_LOSS: "the {peer} failed unexpectedly",
}
#: Addresses and transport detail in gRPC's own messages (`ipv4:127.0.0.1:18102: Failed to connect ...`).
_ADDRESS = re.compile(r"ipv[46]:|unix:|dns:|\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]*:[0-9a-fA-F:]*\]|[\w.-]+:\d{2,5}\b")


class Reason(StrEnum):
    """Every machine-readable reason an mmserve error carries (`ErrorInfo.reason`; lower-cased, the OpenAI `code`).

    One list, so that a client can rely on it and the same fault reads the same in every service (docs/errors.md).
    """

    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MEDIA_TOO_LARGE = "MEDIA_TOO_LARGE"
    FETCH_REFUSED = "FETCH_REFUSED"
    REMOTE_FETCH_FAILED = "REMOTE_FETCH_FAILED"
    NOT_FOUND = "NOT_FOUND"
    EMBEDDING_NOT_FOUND = "EMBEDDING_NOT_FOUND"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    UUID_CONFLICT = "UUID_CONFLICT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    MODEL_MISMATCH = "MODEL_MISMATCH"
    MODALITY_MISMATCH = "MODALITY_MISMATCH"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    QUEUE_FULL = "QUEUE_FULL"
    STORE_FULL = "STORE_FULL"
    UNAVAILABLE = "UNAVAILABLE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    ENCODER_UNAVAILABLE = "ENCODER_UNAVAILABLE"
    ENGINE_STOPPED = "ENGINE_STOPPED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INVALID_API_KEY = "INVALID_API_KEY"
    SERVICE_TOKEN_INVALID = "SERVICE_TOKEN_INVALID"


class MmserveError(Exception):
    """Base of all mmserve errors; never leaks paths or tracebacks in `message`."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[Reason] = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        reason: Reason | str | None = None,  # a str: a reason from a newer peer, kept as sent
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def at(self, prefix: str) -> MmserveError:
        """Re-anchor the field under `prefix` (e.g. the message part it came from)."""
        if not prefix:
            return self
        self.field = f"{prefix}.{self.field}" if self.field else prefix
        return self

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(MmserveError):
    """The request itself is wrong (HTTP 400)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = Reason.INVALID_ARGUMENT


class MediaTooLarge(InvalidArgument):
    """An item or request exceeds a configured size, duration or pixel cap."""

    default_reason = Reason.MEDIA_TOO_LARGE


class FetchRefused(InvalidArgument):
    """The fetch guard refused a URL before any byte was sent to it."""

    default_reason = Reason.FETCH_REFUSED


class RemoteFetchFailed(MmserveError):
    """The remote refused or failed to serve the media (HTTP 422)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.REMOTE_FETCH_FAILED


class NotFound(MmserveError):
    """A referenced embedding does not exist (or has expired)."""

    status = grpc.StatusCode.NOT_FOUND
    default_reason = Reason.NOT_FOUND


class Conflict(MmserveError):
    """A client uuid is already bound to other content or another model."""

    status = grpc.StatusCode.ALREADY_EXISTS
    default_reason = Reason.UUID_CONFLICT


class FailedPrecondition(MmserveError):
    """The request is well formed but cannot run in the current state (e.g. model mismatch)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = Reason.FAILED_PRECONDITION


class ResourceExhausted(MmserveError):
    """Queue full or too many requests (HTTP 429)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = Reason.RESOURCE_EXHAUSTED


class Unavailable(MmserveError):
    """A dependency (Redis, the encoder) is down; retrying later can help."""

    status = grpc.StatusCode.UNAVAILABLE
    default_reason = Reason.UNAVAILABLE


class DeadlineExceeded(MmserveError):
    """A deadline (the caller's, or a per-item fetch deadline) ran out."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = Reason.DEADLINE_EXCEEDED


class Cancelled(MmserveError):
    """The caller went away."""

    status = grpc.StatusCode.CANCELLED
    default_reason = Reason.CANCELLED


class Unimplemented(MmserveError):
    """A capability the contract names but this server does not offer."""

    status = grpc.StatusCode.UNIMPLEMENTED
    default_reason = Reason.UNIMPLEMENTED


class Unauthenticated(MmserveError):
    """Missing or wrong credentials (HTTP 401)."""

    status = grpc.StatusCode.UNAUTHENTICATED
    default_reason = Reason.INVALID_API_KEY


class Internal(MmserveError):
    """A bug; the message is generic, details are in the server log only."""


_BY_REASON: dict[str, type[MmserveError]] = {}
_BY_STATUS: dict[grpc.StatusCode, type[MmserveError]] = {}
for _cls in (
    InvalidArgument,
    MediaTooLarge,
    FetchRefused,
    RemoteFetchFailed,
    NotFound,
    Conflict,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Unimplemented,
    Unauthenticated,
    Internal,
):
    _BY_REASON.setdefault(_cls.default_reason, _cls)
    _BY_STATUS.setdefault(_cls.status, _cls)


#: Longest message, field description or metadata value a status carries: it travels in the trailers,
#: which gRPC caps (16 KiB by default), and a message may quote a client's (arbitrarily long) value.
MAX_DETAIL_CHARS = 1000


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 3] + "..."


def to_rpc_status(err: MmserveError) -> status_pb2.Status:
    """Build a rich `google.rpc.Status` (ErrorInfo + BadRequest) for `err`, every text bounded in length."""
    details: list[any_pb2.Any] = []
    metadata = {_bounded(k): _bounded(v) for k, v in err.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if err.field:
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=_bounded(err.field), description=_bounded(err.message))]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    return status_pb2.Status(code=err.status.value[0], message=_bounded(str(err)), details=details)


def from_rpc_error(exc: grpc.RpcError, *, peer: str = "service") -> MmserveError:
    """Rebuild the typed error a peer raised, keeping field, reason and metadata.

    A status that carries no mmserve `ErrorInfo` was written by gRPC itself
    (the `peer` — "decoder", "encoder" — is down, a stream broke): its text can
    name internal addresses, so it is logged here and the client gets a plain
    message about the peer instead; such a CANCELLED is the peer stopping, so
    it is `Unavailable`.
    """
    code = exc.code()
    message = exc.details() or code.name
    reason: str | None = None
    field: str | None = None
    metadata: dict[str, str] = {}
    ours = False
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata, ours = info.reason, dict(info.metadata), info.domain == ERROR_DOMAIN
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
                    message = bad.field_violations[0].description
    if not ours:
        message, reason = plain_message(code, message, peer), None
        if code == grpc.StatusCode.CANCELLED:
            # Not the caller's cancellation (that raises no error here): gRPC cancelled the call on the peer's side,
            # which a stopping server does to calls it had taken but not started (grpc/grpc#41785; calls still
            # running when its grace ends get UNAVAILABLE). For the caller that is an unavailable peer: retry.
            code = grpc.StatusCode.UNAVAILABLE
    cls = _BY_REASON.get(reason or "") or _BY_STATUS.get(code, Internal)
    if cls.status != code:  # reason unknown to this version: trust the code
        cls = _BY_STATUS.get(code, Internal)
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    return cls(message, field=field, reason=reason, metadata=metadata)


def plain_message(code: grpc.StatusCode, details: str, peer: str) -> str:
    """What a client may see of a status gRPC itself wrote: a plain sentence, never an address (logged instead)."""
    log.warning("the %s failed with %s: %s", peer, code.name, details)
    if code in _PLAIN:
        return _PLAIN[code].format(peer=peer)
    if details and not _ADDRESS.search(details) and len(details) <= 200:
        return details  # e.g. "Received message larger than max (...)": no address, and it helps the client
    return f"the {peer} failed ({code.name.lower()})"
