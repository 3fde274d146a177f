"""The one place where exceptions become gRPC status codes.

Every RPC of a service goes through `ServiceInterceptor`: it refuses a
caller without the service token when one is configured (UNAUTHENTICATED,
before any metadata is believed; health and reflection are not wrapped and stay
open), binds the request id and tenant from the metadata (so logs and
downstream calls carry them), turns `MmserveError` into a rich status (ErrorInfo + BadRequest
details), turns a peer's `grpc.RpcError` into the same typed error, turns
anything else into INTERNAL without leaking the traceback to the client, and
writes one log line per request with its duration and outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from grpc_status import rpc_status

from mmserve.errors import Internal, InvalidArgument, MmserveError, from_rpc_error, to_rpc_status
from mmserve.log import request_fields_var, request_id_var
from mmserve.metrics import RpcRecorder
from mmserve.rpc.auth import check_token
from mmserve.rpc.metadata import REQUEST_ID_KEY, TENANT_KEY, new_request_id, read_metadata, tenant_var

log = logging.getLogger("mmserve.rpc")

#: Infrastructure RPCs that are neither logged per call nor counted.
_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class Undecodable:
    """A request message that did not parse: the client's fault (INVALID_ARGUMENT), not gRPC's UNKNOWN."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidArgument:
        return InvalidArgument(f"the request is not a valid {self.type_name} message (corrupt wire format or invalid UTF-8 in a string)")


def lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning `Undecodable` instead of raising, so the servicer's interceptor can answer."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "protobuf")

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any parse failure is the client's
            return Undecodable(type_name)

    return parse


def checked(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT if it did not parse."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream that raises INVALID_ARGUMENT at the first message that did not parse."""
    async for request in requests:
        yield checked(request)


def _async_stream(behavior: Callable[..., Any] | None) -> Callable[..., AsyncGenerator[Any, None]]:
    """A grpc.aio streaming handler: an async generator function, which grpc-stubs (sync handlers only) cannot say."""
    assert behavior is not None, "a stream handler without its behavior"
    return cast("Callable[..., AsyncGenerator[Any, None]]", behavior)


def as_mmserve_error(exc: BaseException) -> MmserveError:
    """The typed error for any exception raised while serving."""
    if isinstance(exc, MmserveError):
        return exc
    if isinstance(exc, grpc.RpcError):
        return from_rpc_error(exc, peer="downstream service")
    return Internal(f"internal error (request {request_id_var.get()})")


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Request context, error mapping and per-request logging for one service."""

    def __init__(self, service: str, *, default_tenant: str, metrics: RpcRecorder | None = None, service_token: str | None = None) -> None:
        self._service = service
        self._default_tenant = default_tenant
        self._service_token = service_token
        self._metrics = metrics
        self._closing: set[asyncio.Task[None]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_QUIET_PREFIXES):
            return handler
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, name, checked),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, name, checked_stream),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(_async_stream(handler.unary_stream), name, checked),
                request_deserializer=lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(_async_stream(handler.stream_stream), name, checked_stream),
            request_deserializer=lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _bind(self, context: grpc.aio.ServicerContext) -> None:
        """Set the request context; raise Unauthenticated (after the request id, for the log) on a bad token."""
        md = read_metadata(context)
        request_id_var.set(md.get(REQUEST_ID_KEY) or new_request_id())
        tenant_var.set(None)
        request_fields_var.set({})
        if self._metrics is not None:
            self._metrics.started()
        if self._service_token is not None:
            check_token(md, self._service_token)
        tenant_var.set(md.get(TENANT_KEY) or self._default_tenant)  # believed only once the caller is authenticated

    def _wrap_unary(self, behavior: Callable[..., Awaitable[Any]], name: str, check: Callable[[Any], Any]) -> Callable[..., Awaitable[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                self._bind(context)
                response = await behavior(check(request), context)
            except BaseException as exc:
                await self._fail(exc, context, name, start)
                raise
            self._done(name, "OK", start)
            return response

        return run

    def _wrap_stream(
        self, behavior: Callable[..., AsyncGenerator[Any, None]], name: str, check: Callable[[Any], Any]
    ) -> Callable[..., AsyncIterator[Any]]:
        """Stream the servicer's generator, and close it when the RPC ends, however it ends.

        A cancel that lands in grpc's own send (a client gone mid-stream) leaves the servicer's generator
        suspended at a `yield`, still holding its queue slot and engine request, until garbage collection;
        the done callback closes it at once. (The handler stays a generator: OpenTelemetry's interceptor
        iterates it.)
        """

        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.perf_counter()
            try:
                self._bind(context)
                items = behavior(check(request), context)
            except BaseException as exc:
                await self._fail(exc, context, name, start)
                raise
            # grpc-stubs declare the callback type a class, not a protocol, so no function matches it.
            context.add_done_callback(lambda _: self._close_later(items))  # type: ignore[arg-type]
            try:
                async with contextlib.aclosing(items):
                    async for item in items:
                        yield item
            except BaseException as exc:
                await self._fail(exc, context, name, start)
                raise
            self._done(name, "OK", start)

        return run

    def _close_later(self, items: AsyncGenerator[Any, None]) -> None:
        async def close() -> None:
            with contextlib.suppress(RuntimeError):  # still running: the cancel reached it and it unwinds itself
                await items.aclose()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext, name: str, start: float) -> None:
        """Log the failure and abort with its status (re-raises what must propagate)."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self._done(name, "CANCELLED", start)
            return
        if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted on its own
            self._done(name, "ABORTED", start)
            return
        err = as_mmserve_error(exc)
        if isinstance(err, Internal) and not isinstance(exc, MmserveError):
            log.exception("%s failed unexpectedly", name, exc_info=exc)
        self._done(name, err.status.name, start, reason=err.reason, error=str(err))
        await context.abort_with_status(rpc_status.to_status(to_rpc_status(err)))

    def _done(self, name: str, outcome: str, start: float, **fields: str) -> None:
        seconds = time.perf_counter() - start
        noted = request_fields_var.get() or {}
        level = logging.WARNING if outcome in {"INTERNAL", "UNAVAILABLE", "UNKNOWN"} else logging.INFO
        log.log(
            level,
            "%s %s",
            name,
            outcome,
            extra={
                "fields": {
                    "service": self._service,
                    "rpc": name,
                    "outcome": outcome,
                    "duration_ms": round(seconds * 1000, 1),
                    **noted,
                    **fields,
                }
            },
        )
        if self._metrics is not None:
            self._metrics(name, outcome, seconds)
