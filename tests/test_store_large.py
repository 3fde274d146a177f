"""Chunked records and the sliding expiry, on one server and on the 3-master cluster (test_store's fixtures)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis

from mmserve.errors import MediaTooLarge
from mmserve.store import EmbeddingStore, RawTensor, embedding_keys
from tests.test_store import F32, TTL, all_keys, make_descriptor, make_tensors, raw, redis_url  # noqa: F401

CHUNK = 100  # bytes: make_tensors(tokens=4, hidden=8) is 216 bytes -> 3 chunks


@pytest.fixture
async def big(redis_url: str) -> AsyncIterator[EmbeddingStore]:  # noqa: F811
    s = EmbeddingStore(redis_url, ttl_s=TTL, ttl_refresh_s=60, chunk_bytes=CHUNK, max_record_bytes=10_000)
    yield s
    await s.aclose()


async def test_a_record_over_the_chunk_size_round_trips_in_chunks(big: EmbeddingStore, raw: redis.Redis) -> None:  # noqa: F811
    tensors = make_tensors()
    await big.put(make_descriptor(uuid="big"), tensors, tenant="t")
    keys = embedding_keys("big", tenant="t")
    assert raw.hget(keys.meta, "chunks") == b"3"
    assert [raw.strlen(f"{keys.data}:{i}" if i else keys.data) for i in range(3)] == [100, 100, 16]
    got = await big.get("big", tenant="t")
    assert got is not None
    assert [bytes(t.data) for t in got.tensors] == [bytes(t.data) for t in tensors]
    meta_only = await big.get("big", tenant="t", with_tensors=False)
    assert meta_only is not None and meta_only.descriptor.nbytes == 216
    assert all(0 < raw.pttl(k) <= TTL * 1000 for k in all_keys(raw))
    again = await big.put(make_descriptor(uuid="big"), tensors, tenant="t")
    assert again.created is False
    assert await big.delete("big", tenant="t") is True
    assert all_keys(raw) == []


@pytest.mark.parametrize("chunk", [0, 1, 2])
async def test_a_flipped_byte_in_any_chunk_reads_as_absent(big: EmbeddingStore, raw: redis.Redis, chunk: int) -> None:  # noqa: F811
    await big.put(make_descriptor(uuid="flip"), make_tensors(), tenant="t")
    keys = embedding_keys("flip", tenant="t")
    key = f"{keys.data}:{chunk}" if chunk else keys.data
    value = bytearray(raw.get(key))
    value[len(value) // 2] ^= 0x01
    raw.set(key, bytes(value), keepttl=True)
    assert await big.get("flip", tenant="t") is None
    assert all_keys(raw) == []  # removed, every chunk included


async def test_a_missing_chunk_reads_as_absent(big: EmbeddingStore, raw: redis.Redis) -> None:  # noqa: F811
    await big.put(make_descriptor(uuid="hole"), make_tensors(), tenant="t")
    raw.delete(embedding_keys("hole", tenant="t").data + ":2")
    assert await big.get("hole", tenant="t") is None


async def test_a_record_over_the_maximum_is_refused_before_any_upload(big: EmbeddingStore, raw: redis.Redis) -> None:  # noqa: F811
    huge = [RawTensor("embeddings", F32, (2501,), bytes(4 * 2501))]
    with pytest.raises(MediaTooLarge, match="10000 bytes") as info:
        await big.put(make_descriptor(uuid="huge"), huge, tenant="t")
    assert info.value.metadata["setting"] == "store_max_record_bytes"
    assert all_keys(raw) == []


async def test_a_read_slides_the_expiry_once_the_refresh_interval_has_passed(
    big: EmbeddingStore,
    raw: redis.Redis,  # noqa: F811
) -> None:
    await big.put(make_descriptor(uuid="hot"), make_tensors(), tenant="t")
    keys = embedding_keys("hot", tenant="t")
    data_keys = [keys.data, keys.data + ":1", keys.data + ":2"]
    # Fresh (aged less than the 60 s interval): not touched.
    for k in (keys.meta, *data_keys):
        raw.pexpire(k, (TTL - 30) * 1000)
    await big.get("hot", tenant="t")
    assert raw.pttl(keys.meta) <= (TTL - 30) * 1000
    # Older than the interval: every key gets the full TTL back.
    for k in (keys.meta, *data_keys):
        raw.pexpire(k, (TTL - 120) * 1000)
    got = await big.get("hot", tenant="t")
    assert got is not None
    assert all(raw.pttl(k) > (TTL - 5) * 1000 for k in (keys.meta, *data_keys))
    # A metadata-only read does not touch; a re-encode's lookup (touch=True) does.
    for k in (keys.meta, *data_keys):
        raw.pexpire(k, (TTL - 120) * 1000)
    await big.get("hot", tenant="t", with_tensors=False)
    assert raw.pttl(keys.meta) <= (TTL - 120) * 1000
    await big.get_many(["hot"], tenant="t", with_tensors=False, touch=True)
    assert raw.pttl(keys.meta) > (TTL - 5) * 1000
