"""The embedding store against a real redis-server and a real 3-master Redis Cluster: content, keys, identity, TTLs, outages.

Every test that takes `redis_url` (directly or through `store`/`raw`) runs
twice: on one server and on the cluster (`redis+cluster://`), with the same
assertions: the store's semantics do not depend on the topology.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import numpy as np
import pytest
import redis
from redis.crc import key_slot

from mmserve.api.common.v1 import embedding_pb2, media_pb2, tensor_pb2
from mmserve.config import Settings
from mmserve.errors import Conflict, InvalidArgument, Unavailable
from mmserve.localredis import LocalRedis, LocalRedisCluster, free_port
from mmserve.store import (
    EmbeddingStore,
    RawTensor,
    canonical_options_json,
    content_id,
    embedding_keys,
    validate_uuid,
)
from mmserve.store.connect import sync_client

IMAGE = media_pb2.MODALITY_IMAGE
VIDEO = media_pb2.MODALITY_VIDEO
F32 = tensor_pb2.DATA_TYPE_FLOAT32
BF16 = tensor_pb2.DATA_TYPE_BFLOAT16
I64 = tensor_pb2.DATA_TYPE_INT64
TTL = 3600


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def make_tensors(seed: int = 0, tokens: int = 4, hidden: int = 8) -> list[RawTensor]:
    """float32 embeddings, a bfloat16 deepstack feature (raw bytes) and an int64 grid."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((tokens, hidden)).astype("<f4")
    bf16 = (emb.view("<u4") >> 16).astype("<u2")  # bfloat16 = upper half of a float32
    grid = np.array([1, 2 * tokens, 2], dtype="<i8")
    return [
        RawTensor("embeddings", F32, (tokens, hidden), emb.tobytes()),
        RawTensor("deepstack.0", BF16, (tokens, hidden), bf16.tobytes()),
        RawTensor("grid", I64, (3,), grid.tobytes()),
    ]


def make_descriptor(
    *,
    uuid: str | None = None,
    content: bytes = b"a cat",
    fingerprint: str = "fp-model-a",
    modality: int = IMAGE,
    options: str = '{"max_pixels":1000}',
) -> embedding_pb2.EmbeddingDescriptor:
    d = embedding_pb2.EmbeddingDescriptor(
        modality=modality,  # type: ignore[arg-type]
        model="tiny-qwen",
        model_fingerprint=fingerprint,
        token_count=4,
        content_sha256=sha(content),
        options_json=options,
    )
    if modality == IMAGE:
        d.image.grid_thw.extend([1, 8, 2])
        d.image.spatial_merge_size = 2
    if uuid is None:
        d.id = content_id(
            modality=modality,
            content_sha256=d.content_sha256,
            model_fingerprint=fingerprint,
            dtype=F32,
            options_json=options,
        )
    else:
        d.id, d.client_uuid = uuid, True
    return d


