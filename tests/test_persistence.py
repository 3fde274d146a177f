"""Nothing lost on restart: `mmserve up`'s Redis appends every write to a file in its data dir.

Precomputed embeddings are user data ("precompute now, reference later"), so
the private redis-server of `mmserve up` runs with an append-only file,
fsynced every second, in a data dir (default `<cache dir>/redis`). Tested
with the server `mmserve up` starts (`mmserve.stack.local_redis`): store,
SIGTERM the redis-server we started, start it again on the same folder, read
back bit for bit; then the real `mmserve up`, stopped and started again.
Memory only (MMSERVE_REDIS_PERSIST=false) really keeps nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.config import Settings
from mmserve.localredis import LocalRedis
from mmserve.rpc.auth import SERVICE_TOKEN_KEY
from mmserve.stack import local_redis
from mmserve.store import EmbeddingStore, RawTensor, StoredEmbedding
from tests.conftest import TINY
from tests.support import encoder_stub, image_item, png_bytes
from tests.test_stack_up import children, launch_up, wait_up
from tests.test_store import F32, assert_same_tensors, make_descriptor, make_tensors

pytestmark = pytest.mark.slow  # redis-server restarts and `mmserve up` restarts

TTL = 3600


def big_tensors() -> list[RawTensor]:
    """The test_store tensors plus 4 MiB of float32 (above the store's worker-thread threshold)."""
    big = np.random.default_rng(7).standard_normal((1024, 1024)).astype("<f4")
    return [*make_tensors(), RawTensor("big", F32, big.shape, big.tobytes())]


async def put_and_get(url: str, uuid: str, tensors: list[RawTensor]) -> StoredEmbedding | None:
    async with EmbeddingStore(url, ttl_s=TTL) as store:
        await store.put(make_descriptor(uuid=uuid), tensors, tenant="t")
        return await store.get(uuid, tenant="t")


async def get(url: str, uuid: str) -> StoredEmbedding | None:
    async with EmbeddingStore(url, ttl_s=TTL) as store:
        return await store.get(uuid, tenant="t")


def sigterm(server: LocalRedis) -> int:
    """SIGTERM the redis-server this test started (by its pid) and wait for it: its exit code."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGTERM)
    code = server.proc.wait(30)
    server.stop()  # releases the data dir's lock
    return code


def test_an_embedding_survives_a_redis_restart_bit_exact(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    server = local_redis(settings).start()
    try:
        assert server.data_dir == tmp_path / "redis"
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.close()
        tensors = big_tensors()
        before = asyncio.run(put_and_get(server.url, "kept", tensors))
        assert before is not None
        assert sigterm(server) == 0  # right after the write: a SIGTERM flushes the file first
    finally:
        server.stop()
    assert any((tmp_path / "redis").rglob("*.aof"))

    again = local_redis(settings).start()
    try:
        after = asyncio.run(get(again.url, "kept"))
        assert after is not None
        assert_same_tensors(after.tensors, tensors)
        old, new = before.descriptor, after.descriptor
        old.ClearField("expires_at")
        new_expiry = new.expires_at.ToSeconds()
        new.ClearField("expires_at")
        assert new == old
        assert 0 < new_expiry - new.created_at.ToSeconds() <= TTL + 1  # the lifetime survived too
    finally:
        again.stop()


def test_memory_only_keeps_nothing(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, redis_persist=False)
    assert settings.local_redis_dir() is None
    server = local_redis(settings).start()
    try:
        assert asyncio.run(put_and_get(server.url, "lost", make_tensors())) is not None
        assert sigterm(server) == 0
        server.start()  # same port, nothing on disk
        assert asyncio.run(get(server.url, "lost")) is None
    finally:
        server.stop()
    assert not (tmp_path / "redis").exists()


def test_one_data_dir_serves_one_redis_at_a_time(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, redis_data_dir=tmp_path / "data")
    with local_redis(settings) as first:
        assert first.data_dir == tmp_path / "data"
        with pytest.raises(RuntimeError, match="another redis-server keeps its data in"):
            local_redis(settings).start()
    with local_redis(settings):  # free again once the first stopped
        pass


def stop_up(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def test_mmserve_up_keeps_precomputed_embeddings_across_a_restart(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Precompute through the real `mmserve up`, stop it, start it again: the embedding is still there, bit for bit."""
    data = tmp_path / "redis"
    env = {"MMSERVE_MODEL": f"tiny:{TINY}", "MMSERVE_REDIS_DATA_DIR": str(data), "MMSERVE_SERVICE_TOKEN": "persistence-test"}
    token = ((SERVICE_TOKEN_KEY, "persistence-test"),)
    image = png_bytes(seed=1401)
    with launch_up(**env) as up:
        wait_up(up)
        redis_cmd = next(cmd for cmd in children(up.proc.pid).values() if "redis-server" in cmd)  # "redis-server host:port"
        client = redis.Redis(port=int(redis_cmd.rsplit(":", 1)[1]))
        config = {**client.config_get("appendonly"), **client.config_get("appendfsync"), **client.config_get("dir")}
        client.close()
        assert config == {"appendonly": "yes", "appendfsync": "everysec", "dir": str(data)}
        with encoder_stub(f"127.0.0.1:{up.ports['encoder']}") as stub:
            stored = stub.Encode(enc_pb.EncodeRequest(items=[image_item(image, uuid="kept-up")]), metadata=token).results[0]
            first = stub.GetEmbedding(enc_pb.GetEmbeddingRequest(id="kept-up", include_tensors=True), metadata=token)
        assert not stored.cached
        stop_up(up.proc)

    with launch_up(**env) as up:
        wait_up(up)
        with encoder_stub(f"127.0.0.1:{up.ports['encoder']}") as stub:
            second = stub.GetEmbedding(enc_pb.GetEmbeddingRequest(id="kept-up", include_tensors=True), metadata=token)
            assert stub.Encode(enc_pb.EncodeRequest(items=[image_item(image, uuid="kept-up")]), metadata=token).results[0].cached
        assert [t.SerializeToString() for t in second.tensors] == [t.SerializeToString() for t in first.tensors]
        assert second.embedding.created_at == first.embedding.created_at and second.embedding.id == "kept-up"
        body = {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "kept-up"}]}],
            "max_completion_tokens": 4, "temperature": 0,
        }  # fmt: skip
        reply = httpx.post(f"http://127.0.0.1:{up.ports['gateway']}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        stop_up(up.proc)
