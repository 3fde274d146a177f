"""The encoder service end to end: the real encoder servicer and pipeline (in-process, tests/inprocess.py), a real redis-server, real HTTP.

The embedding read back from Redis must equal the monolithic transformers
reference computed here in-process on the same image, and every bad input must
fail with the right status, name its field, and leave Redis untouched. What is
about the process (a Redis outage then SIGTERM, the peak memory of a decode) runs
on `mmserve encoder` processes.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.localredis import LocalRedis
from mmserve.rpc.metadata import TENANT_KEY
from mmserve.store import EmbeddingStore, RawTensor, StoredEmbedding, content_id
from tests.conftest import MediaServer, RunningService, StartService
from tests.inprocess import InProcessService, InProcessServices
from tests.support import encoder_stub, image_item, png_bytes, redis_keys, rpc_error, scrape

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def encoder(inprocess: InProcessServices, redis_server: LocalRedis) -> Iterator[InProcessService]:
    """The encoder as tests run it: loopback fetches allowed (for the local media server), 4 MiB item cap."""
    service = inprocess.start("encoder", redis_url=redis_server.url, fetch_allow_loopback=True, max_item_bytes=4 * MiB)
    yield service
    inprocess.stop(service)


@pytest.fixture(scope="module")
def encoder_process(start_service: StartService, redis_server: LocalRedis) -> RunningService:
    """The same encoder as a `mmserve encoder` process (for what needs the process: its peak memory, its own torch threads).

    Its patch embeddings stay convolutions, as in transformers, so that its embeddings can be compared bit for bit;
    the in-process encoder runs the default (matmuls, equal within float rounding: the tolerance test below).
    """
    return start_service(
        "encoder",
        redis_url=redis_server.url,
        MMSERVE_FETCH_ALLOW_LOOPBACK="true",
        MMSERVE_MAX_ITEM_BYTES=str(4 * MiB),
        MMSERVE_PATCH_EMBED_MATMUL="false",
    )


@pytest.fixture(scope="module")
def file_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media-root")
    (root / "ok.png").write_bytes(png_bytes(seed=7))
    (root.parent / "secret.png").write_bytes(png_bytes(seed=8))
    return root


@pytest.fixture(scope="module")
def strict_encoder(inprocess: InProcessServices, redis_server: LocalRedis, file_root: Path) -> Iterator[InProcessService]:
    """The encoder with the default fetch guard (no loopback), a file root, and a 1 MiB item cap."""
    service = inprocess.start("encoder", redis_url=redis_server.url, file_root=file_root, max_item_bytes=MiB)
    yield service
    inprocess.stop(service)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> tuple[Any, Any]:
    """(model, processor) of the tiny checkpoint, loaded in this process."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return model, AutoProcessor.from_pretrained(tiny_checkpoint)


def reference_embedding(reference: tuple[Any, Any], png: bytes) -> np.ndarray:
    """The monolithic path: processor -> get_image_features, as transformers does inside generate() (in the test
    thread, whose torch thread count no in-process service changes: mmserve.models.threads)."""
    model, processor = reference
    image = Image.open(io.BytesIO(png)).convert("RGB")
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    return out[0].numpy()


def stored_embedding(redis_url: str, ref: str, tenant: str = "default") -> StoredEmbedding | None:
    """Read an embedding straight from Redis through the store (what a decoder does)."""

    async def read() -> StoredEmbedding | None:
        async with EmbeddingStore(redis_url, ttl_s=0) as store:
            return await store.get(ref, tenant=tenant)

    return asyncio.run(read())


def same_descriptor(a: embedding_pb2.EmbeddingDescriptor, b: embedding_pb2.EmbeddingDescriptor) -> bool:
    """Equal but for expires_at, which the store derives from the key's live TTL (±1 s)."""
    a2, b2 = embedding_pb2.EmbeddingDescriptor(), embedding_pb2.EmbeddingDescriptor()
    a2.CopyFrom(a), b2.CopyFrom(b)
    close = abs(a.expires_at.ToMilliseconds() - b.expires_at.ToMilliseconds()) < 1500
    a2.ClearField("expires_at"), b2.ClearField("expires_at")
    return close and a2 == b2


def as_array(raw: RawTensor) -> np.ndarray:
    assert raw.dtype == 1  # float32, the tiny model's dtype
    return np.frombuffer(bytes(raw.data), dtype=np.float32).reshape(raw.shape)


# --- correctness --------------------------------------------------------------------