@pytest.fixture(params=["single", "cluster"])
def redis_url(request: pytest.FixtureRequest, redis_server: LocalRedis) -> str:
    """An empty store: the session's redis-server, or the session's cluster."""
    from tests.conftest import flush_store

    if request.param == "cluster":
        cluster: LocalRedisCluster = request.getfixturevalue("redis_cluster")
        return flush_store(cluster.url)
    return flush_store(redis_server.url)


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client (a cluster client on the cluster) to look at what the store wrote."""
    client = sync_client(redis_url, timeout_s=5)
    yield client  # type: ignore[misc]
    client.close()


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[EmbeddingStore]:
    s = EmbeddingStore(redis_url, ttl_s=TTL)
    yield s
    await s.aclose()


def all_keys(client: redis.Redis | redis.RedisCluster) -> list[bytes]:
    """Every key of the server, or of every master of the cluster."""
    if isinstance(client, redis.RedisCluster):
        return list(client.keys("*", target_nodes=redis.RedisCluster.PRIMARIES))
    return list(client.keys("*"))


def assert_same_tensors(got: list[RawTensor], want: list[RawTensor]) -> None:
    assert [(t.name, t.dtype, t.shape) for t in got] == [(t.name, t.dtype, t.shape) for t in want]
    for g, w in zip(got, want, strict=True):
        assert bytes(g.data) == bytes(w.data)


# --- round trip -------------------------------------------------------------


async def test_round_trip_several_tensors_byte_for_byte(store: EmbeddingStore) -> None:
    tensors = make_tensors()
    d = make_descriptor()
    before = time.time()
    result = await store.put(d, tensors, tenant="default")
    assert result.created is True
    assert [(t.name, t.dtype, list(t.shape)) for t in d.tensors] == [
        ("embeddings", F32, [4, 8]),
        ("deepstack.0", BF16, [4, 8]),
        ("grid", I64, [3]),
    ]
    assert d.nbytes == 4 * 8 * 4 + 4 * 8 * 2 + 3 * 8
    assert before - 1 <= d.created_at.ToSeconds() <= time.time() + 1
    assert d.expires_at.ToSeconds() - d.created_at.ToSeconds() == pytest.approx(TTL, abs=1)

    got = await store.get(d.id, tenant="default")
    assert got is not None
    assert_same_tensors(got.tensors, tensors)
    assert got.tensor("deepstack.0").dtype == BF16
    g = got.descriptor
    assert (g.id, g.client_uuid, g.modality, g.model, g.model_fingerprint, g.token_count) == (
        d.id,
        False,
        IMAGE,
        "tiny-qwen",
        "fp-model-a",
        4,
    )
    assert g.content_sha256 == sha(b"a cat") and g.options_json == '{"max_pixels":1000}'
    assert list(g.image.grid_thw) == [1, 8, 2] and g.image.spatial_merge_size == 2
    assert list(g.tensors) == list(d.tensors) and g.nbytes == d.nbytes
    assert g.created_at == d.created_at
    assert g.expires_at.ToSeconds() == pytest.approx(d.expires_at.ToSeconds(), abs=2)

    meta_only = await store.get(d.id, tenant="default", with_tensors=False)
    assert meta_only is not None and meta_only.tensors == [] and meta_only.descriptor.nbytes == d.nbytes


async def test_single_tensor_and_memoryview_input(store: EmbeddingStore) -> None:
    arr = np.arange(12, dtype="<f4").reshape(3, 4)
    t = RawTensor("embeddings", F32, (3, 4), arr.data)  # a float-typed 2-D view becomes a flat byte view
    assert isinstance(t.data, memoryview) and t.data.format == "B" and t.nbytes == 48
    d = make_descriptor(uuid="single")
    await store.put(d, [t], tenant="default")
    got = await store.get("single", tenant="default")
    assert got is not None and bytes(got.tensors[0].data) == arr.tobytes()


# --- keys -------------------------------------------------------------------


async def test_keys_hash_tags_and_meta_fields(store: EmbeddingStore, raw: redis.Redis) -> None:
    tensors = make_tensors()
    by_content = make_descriptor()
    by_uuid = make_descriptor(uuid="user:img/1.png", content=b"a dog")
    await store.put(by_content, tensors, tenant="default")
    await store.put(by_uuid, tensors, tenant="acme")

    cid = by_content.id
    assert sorted(all_keys(raw)) == sorted(
        [
            f"mmserve:emb:v1:{{c:default:{cid}}}:data".encode(),
            f"mmserve:emb:v1:{{c:default:{cid}}}:meta".encode(),
            b"mmserve:emb:v1:{u:acme:user:img/1.png}:data",
            b"mmserve:emb:v1:{u:acme:user:img/1.png}:meta",
        ]
    )
    for ref, tenant in ((cid, "default"), ("user:img/1.png", "acme")):
        keys = embedding_keys(ref, tenant=tenant)
        assert key_slot(keys.data.encode()) == key_slot(keys.meta.encode())  # one cluster slot
        assert raw.type(keys.data) == b"string" and raw.type(keys.meta) == b"hash"
        assert raw.get(keys.data) == b"".join(bytes(t.data) for t in tensors)

    stored_hash = cast(dict[bytes, bytes], raw.hgetall(embedding_keys(cid, tenant="default").meta))
    meta = {k.decode(): v for k, v in stored_hash.items()}
    assert meta["dtype"] == b"float32"
    assert json.loads(meta["shape"]) == [4, 8]
    assert meta["modality"] == b"image"
    assert meta["fingerprint"] == b"fp-model-a"
    assert meta["token_count"] == b"4"
    assert int(meta["nbytes"]) == by_content.nbytes
    assert meta["data_checksum"].startswith(b"xxh3_64:") and meta["record_checksum"].startswith(b"sha256:")
    assert meta["created"].decode().endswith("Z")
    assert json.loads(meta["tensors"])[1] == ["deepstack.0", "bfloat16", [4, 8]]
    assert json.loads(meta["placement"])["image"]["spatial_merge_size"] == 2
    stored = embedding_pb2.EmbeddingDescriptor.FromString(meta["descriptor"])
    assert stored.id == cid and list(stored.tensors) == list(by_content.tensors)


def test_uuid_rules() -> None:
    for good in ("a", "x" * 128, "A-Z.a_z:0/9-", "mmemb", "MMEMB-upper"):
        assert validate_uuid(good, "uuid") == good
    for bad in ("", "x" * 129, "has space", "brace{", "new\nline", "mmemb-abc", "é"):
        with pytest.raises(InvalidArgument) as err:
            validate_uuid(bad, "messages[0].content[1].uuid")
        assert err.value.field == "messages[0].content[1].uuid"
    with pytest.raises(InvalidArgument) as err:
        embedding_keys("ok", tenant="a:b")  # ':' in a tenant would make slots ambiguous
    assert err.value.field == "tenant"
    # A reference that merely looks like a content id is a (refused) uuid, not a content id.
    with pytest.raises(InvalidArgument):
        embedding_keys("mmemb-" + "A" * 64, tenant="t")


async def test_put_refuses_malformed_ids(store: EmbeddingStore) -> None:
    d = make_descriptor(uuid="bad uuid")
    with pytest.raises(InvalidArgument) as err:
        await store.put(d, make_tensors(), tenant="t")
    assert err.value.field == "uuid"
    d = make_descriptor()
    d.id = "not-a-content-id"
    with pytest.raises(InvalidArgument) as err:
        await store.put(d, make_tensors(), tenant="t")
    assert err.value.field == "id"
    with pytest.raises(InvalidArgument):
        await store.put(make_descriptor(), [], tenant="t")


# --- identity ---------------------------------------------------------------


def cid(**changes: Any) -> str:
    """content_id of a fixed identity with some fields changed."""
    fields: dict[str, Any] = {
        "modality": IMAGE,
        "content_sha256": sha(b"x"),
        "model_fingerprint": "fp",
        "dtype": F32,
        "options_json": '{"a":1}',
    }
    return content_id(**(fields | changes))


def test_content_ids_are_deterministic_and_sensitive_to_every_field() -> None:
    first = cid()
    assert first == cid()
    assert first.startswith("mmemb-") and len(first) == 6 + 64
    variants: list[dict[str, Any]] = [
        {"modality": VIDEO},
        {"content_sha256": sha(b"y")},
        {"model_fingerprint": "fp2"},
        {"dtype": BF16},
        {"options_json": '{"a":2}'},
        {"options_json": "{}"},
    ]
    assert len({first} | {cid(**v) for v in variants}) == len(variants) + 1
    # Spelling of the options does not matter, their meaning does.
    assert cid(options_json='{ "a" : 1.0 }') == first
    assert cid(options_json="") == cid(options_json="{}")
    with pytest.raises(InvalidArgument) as err:
        cid(content_sha256="ABC")
    assert err.value.field == "content_sha256"
    with pytest.raises(InvalidArgument):
        cid(dtype=tensor_pb2.DATA_TYPE_UNSPECIFIED)
    with pytest.raises(InvalidArgument):
        cid(modality=media_pb2.MODALITY_UNSPECIFIED)
    with pytest.raises(InvalidArgument):
        cid(options_json="[1]")


def test_canonical_options_json() -> None:
    assert canonical_options_json({"b": {"y": 2.0, "x": 0.5}, "a": [1, 2.50], "c": None, "d": True}) == (
        '{"a":[1,2.5],"b":{"x":0.5,"y":2},"c":null,"d":true}'
    )
    assert canonical_options_json(None) == "{}"
    assert canonical_options_json({"fps": np.float32(2.0), "n": np.int64(3)}) == '{"fps":2,"n":3}'
    assert canonical_options_json({"s": "é"}) == '{"s":"\\u00e9"}'
    with pytest.raises(InvalidArgument):
        canonical_options_json({"x": float("nan")})


async def test_same_identity_twice_keeps_the_original(store: EmbeddingStore, raw: redis.Redis) -> None:
    first = make_descriptor(uuid="img-1")
    original = make_tensors(seed=1)
    await store.put(first, original, tenant="t")
    keys = embedding_keys("img-1", tenant="t")
    data_before = raw.get(keys.data)

    again = make_descriptor(uuid="img-1")
    result = await store.put(again, make_tensors(seed=2), tenant="t")  # e.g. a non-deterministic encoder
    assert result.created is False
    assert result.descriptor.created_at == first.created_at
    assert raw.get(keys.data) == data_before
    got = await store.get("img-1", tenant="t")
    assert got is not None
    assert_same_tensors(got.tensors, original)

    # Content ids behave alike.
    cid = make_descriptor()
    assert (await store.put(cid, original, tenant="t")).created is True
    assert (await store.put(make_descriptor(), original, tenant="t")).created is False


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"content": b"another picture"}, "other content"),
        ({"fingerprint": "fp-model-b"}, "another model"),
        ({"options": '{"max_pixels":2000}'}, "other processing options"),
        ({"modality": VIDEO}, "another modality"),
    ],
)
async def test_reused_uuid_with_another_identity_is_a_conflict(store: EmbeddingStore, change: dict[str, object], words: str) -> None:
    original = make_tensors(seed=1)
    await store.put(make_descriptor(uuid="shared-id"), original, tenant="t")
    with pytest.raises(Conflict) as err:
        await store.put(make_descriptor(uuid="shared-id", **change), make_tensors(seed=3), tenant="t")  # type: ignore[arg-type]
    assert err.value.field == "uuid"
    assert words in err.value.message and "shared-id" in err.value.message
    got = await store.get("shared-id", tenant="t")
    assert got is not None and got.descriptor.model_fingerprint == "fp-model-a"
    assert got.descriptor.content_sha256 == sha(b"a cat")
    assert_same_tensors(got.tensors, original)


async def test_no_staged_upload_outlives_a_put(store: EmbeddingStore, raw: redis.Redis) -> None:
    """Created, kept or refused: the staging key (`:put:<token>`) is renamed into place or dropped at once."""
    await store.put(make_descriptor(uuid="staged"), make_tensors(seed=1), tenant="t")
    await store.put(make_descriptor(uuid="staged"), make_tensors(seed=1), tenant="t")
    with pytest.raises(Conflict):
        await store.put(make_descriptor(uuid="staged", content=b"other"), make_tensors(seed=2), tenant="t")
    keys = embedding_keys("staged", tenant="t")
    assert sorted(all_keys(raw)) == sorted([keys.data.encode(), keys.meta.encode()])


async def test_put_and_get_survive_an_emptied_script_cache(store: EmbeddingStore, raw: redis.Redis) -> None:
    """The place and touch scripts go by SHA1 (EVALSHA); after SCRIPT FLUSH (or a restart) both fall back to the body."""
    tensors = make_tensors(seed=3)

    def flush() -> None:
        if isinstance(raw, redis.RedisCluster):
            raw.execute_command("SCRIPT FLUSH", target_nodes=redis.RedisCluster.PRIMARIES)
        else:
            raw.script_flush()

    flush()
    put = await store.put(make_descriptor(uuid="flushed"), tensors, tenant="t")
    assert put.created
    flush()
    got = await store.get("flushed", tenant="t")
    assert got is not None
    assert_same_tensors(got.tensors, tensors)
    keys = embedding_keys("flushed", tenant="t")
    assert sorted(all_keys(raw)) == sorted([keys.data.encode(), keys.meta.encode()])  # no upload left behind


async def test_same_uuid_in_two_tenants_is_two_embeddings(store: EmbeddingStore) -> None:
    a, b = make_tensors(seed=1), make_tensors(seed=2)
    assert (await store.put(make_descriptor(uuid="u1", content=b"A"), a, tenant="alice")).created
    assert (await store.put(make_descriptor(uuid="u1", content=b"B", fingerprint="fp-b"), b, tenant="bob")).created
    got_a = await store.get("u1", tenant="alice")
    got_b = await store.get("u1", tenant="bob")
    assert got_a is not None and got_b is not None
    assert_same_tensors(got_a.tensors, a)
    assert_same_tensors(got_b.tensors, b)
    assert got_a.descriptor.content_sha256 == sha(b"A") and got_b.descriptor.content_sha256 == sha(b"B")
    assert await store.get("u1", tenant="carol") is None
    assert await store.delete("u1", tenant="alice")
    assert await store.get("u1", tenant="bob") is not None


async def test_content_ids_are_scoped_to_their_tenant(store: EmbeddingStore) -> None:
    """Same media in two tenants: one id string, two records; neither tenant sees, probes or deletes the other's."""
    d = make_descriptor()
    assert (await store.put(d, make_tensors(seed=1), tenant="alice")).created
    for probe in (store.get(d.id, tenant="bob"), store.get(d.id, tenant="bob", with_tensors=False)):
        assert await probe is None
    assert not await store.exists(d.id, tenant="bob")
    assert (await store.get_many([d.id], tenant="bob")) == {d.id: None}
    assert await store.delete(d.id, tenant="bob") is False
    assert await store.get(d.id, tenant="alice") is not None
    again = make_descriptor()
    assert again.id == d.id
    assert (await store.put(again, make_tensors(seed=1), tenant="bob")).created  # bob's own record, not "already stored"
    assert await store.delete(d.id, tenant="bob")
    assert await store.get(d.id, tenant="alice") is not None


