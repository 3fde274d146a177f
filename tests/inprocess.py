"""The services run inside the test process: the real servicers, engine, pipeline and gateway app, no child process.

Each gRPC service goes through the same start-up path as `mmserve encoder` / `mmserve decoder`
(`services.<role>.main.start`: the project's server builder, interceptors, health and
reflection) on a grpc.aio server bound to 127.0.0.1:0; the gateway is its app under uvicorn
with the gateway's own server configuration. All run on one event loop in a background
thread, so that the tests keep calling them with ordinary blocking clients. What needs a
separate process (start-up from the command line, SIGTERM, kill and restart, compose
commands) stays in the process-level tests (conftest.py's `start_service`).

One process has one Prometheus registry: every in-process service is scraped at the
same /metrics (counters are labelled by service; the decoder engine's unlabelled gauges
follow the engine started last, see `InProcessService.own_gauges`). The services set
torch's intra-op thread count only for their own threads (mmserve.models.threads), so
a reference computed in the test thread runs as in a fresh process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn

from mmserve.config import Settings
from mmserve.localredis import free_port
from mmserve.metrics import serve_metrics
from mmserve.rpc.health import wait_serving
from mmserve.rpc.server import StartedService
from mmserve.stack import wait_http_ok

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio event loop running forever in a daemon thread; `run` waits for a coroutine's result from any other thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="inprocess-services", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, object]) -> Future[object]:
        """Start a coroutine on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class InProcessService:
    """One started service: where to reach it, its settings, and what stops it."""

    role: str
    settings: Settings
    started: StartedService
    metrics_port: int
    _watcher: Future[object] | None = field(default=None, repr=False)
    _owner: InProcessServices | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.started.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """/metrics of the test process (shared by all its in-process services)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self) -> None:
        """Stop this service now (idempotent)."""
        if self._owner is not None:
            self._owner.stop(self)

    def own_gauges(self) -> None:
        """Point the process's engine gauges (running, waiting, KV cache) at this decoder's engine, as its start did."""
        _, engine, _ = self.started.servicer.parts  # type: ignore[attr-defined]
        engine.export_metrics()


@dataclass
class InProcessGateway:
    """The gateway app under uvicorn, as `mmserve gateway` serves it (gateway/main.py), on this process's loop thread."""

    settings: Settings
    server: uvicorn.Server
    task: Future[object]
    _owner: InProcessServices | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.settings.gateway_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The gateway's OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def metrics_url(self) -> str:
        """The gateway's /metrics (the test process's registry: the in-process services' series too)."""
        return f"http://127.0.0.1:{self.port}/metrics"

    def stop(self) -> None:
        if self._owner is not None:
            self._owner.stop(self)


class InProcessServices:
    """Starts encoders and decoders in this process (each with its own settings) and stops them all at the end."""

    def __init__(self, base: dict[str, Any], metrics_port: int) -> None:
        self.base = base
        self.metrics_port = metrics_port
        self.loop = BackgroundLoop()
        self.started: list[InProcessService | InProcessGateway] = []
        serve_metrics(metrics_port, "127.0.0.1")

    def start(self, role: str, *, redis_url: str, **overrides: Any) -> InProcessService:
        """Start `role` ("encoder" or "decoder") with these Settings fields on a free port; return once it is SERVING."""
        if role == "encoder":
            from services.encoder.main import start
        elif role == "decoder":
            from services.decoder.main import start
        else:
            raise ValueError(f"no in-process {role!r} (the gateway has `start_gateway`)")
        settings = Settings(**{**self.base, "redis_url": redis_url, f"{role}_port": 0, "metrics_port": None, **overrides})
        started = self.loop.run(start(settings))
        service = InProcessService(role, settings, started, self.metrics_port, _owner=self)
        if started.probe is not None:
            service._watcher = self.loop.spawn(started.server.watch(started.probe, settings.store_health_interval_s))
        else:
            self.loop.run(started.server.set_serving(True))
        self.started.append(service)
        wait_serving(service.target, timeout=30)
        return service

    def start_gateway(self, **overrides: Any) -> InProcessGateway:
        """Start the gateway app (these Settings fields, e.g. `decoder_target`) on a free port; return once /health answers."""
        from gateway.app import create_app
        from gateway.server import server_config

        settings = Settings(**{**self.base, "gateway_port": free_port(), **overrides})
        server = uvicorn.Server(server_config(create_app(settings), settings))
        gateway = InProcessGateway(settings, server, self.loop.spawn(server.serve()), _owner=self)
        self.started.append(gateway)
        wait_http_ok(f"http://127.0.0.1:{gateway.port}/health", timeout=30, alive=lambda: not gateway.task.done())
        return gateway

    def stop(self, service: InProcessService | InProcessGateway) -> None:
        """Stop one service now (idempotent): its health watch, its server (grace from its settings), its cleanup."""
        if service not in self.started:
            return
        self.started.remove(service)
        if isinstance(service, InProcessGateway):
            service.server.should_exit = True
            service.task.result(30)
            return
        if service._watcher is not None:
            service._watcher.cancel()
        self.loop.run(service.started.close(service.settings.shutdown_grace_s))

    def close(self) -> None:
        for service in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(service)
        self.loop.close()
