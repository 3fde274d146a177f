"""What only a Redis Cluster can show: URL forms, slots across masters, MOVED, CLUSTERDOWN, health, chat by uuid; and Sentinel.

The store's general semantics run on the cluster in tests/test_store.py
(parametrized); here a real 3-master cluster (`LocalRedisCluster`) has a slot
moved under a running store, loses a master, and serves a whole stack.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import redis
from redis.crc import key_slot

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.errors import Conflict, Unavailable
from mmserve.localredis import LocalRedis, LocalRedisCluster, free_port
from mmserve.rpc.health import check
from mmserve.rpc.server import LIVENESS_SERVICE
from mmserve.store import EmbeddingStore, embedding_keys
from mmserve.store.connect import parse_store_url, sync_client
from tests.conftest import Stack, StartService, flush_store, start_stack
from tests.support import encoder_stub, png_bytes
from tests.test_store import assert_same_tensors, make_descriptor, make_tensors

TTL = 3600
IMAGE = media_pb2.MODALITY_IMAGE


def test_url_forms() -> None:
    cluster = parse_store_url("redis+cluster://u:s3cret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002?socket_timeout=2")
    assert cluster.topology == "cluster"
    assert cluster.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert cluster.options["username"] == "u" and cluster.options["password"] == "s3cret"
    assert cluster.options["socket_timeout"] == 2.0 and "s3cret" not in cluster.location
    assert parse_store_url("rediss+cluster://h:1").options["ssl"] is True
    sentinel = parse_store_url("redis+sentinel://s1:26379,s2:26379/mymaster/2")
    assert (sentinel.topology, sentinel.service, sentinel.options["db"]) == ("sentinel", "mymaster", 2)
    assert parse_store_url("redis://h:6380/3").topology == "single"
    for bad in ("redis+cluster://h:1/3", "redis+cluster://h", "redis+sentinel://h:1", "http://h:1"):
        with pytest.raises(ValueError):
            parse_store_url(bad)


def test_a_records_keys_and_its_upload_share_one_slot() -> None:
    for ref, tenant in (("mmemb-" + "a" * 64, "t"), ("user:img/1.png", "acme")):
        keys = embedding_keys(ref, tenant=tenant)
        slots = {key_slot(k.encode()) for k in (keys.data, keys.meta, keys.upload("0123456789abcdef"))}
        assert len(slots) == 1


async def test_records_spread_over_every_master_and_read_back(redis_cluster: LocalRedisCluster) -> None:
    flush_store(redis_cluster.url)
    async with EmbeddingStore(redis_cluster.url, ttl_s=TTL) as store:
        assert store.is_cluster
        for i in range(24):
            await store.put(make_descriptor(uuid=f"spread-{i}", content=f"c{i}".encode()), make_tensors(seed=i), tenant="t")
        found = await store.get_many([f"spread-{i}" for i in range(24)], tenant="t")
        for i in range(24):
            assert_same_tensors(found[f"spread-{i}"].tensors, make_tensors(seed=i))  # type: ignore[union-attr]
    per_node = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
    assert all(count > 0 for count in per_node), per_node  # every master holds some records


def _node_id(port: int) -> str:
    return str(redis.Redis(port=port).execute_command("CLUSTER", "MYID"), "ascii")


async def test_a_slot_moved_under_a_running_store_is_followed(redis_cluster: LocalRedisCluster) -> None:
    """MOVED is the client's business: after a slot migrates, reads and writes of its records just work."""
    flush_store(redis_cluster.url)
    keys = embedding_keys("mover", tenant="t")
    slot = key_slot(keys.meta.encode())
    async with EmbeddingStore(redis_cluster.url, ttl_s=TTL) as store:
        await store.put(make_descriptor(uuid="mover"), make_tensors(seed=1), tenant="t")
        client = sync_client(redis_cluster.url, timeout_s=5)
        source = client.get_node_from_key(keys.meta)  # type: ignore[union-attr]
        target = next(n for n in redis_cluster.nodes if n.port != source.port)
        src, dst = redis.Redis(port=source.port), redis.Redis(port=target.port)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", _node_id(source.port))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", _node_id(target.port))
        moving = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving)
        for node in redis_cluster.nodes:
            redis.Redis(port=node.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", _node_id(target.port))
        client.close()
        got = await store.get("mover", tenant="t")  # the store's client still thinks `source` owns the slot
        assert got is not None
        assert_same_tensors(got.tensors, make_tensors(seed=1))
        assert (await store.put(make_descriptor(uuid="mover"), make_tensors(seed=1), tenant="t")).created is False
        assert await store.delete("mover", tenant="t")
        assert (await store.put(make_descriptor(uuid="mover"), make_tensors(seed=2), tenant="t")).created is True
        assert dst.exists(keys.meta, keys.data) == 2


@pytest.fixture
def own_cluster() -> Iterator[LocalRedisCluster]:
    """A cluster only this test uses (it loses a master)."""
    with LocalRedisCluster() as cluster:
        yield cluster


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not {what} within {timeout}s")


@pytest.mark.slow  # its own Redis Cluster, a master stopped and restarted
async def test_a_lost_master_is_unavailable_never_internal_and_the_store_recovers(own_cluster: LocalRedisCluster) -> None:
    async with EmbeddingStore(own_cluster.url, ttl_s=TTL, op_timeout_s=5) as store:
        await store.probe()
        await store.put(make_descriptor(uuid="before"), make_tensors(), tenant="t")
        lost = own_cluster.nodes[0]
        lost.stop()
        survivor = redis.Redis(port=own_cluster.nodes[1].port)
        _wait(lambda: b"cluster_state:fail" in survivor.execute_command("CLUSTER", "INFO"), 20, "CLUSTERDOWN")
        with pytest.raises(Unavailable) as err:
            await store.probe()
        assert "embedding store unavailable" in err.value.message
        for i in range(6):  # keys on the lost master and on the survivors: all UNAVAILABLE
            with pytest.raises(Unavailable):
                await store.put(make_descriptor(uuid=f"during-{i}"), make_tensors(), tenant="t")
            with pytest.raises(Unavailable):
                await store.get(f"during-{i}", tenant="t")
        lost.start()  # same port and nodes.conf: it rejoins
        _wait(lambda: b"cluster_state:ok" in survivor.execute_command("CLUSTER", "INFO"), 30, "ok again")
        deadline = time.monotonic() + 20
        while True:
            try:
                await store.probe()
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert (await store.put(make_descriptor(uuid="after"), make_tensors(), tenant="t")).created is True
        assert await store.get("after", tenant="t") is not None


@pytest.fixture
def sentinel_url(own_redis: LocalRedis) -> Iterator[str]:
    """A real Sentinel (redis-server --sentinel) monitoring a private master as service `mm`."""
    port = free_port()
    conf = own_redis.workdir / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\nsentinel monitor mm 127.0.0.1 {own_redis.port} 1\n")
    exe = shutil.which("redis-server")
    assert exe is not None
    proc = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: redis.Redis(port=port).ping(), 10, "a sentinel answering")
        yield f"redis+sentinel://127.0.0.1:{port}/mm/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow  # a redis-sentinel process