# --- lifetime ---------------------------------------------------------------


async def test_ttl_is_set_on_both_keys(store: EmbeddingStore, raw: redis.Redis) -> None:
    d = make_descriptor(uuid="ttl")
    await store.put(d, make_tensors(), tenant="t")
    keys = embedding_keys("ttl", tenant="t")
    data_ms, meta_ms = raw.pttl(keys.data), raw.pttl(keys.meta)
    assert TTL * 1000 - 5000 < data_ms <= TTL * 1000
    assert TTL * 1000 - 5000 < meta_ms <= TTL * 1000
    assert abs(data_ms - meta_ms) < 1000


async def test_ttl_zero_means_no_expiry(redis_url: str, raw: redis.Redis) -> None:
    async with EmbeddingStore(redis_url, ttl_s=0) as forever:
        d = make_descriptor(uuid="pinned")
        await forever.put(d, make_tensors(), tenant="t")
        assert not d.HasField("expires_at")
        keys = embedding_keys("pinned", tenant="t")
        assert raw.pttl(keys.data) == -1 and raw.pttl(keys.meta) == -1
        got = await forever.get("pinned", tenant="t")
        assert got is not None and not got.descriptor.HasField("expires_at")


async def test_repeated_put_extends_but_never_shortens_the_lifetime(store: EmbeddingStore, raw: redis.Redis) -> None:
    keys = embedding_keys("refresh", tenant="t")
    await store.put(make_descriptor(uuid="refresh"), make_tensors(), tenant="t", ttl_s=100)
    assert raw.pttl(keys.data) <= 100_000
    result = await store.put(make_descriptor(uuid="refresh"), make_tensors(), tenant="t")  # store TTL 3600 s
    assert result.created is False
    assert raw.pttl(keys.data) > 100_000 and raw.pttl(keys.meta) > 100_000
    assert result.descriptor.expires_at.ToSeconds() == pytest.approx(time.time() + TTL, abs=5)
    await store.put(make_descriptor(uuid="refresh"), make_tensors(), tenant="t", ttl_s=10)
    assert raw.pttl(keys.meta) > 100_000


