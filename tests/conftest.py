"""Shared fixtures: real redis-server, real services (in-process or child processes), the tiny checkpoint.

Every test talks to real components. Redis is a private `redis-server` on a
free port (never the machine's shared one), flushed before each test that
asks for `redis_url`; tests that stop Redis on purpose get their own
instance. Services run in the test process (`inprocess`, `grpc_services`,
`inprocess_stack`, `inprocess_omni_stack`, `start_inprocess_stack`: the real
servicers and gateway app through the services' own start-up path,
tests/inprocess.py) unless the test is about the process itself (`stack`,
`process_stack`, `omni_stack`, `start_stack`); then as child processes started with
exactly the command `mmserve up` and compose use
(`mmserve.launcher.SERVICE_COMMANDS`). Tests that start processes, clusters or
vLLM, or take more than a few seconds, are marked `slow`: `pytest -m "not slow"`
is the quick loop.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from mmserve.config import Settings
from mmserve.launcher import DEFAULT_VLLM_VENV, ServiceProcess
from mmserve.localredis import LocalRedis, LocalRedisCluster, free_port
from mmserve.rpc.health import wait_serving
from mmserve.stack import wait_http_ok
from tests.inprocess import InProcessGateway, InProcessService, InProcessServices

if TYPE_CHECKING:
    from tests.vllm_pairs import PairPool

TINY = "qwen2_5_vl-tiny"
CACHE_DIR = Path(os.environ.get("MMSERVE_TEST_CACHE_DIR", Path.home() / ".cache" / "mmserve"))


#: Fixtures that start service processes (and so every stack), a Redis Cluster, or the vLLM environment:
#: a test that uses one, directly or through another fixture, is marked `slow`.
PROCESS_FIXTURES = frozenset({"start_service", "redis_cluster", "vllm_env"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test whose fixtures start processes (tests slow for other reasons carry the marker themselves)."""
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: The session's `vllm_pairs` while it exists (the hook below stops its pair between tests).
_vllm_pools: list[PairPool] = []


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the running engine pair once the next test uses none: an idle vLLM keeps a core busy."""
    if nextitem is None or "vllm_pairs" not in getattr(nextitem, "fixturenames", ()):
        for pool in _vllm_pools:
            pool.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the session's redis-server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A real 3-master Redis Cluster on loopback, shared by the session (flush it before use)."""
    with LocalRedisCluster() as cluster:
        yield cluster


