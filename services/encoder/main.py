"""Run the encoder service: `mmserve encoder` (configured by MMSERVE_* env vars)."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from mmserve.api.encoder.v1 import encoder_service_pb2, encoder_service_pb2_grpc
from mmserve.cli import role_arguments
from mmserve.config import Settings
from mmserve.models.loading import load_model
from mmserve.models.threads import confine_torch_threads, in_passing_thread, model_executor
from mmserve.rpc.server import StartedService, run_service, start_server
from mmserve.store import EmbeddingStore
from mmserve.store.size import register_store_size
from services.encoder.media.fetch import GuardedFetcher
from services.encoder.pipeline import EncoderPipeline
from services.encoder.servicer import EncoderServicer

log = logging.getLogger("mmserve.encoder")
SERVICE_NAME = encoder_service_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name


async def start(settings: Settings) -> StartedService:
    """Start serving at once (health NOT_SERVING), load and warm the model; the encoder is then ready to go SERVING."""
    register_store_size(settings.redis_url)
    store = EmbeddingStore.from_settings(settings)
    fetcher = GuardedFetcher(settings)
    servicer = EncoderServicer(settings, store)

    def register(server: grpc.aio.Server) -> None:
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, server)

    server = await start_server(
        settings,
        service="encoder",
        port=settings.encoder_port,
        register=register,
        service_names=[SERVICE_NAME],
    )
    loop = asyncio.get_running_loop()
    confine_torch_threads(loop)
    model = await in_passing_thread(functools.partial(load_model, settings, part="encoder"))
    tower = model_executor("mmserve-tower")
    await loop.run_in_executor(tower, model.family.warmup)
    pipeline = EncoderPipeline(settings, model, store, fetcher, tower)
    servicer.attach(pipeline)
    log.info("encoder SERVING %s on port %d", model.served_name, server.port)
    return StartedService(server, [pipeline.close, fetcher.aclose, store.aclose], probe=store.probe, servicer=servicer)


async def serve(settings: Settings) -> None:
    """`start`, then SERVING (while the store takes writes) until SIGTERM."""
    started = await start(settings)
    await started.serve_until_signal(settings)


def main(argv: list[str] | None = None) -> int:
    """Run the encoder gRPC service."""
    role_arguments("encoder", __doc__, argv)
    run_service("encoder", serve)  # exits the process when the service has stopped