async def test_one_second_ttl_really_expires(store: EmbeddingStore, raw: redis.Redis) -> None:
    await store.put(make_descriptor(uuid="brief"), make_tensors(), tenant="t", ttl_s=1)
    assert await store.exists("brief", tenant="t")
    await asyncio.sleep(1.3)
    assert await store.get("brief", tenant="t") is None
    assert not await store.exists("brief", tenant="t")
    assert all_keys(raw) == []


async def test_delete_removes_both_keys(store: EmbeddingStore, raw: redis.Redis) -> None:
    await store.put(make_descriptor(uuid="gone"), make_tensors(), tenant="t")
    assert await store.delete("gone", tenant="t") is True
    assert all_keys(raw) == []
    assert await store.delete("gone", tenant="t") is False
    assert await store.get("gone", tenant="t") is None


# --- reads ------------------------------------------------------------------


async def test_missing_ids_read_as_none(store: EmbeddingStore) -> None:
    assert await store.get("never-stored", tenant="t") is None
    assert await store.get("mmemb-" + "0" * 64, tenant="t") is None
    assert await store.get("never-stored", tenant="t", with_tensors=False) is None
    assert await store.exists("never-stored", tenant="t") is False


async def test_get_many_with_a_mix(store: EmbeddingStore) -> None:
    one, two = make_tensors(seed=1), make_tensors(seed=2, tokens=2)
    d1 = make_descriptor()
    await store.put(d1, one, tenant="t")
    await store.put(make_descriptor(uuid="two", content=b"two"), two, tenant="t")
    found = await store.get_many([d1.id, "missing", "two", d1.id], tenant="t")
    assert list(found) == [d1.id, "missing", "two"]
    assert found["missing"] is None
    assert found[d1.id] is not None and found["two"] is not None
    assert_same_tensors(found[d1.id].tensors, one)  # type: ignore[union-attr]
    assert_same_tensors(found["two"].tensors, two)  # type: ignore[union-attr]
    assert await store.get_many([], tenant="t") == {}