def flush_store(url: str) -> str:
    """Empty the Redis (or every master of the cluster) behind a store URL; return the URL."""
    from mmserve.store.connect import sync_client

    client = sync_client(url, timeout_s=5)
    client.flushall()
    client.close()
    return url


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A redis-server only this test uses (to stop and restart it)."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings pointing at the test Redis, with loopback fetches allowed for local HTTP servers."""
    return Settings(redis_url=redis_url, fetch_allow_loopback=True, cache_dir=CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The tiny Qwen2.5-VL checkpoint most service tests run (built once, cached; `mmserve up` defaults to the Omni one)."""
    from mmserve.models.tiny import ensure_checkpoint

    return ensure_checkpoint(TINY, CACHE_DIR)


@pytest.fixture(scope="session")
def inprocess(tiny_checkpoint: Path) -> Iterator[InProcessServices]:
    """Starts encoders and decoders of the tiny checkpoint inside the test process (`.start(role, redis_url=..., **settings)`)."""
    services = InProcessServices({"model": f"tiny:{TINY}", "cache_dir": CACHE_DIR, "shutdown_grace_s": 2.0}, metrics_port=free_port())
    yield services
    services.close()


@dataclass
class GrpcServices:
    """An in-process encoder and a decoder wired to it, on one Redis."""

    encoder: InProcessService
    decoder: InProcessService
    redis_url: str


@pytest.fixture(scope="session")
def grpc_services(inprocess: InProcessServices, redis_server: LocalRedis) -> GrpcServices:
    """The session's in-process encoder (loopback fetches allowed, for the media server) and decoder on the session Redis."""
    encoder = inprocess.start("encoder", redis_url=redis_server.url, fetch_allow_loopback=True)
    decoder = inprocess.start("decoder", redis_url=redis_server.url, encoder_target=encoder.target)
    return GrpcServices(encoder, decoder, redis_server.url)


@dataclass
class RunningService:
    """A service child process and where to reach it."""

    process: ServiceProcess
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        """/metrics of a gRPC service (its own port) or of the gateway (its HTTP port)."""
        if self.process.role == "gateway":
            return f"http://127.0.0.1:{self.port}/metrics"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def base_url(self) -> str:
        """The gateway's OpenAI base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> int | None:
        return self.process.stop()

    def wait_ready(self, timeout: float = 180.0) -> RunningService:
        """Wait until it serves (a gRPC service SERVING, the gateway's /health OK); stopped, with its log, if it never does."""
        try:
            if self.process.role == "gateway":
                wait_http_ok(f"http://127.0.0.1:{self.port}/health", timeout=timeout, alive=self.process.alive)
            else:
                wait_serving(self.target, timeout=timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.process.stop()
            raise RuntimeError(f"{self.process.role} did not start: {exc}\n--- log ---\n{self.process.log_text()[-4000:]}") from exc
        return self


StartService = Callable[..., RunningService]


def stop_all(services: Iterable[RunningService]) -> None:
    """Stop services together: each takes up to seconds to stop gracefully (vLLM's ~6 s), and none waits for another."""
    with ThreadPoolExecutor() as stopping:
        list(stopping.map(RunningService.stop, services))


@pytest.fixture(scope="session")
def start_service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[StartService]:
    """Start `mmserve <role>` with MMSERVE_* env overrides; wait until it is SERVING (unless `wait=False`)."""
    started: list[RunningService] = []

    def start(
        role: str, *, redis_url: str = "redis://127.0.0.1:1/0", timeout: float = 180.0, venv: Path | None = None,
        wait: bool = True, **env: str,
    ) -> RunningService:  # fmt: skip
        port, metrics_port = free_port(), free_port()
        full_env = {
            "MMSERVE_MODEL": f"tiny:{TINY}",
            "MMSERVE_CACHE_DIR": str(CACHE_DIR),
            "MMSERVE_REDIS_URL": redis_url,
            f"MMSERVE_{role.upper()}_PORT": str(port),
            "MMSERVE_METRICS_PORT": str(metrics_port),
            "MMSERVE_SHUTDOWN_GRACE_S": "2",
            **env,
        }
        log = tmp_path_factory.mktemp(role) / f"{role}.log"
        proc = ServiceProcess(role, full_env, log_path=log, venv=venv).start()
        service = RunningService(proc, port, metrics_port)
        started.append(service)
        return service.wait_ready(timeout) if wait else service

    yield start
    stop_all(started)


class MediaServer:
    """A real HTTP server on loopback (stands in for the web): routes -> (status, headers, body); records hits."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                status, headers, body = outer.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, body: bytes, *, status: int = 200, content_type: str = "application/octet-stream") -> str:
        self.routes[path] = (status, {"Content-Type": content_type}, body)
        return self.url(path)

    def redirect(self, path: str, location: str) -> str:
        self.routes[path] = (302, {"Location": location}, b"")
        return self.url(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    server = MediaServer()
    yield server
    server.close()


@dataclass
class Stack:
    """Encoder, decoder and gateway (processes, or in-process: `start_inprocess_stack`) against one Redis."""

    encoder: RunningService | InProcessService
    decoder: RunningService | InProcessService
    gateway: RunningService | InProcessGateway
    redis_url: str

    def client(self, **kwargs: object):
        import openai

        return openai.OpenAI(base_url=self.gateway.base_url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the three processes now (a module's own stack ends with its module: memory is finite)."""
        for service in (self.gateway, self.decoder, self.encoder):
            service.stop()


def start_stack(start_service: StartService, redis_url: str, **env: str) -> Stack:
    """The three services wired together, as `mmserve up` does (loopback fetches allowed for the media server).

    All three start at once and are waited for together (their targets are known before they serve), as `mmserve up`
    starts them: the model loads overlap.
    """
    encoder = start_service("encoder", redis_url=redis_url, wait=False, MMSERVE_FETCH_ALLOW_LOOPBACK="true", **env)
    decoder = start_service("decoder", redis_url=redis_url, wait=False, MMSERVE_ENCODER_TARGET=encoder.target, **env)
    gateway = start_service("gateway", wait=False, MMSERVE_DECODER_TARGET=decoder.target, MMSERVE_ENCODER_TARGET=encoder.target, **env)
    return Stack(encoder.wait_ready(), decoder.wait_ready(), gateway.wait_ready(), redis_url)


def start_inprocess_stack(inprocess: InProcessServices, redis_url: str, **settings: Any) -> Stack:
    """The three services wired together as `start_stack` does, in the test process (these Settings fields for all three)."""
    encoder = inprocess.start("encoder", redis_url=redis_url, fetch_allow_loopback=True, **settings)
    decoder = inprocess.start("decoder", redis_url=redis_url, encoder_target=encoder.target, **settings)
    gateway = inprocess.start_gateway(decoder_target=decoder.target, encoder_target=encoder.target, **settings)
    return Stack(encoder, decoder, gateway, redis_url)


@pytest.fixture(scope="session")
def process_stack(start_service: StartService, redis_server: LocalRedis) -> Stack:
    """The shared stack of processes on the session Redis."""
    return start_stack(start_service, redis_server.url)


@pytest.fixture(scope="session")
def stack(process_stack: Stack) -> Stack:
    """The shared stack of processes (a module whose tests need none overrides `stack` with `inprocess_stack`)."""
    return process_stack


@pytest.fixture(scope="session")
def inprocess_stack(inprocess: InProcessServices, grpc_services: GrpcServices) -> Stack:
    """The session's in-process encoder and decoder (`grpc_services`) behind an in-process gateway, on the session Redis."""
    gateway = inprocess.start_gateway(decoder_target=grpc_services.decoder.target, encoder_target=grpc_services.encoder.target)
    return Stack(grpc_services.encoder, grpc_services.decoder, gateway, grpc_services.redis_url)


@pytest.fixture(scope="session")
def inprocess_omni_stack(inprocess: InProcessServices) -> Iterator[Stack]:
    """`omni_stack` in the test process: the Omni thinker + time-series adapter (all four modalities) on its own Redis."""
    with LocalRedis() as server:
        yield start_inprocess_stack(inprocess, server.url, model="tiny:qwen2_5_omni-tiny")


@pytest.fixture(scope="module")
def module_redis() -> Iterator[LocalRedis]:
    """A redis-server for one test module's own stack."""
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="session")
def omni_stack(start_service: StartService) -> Iterator[Stack]:
    """The default demo model (Omni thinker + time-series adapter: all four modalities) on its own Redis."""
    with LocalRedis() as server:
        yield start_stack(start_service, server.url, MMSERVE_MODEL="tiny:qwen2_5_omni-tiny")


@pytest.fixture(scope="session")
def vllm_env() -> Path:
    """The vLLM decoder environment, built by the documented script when missing or stale (CI builds it here)."""
    # An environment installed before the `mmserve.commands` entry points has an `mmserve` that runs no command.
    probe = "import importlib.metadata as m, sys; sys.exit(not m.entry_points(group='mmserve.commands'))"
    python = DEFAULT_VLLM_VENV / "bin" / "python"
    stale = not python.exists() or subprocess.run([str(python), "-c", probe], timeout=60).returncode != 0
    if stale or not (DEFAULT_VLLM_VENV / "bin" / "mmserve").exists():
        root = Path(__file__).resolve().parents[1]
        subprocess.run([str(root / "scripts" / "build-vllm-env"), str(DEFAULT_VLLM_VENV)], check=True, timeout=1800)
    return DEFAULT_VLLM_VENV


@pytest.fixture(scope="session")
def vllm_pairs(start_service: StartService, vllm_env: Path) -> Iterator[PairPool]:
    """Decoder pairs (built-in and vLLM engine) on a checkpoint, at most one at a time (tests/vllm_pairs.py)."""
    from tests.vllm_pairs import PairPool  # it imports this module's names: imported once they exist

    pool = PairPool(start_service, vllm_env)
    _vllm_pools.append(pool)
    try:
        yield pool
    finally:
        _vllm_pools.remove(pool)
        pool.close()