def test_stored_embedding_equals_reference_bit_for_bit(encoder_process: RunningService, redis_url: str, reference) -> None:
    """On a process: bit for bit needs the encoder's own torch thread count, which in-process decoders change for the whole process."""
    encoder = encoder_process
    png = png_bytes(seed=1)
    with encoder_stub(encoder.target) as stub:
        result = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0]
    desc = result.embedding
    assert not result.cached
    assert desc.id.startswith("mmemb-") and desc.modality == media_pb2.MODALITY_IMAGE
    assert list(desc.image.grid_thw) == [1, 4, 6] and desc.image.spatial_merge_size == 2
    assert desc.token_count == 6 and list(desc.image.source_size) == [96, 64]

    stored = stored_embedding(redis_url, desc.id)
    assert stored is not None and same_descriptor(stored.descriptor, desc)
    got = as_array(stored.tensors[0])
    want = reference_embedding(reference, png)
    assert got.shape == want.shape == (6, 128)
    assert np.array_equal(got, want), f"max abs diff {np.abs(got - want).max()}"


def test_batched_embeddings_match_reference_within_tolerance(encoder: InProcessService, redis_url: str, reference) -> None:
    pngs = [png_bytes(64 + 28 * i, 56 + 14 * i, seed=10 + i) for i in range(4)]
    with encoder_stub(encoder.target) as stub:
        one_call = stub.Encode(pb.EncodeRequest(items=[image_item(p) for p in pngs[:2]])).results
        with ThreadPoolExecutor(2) as pool:  # concurrent calls get batched together by the encoder
            concurrent = list(pool.map(lambda p: stub.Encode(pb.EncodeRequest(items=[image_item(p)])).results[0], pngs[2:]))
    for png, result in zip(pngs, [*one_call, *concurrent], strict=True):
        got = as_array(stored_embedding(redis_url, result.embedding.id).tensors[0])
        want = reference_embedding(reference, png)
        # Float rounding only: batching and the patch matmul (mmserve/models/patch_embed.py) reorder sums, and the
        # difference grows through the tower's layers; bounded relative to the tensor's own scale (seen: 3e-6).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_same_image_twice_same_id_and_no_model_run(encoder: InProcessService, redis_url: str) -> None:
    png = png_bytes(seed=2)
    with encoder_stub(encoder.target) as stub:
        first = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0]
        before = scrape(encoder.metrics_url)
        second = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0]
        after = scrape(encoder.metrics_url)
    assert not first.cached and second.cached
    assert second.embedding.id == first.embedding.id
    assert second.embedding.created_at == first.embedding.created_at  # not rewritten
    hits = 'mmserve_encoder_cache_hits_total{modality="image"}'
    runs = 'mmserve_encoder_items_encoded_total{modality="image"}'
    assert after[hits] == before.get(hits, 0) + 1
    assert after[runs] == before[runs]  # the tower did not run


def test_identity_includes_processing_options(encoder: InProcessService, redis_url: str) -> None:
    png = png_bytes(200, 200, seed=3)
    with encoder_stub(encoder.target) as stub:
        default = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0].embedding
        small = stub.Encode(pb.EncodeRequest(items=[image_item(png, max_pixels=56 * 56)])).results[0].embedding
    assert default.id != small.id
    assert small.token_count < default.token_count
    assert '"max_pixels":3136' in small.options_json


def test_upload_stream_gives_the_same_embedding_as_inline_bytes(encoder: InProcessService, redis_url: str) -> None:
    png = png_bytes(300, 200, seed=4)
    header = pb.UploadHeader(item=media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE), total_bytes=len(png))
    chunks = [pb.EncodeUploadRequest(header=header)] + [pb.EncodeUploadRequest(chunk=png[i : i + 4096]) for i in range(0, len(png), 4096)]
    with encoder_stub(encoder.target) as stub:
        uploaded = stub.EncodeUpload(iter(chunks)).result
        inline = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0]
    assert not uploaded.cached and inline.cached
    assert uploaded.embedding.id == inline.embedding.id


# --- uuids, TTL, delete ------------------------------------------------------------------