async def test_corrupted_data_is_treated_as_missing(store: EmbeddingStore, raw: redis.Redis) -> None:
    tensors = make_tensors()
    await store.put(make_descriptor(uuid="bitrot"), tensors, tenant="t")
    keys = embedding_keys("bitrot", tenant="t")
    good = raw.get(keys.data)
    assert isinstance(good, bytes)
    raw.set(keys.data, bytes([good[0] ^ 0xFF]) + good[1:], keepttl=True)  # same length, one byte flipped
    assert await store.get("bitrot", tenant="t") is None
    # The damaged pair is removed, so the next encode can store a good one again.
    assert all_keys(raw) == []
    assert (await store.put(make_descriptor(uuid="bitrot"), tensors, tenant="t")).created is True
    got = await store.get("bitrot", tenant="t")
    assert got is not None
    assert_same_tensors(got.tensors, tensors)

    raw.set(keys.data, good[:-1], keepttl=True)  # truncated
    assert await store.get("bitrot", tenant="t") is None


async def test_half_evicted_embedding_is_replaced_by_a_new_put(store: EmbeddingStore, raw: redis.Redis) -> None:
    await store.put(make_descriptor(uuid="evicted"), make_tensors(seed=1), tenant="t")
    raw.delete(embedding_keys("evicted", tenant="t").data)  # what allkeys-lru may do to the big key
    assert await store.get("evicted", tenant="t") is None
    assert not await store.exists("evicted", tenant="t")
    fresh = make_tensors(seed=2)
    assert (await store.put(make_descriptor(uuid="evicted", content=b"new"), fresh, tenant="t")).created is True
    got = await store.get("evicted", tenant="t")
    assert got is not None and got.descriptor.content_sha256 == sha(b"new")
    assert_same_tensors(got.tensors, fresh)


