"""A stored record is whole or absent: every byte of it is under a checksum, checked on every read.

Bytes are flipped in each part of a record through a real redis-server: every
field of the meta hash (the descriptor, the data's checksum, the record
checksum itself, the operator copies) and every tensor of the data. A read
must then answer "absent" (never a wrong embedding, a 400 or a 500), remove
the record, log the key at WARNING and count it; through the real services a
chat by that uuid is a 404 / NOT_FOUND and re-encoding the content works.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as dec_pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as dec_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.localredis import LocalRedis
from mmserve.store import EmbeddingStore, embedding_keys, tensor_nbytes
from tests.conftest import Stack, StartService, start_stack
from tests.support import encoder_stub, image_item, png_bytes, rpc_error, scrape
from tests.test_store import assert_same_tensors, make_descriptor, make_tensors

TENANT = "t"
CORRUPT = "mmserve_store_corrupt_records_total"
META_FIELDS = [
    "descriptor", "data_checksum", "record_checksum", "id", "modality", "model", "fingerprint", "content_sha256",
    "options", "token_count", "dtype", "shape", "tensors", "placement", "created", "nbytes",
]  # fmt: skip


def flip(value: bytes, at: int | None = None, bit: int = 0) -> bytes:
    """`value` with one bit flipped (in the middle byte unless told)."""
    i = len(value) // 2 if at is None else at
    return value[:i] + bytes([value[i] ^ (1 << bit)]) + value[i + 1 :]


def tensor_ranges(descriptor: object) -> dict[str, tuple[int, int]]:
    """Byte range of each tensor in the `:data` value, from the descriptor's TensorInfo list."""
    out, offset = {}, 0
    for info in descriptor.tensors:  # type: ignore[attr-defined]
        size = tensor_nbytes(info.dtype, info.shape)
        out[info.name] = (offset, offset + size)
        offset += size
    return out


def corrupt(raw: redis.Redis, ref: str, tenant: str, part: str, descriptor: object) -> None:
    """Flip one bit in `part` of the stored record: a meta field name, or `tensor:<name>`."""
    keys = embedding_keys(ref, tenant=tenant)
    if part.startswith("tensor:"):
        start, end = tensor_ranges(descriptor)[part.removeprefix("tensor:")]
        data = raw.get(keys.data)
        assert isinstance(data, bytes)
        raw.set(keys.data, flip(data, (start + end) // 2), keepttl=True)
    else:
        value = raw.hget(keys.meta, part)
        assert isinstance(value, bytes), part
        raw.hset(keys.meta, part, flip(value))


def corrupt_count(reason: str = "checksum") -> float:
    return REGISTRY.get_sample_value(CORRUPT, {"reason": reason}) or 0.0


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[EmbeddingStore]:
    s = EmbeddingStore(redis_url, ttl_s=3600)
    yield s
    await s.aclose()


# --- the store --------------------------------------------------------------------------


@pytest.mark.parametrize("part", [*META_FIELDS, "tensor:embeddings", "tensor:deepstack.0", "tensor:grid"])
async def test_a_flipped_bit_anywhere_reads_as_absent_and_is_removed(
    store: EmbeddingStore, raw: redis.Redis, caplog: pytest.LogCaptureFixture, part: str
) -> None:
    tensors = make_tensors()
    d = make_descriptor(uuid="flip")
    await store.put(d, tensors, tenant=TENANT)
    keys = embedding_keys("flip", tenant=TENANT)
    assert sorted(k.decode() for k in raw.hkeys(keys.meta)) == sorted(META_FIELDS)  # every field is tested
    corrupt(raw, "flip", TENANT, part, d)
    before = corrupt_count()

    with caplog.at_level(logging.WARNING, logger="mmserve.store.redis_store"):
        meta_only = await store.get("flip", tenant=TENANT, with_tensors=False)
        got = await store.get("flip", tenant=TENANT)
    if part.startswith("tensor:"):  # a metadata read checks the data by size; the full read catches it
        assert meta_only is not None
    else:
        assert meta_only is None
    assert got is None
    assert raw.keys("*") == []
    assert corrupt_count() == before + 1
    assert any(r.levelno == logging.WARNING and keys.meta in r.getMessage() for r in caplog.records)

    assert (await store.put(make_descriptor(uuid="flip"), tensors, tenant=TENANT)).created is True
    again = await store.get("flip", tenant=TENANT)
    assert again is not None
    assert_same_tensors(again.tensors, tensors)


async def test_every_bit_of_the_descriptor_is_covered(store: EmbeddingStore, raw: redis.Redis) -> None:
    """The issue's case: flips in a stored descriptor were served. Now none of them is, whatever the bit."""
    keys = embedding_keys("every-bit", tenant=TENANT)
    tensors = make_tensors()
    await store.put(make_descriptor(uuid="every-bit"), tensors, tenant=TENANT)
    good = raw.hgetall(keys.meta)
    descriptor = good[b"descriptor"]
    for at in range(len(descriptor)):
        bit = at % 8
        raw.hset(keys.meta, mapping={**good, b"descriptor": flip(descriptor, at, bit)})  # type: ignore[arg-type]
        raw.set(keys.data, b"".join(bytes(t.data) for t in tensors))
        assert await store.get("every-bit", tenant=TENANT) is None, (at, bit)
        assert raw.exists(keys.meta, keys.data) == 0, (at, bit)


async def test_missing_fields_and_a_half_evicted_record(store: EmbeddingStore, raw: redis.Redis) -> None:
    keys = embedding_keys("gone", tenant=TENANT)
    for field in ("descriptor", "record_checksum", "data_checksum"):
        await store.put(make_descriptor(uuid="gone"), make_tensors(), tenant=TENANT)
        raw.hdel(keys.meta, field)
        assert await store.get("gone", tenant=TENANT) is None, field
        assert raw.keys("*") == [], field
    await store.put(make_descriptor(uuid="gone"), make_tensors(), tenant=TENANT)
    raw.delete(keys.data)
    before = corrupt_count("incomplete")
    assert await store.get("gone", tenant=TENANT, with_tensors=False) is None
    assert corrupt_count("incomplete") == before + 1 and raw.keys("*") == []


async def test_a_put_over_a_corrupt_record_replaces_it(store: EmbeddingStore, raw: redis.Redis) -> None:
    d = make_descriptor(uuid="replace")
    await store.put(d, make_tensors(), tenant=TENANT)
    corrupt(raw, "replace", TENANT, "descriptor", d)
    fresh = make_tensors(seed=3)
    assert (await store.put(make_descriptor(uuid="replace"), fresh, tenant=TENANT)).created is True
    got = await store.get("replace", tenant=TENANT)
    assert got is not None
    assert_same_tensors(got.tensors, fresh)


async def test_a_first_format_record_is_a_clean_miss(store: EmbeddingStore, raw: redis.Redis) -> None:
    """Records written before the seal (descriptor + crc32 of the data only) are dropped, then re-made."""
    tensors = make_tensors()
    d = make_descriptor(uuid="old")
    await store.put(d, tensors, tenant=TENANT)
    keys = embedding_keys("old", tenant=TENANT)
    stored = raw.hgetall(keys.meta)
    data = raw.get(keys.data)
    assert isinstance(data, bytes)
    raw.delete(keys.meta)
    raw.hset(keys.meta, mapping={"descriptor": stored[b"descriptor"], "checksum": f"crc32:{zlib.crc32(data):08x}"})
    before = corrupt_count("old_format")
    assert await store.get("old", tenant=TENANT) is None
    assert corrupt_count("old_format") == before + 1 and raw.keys("*") == []
    assert (await store.put(make_descriptor(uuid="old"), tensors, tenant=TENANT)).created is True


# --- through the services -------------------------------------------------------------------


def encode(stack: Stack, uuid: str, image: bytes) -> enc_pb.EncodeResult:
    with encoder_stub(stack.encoder.target) as stub:
        return stub.Encode(enc_pb.EncodeRequest(items=[image_item(image, uuid=uuid)])).results[0]


@pytest.fixture(scope="module")
def stack(start_service: StartService, module_redis: LocalRedis) -> Iterator[Stack]:
    """The stack with the decoder's embedding cache off: these tests damage what Redis holds, and a cached copy
    (verified when it was read, so still right) would be served instead of the record being checked."""
    stack = start_stack(start_service, module_redis.url, MMSERVE_DECODER_CACHE_BYTES="0")
    yield stack
    stack.stop()


def chat_rest(stack: Stack, uuid: str) -> httpx.Response:
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": uuid}, {"type": "text", "text": "?"}]}],
        "max_completion_tokens": 4, "temperature": 0,
    }  # fmt: skip
    return httpx.post(f"{stack.gateway.base_url}/chat/completions", json=body, timeout=120)


def generate(stack: Stack, uuid: str) -> list[dec_pb.GenerateResponse]:
    part = dec_pb.ContentPart(media=media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, uuid=uuid))
    req = dec_pb.GenerateRequest(
        messages=[dec_pb.ChatMessage(role=dec_pb.ROLE_USER, content=[part, dec_pb.ContentPart(text="?")])],
        sampling=dec_pb.SamplingParams(temperature=0.0, max_tokens=4),
    )
    with grpc.insecure_channel(stack.decoder.target) as channel:
        return list(dec_grpc.DecoderServiceStub(channel).Generate(req, timeout=120))