def test_uuid_is_namespaced_per_tenant_and_never_rebound(encoder: InProcessService, redis_url: str) -> None:
    a, b = png_bytes(seed=20), png_bytes(seed=21)
    with encoder_stub(encoder.target) as stub:
        in_a = stub.Encode(pb.EncodeRequest(items=[image_item(a, uuid="cat")]), metadata=[(TENANT_KEY, "alice")]).results[0]
        in_b = stub.Encode(pb.EncodeRequest(items=[image_item(b, uuid="cat")]), metadata=[(TENANT_KEY, "bob")]).results[0]
        assert in_a.embedding.id == in_b.embedding.id == "cat"
        assert in_a.embedding.client_uuid and in_a.embedding.content_sha256 != in_b.embedding.content_sha256

        # alice reuses her uuid for other content: refused, and her embedding is untouched.
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[image_item(b, uuid="cat")]), metadata=[(TENANT_KEY, "alice")])
        assert code == grpc.StatusCode.ALREADY_EXISTS and err.field == "items[0].uuid"
        again = stub.GetEmbedding(pb.GetEmbeddingRequest(id="cat"), metadata=[(TENANT_KEY, "alice")]).embedding
        assert again.content_sha256 == in_a.embedding.content_sha256

        # Same content under the same uuid, or a pure reference: served from the store.
        same = stub.Encode(pb.EncodeRequest(items=[image_item(a, uuid="cat")]), metadata=[(TENANT_KEY, "alice")]).results[0]
        ref = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid="cat")
        by_ref = stub.Encode(pb.EncodeRequest(items=[ref]), metadata=[(TENANT_KEY, "bob")]).results[0]
    assert same.cached and same.embedding.content_sha256 == in_a.embedding.content_sha256
    assert by_ref.cached and by_ref.embedding.content_sha256 == in_b.embedding.content_sha256


def test_uuid_held_by_another_model_is_never_served(encoder: InProcessService, redis_url: str) -> None:
    """Another model's encoder wrote "shared" into the same Redis: ours refuses to rebind or use it."""
    png = png_bytes(seed=22)
    other = embedding_pb2.EmbeddingDescriptor(
        id="shared",
        modality=media_pb2.MODALITY_IMAGE,
        model="other",
        model_fingerprint="other-model-0000",
        token_count=1,
        content_sha256="0" * 64,
        client_uuid=True,
        options_json="{}",
    )

    async def plant() -> None:
        async with EmbeddingStore(redis_url, ttl_s=60) as store:
            await store.put(other, [RawTensor("embeddings", 1, (1, 128), bytes(512))], tenant="default")

    asyncio.run(plant())
    with encoder_stub(encoder.target) as stub:
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[image_item(png, uuid="shared")]))
        assert code == grpc.StatusCode.ALREADY_EXISTS and err.field == "items[0].uuid"
        ref = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid="shared")
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[ref]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "another model" in err.message


def test_ttl_is_set_on_both_keys(encoder: InProcessService, redis_url: str) -> None:
    import redis

    with encoder_stub(encoder.target) as stub:
        desc = stub.Encode(pb.EncodeRequest(items=[image_item(png_bytes(seed=30))])).results[0].embedding
    assert abs(desc.expires_at.seconds - desc.created_at.seconds - 7 * 24 * 3600) <= 2  # the default TTL
    client = redis.Redis.from_url(redis_url)
    ttls = [client.ttl(key) for key in client.keys(f"*{desc.id}*")]
    client.close()
    assert len(ttls) == 2 and all(7 * 24 * 3600 - 60 < t <= 7 * 24 * 3600 for t in ttls)


def test_delete(encoder: InProcessService, redis_url: str) -> None:
    with encoder_stub(encoder.target) as stub:
        desc = stub.Encode(pb.EncodeRequest(items=[image_item(png_bytes(seed=31))])).results[0].embedding
        assert len(redis_keys(redis_url)) == 2
        assert stub.DeleteEmbedding(pb.DeleteEmbeddingRequest(id=desc.id)).deleted
        assert redis_keys(redis_url) == []
        code, err = rpc_error(stub.GetEmbedding, pb.GetEmbeddingRequest(id=desc.id))
        assert code == grpc.StatusCode.NOT_FOUND and desc.id in err.message
        assert not stub.DeleteEmbedding(pb.DeleteEmbeddingRequest(id=desc.id)).deleted


def test_get_embedding_returns_tensors_on_request(encoder: InProcessService, redis_url: str) -> None:
    with encoder_stub(encoder.target) as stub:
        desc = stub.Encode(pb.EncodeRequest(items=[image_item(png_bytes(seed=32))])).results[0].embedding
        bare = stub.GetEmbedding(pb.GetEmbeddingRequest(id=desc.id))
        full = stub.GetEmbedding(pb.GetEmbeddingRequest(id=desc.id, include_tensors=True))
    assert same_descriptor(bare.embedding, desc) and not bare.tensors
    assert [t.name for t in full.tensors] == ["embeddings"]
    assert list(full.tensors[0].tensor.shape) == [desc.token_count, 128]
    assert len(full.tensors[0].tensor.data) == desc.nbytes == desc.token_count * 128 * 4


