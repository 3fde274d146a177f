"""Issue 14, items 3 and 5: one model run per content across encoder replicas, and the decoder's embedding cache.

3. Two encoder processes on one Redis get the same fresh content at the same time: the
   first takes the content's lease (SET NX PX under its hash tag) and runs the model, the
   other waits for its record. Both /metrics together count one item through the tower.
5. Many chats referencing one stored image by uuid: the decoder reads the tensor data from
   Redis once (INFO commandstats of this test's own redis-server: one GET), later chats
   only check the record's seal; a DELETE is seen by the very next chat (404).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
import redis

from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.localredis import LocalRedis
from tests.conftest import Stack, StartService, start_stack
from tests.support import data_url, encoder_stub, image_item, png_bytes, scrape


@pytest.fixture(scope="module")
def stack_own(start_service: StartService, module_redis: LocalRedis) -> Iterator[Stack]:
    stack = start_stack(start_service, module_redis.url)
    yield stack
    stack.stop()


def _model_runs(*metrics_urls: str) -> float:
    return sum(v for url in metrics_urls for k, v in scrape(url).items() if k.startswith("mmserve_encoder_items_encoded_total"))


def test_same_content_on_two_encoders_runs_the_model_once(stack_own: Stack, start_service: StartService) -> None:
    first = stack_own.encoder
    second = start_service("encoder", redis_url=stack_own.redis_url)
    urls = (first.metrics_url, second.metrics_url)
    for seed in (1401, 1402, 1403):
        before = _model_runs(*urls)
        png = png_bytes(seed=seed)
        barrier = threading.Barrier(2)
        ids: list[str] = []

        def call(target: str, png: bytes = png, barrier: threading.Barrier = barrier, ids: list[str] = ids) -> None:
            with encoder_stub(target) as stub:
                barrier.wait()
                reply = stub.Encode(enc_pb.EncodeRequest(items=[image_item(png)]), timeout=60)
                ids.append(reply.results[0].embedding.id)

        threads = [threading.Thread(target=call, args=(s.target,)) for s in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert len(ids) == 2 and ids[0] == ids[1] and ids[0].startswith("mmemb-")
        assert _model_runs(*urls) - before == 1, f"seed {seed}: the model ran more than once"
    client = redis.Redis.from_url(stack_own.redis_url)
    assert not [k for k in client.keys("*:lease")], "leases are released once stored"
    client.close()


def _chat(stack: Stack, uuid: str) -> httpx.Response:
    body = {
        "model": "mmserve-tiny-random", "max_tokens": 2,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": None, "uuid": uuid}]}],
    }  # fmt: skip
    return httpx.post(f"{stack.gateway.base_url}/chat/completions", json=body, timeout=120)


def _gets(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_hot_image_is_read_from_redis_once_and_delete_is_seen(stack_own: Stack) -> None:
    base = stack_own.gateway.base_url
    body = {"content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=1501))}, "uuid": "hot-1501"}]}
    assert httpx.post(f"{base}/mm/encode", json=body, timeout=60).status_code == 200
    client = redis.Redis.from_url(stack_own.redis_url)
    client.config_resetstat()
    hits = "mmserve_decoder_cache_hits_total"
    hits_before = scrape(stack_own.decoder.metrics_url).get(hits, 0)
    for _ in range(6):
        reply = _chat(stack_own, "hot-1501")
        assert reply.status_code == 200, reply.text
    assert _gets(client) == 1, "the tensor data is read from Redis once per decoder"
    assert scrape(stack_own.decoder.metrics_url)[hits] - hits_before == 5
    assert httpx.delete(f"{base}/mm/embeddings/hot-1501", timeout=30).json()["deleted"] is True
    gone = _chat(stack_own, "hot-1501")
    assert gone.status_code == 404 and "hot-1501" in gone.text
    client.close()
