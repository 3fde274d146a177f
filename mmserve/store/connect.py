"""One place that turns `MMSERVE_REDIS_URL` into a redis-py client: single node, Cluster or Sentinel.

The URL picks the topology, so every process (encoder, decoder, the store-size
metric) agrees on it without another setting:

- `redis://[user:pass@]host:port/db`, `rediss://...` (TLS), `unix:///path`:
  one server (redis-py's own URL forms);
- `redis+cluster://[user:pass@]host:port[,host:port...]` (`rediss+cluster://`
  for TLS): a Redis Cluster through redis-py's cluster client, which follows
  MOVED/ASK redirects and retries CLUSTERDOWN/TRYAGAIN itself; the listed
  nodes are only where it starts (it discovers the rest), db must be 0;
- `redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/db]`: the
  current master of `<service>` as the Sentinels report it (credentials are
  the master's; the Sentinels are asked without).

Query options (`?socket_timeout=2`, ...) are parsed by redis-py for every form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.sentinel
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import ExponentialWithJitterBackoff

Topology = Literal["single", "cluster", "sentinel"]
AsyncClient = aioredis.Redis | AsyncRedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL: its topology, the hosts it names, and redis-py's keyword options."""

    topology: Topology
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""  # Sentinel: the monitored master's name
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """Where the store is, for logs and messages: hosts only, never credentials."""
        if self.topology == "single":
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return f"unix:{parts.path}"
            return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"cluster {hosts}" if self.topology == "cluster" else f"sentinel {hosts} service {self.service}"


def _split_hosts(netloc: str) -> tuple[str, list[tuple[str, int]]]:
    """`user:pass@h1:p1,h2:p2` -> ("user:pass@", [(h1, p1), (h2, p2)]); IPv6 in brackets."""
    auth, _, hosts = netloc.rpartition("@")
    nodes = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"store URL host {item!r} must be host:port")
        nodes.append((host.strip("[]"), int(port)))
    return (auth + "@" if auth else ""), nodes


def parse_store_url(url: str) -> StoreUrl:
    """Parse any accepted form (module docstring); ValueError, without the credentials, when malformed."""
    scheme = url.partition("://")[0]
    plain = CLUSTER_SCHEMES.get(scheme) or SENTINEL_SCHEMES.get(scheme)
    if plain is None:
        try:
            options = dict(parse_url(url))
        except ValueError as exc:
            raise ValueError(f"{exc}; or redis+cluster:// or redis+sentinel://") from None
        return StoreUrl("single", url, options=options)
    parts = urlsplit(url)
    auth, nodes = _split_hosts(parts.netloc)
    path = [p for p in parts.path.split("/") if p]
    service = ""
    if scheme in SENTINEL_SCHEMES:
        if not path:
            raise ValueError("a redis+sentinel:// URL needs the master's service name: redis+sentinel://host:port/<name>")
        service = path.pop(0)
    query = f"?{parts.query}" if parts.query else ""
    first = f"{nodes[0][0]}:{nodes[0][1]}" if ":" not in nodes[0][0] else f"[{nodes[0][0]}]:{nodes[0][1]}"
    options = dict(parse_url(f"{plain}://{auth}{first}/{'/'.join(path)}{query}"))
    options.pop("host", None)
    options.pop("port", None)
    if options.pop("connection_class", None) is AsyncSSLConnection:
        options["ssl"] = True
    if scheme in CLUSTER_SCHEMES and options.pop("db", 0):
        raise ValueError("Redis Cluster has only database 0: drop the /<db> from the redis+cluster:// URL")
    return StoreUrl("cluster" if scheme in CLUSTER_SCHEMES else "sentinel", url, tuple(nodes), service, options)


def async_client(url: str, *, connect_timeout_s: float, socket_timeout_s: float, retries: int, max_connections: int) -> AsyncClient:
    """An asyncio client for the URL, with a bounded pool and bounded, jittered retries."""
    parsed = parse_store_url(url)
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout_s,
        "socket_timeout": socket_timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
        "decode_responses": False,
    }
    if parsed.topology == "cluster":
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in parsed.nodes],
            max_connections=max_connections,
            **(common | parsed.options),
        )
    if parsed.topology == "sentinel":
        sentinel = AsyncSentinel(
            list(parsed.nodes),
            sentinel_kwargs={"socket_connect_timeout": connect_timeout_s, "socket_timeout": socket_timeout_s},
            **(common | parsed.options),  # `ssl` reaches the master's pool, which picks the TLS connection
        )
        return sentinel.master_for(parsed.service, max_connections=max_connections)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout_s,
        **common,  # timeout: wait for a pooled connection
    )
    return aioredis.Redis.from_pool(pool)


def sync_client(url: str, *, timeout_s: float) -> redis.Redis | redis.RedisCluster:
    """A blocking client for the URL (the scrape-time store-size metric); a Sentinel URL's master."""
    parsed = parse_store_url(url)
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if parsed.topology == "cluster":
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in parsed.nodes]
        return redis.RedisCluster(startup_nodes=nodes, **(timeouts | parsed.options))
    if parsed.topology == "sentinel":
        sentinel = redis.sentinel.Sentinel(list(parsed.nodes), sentinel_kwargs=timeouts, **(timeouts | parsed.options))
        return sentinel.master_for(parsed.service)
    return redis.Redis.from_url(url, **timeouts)
