"""The gateway's FastAPI app: /v1/chat/completions, /v1/models, /health, /metrics.

Streaming: the gRPC call is started and its first message awaited *before*
the HTTP response begins, so every media or validation error (decided by the
decoder before its first message) is a real HTTP error. After that, SSE
chunks follow the OpenAI format; an error mid-stream becomes an
`data: {"error": ...}` event; long silences get `: keep-alive` comments; a
client that disconnects cancels the gRPC call, which frees the decoder slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_body, error_response, http_status, mm_error_response
from gateway.schemas import ChatCompletionRequest, ModelList, ModelObject
from gateway.translate import to_generate_request
from mmserve.config import Settings
from mmserve.decoder.v1 import decoder_service_pb2 as pb
from mmserve.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.log import request_id_var
from mmserve.mediainput import MODALITY_NAMES
from mmserve.metrics import REQUEST_SECONDS, REQUESTS
from mmserve.rpc.metadata import REQUEST_ID_KEY, TENANT_KEY
from mmserve.rpc.server import message_size_options

log = logging.getLogger("mmserve.gateway")

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


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


class Gateway:
    """State shared by the routes: settings, the decoder channel."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        options = [*message_size_options(settings), ("grpc.lb_policy_name", "round_robin")]
        self.channel = grpc.aio.insecure_channel(settings.decoder_target, options=options)
        self.decoder = pb_grpc.DecoderServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.model_id: str | None = None

    async def served_model(self) -> str:
        """The decoder's model id (asked once), for responses to requests that named none."""
        if self.model_id is None:
            reply = await self.decoder.ListModels(pb.ListModelsRequest(), timeout=10)
            self.model_id = reply.models[0].id if reply.models else "unknown"
        return self.model_id

    def tenant(self, request: Request) -> str | None:
        """None if the request is not authorised; the tenant namespace otherwise."""
        key = self.settings.api_key
        if not key:
            return self.settings.tenant
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def create_app(settings: Settings) -> FastAPI:
    """Build the app; gRPC channels are created lazily on the running loop."""
    state: dict[str, Gateway] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if "gw" in state:
            await state["gw"].channel.close()

    app = FastAPI(
        title="mmserve gateway",
        version="1",
        description="OpenAI-compatible chat completions over mmserve's encoder/decoder services.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def gw() -> Gateway:
        if "gw" not in state:
            state["gw"] = Gateway(settings)
        return state["gw"]

    @app.middleware("http")
    async def request_context(request: Request, call_next: Any) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request_id_var.set(rid)
        request.state.request_id = rid
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        if path not in ("/metrics", "/health"):
            seconds = time.perf_counter() - start
            REQUESTS.labels("gateway", path, str(response.status_code)).inc()
            REQUEST_SECONDS.labels("gateway", path).observe(seconds)
            log.info("%s %s %d", request.method, path, response.status_code,
                     extra={"fields": {"service": "gateway", "route": path, "status": response.status_code,
                                       "duration_ms": round(seconds * 1000, 1)}})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(f"the body is not valid JSON: {first.get('msg')}", status=400, code="invalid_json",
                                  request_id=request.state.request_id)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ""
        for part in loc:
            param += f"[{part}]" if part.isdigit() else (f".{part}" if param else part)
        return error_response(f"{param or 'body'}: {first.get('msg')}", status=400, param=param or None,
                              code="invalid_request", request_id=request.state.request_id)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods get the OpenAI error shape too."""
        response = error_response(str(exc.detail), status=exc.status_code, code=str(exc.detail).lower().replace(" ", "_"),
                                  request_id=getattr(request.state, "request_id", None))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        rid = request.state.request_id
        g = gw()
        tenant = g.tenant(request)
        if tenant is None:
            return error_response("invalid or missing API key", status=401, code="invalid_api_key", request_id=rid)
        if body.model_extra:
            log.info("ignoring unknown fields: %s", ", ".join(sorted(body.model_extra)))
        max_tokens_name = "max_completion_tokens" if body.max_completion_tokens is not None or body.max_tokens is None else "max_tokens"
        try:
            grpc_request = to_generate_request(body)
        except MmserveError as err:
            return mm_error_response(err, request_id=rid, max_tokens_name=max_tokens_name)
        metadata = ((REQUEST_ID_KEY, rid), (TENANT_KEY, tenant))
        call = g.decoder.Generate(grpc_request, metadata=metadata, timeout=settings.gateway_request_timeout_s)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            first = await call.read()
        except grpc.RpcError as exc:
            return mm_error_response(from_rpc_error(exc), request_id=rid, max_tokens_name=max_tokens_name)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            return error_response("the decoder ended the stream without a result", status=502, request_id=rid)
        model = body.model or await g.served_model()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse_events(call, first, completion_id, created, model, include_usage, settings.sse_keepalive_s)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"x-request-id": rid, "cache-control": "no-cache"})
        try:
            return JSONResponse(await collect(call, first, completion_id, created, model), headers={"x-request-id": rid})
        except grpc.RpcError as exc:
            return mm_error_response(from_rpc_error(exc), request_id=rid)
        finally:
            call.cancel()  # no-op when finished; frees the decoder slot if the client went away

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> Response:
        rid = request.state.request_id
        g = gw()
        if g.tenant(request) is None:
            return error_response("invalid or missing API key", status=401, code="invalid_api_key", request_id=rid)
        try:
            reply = await g.decoder.ListModels(pb.ListModelsRequest(), timeout=10, metadata=((REQUEST_ID_KEY, rid),))
        except grpc.RpcError as exc:
            return mm_error_response(from_rpc_error(exc), request_id=rid)
        data = [
            ModelObject(
                id=m.id, created=m.created, owned_by=m.owned_by, random_weights=m.random_weights, family=m.family,
                modalities=[MODALITY_NAMES[x] for x in m.modalities if x in MODALITY_NAMES], max_model_len=m.max_model_len,
            )
            for m in reply.models
        ]
        return JSONResponse(ModelList(data=data).model_dump())

    @app.get("/health")
    async def health() -> Response:
        """200 when the decoder behind this gateway reports SERVING, 503 otherwise."""
        try:
            reply = await gw().health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False
        return JSONResponse({"status": "ok" if serving else "unavailable"}, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _usage(usage: pb.Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens, "total_tokens": usage.total_tokens}


async def collect(call: Any, first: pb.GenerateResponse, completion_id: str, created: int, model: str) -> dict[str, Any]:
    """A whole (non-streamed) completion."""
    texts: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    usage: dict[str, int] = {}
    message: Any = first
    while message is not grpc.aio.EOF:
        texts.setdefault(message.index, []).append(message.text)
        if message.finish_reason:
            finish[message.index] = FINISH.get(message.finish_reason, "stop")
        if message.HasField("usage"):
            usage = _usage(message.usage)
        message = await call.read()
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])}, "finish_reason": finish.get(i, "stop")}
        for i in sorted(texts)
    ]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": usage}


async def sse_events(call: Any, first: pb.GenerateResponse, completion_id: str, created: int, model: str,
                     include_usage: bool, keepalive_s: float) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events, keep-alives, and [DONE]; cancels the call on disconnect."""

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    started: set[int] = set()
    usage: dict[str, int] | None = None
    message: Any = first
    pending: asyncio.Task[Any] | None = None
    try:
        while message is not grpc.aio.EOF:
            if message.index not in started:
                started.add(message.index)
                yield chunk([{"index": message.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            if message.text or message.finish_reason:
                delta = {"content": message.text} if message.text else {}
                yield chunk([{"index": message.index, "delta": delta, "finish_reason": FINISH.get(message.finish_reason)}])
            if message.HasField("usage"):
                usage = _usage(message.usage)
            pending = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
                if done:
                    break
                yield ": keep-alive\n\n"
            message, pending = pending.result(), None
        if include_usage and usage is not None:
            yield chunk([], usage)
    except grpc.RpcError as exc:
        err = from_rpc_error(exc)
        yield f"data: {json.dumps(error_body(err.message, status=http_status(err), code=err.reason.lower()))}\n\n"
    finally:
        if pending is not None:
            pending.cancel()
        call.cancel()  # the client went away (or we are done): free the decoder slot
    yield "data: [DONE]\n\n"
