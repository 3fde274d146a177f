"""gRPC status and mmserve errors -> HTTP status and OpenAI-shaped error bodies."""

from __future__ import annotations

import logging
import re
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from gateway.schemas import ErrorResponse
from mmserve.errors import InvalidArgument, MmserveError, Reason

log = logging.getLogger("mmserve.gateway")

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: Reasons whose HTTP status differs from their gRPC code's.
# A service refusing the gateway's (or a decoder's) service token is a deployment fault, not the client's: a 500.
REASON_STATUS: dict[str, int] = {Reason.REMOTE_FETCH_FAILED: 422, Reason.SERVICE_TOKEN_INVALID: 500}

ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

_PART = re.compile(r"^(messages\[\d+\](?:\.content\[\d+\])?|content\[\d+\])")
#: gRPC sampling fields whose OpenAI name differs (others are `sampling.<name>` -> `<name>`).
_SAMPLING = {"sampling.guidance": "response_format"}
#: Fields below a content part that are named in full (the JSON of a client embedding part).
_EMBEDS_PARAM = re.compile(
    r"^(?:messages\[\d+\]\.content\[\d+\]|content\[\d+\])\.(?:image_embeds|audio_embeds|image_grid_thw|audio_feature_length|deepstack)\b"
)


#: What each error status of the gateway means, for its OpenAPI document.
ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field fails validation (never 422) or cannot be honoured; `param` names it.",
    401: "Missing or wrong API key (only when MMSERVE_API_KEY is set).",
    404: "Not found: an unknown model, or a stored embedding that does not exist (or has expired).",
    409: "A client uuid is already bound to other content or another model.",
    413: "The body is larger than MMSERVE_MAX_BODY_BYTES.",
    422: "Remote media could not be fetched: its server refused or failed to serve it (code `remote_fetch_failed`).",
    429: "The decoder's queue, or the embedding store, is full; retry later.",
    503: "A service behind the gateway (decoder, encoder, Redis) is unavailable, or still loading; retry later.",
    504: "The request ran out of time (MMSERVE_GATEWAY_REQUEST_TIMEOUT_S).",
}
CLIENT_GONE = {"description": "The client disconnected; the generation was cancelled (logged, never received: no body)."}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the error statuses a route really returns, plus `default` (500), all in OpenAI's shape.

    Declaring `default` also keeps FastAPI from documenting its 422 validation
    error, which this gateway never sends (validation errors are 400s).
    """
    docs: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[s]} for s in statuses}
    docs["default"] = {"model": ErrorResponse, "description": "Internal error (500): details only in the server log."}
    return docs


class RequestFieldError(InvalidArgument):
    """A gateway-side error whose field is already the JSON path in the request (`param` is it, untouched)."""


def validation_param(error: dict[str, Any], body: Any) -> str:
    """The JSON path a pydantic error's `loc` points at in `body`, in the request's own terms.

    Union members (`str`, `list[str]`, ...) appear in `loc` but not in the
    body; following the body skips them, so `stop: 5` is `stop`, not
    `stop.str`. A missing field is named although the body lacks it.
    """
    loc = [p for p in error.get("loc", ()) if p != "body"]
    param, node = "", body
    for i, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            param, node = f"{param}[{part}]", node[part]
        elif isinstance(node, dict) and isinstance(part, str) and (part in node or (i == len(loc) - 1 and error.get("type") == "missing")):
            param, node = f"{param}.{part}" if param else part, node.get(part)
    return param


def rest_param(field: str | None, *, max_tokens_name: str = "max_completion_tokens", exact: bool = False) -> str | None:
    """The request field, in OpenAI's words, that a gRPC field path points at (`exact`: it already is one)."""
    if not field:
        return None
    if exact or _EMBEDS_PARAM.match(field):
        return field
    match = _PART.match(field)
    if match:
        return match.group(1)
    if field == "sampling.max_tokens":
        return max_tokens_name
    if field in _SAMPLING:
        return _SAMPLING[field]
    return field.removeprefix("sampling.")


def error_body(message: str, *, status: int, param: str | None = None, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}}


def error_response(
    message: str, *, status: int, param: str | None = None, code: str | None = None, request_id: str | None = None
) -> JSONResponse:
    headers = {}
    if 400 <= status < 500 and status not in (408, 429):
        headers["x-should-retry"] = "false"  # a retry cannot help
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error_body(message, status=status, param=param, code=code), status_code=status, headers=headers)


def http_status(err: MmserveError) -> int:
    return REASON_STATUS.get(err.reason) or HTTP_STATUS.get(err.status, 500)


def mm_error_response(err: MmserveError, *, request_id: str | None, max_tokens_name: str = "max_completion_tokens") -> JSONResponse:
    status = http_status(err)
    message = err.message
    param = rest_param(err.field, max_tokens_name=max_tokens_name, exact=isinstance(err, RequestFieldError))
    detail = _below_part(err.field, param)
    if detail and not message.startswith(detail.rsplit(".", 1)[-1]):
        message = f"{detail}: {message}"  # e.g. "video.num_frames: must be ...": param names only the part
    if status >= 500 and status not in (501, 503, 504):
        if err.reason == Reason.SERVICE_TOKEN_INVALID:
            log.error("a service refused this stack's service token (MMSERVE_SERVICE_TOKEN differs or is missing): %s", err.message)
        message = f"internal error (request {request_id})"
    return error_response(message, status=status, param=param, code=err.reason.lower(), request_id=request_id)


def _below_part(field: str | None, param: str | None) -> str:
    """The option a gRPC field names below a content part (`video.fps`); '' for the part's payload itself."""
    if not field or not param or not field.startswith(param):
        return ""
    rest = field[len(param) :].lstrip(".")
    return "" if not rest or rest.startswith("source") else rest