def test_a_corrupt_record_is_404_through_rest_and_not_found_through_grpc_then_re_encodes(stack: Stack) -> None:
    raw = redis.Redis.from_url(stack.redis_url)
    image = png_bytes(seed=1301)
    uuid = "integrity-svc"
    keys = embedding_keys(uuid, tenant="default")
    first = encode(stack, uuid, image)
    tensor_parts = [f"tensor:{t.name}" for t in first.embedding.tensors]
    assert chat_rest(stack, uuid).status_code == 200
    counted = scrape(stack.decoder.metrics_url).get(f'{CORRUPT}{{reason="checksum"}}', 0.0)
    try:
        for part in ["descriptor", "data_checksum", "record_checksum", "token_count", *tensor_parts]:
            corrupt(raw, uuid, "default", part, first.embedding)
            response = chat_rest(stack, uuid)
            assert response.status_code == 404, (part, response.text)
            error = response.json()["error"]
            assert error["type"] == "not_found_error" and uuid in error["message"], part
            assert raw.exists(keys.meta, keys.data) == 0, part

            again = encode(stack, uuid, image)  # re-encoding works: the tower runs again
            assert not again.cached and again.embedding.token_count == first.embedding.token_count, part
            corrupt(raw, uuid, "default", part, again.embedding)
            code, err = rpc_error(generate, stack, uuid)
            assert code == grpc.StatusCode.NOT_FOUND and err.reason == "EMBEDDING_NOT_FOUND", (part, code, err)
            assert raw.exists(keys.meta, keys.data) == 0, part

            assert not encode(stack, uuid, image).cached
            assert generate(stack, uuid)[-1].usage.cached_media == 1, part
            counted += 2
    finally:
        raw.close()
    assert scrape(stack.decoder.metrics_url)[f'{CORRUPT}{{reason="checksum"}}'] == counted
    log = stack.decoder.process.log_text()
    assert "WARNING" in log and keys.meta in log
