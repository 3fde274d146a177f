"""Service-to-service authentication: with MMSERVE_SERVICE_TOKEN the gRPC ports serve only the stack's own processes.

A real encoder, decoder and gateway share a token. Every RPC of both
services, of every kind (unary, client- and server-streaming), without the
token or with a wrong one is UNAUTHENTICATED; with it, it works; the tenant
metadata of an unauthenticated caller is never believed (a forged
`x-mmserve-tenant` reads nothing); health and reflection answer anyone. The
decoder's calls to the encoder and the gateway's calls carry the token (a
chat with an inline image goes gateway -> decoder -> encoder); a gateway
without it gets a 500 that blames no client. Without a token, services warn.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmserve.api.decoder.v1 import decoder_service_pb2 as dec
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as dec_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as enc_grpc
from mmserve.config import Settings
from mmserve.localredis import LocalRedis
from mmserve.rpc.auth import SERVICE_TOKEN_KEY, warn_if_open
from mmserve.rpc.metadata import TENANT_KEY
from mmserve.samples import data_url, png_bytes
from tests.conftest import RunningService, Stack, StartService, start_stack
from tests.support import image_item, rpc_error

TOKEN = secrets.token_urlsafe(32)
GOOD = ((SERVICE_TOKEN_KEY, TOKEN),)
WRONG: tuple[tuple[tuple[str, str], ...], ...] = ((), ((SERVICE_TOKEN_KEY, TOKEN[:-1]),), ((SERVICE_TOKEN_KEY, ""),))


@pytest.fixture(scope="module")
def locked(start_service: StartService, module_redis: LocalRedis) -> Iterator[Stack]:
    stack = start_stack(start_service, module_redis.url, MMSERVE_SERVICE_TOKEN=TOKEN)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def channels(locked: Stack) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    with grpc.insecure_channel(locked.encoder.target) as e, grpc.insecure_channel(locked.decoder.target) as d:
        yield e, d


def generate_request(*media: Any) -> dec.GenerateRequest:
    parts = [dec.ContentPart(text="Look:"), *(dec.ContentPart(media=m) for m in media)]
    return dec.GenerateRequest(
        messages=[dec.ChatMessage(role=dec.ROLE_USER, content=parts)], sampling=dec.SamplingParams(temperature=0, max_tokens=3)
    )


def rpcs(channels: tuple[grpc.Channel, grpc.Channel]) -> dict[str, Callable[..., Any]]:
    """One call of every RPC of both services, taking `metadata=`."""
    e, d = enc_grpc.EncoderServiceStub(channels[0]), dec_grpc.DecoderServiceStub(channels[1])
    header = enc.EncodeUploadRequest(header=enc.UploadHeader(item=image_item(b""), total_bytes=3))
    upload = [header, enc.EncodeUploadRequest(chunk=b"abc")]
    return {
        "Encode": lambda **kw: e.Encode(enc.EncodeRequest(items=[image_item(png_bytes(seed=901))]), timeout=60, **kw),
        "EncodeUpload": lambda **kw: e.EncodeUpload(iter(upload), timeout=60, **kw),
        "GetEmbedding": lambda **kw: e.GetEmbedding(enc.GetEmbeddingRequest(id="nothing-here"), timeout=30, **kw),
        "DeleteEmbedding": lambda **kw: e.DeleteEmbedding(enc.DeleteEmbeddingRequest(id="nothing-here"), timeout=30, **kw),
        "GetModelInfo": lambda **kw: e.GetModelInfo(enc.GetModelInfoRequest(), timeout=30, **kw),
        "ListModels": lambda **kw: d.ListModels(dec.ListModelsRequest(), timeout=30, **kw),
        "Generate": lambda **kw: list(d.Generate(generate_request(), timeout=60, **kw)),
    }


def test_every_rpc_needs_the_token(channels: tuple[grpc.Channel, grpc.Channel]) -> None:
    for name, call in rpcs(channels).items():
        for metadata in WRONG:
            code, err = rpc_error(call, metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, metadata, code, err)
            assert err.reason == "SERVICE_TOKEN_INVALID" and TOKEN not in err.message
    ok = rpcs(channels)
    assert ok["Encode"](metadata=GOOD).results[0].embedding.id.startswith("mmemb-")
    assert ok["GetModelInfo"](metadata=GOOD).model_fingerprint
    assert ok["DeleteEmbedding"](metadata=GOOD).deleted is False
    assert ok["ListModels"](metadata=GOOD).models
    assert ok["Generate"](metadata=GOOD)
    code, _ = rpc_error(ok["GetEmbedding"], metadata=GOOD)  # authenticated: the honest answer
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = rpc_error(ok["EncodeUpload"], metadata=GOOD)  # authenticated: 3 bytes are no image
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_forged_tenant_is_refused_without_the_token(channels: tuple[grpc.Channel, grpc.Channel]) -> None:
    e, d = enc_grpc.EncoderServiceStub(channels[0]), dec_grpc.DecoderServiceStub(channels[1])
    victim = ((TENANT_KEY, "victim"),)
    e.Encode(enc.EncodeRequest(items=[image_item(png_bytes(seed=911), uuid="secret-1")]), metadata=GOOD + victim, timeout=60)
    read = enc.GetEmbeddingRequest(id="secret-1", include_tensors=True)
    assert e.GetEmbedding(read, metadata=GOOD + victim, timeout=30).embedding.id == "secret-1"  # believed: authenticated

    reference = image_item(uuid="secret-1")
    reference.ClearField("source")
    for metadata in WRONG:
        forged = metadata + victim
        for call, request in ((e.GetEmbedding, read), (e.DeleteEmbedding, enc.DeleteEmbeddingRequest(id="secret-1")),
                              (lambda r, **kw: list(d.Generate(r, **kw)), generate_request(reference))):  # fmt: skip
            code, _ = rpc_error(call, request, metadata=forged, timeout=60)
            assert code == grpc.StatusCode.UNAUTHENTICATED
    assert e.GetEmbedding(read, metadata=GOOD + victim, timeout=30).embedding.id == "secret-1"  # still there
    code, _ = rpc_error(lambda: e.GetEmbedding(read, metadata=GOOD, timeout=30))  # another tenant: not found
    assert code == grpc.StatusCode.NOT_FOUND
    assert list(d.Generate(generate_request(reference), metadata=GOOD + victim, timeout=60))


def test_health_and_reflection_stay_open(locked: Stack, channels: tuple[grpc.Channel, grpc.Channel]) -> None:
    for channel in channels:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert "grpc.health.v1.Health" in names and any(n.startswith("mmserve.") for n in names)
    assert not any(TOKEN in service.process.log_text() for service in (locked.encoder, locked.decoder, locked.gateway))
    assert "MMSERVE_SERVICE_TOKEN is unset" not in locked.encoder.process.log_text()


def test_the_gateway_and_the_decoder_carry_the_token(locked: Stack) -> None:
    """A chat with an inline image: gateway -> decoder (Generate) -> encoder (Encode), each hop authenticated."""
    client = locked.client()
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=921))}}
    reply = client.chat.completions.create(
        model="mmserve-tiny-random", max_completion_tokens=3, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"}, image]}],
    )  # fmt: skip
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    stored = client.post("/mm/encode", body={"content": [image]}, cast_to=object)["data"][0]  # type: ignore[index]
    assert stored["cached"] is True  # the decoder's Encode call stored it
    assert client.get(f"/mm/embeddings/{stored['id']}", cast_to=object)["id"] == stored["id"]  # type: ignore[index]


@pytest.fixture(scope="module")
def tokenless_gateway(start_service: StartService, locked: Stack) -> RunningService:
    return start_service("gateway", MMSERVE_DECODER_TARGET=locked.decoder.target, MMSERVE_ENCODER_TARGET=locked.encoder.target)


def test_a_gateway_without_the_token_is_a_server_fault(tokenless_gateway: RunningService) -> None:
    assert httpx.get(f"http://127.0.0.1:{tokenless_gateway.port}/health", timeout=10).status_code == 200  # health is open
    client = openai.OpenAI(base_url=tokenless_gateway.base_url, api_key="unused", max_retries=0)
    for call in (lambda: client.models.list(), lambda: client.get("/mm/embeddings/x", cast_to=object)):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == 500  # not a 401: the client's credentials are fine
        assert "token" not in info.value.response.text.lower().replace("service_token_invalid", "")
    assert "refused this stack's service token" in tokenless_gateway.process.log_text()


def test_without_a_token_services_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmserve.rpc"):
        warn_if_open("encoder", Settings(service_token=None))
        warn_if_open("decoder", Settings(service_token="set"))
    assert [r.getMessage().count("local development only") for r in caplog.records] == [1]
