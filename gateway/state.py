"""What the gateway's routes share: gRPC channels to the decoders and encoders, and who is calling.

Channels are created lazily, on the event loop that serves requests, and are
built by mmserve.rpc.channel: round-robin over the SERVING replicas their
target resolves to, retried on UNAVAILABLE before any response; every call on
them carries the service token (mmserve/rpc/auth.py), so the services trust
the tenant sent with it.
"""

from __future__ import annotations

import time

import grpc
from fastapi import Request
from grpc_health.v1 import health_pb2_grpc

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as enc_grpc
from mmserve.config import Settings
from mmserve.errors import Unauthenticated
from mmserve.rpc.channel import client_channel
from mmserve.rpc.metadata import REQUEST_ID_KEY, TENANT_KEY
from mmserve.tenancy import ApiKeys

CARD_TTL_S = 30.0  # how long the gateway trusts a model card (limits) before asking again


class Gateway:
    """Settings and the gRPC stubs of one gateway process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._decoder_channel = client_channel(settings.decoder_target, settings)
        self._encoder_channel = client_channel(settings.encoder_target, settings)
        self.decoder = pb_grpc.DecoderServiceStub(self._decoder_channel)
        self.encoder = enc_grpc.EncoderServiceStub(self._encoder_channel)
        self.health = health_pb2_grpc.HealthStub(self._decoder_channel)
        self._card: tuple[float, pb.ModelCard] | None = None

    async def served_model(self) -> str:
        """The decoder's model id, for responses to requests that named none."""
        card = await self.model_card()
        return card.id if card is not None else "unknown"

    async def model_card(self) -> pb.ModelCard | None:
        """The decoder's model card (refreshed every 30 s), or None while no decoder answers."""
        now = time.monotonic()
        if self._card is None or now - self._card[0] > CARD_TTL_S:
            try:
                reply = await self.decoder.ListModels(pb.ListModelsRequest(), timeout=2)
            except grpc.RpcError:
                return self._card[1] if self._card else None
            if not reply.models:
                return None
            self._card = (now, reply.models[0])
        return self._card[1]

    async def close(self) -> None:
        await self._decoder_channel.close()
        await self._encoder_channel.close()


async def gateway(request: Request) -> Gateway:
    """The app's Gateway (FastAPI dependency); async so its channels are made on the serving loop, not a worker thread."""
    state = request.app.state
    if getattr(state, "gateway", None) is None:
        state.gateway = Gateway(state.settings)
    return state.gateway


async def tenant(request: Request) -> str:
    """The caller's tenant, from its API key when keys are configured (mmserve/tenancy.py); the store scopes every id to it.

    async although it awaits nothing: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request.
    """
    keys: ApiKeys = request.app.state.api_keys
    if not keys.required:
        return keys.default_tenant
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = keys.tenant_for(token.strip()) if scheme.lower() == "bearer" else None
    if found is None:
        raise Unauthenticated("invalid or missing API key (Authorization: Bearer <key>)")
    return found


def call_metadata(request: Request, caller: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for downstream calls: the request id and the tenant."""
    return ((REQUEST_ID_KEY, request.state.request_id), (TENANT_KEY, caller))