# --- concurrency ------------------------------------------------------------


async def test_concurrent_puts_of_one_uuid_have_exactly_one_winner(store: EmbeddingStore) -> None:
    n = 24
    contents = [f"content-{i}".encode() for i in range(n)]
    results = await asyncio.gather(
        *(store.put(make_descriptor(uuid="race", content=c), make_tensors(seed=i), tenant="t") for i, c in enumerate(contents)),
        return_exceptions=True,
    )
    winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for i, r in enumerate(results) if i != winners[0]), results
    assert results[winners[0]].created is True  # type: ignore[union-attr]
    got = await store.get("race", tenant="t")
    assert got is not None and got.descriptor.content_sha256 == sha(contents[winners[0]])
    assert_same_tensors(got.tensors, make_tensors(seed=winners[0]))


async def test_concurrent_puts_of_one_identity_create_once(store: EmbeddingStore) -> None:
    results = await asyncio.gather(*(store.put(make_descriptor(), make_tensors(), tenant="t") for _ in range(16)))
    assert sorted(r.created for r in results) == [False] * 15 + [True]
    assert len({r.descriptor.created_at.ToNanoseconds() for r in results}) == 1


# --- outages ----------------------------------------------------------------


async def test_redis_outage_is_unavailable_quickly_and_the_store_recovers(own_redis: LocalRedis) -> None:
    async with EmbeddingStore(own_redis.url, ttl_s=TTL) as s:
        await s.ping()
        await s.put(make_descriptor(uuid="before"), make_tensors(), tenant="t")
        own_redis.stop()
        for call in (
            lambda: s.get("before", tenant="t"),
            lambda: s.put(make_descriptor(uuid="during"), make_tensors(), tenant="t"),
            lambda: s.get_many(["before", "x"], tenant="t"),
            lambda: s.exists("before", tenant="t"),
            lambda: s.delete("before", tenant="t"),
            s.ping,
        ):
            started = time.monotonic()
            with pytest.raises(Unavailable) as err:
                await call()
            assert time.monotonic() - started < 3.0
            assert "embedding store unavailable" in err.value.message
            assert "redis://" not in err.value.message and str(own_redis.port) not in err.value.message

        own_redis.start()  # same port, empty (no persistence)
        await s.ping()
        assert await s.get("before", tenant="t") is None
        assert (await s.put(make_descriptor(uuid="after"), make_tensors(), tenant="t")).created is True
        assert await s.get("after", tenant="t") is not None