# --- bad input: right status, field named, nothing stored -----------------------------------


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def expect_refused(target: str, redis_url: str, item: media_pb2.MediaInput, code: grpc.StatusCode, field: str, words: str) -> None:
    before = redis_keys(redis_url)
    with encoder_stub(target) as stub:
        got_code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[image_item(png_bytes(seed=99)), item]))
    assert got_code == code, (got_code, err)
    assert err.field == field, err
    assert words.lower() in err.message.lower(), err.message
    assert redis_keys(redis_url) == before  # the good first item was not stored either


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://10.0.0.1/cat.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]:{port}/cat.png", "loopback"),
        ("http://127.0.0.1:{port}/cat.png", "loopback"),
        ("http://[::ffff:127.0.0.1]:{port}/cat.png", "IPv4-mapped form of a loopback address"),
        ("http://localhost:{port}/cat.png", "not publicly routable"),
    ],
)
def test_fetch_guard_refuses_non_global_addresses(
    strict_encoder: InProcessService, redis_url: str, media_server: MediaServer, url: str, words: str
) -> None:
    media_server.add("/cat.png", png_bytes(seed=5), content_type="image/png")
    hits = len(media_server.hits)
    item = image_item(url=url.format(port=media_server.port))
    expect_refused(strict_encoder.target, redis_url, item, grpc.StatusCode.INVALID_ARGUMENT, "items[1].source.url", words)
    assert len(media_server.hits) == hits  # nothing was sent


def test_redirect_to_private_address_refused(encoder: InProcessService, redis_url: str, media_server: MediaServer) -> None:
    url = media_server.redirect("/hop", "http://10.0.0.1/cat.png")
    expect_refused(encoder.target, redis_url, image_item(url=url), grpc.StatusCode.INVALID_ARGUMENT, "items[1].source.url", "private")


def test_image_by_http_url_works(encoder: InProcessService, redis_url: str, media_server: MediaServer) -> None:
    png = png_bytes(seed=6)
    url = media_server.add("/dog.png", png, content_type="image/png")
    with encoder_stub(encoder.target) as stub:
        by_url = stub.Encode(pb.EncodeRequest(items=[image_item(url=url)])).results[0]
        by_bytes = stub.Encode(pb.EncodeRequest(items=[image_item(png)])).results[0]
    assert by_bytes.cached and by_bytes.embedding.id == by_url.embedding.id


def test_remote_404_is_a_remote_fetch_failure(encoder: InProcessService, redis_url: str, media_server: MediaServer) -> None:
    expect_refused(
        encoder.target,
        redis_url,
        image_item(url=media_server.url("/missing.png")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "items[1].source.url",
        "404",
    )


def test_oversize_remote_body_refused(encoder: InProcessService, redis_url: str, media_server: MediaServer) -> None:
    url = media_server.add("/huge.png", b"\x89PNG" + bytes(5 * MiB), content_type="image/png")
    expect_refused(encoder.target, redis_url, image_item(url=url), grpc.StatusCode.INVALID_ARGUMENT, "items[1].source.url", "limit")


def test_file_url_refused_without_root(encoder: InProcessService, redis_url: str) -> None:
    item = image_item(url="file:///etc/passwd")
    expect_refused(encoder.target, redis_url, item, grpc.StatusCode.INVALID_ARGUMENT, "items[1].source.url", "file://")


def test_file_url_under_root_and_dotdot_escape(strict_encoder: InProcessService, redis_url: str, file_root: Path) -> None:
    with encoder_stub(strict_encoder.target) as stub:
        ok = stub.Encode(pb.EncodeRequest(items=[image_item(url=f"file://{file_root}/ok.png")])).results[0]
    assert ok.embedding.token_count == 6
    escape = image_item(url=f"file://{file_root}/../secret.png")
    expect_refused(strict_encoder.target, redis_url, escape, grpc.StatusCode.INVALID_ARGUMENT, "items[1].source.url", "outside")
    with encoder_stub(strict_encoder.target) as stub:
        _, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[escape]))
    assert str(file_root) not in err.message  # no local paths in messages


