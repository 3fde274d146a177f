"""gRPC status and mmserve errors -> HTTP status and OpenAI-shaped error bodies."""

from __future__ import annotations

import re

import grpc
from fastapi.responses import JSONResponse

from mmserve.errors import MmserveError

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
REASON_STATUS = {"REMOTE_FETCH_FAILED": 422}

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
#: Fields below a content part that are named in full (the JSON of a client embedding part).
_EMBEDS_PARAM = re.compile(
    r"^(?:messages\[\d+\]\.content\[\d+\]|content\[\d+\])\.(?:image_embeds|audio_embeds|image_grid_thw|audio_feature_length|deepstack)\b"
)
_SAMPLING = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
             "sampling.seed": "seed", "sampling.stop": "stop", "sampling.n": "n", "sampling.max_tokens": "max_completion_tokens"}


def rest_param(field: str | None, *, max_tokens_name: str = "max_completion_tokens") -> str | None:
    """The request field, in OpenAI's words, that a gRPC field path points at."""
    if not field:
        return None
    if _EMBEDS_PARAM.match(field):
        return field
    match = _PART.match(field)
    if match:
        return match.group(1)
    if field == "sampling.max_tokens":
        return max_tokens_name
    return _SAMPLING.get(field, field)


def error_body(message: str, *, status: int, param: str | None = None, code: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}}


def error_response(message: str, *, status: int, param: str | None = None, code: str | None = None, request_id: str | None = None) -> JSONResponse:
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
    param = rest_param(err.field, max_tokens_name=max_tokens_name)
    detail = _below_part(err.field, param)
    if detail and not message.startswith(detail.rsplit(".", 1)[-1]):
        message = f"{detail}: {message}"  # e.g. "video.num_frames: must be ...": param names only the part
    if status >= 500 and status not in (501, 503, 504):
        message = f"internal error (request {request_id})"
    return error_response(message, status=status, param=param, code=err.reason.lower(), request_id=request_id)


def _below_part(field: str | None, param: str | None) -> str:
    """The option a gRPC field names below a content part (`video.fps`); '' for the part's payload itself."""
    if not field or not param or not field.startswith(param):
        return ""
    rest = field[len(param) :].lstrip(".")
    return "" if not rest or rest.startswith("source") else rest
