"""The store's size as a Prometheus metric, `mmserve_store_bytes`: Redis memory in use, read at scrape time.

Here rather than in mmserve/metrics.py so that the metric names stay free of
store internals (the Redis client, cluster topology); the encoder registers it.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mmserve.store.connect import sync_client

_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


class StoreBytes(Collector):
    """`mmserve_store_bytes`: Redis used_memory, summed over a cluster's masters."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._client: redis.Redis | redis.RedisCluster | None = None  # at first scrape: a cluster client dials at once

    def _used(self) -> float:
        if self._client is None:
            self._client = sync_client(self._url, timeout_s=0.5)
        if isinstance(self._client, redis.RedisCluster):
            replies = self._client.info("memory", target_nodes=redis.RedisCluster.PRIMARIES)
            return float(sum(reply["used_memory"] for reply in replies.values()))
        return float(self._client.info("memory")["used_memory"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            used = self._used()
        except _ERRORS:
            return  # store down: no sample rather than a wrong one
        yield GaugeMetricFamily("mmserve_store_bytes", "Bytes of memory used by the embedding store (Redis used_memory).", value=used)


_registered: StoreBytes | None = None


def register_store_size(redis_url: str) -> None:
    """Expose the store's size from this process (the encoder does; a later call, as from a second in-process encoder, replaces the first)."""
    global _registered
    if _registered is not None:
        REGISTRY.unregister(_registered)
    _registered = StoreBytes(redis_url)
    REGISTRY.register(_registered)
