"""The gateway's FastAPI app: routes, request context, and one error shape for everything.

Routes live in `chat` (/v1/chat/completions, /v1/models), `completions`
(/v1/completions) and `precompute` (/v1/mm/...); this module adds /health and /metrics, the request id
(`X-Request-Id` taken or generated, echoed, passed downstream, on every log
line), the body limit, and the exception handlers that give every error the
OpenAI shape `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import chat, completions, precompute
from gateway.context import RequestContext
from gateway.errors import error_response, error_responses, mm_error_response, validation_param
from gateway.limits import BodyLimit
from gateway.state import gateway
from mmserve import tracing
from mmserve.config import Settings
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.tenancy import ApiKeys

log = logging.getLogger("mmserve.gateway")

DESCRIPTION = """OpenAI-compatible chat completions (and legacy completions) over mmserve's encoder and decoder services.

mmserve extensions: content parts `video_url`, `audio_url`, `input_audio`, `time_series_url`; a `uuid` on any media
part (and a null or `{}` payload to reuse a stored embedding); video as a frame-list data URL
(`data:video/jpeg;base64,<frame>,<frame>,...`); an image's `detail` as its pixel budget (`low` = at most 200,704
pixels); top-level `media_io_kwargs`, `mm_processor_kwargs`, `top_k`, `ignore_eos`; and `/v1/mm/*` to precompute
embeddings for later requests. Every validation error is a 400 whose `param` names the field."""


def create_app(settings: Settings) -> FastAPI:
    """Build the app; gRPC channels are created lazily on the running loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if getattr(app.state, "gateway", None) is not None:
            await app.state.gateway.close()
        tracing.shutdown()

    app = FastAPI(title="mmserve gateway", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.api_keys = ApiKeys.from_settings(settings)  # a bad keys file stops the start, not the first request
    app.state.gateway = None
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout_s=settings.gateway_body_timeout_s)
    app.add_middleware(RequestContext)  # outside the body limit: a 413 or 408 has its request id and metrics too
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(precompute.router)
    tracing.setup("gateway", settings)
    tracing.instrument_app(app, settings)

    def rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(MmserveError)
    async def mmserve_error(request: Request, exc: MmserveError) -> JSONResponse:
        return mm_error_response(exc, request_id=rid(request))

    @app.exception_handler(chat.ChatError)
    async def chat_error(request: Request, exc: chat.ChatError) -> JSONResponse:
        return mm_error_response(exc.error, request_id=rid(request), max_tokens_name=exc.max_tokens_name)

    @app.exception_handler(grpc.RpcError)
    async def rpc_error(request: Request, exc: grpc.RpcError) -> JSONResponse:
        return mm_error_response(from_rpc_error(exc, peer="service behind the gateway"), request_id=rid(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(
                f"the body is not valid JSON: {first.get('msg')}", status=400, code="invalid_json", request_id=rid(request)
            )
        param = (first.get("ctx") or {}).get("param") or validation_param(first, exc.body)
        message = str(first.get("msg"))
        if first.get("type") == "extra_forbidden":
            message = "unknown field: mmserve does not support it (the README lists every field it takes)"
        if not message.startswith(f"{param}:"):
            message = f"{param or 'body'}: {message}"
        return error_response(message, status=400, param=param or None, code="invalid_request", request_id=rid(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods get the OpenAI error shape too."""
        response = error_response(
            str(exc.detail), status=exc.status_code, code=str(exc.detail).lower().replace(" ", "_"), request_id=rid(request)
        )
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    health_docs: dict[int | str, dict[str, Any]] = {
        503: {"description": 'The decoder is not SERVING: `{"status": "unavailable"}`.'},
        "default": error_responses()["default"],
    }

    @app.get("/health", tags=["operations"], responses=health_docs)
    async def health(request: Request) -> JSONResponse:
        """200 when the decoder behind this gateway reports SERVING, 503 otherwise."""
        try:
            stub = (await gateway(request)).health
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False
        return JSONResponse({"status": "ok" if serving else "unavailable"}, status_code=200 if serving else 503)

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus metrics of this gateway process."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
