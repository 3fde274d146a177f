"""Build, run and gracefully stop a grpc.aio server with health and reflection.

Health starts NOT_SERVING for every service and the overall server; the
service flips it to SERVING once its model is loaded and warm, and, given a
probe (the embedding store's), keeps it SERVING only while the probe passes:
a service whose store cannot take a write cannot do its job, so load
balancers and orchestrators must see it as unhealthy, not merely slow. Every
other RPC needs the service token when one is configured
(mmserve/rpc/auth.py). On SIGTERM or SIGINT health goes NOT_SERVING first (so
load balancers stop sending), then `server.stop(grace)` lets in-flight calls
finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mmserve import tracing
from mmserve.config import Settings
from mmserve.errors import MmserveError
from mmserve.log import setup_logging
from mmserve.metrics import RpcRecorder, serve_metrics
from mmserve.rpc.auth import service_token, warn_if_open
from mmserve.rpc.channel import message_size_options, server_options  # noqa: F401 - message_size_options: its old home
from mmserve.rpc.interceptor import ServiceInterceptor

log = logging.getLogger("mmserve.rpc")


class HealthServicer(health.aio.HealthServicer):
    """grpc's asyncio health servicer, whose Watch streams end once shutdown has sent them NOT_SERVING.

    Health-checking clients (mmserve.rpc.channel) keep a Watch open on every connection; left
    open, those would hold `server.stop(grace)` for the whole grace even with no real call running.
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status: int) -> None:  # a HealthCheckResponse.ServingStatus
        await super().set(service, status)
        async with self._changed:
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        async with self._changed:
            self._draining = True
            self._changed.notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        """Send the status now and on every change (as grpc's Watch); return after the last one once draining."""
        last = None
        while True:
            async with self._changed:
                # grpc's servicer keeps the statuses here (what its own Watch reads); its stubs do not declare it.
                statuses = self._server_status  # type: ignore[attr-defined]
                status = statuses.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                draining = self._draining
                if status == last and not draining:
                    await self._changed.wait()
                    continue
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if draining:
                return


#: A health service name that is SERVING while the process runs, whatever the model or store: for liveness probes
#: (a Redis outage makes the service NOT_SERVING, which should stop traffic, not restart the process).
LIVENESS_SERVICE = "mmserve.liveness"


@dataclass
class GrpcServer:
    """A started server and its health servicer."""

    server: grpc.aio.Server
    health: HealthServicer
    services: Sequence[str]
    port: int

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def watch(self, probe: Callable[[], Awaitable[None]], interval_s: float) -> None:
        """Forever: SERVING while `probe` passes, NOT_SERVING while it raises; each change logged once."""
        serving: bool | None = None
        while True:
            try:
                await probe()
                ok, why = True, ""
            except MmserveError as exc:
                ok, why = False, exc.message
            if ok != serving:
                await self.set_serving(ok)
                if ok:
                    log.info("health SERVING%s", " again: the store works" if serving is False else "")
                else:
                    log.warning("health NOT_SERVING: %s", why)
                serving = ok
            await asyncio.sleep(interval_s)

    async def serve_until_signal(
        self,
        settings: Settings,
        cleanup: Sequence[Callable[[], object]],
        probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Report SERVING (while `probe` passes, if given), run until SIGTERM/SIGINT, stop gracefully, then run `cleanup` in order."""
        watcher: asyncio.Task[None] | None = None
        if probe is None:
            await self.set_serving(True)
        else:
            watcher = asyncio.create_task(self.watch(probe, settings.store_health_interval_s))
        try:
            await wait_for_signal()
            log.info("shutting down (grace %.0fs)", settings.shutdown_grace_s)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await self.stop(settings.shutdown_grace_s)
            await run_cleanup(cleanup)
            tracing.shutdown()


@dataclass
class StartedService:
    """A service whose server is up and whose model is loaded and warm: what `serve` runs until SIGTERM.

    `start` of each service returns one, so that `mmserve <role>` and the tests (which run the
    servicers in-process, tests/inprocess.py) go through the same start-up path.
    """

    server: GrpcServer
    cleanup: Sequence[Callable[[], object]]
    probe: Callable[[], Awaitable[None]] | None = None
    servicer: object = None  # the service's servicer (its model and engine or pipeline, once attached)

    async def serve_until_signal(self, settings: Settings) -> None:
        """SERVING (while the probe passes) until SIGTERM/SIGINT, then the graceful stop and the cleanup."""
        await self.server.serve_until_signal(settings, self.cleanup, probe=self.probe)

    async def close(self, grace: float) -> None:
        """Stop the server (in-flight calls get `grace` seconds), then run the cleanup in order."""
        await self.server.stop(grace)
        await run_cleanup(self.cleanup)


async def run_cleanup(cleanup: Sequence[Callable[[], object]]) -> None:
    """Call each step in order, awaiting those that return an awaitable."""
    for step in cleanup:
        result = step()
        if inspect.isawaitable(result):
            await result


async def start_server(
    settings: Settings,
    *,
    service: str,
    port: int,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
) -> GrpcServer:
    """Start a service's server on `port` (0 picks a free one), health NOT_SERVING, with its metrics and tracing."""
    warn_if_open(service, settings)
    serve_metrics(settings.metrics_port, settings.host)
    tracing.setup(service, settings)
    server = grpc.aio.server(
        interceptors=[
            *tracing.server_interceptors(settings),
            ServiceInterceptor(
                service, default_tenant=settings.tenant, metrics=RpcRecorder(service), service_token=service_token(settings)
            ),
        ],
        options=server_options(settings),  # message sizes, the clients' keepalive pings, connection age
    )
    register(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    bound = server.add_insecure_port(f"{settings.host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {settings.host}:{port}")
    grpc_server = GrpcServer(server, health_servicer, service_names, bound)
    await grpc_server.set_serving(False)  # before start: grpc's servicer begins SERVING, a health-checking client would send calls
    await server.start()
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on %s:%d (health NOT_SERVING until warm)", service, settings.host, bound)
    return grpc_server


async def wait_for_signal() -> None:
    """Return on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_service(role: str, serve: Callable[[Settings], Coroutine[Any, Any, None]]) -> NoReturn:
    """The one start-up path of a gRPC service: settings from the environment, logging, then `serve` until SIGTERM.

    Once `serve` has stopped gracefully and run the cleanup, the process exits at once (status 0): the
    interpreter's own teardown, which frees the model's tensors and torch's modules one by one, took about a
    second of every stop here, and has nothing left to do (pools closed, traces flushed, engines shut down).
    """
    settings = Settings()
    setup_logging(role, level=settings.log_level, json_logs=settings.log_json)
    asyncio.run(serve(settings))
    logging.shutdown()  # flushes every handler
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