async def test_the_store_through_sentinel(sentinel_url: str, own_redis: LocalRedis) -> None:
    async with EmbeddingStore(sentinel_url, ttl_s=TTL) as store:
        await store.probe()
        assert (await store.put(make_descriptor(uuid="via-sentinel"), make_tensors(seed=1), tenant="t")).created
        with pytest.raises(Conflict):
            await store.put(make_descriptor(uuid="via-sentinel", content=b"other"), make_tensors(seed=2), tenant="t")
        got = await store.get("via-sentinel", tenant="t")
        assert got is not None
        assert_same_tensors(got.tensors, make_tensors(seed=1))
        assert redis.Redis(port=own_redis.port).exists(embedding_keys("via-sentinel", tenant="t").meta) == 1
        assert await store.delete("via-sentinel", tenant="t")


# --- a whole stack on the cluster -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_stack(start_service: StartService) -> Iterator[tuple[Stack, LocalRedisCluster]]:
    """Encoder, decoder and gateway on their own cluster, probing the store every second."""
    with LocalRedisCluster() as cluster:
        stack = start_stack(start_service, cluster.url, MMSERVE_STORE_HEALTH_INTERVAL_S="1")
        yield stack, cluster
        stack.stop()


def test_chat_by_uuid_on_the_cluster(cluster_stack: tuple[Stack, LocalRedisCluster]) -> None:
    """Encode ahead under uuids (records on several masters), then chat by uuid: same answer as inline."""
    stack, _ = cluster_stack
    image = png_bytes(seed=7)
    with encoder_stub(stack.encoder.target) as stub:
        for i in range(6):
            item = media_pb2.MediaInput(modality=IMAGE, source=media_pb2.MediaSource(data=image), uuid=f"cl-{i}")
            assert stub.Encode(pb.EncodeRequest(items=[item])).results[0].embedding.id == f"cl-{i}"
    client = stack.client()
    question = {"type": "text", "text": "What is in the picture?"}

    def ask(part: dict[str, Any]) -> str:
        reply = client.chat.completions.create(
            model="", messages=[{"role": "user", "content": [part, question]}], temperature=0, max_completion_tokens=8
        )
        return reply.choices[0].message.content or ""

    inline = ask({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}})
    for i in range(6):
        assert ask({"type": "image_url", "image_url": None, "uuid": f"cl-{i}"}) == inline
    err = None
    try:
        ask({"type": "image_url", "image_url": None, "uuid": "never-stored"})
    except Exception as exc:  # the SDK's NotFoundError
        err = exc
    assert err is not None and getattr(err, "status_code", None) == 404


def test_health_follows_the_cluster(cluster_stack: tuple[Stack, LocalRedisCluster]) -> None:
    """A lost master: encoder and decoder go NOT_SERVING (CLUSTERDOWN), and SERVING again once it is back."""
    stack, cluster = cluster_stack
    targets = (stack.encoder.target, stack.decoder.target)
    assert all(check(t) for t in targets)
    lost = cluster.nodes[2]
    lost.stop()
    try:
        _wait(lambda: not any(check(t) for t in targets), 30, "NOT_SERVING")
        assert all(check(t, LIVENESS_SERVICE) for t in targets)  # alive all along: a liveness probe restarts nothing
        refusals: list[grpc.RpcError] = []

        def encode_refused(seed: list[int] = [8]) -> bool:  # noqa: B006 - a fresh image per try
            seed[0] += 1
            item = media_pb2.MediaInput(modality=IMAGE, source=media_pb2.MediaSource(data=png_bytes(seed=seed[0])))
            with encoder_stub(stack.encoder.target) as stub:
                try:
                    stub.Encode(pb.EncodeRequest(items=[item]), timeout=30)
                except grpc.RpcError as exc:
                    refusals.append(exc)
                    return True
            return False  # each master decides CLUSTERDOWN for itself: the one holding this slot may not have yet

        _wait(encode_refused, 30, "Encode refused")
        assert refusals[-1].code() == grpc.StatusCode.UNAVAILABLE, refusals[-1].details()
        assert "store" in (refusals[-1].details() or "")
    finally:
        lost.start()
    _wait(lambda: all(check(t) for t in targets), 60, "SERVING again")