@pytest.mark.parametrize(
    ("item", "field", "words"),
    [
        (image_item(url="data:image/png;base64,iVBORw0KGgo!!!!"), "items[1].source.url", "base64"),
        (image_item(png_bytes()[:200]), "items[1].source", "truncated"),
        (image_item(bomb_png()), "items[1].source", "pixels"),
        (image_item(b"this is not an image at all"), "items[1].source", "not a supported image"),
        (image_item(url="ftp://example.com/cat.png"), "items[1].source.url", "http, https, data, file"),
        (image_item(bytes(2 * MiB)), "items[1].source.data", "limit"),
        (image_item(png_bytes(), rgba_background_color="blue"), "items[1].image.rgba_background_color", "#RRGGBB"),
        (media_pb2.MediaInput(source=media_pb2.MediaSource(data=png_bytes())), "items[1].modality", "modality"),
        (image_item(png_bytes(), uuid="mmemb-reserved"), "items[1].uuid", "mmemb-"),
    ],
    ids=[
        "bad-base64",
        "truncated-png",
        "decompression-bomb",
        "not-an-image",
        "unknown-scheme",
        "oversize-body",
        "bad-color",
        "no-modality",
        "reserved-uuid",
    ],
)
def test_bad_input_is_invalid_argument(
    strict_encoder: InProcessService, redis_url: str, item: media_pb2.MediaInput, field: str, words: str
) -> None:
    expect_refused(strict_encoder.target, redis_url, item, grpc.StatusCode.INVALID_ARGUMENT, field, words)


def test_too_many_images_names_the_limit(encoder: InProcessService, redis_url: str) -> None:
    items = [image_item(png_bytes(seed=i)) for i in range(9)]
    with encoder_stub(encoder.target) as stub:
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=items))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "items" and "limit 8" in err.message
    assert redis_keys(redis_url) == []


def test_unknown_reference_lists_every_missing_id(encoder: InProcessService, redis_url: str) -> None:
    refs = [media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid=u) for u in ("nope-1", "nope-2")]
    fake = "mmemb-" + content_id(modality=1, content_sha256="1" * 64, model_fingerprint="x", dtype=1, options_json="{}")[6:]
    refs.append(media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(embedding_id=fake)))
    with encoder_stub(encoder.target) as stub:
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=refs))
    assert code == grpc.StatusCode.NOT_FOUND
    assert err.metadata["missing"].split(",") == ["nope-1", "nope-2", fake]


# --- operations ------------------------------------------------------------------------------


def test_health_reflection_and_model_info(encoder: InProcessService) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(encoder.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "mmserve.encoder.v1.EncoderService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "mmserve.encoder.v1.EncoderService" in services and "grpc.health.v1.Health" in services
    with encoder_stub(encoder.target) as stub:
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.family == "qwen2_5_vl" and info.random_weights
    # Qwen2.5-VL takes images and video; the tiny checkpoint also carries the time-series adapter.
    assert list(info.modalities) == [media_pb2.MODALITY_IMAGE, media_pb2.MODALITY_VIDEO, media_pb2.MODALITY_TIME_SERIES]
    assert info.model_fingerprint.startswith("qwen2_5_vl-")


@pytest.mark.slow
def test_redis_outage_is_unavailable_then_recovers(start_service: StartService, own_redis: LocalRedis) -> None:
    service = start_service("encoder", redis_url=own_redis.url)
    with encoder_stub(service.target) as stub:
        assert stub.Encode(pb.EncodeRequest(items=[image_item(png_bytes(seed=40))])).results[0].embedding.id
        own_redis.stop()
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[image_item(png_bytes(seed=41))]), timeout=15)
        assert code == grpc.StatusCode.UNAVAILABLE and "store" in err.message
        assert "redis://" not in err.message
        own_redis.start()
        result = stub.Encode(pb.EncodeRequest(items=[image_item(png_bytes(seed=41))]), timeout=15).results[0]
        assert not result.cached and result.embedding.token_count == 6
    assert redis_keys(own_redis.url) != []
    assert service.stop() == 0  # SIGTERM: graceful shutdown, clean exit


def vm_hwm_kib(pid: int) -> int:
    """Peak resident memory of a process (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_decompression_bomb_under_the_pixel_cap_is_refused_fast_with_bounded_memory(
    encoder_process: RunningService, redis_url: str
) -> None:
    """A real 12000x12000 PNG (~420 KB; 144 MP, under the pixel cap): refused from its header, the encoder process's peak RSS unmoved."""
    from tests.test_image_decode import big_png

    encoder = encoder_process
    bomb = big_png(12000, 12000)
    assert encoder.process.proc is not None
    pid = encoder.process.proc.pid
    before = vm_hwm_kib(pid)
    started = time.monotonic()
    expect_refused(encoder.target, redis_url, image_item(bomb), grpc.StatusCode.INVALID_ARGUMENT, "items[1].source", "per-item limit")
    assert time.monotonic() - started < 5  # from the header: milliseconds, not the 33 s a full decode took
    assert vm_hwm_kib(pid) - before < 64 * 1024  # the decode alone would have needed ~860 MB
