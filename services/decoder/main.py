"""Run the decoder service: `mmserve decoder` (configured by MMSERVE_* env vars)."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from mmserve.api.decoder.v1 import decoder_service_pb2, decoder_service_pb2_grpc
from mmserve.cli import role_arguments
from mmserve.config import Settings
from mmserve.models.loading import load_model
from mmserve.models.threads import confine_torch_threads, in_passing_thread
from mmserve.rpc.server import StartedService, run_service, start_server
from mmserve.store import EmbeddingStore
from services.decoder.engine import make_engine, model_part
from services.decoder.media import EncoderClient, MediaResolver
from services.decoder.servicer import DecoderServicer

log = logging.getLogger("mmserve.decoder")
SERVICE_NAME = decoder_service_pb2.DESCRIPTOR.services_by_name["DecoderService"].full_name


async def start(settings: Settings) -> StartedService:
    """Start serving at once (health NOT_SERVING), load and warm the model; the decoder is then ready to go SERVING."""
    store = EmbeddingStore.from_settings(settings)
    encoder = EncoderClient(settings)
    servicer = DecoderServicer(settings)

    def register(server: grpc.aio.Server) -> None:
        decoder_service_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, server)

    server = await start_server(
        settings,
        service="decoder",
        port=settings.decoder_port,
        register=register,
        service_names=[SERVICE_NAME],
    )
    confine_torch_threads(asyncio.get_running_loop())
    model = await in_passing_thread(functools.partial(load_model, settings, part=model_part(settings)))
    engine = make_engine(model, settings)
    await engine.start()
    servicer.attach(model, engine, MediaResolver(store, encoder, model.fingerprint, cache_bytes=settings.decoder_cache_bytes))
    log.info("decoder SERVING %s on port %d", model.served_name, server.port)
    return StartedService(server, [engine.close, encoder.close, store.aclose], probe=store.probe, servicer=servicer)


async def serve(settings: Settings) -> None:
    """`start`, then SERVING (while the store takes writes) until SIGTERM."""
    started = await start(settings)
    await started.serve_until_signal(settings)


def main(argv: list[str] | None = None) -> int:
    """Run the decoder gRPC service."""
    role_arguments("decoder", __doc__, argv)
    run_service("decoder", serve)  # exits the process when the service has stopped