async def test_unreachable_redis_message_hides_credentials() -> None:
    port = free_port()  # nothing listens there
    async with EmbeddingStore(f"redis://user:s3cret-pw@127.0.0.1:{port}/0", ttl_s=TTL) as s:
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await s.get("x", tenant="t")
        assert time.monotonic() - started < 3.0
        assert "s3cret" not in str(err.value) and "s3cret" not in repr(err.value.metadata)


def test_from_settings_uses_url_and_ttl(redis_url: str) -> None:
    s = EmbeddingStore.from_settings(Settings(redis_url=redis_url, embedding_ttl_s=42))
    assert s.ttl_s == 42


# --- tensors and imports ----------------------------------------------------


def test_raw_tensor_validation_and_proto_round_trip() -> None:
    t = make_tensors()[1]
    back = RawTensor.from_proto(t.to_proto())
    assert (back.name, back.dtype, back.shape, bytes(back.data)) == (t.name, t.dtype, t.shape, bytes(t.data))
    assert t.info() == tensor_pb2.TensorInfo(name="deepstack.0", dtype=BF16, shape=[4, 8])
    with pytest.raises(InvalidArgument) as err:
        RawTensor("x", F32, (2, 3), b"\0" * 23)
    assert err.value.field == "data" and "24" in err.value.message
    with pytest.raises(InvalidArgument):
        RawTensor("x", tensor_pb2.DATA_TYPE_UNSPECIFIED, (1,), b"\0")
    with pytest.raises(InvalidArgument):
        RawTensor("x", F32, (-1,), b"")
    assert RawTensor("empty", F32, (0, 8), b"").nbytes == 0


def test_store_imports_neither_torch_nor_numpy() -> None:
    code = "import sys, mmserve.store; bad = [m for m in ('torch', 'numpy') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
