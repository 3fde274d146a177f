"""Shared fixtures: a real redis-server per test session, settings for tests.

Every test talks to real components. Redis is a private `redis-server` on a
free port (never the machine's shared one), flushed before each test that asks
for `redis_url`; tests that stop Redis on purpose get their own instance.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mmserve.config import Settings
from mmserve.localredis import LocalRedis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: LocalRedis) -> str:
    """URL of the session's redis-server, emptied for this test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A redis-server only this test uses (to stop and restart it)."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings pointing at the test Redis, with loopback fetches allowed for local HTTP servers."""
    return Settings(redis_url=redis_url, fetch_allow_loopback=True, cache_dir=_cache_dir())


def _cache_dir():  # noqa: ANN202 - tiny helper
    from pathlib import Path

    return Path.home() / ".cache" / "mmserve"
