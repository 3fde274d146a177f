"""The embedding store: stored embeddings in Redis, shared by every encoder and decoder.

Design points (docs/architecture.md, "The embedding store"):
- one Redis, a Redis Cluster or a Sentinel-managed master, chosen by the URL
  (`mmserve.store.connect`); all keys of an embedding share a hash tag, so
  every command below stays in one slot and works the same on a cluster;
- a put is one round trip: the data is SET under a short-lived staging key
  and, pipelined behind it, one small Lua script checks the id and, if it is
  free, renames the upload into place and writes the sealed meta hash with the
  TTL, atomically. The data never passes through Lua: a script taking a 16 MiB
  argument ran at ~70 MB/s here, RENAME is O(1). The staging key shares the
  record's hash tag, so the pair goes to one cluster node;
- the script is the check-and-set: an id already holding a whole record is
  not touched (the upload is dropped) and its meta comes back; the same
  identity then keeps it (its lifetime extended, never shortened: a second
  round trip, only then), another identity is a Conflict. Concurrent writers
  cannot both win, and no WATCH is involved, so a dropped connection is an
  error, never mistaken for contention;
- a get is one round trip (meta, data and TTL pipelined; a pair that does not
  fit is read again in MULTI/EXEC before it is called damaged, since a writer
  may have run between the commands); every read goes through
  `codec.open_record`, which checks the record's seal before anything parses
  it: a corrupt record is logged, counted, removed and read as absent, so
  callers answer NOT_FOUND and the next encode stores a good one;
- every operation has bounded retries with jittered exponential backoff and an
  overall deadline, so an outage turns into `Unavailable` within seconds, and
  the pool reconnects by itself afterwards; the cluster client follows
  MOVED/ASK and retries CLUSTERDOWN itself, and what it gives up on is
  `Unavailable` too, never INTERNAL;
- `probe` is what health checks ask: a short write, so a store that answers
  PING but refuses writes (read-only replica, CLUSTERDOWN, a failed disk)
  makes the services NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.typing import EncodableT

from mmserve.api.common.v1 import embedding_pb2
from mmserve.errors import Internal, InvalidArgument, MediaTooLarge, Reason, ResourceExhausted, Unavailable
from mmserve.metrics import STORE_CORRUPT
from mmserve.store import codec, connect
from mmserve.store.identity import Identity, check_uuid_binding, is_content_id
from mmserve.store.keys import DEFAULT_KEY_PREFIX, EmbeddingKeys, embedding_keys, validate_uuid
from mmserve.store.tensors import RawTensor

if TYPE_CHECKING:
    from mmserve.config import Settings

log = logging.getLogger(__name__)
#: One Redis command as sent on the wire: its name and arguments.
Command = tuple[EncodableT, ...]

EmbeddingDescriptor = embedding_pb2.EmbeddingDescriptor

# Lua: removes a record and all its data chunks (their count is in the meta), as `removed`. KEYS: meta, data.
_UNLINK_RECORD = """
local n = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') or 1
local removed = redis.call('UNLINK', KEYS[1], KEYS[2])
for i = 1, n - 1 do
  removed = removed + redis.call('UNLINK', KEYS[2] .. ':' .. i)
end
"""

# Removes a damaged embedding only if its meta still has the seal the reader
# saw ("" for none), so a writer that repaired it meanwhile is never undone
# (every write has a new seal: the descriptor holds its creation time in ns).
_DROP_IF_UNCHANGED = f"""
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') == ARGV[2] then
{_UNLINK_RECORD}
  return removed
end
return 0
"""

# Removes a record and all its data chunks. KEYS: meta, data.
_DELETE = f"""
{_UNLINK_RECORD}
return removed
"""

# The read's lifetime check, and the sliding expiry in the same round trip. KEYS: meta, data.
# ARGV: the store's ttl in ms, and the threshold: a record with less than that left (and an
# expiry at all) gets its full ttl back on every key (meta, data, further chunks). Returns the
# meta's PTTL after that. A record read again soon after is left alone (rate limit).
_TOUCH = """
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and pttl < tonumber(ARGV[2]) then
  local ttl = tonumber(ARGV[1])
  local n = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') or 1
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  for i = 1, n - 1 do
    redis.call('PEXPIRE', KEYS[2] .. ':' .. i, ttl)
  end
  return ttl
end
return pttl
"""

# Places an uploaded record. KEYS: meta, then the n data chunk keys (`:data`,
# `:data:1`, ...), then the n uploads. ARGV: ttl ms (0: none), mode ("new": only
# where the id holds no whole record; "replace": only where the meta still has
# the seal ARGV[4], i.e. the damaged record the caller saw), the seal field's
# name, that seal, n, then the meta hash as field, value, ...
# Returns {1} when placed; {0, meta fields, data length} when the id holds
# something else (the uploads are dropped); {-1} when an upload is gone.
# All chunks become visible at once with the meta: all or nothing.
_PLACE = """
local n = tonumber(ARGV[5])
local function drop_uploads()
  for i = 1, n do redis.call('UNLINK', KEYS[1 + n + i]) end
end
local function existing()
  drop_uploads()
  local m = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') or 1
  local size = redis.call('STRLEN', KEYS[2])
  for i = 1, m - 1 do size = size + redis.call('STRLEN', KEYS[2] .. ':' .. i) end
  return {0, redis.call('HGETALL', KEYS[1]), size}
end
if ARGV[2] == 'new' then
  if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('EXISTS', KEYS[2]) == 1 then
    return existing()
  end
elseif (redis.call('HGET', KEYS[1], ARGV[3]) or '') ~= ARGV[4] then
  return existing()
end
for i = 1, n do
  if redis.call('EXISTS', KEYS[1 + n + i]) == 0 then
    drop_uploads()
    return {-1}
  end
end
local old = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') or 1
for i = n, old - 1 do redis.call('UNLINK', KEYS[2] .. ':' .. i) end
for i = 1, n do redis.call('RENAME', KEYS[1 + n + i], KEYS[1 + i]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
local ttl = tonumber(ARGV[1])
for i = 1, n + 1 do
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  else
    redis.call('PERSIST', KEYS[i])
  end
end
return {1}
"""


@dataclass(frozen=True)
class _Script:
    """A Lua script sent by its SHA1 (EVALSHA) where it runs on every put or get: the body only when Redis lacks it."""

    body: str
    sha: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


_PLACE_SCRIPT = _Script(_PLACE)
_TOUCH_SCRIPT = _Script(_TOUCH)


# Extends (never shortens) a kept record's lifetime on every key. KEYS: meta, data. ARGV: ttl ms (0: persist).
_EXTEND = """
local ttl = tonumber(ARGV[1])
local n = tonumber(redis.call('HGET', KEYS[1], 'chunks') or '1') or 1
local keys = {KEYS[1], KEYS[2]}
for i = 1, n - 1 do keys[#keys + 1] = KEYS[2] .. ':' .. i end
for _, key in ipairs(keys) do
  if ttl > 0 then
    local left = redis.call('PTTL', key)
    if left >= 0 and left < ttl then redis.call('PEXPIRE', key, ttl) end
  else
    redis.call('PERSIST', key)
  end
end
return redis.call('PTTL', KEYS[1])
"""

# Lease scripts (KEYS: the lease; ARGV: the holder's token): renew or release
# only a lease this holder still has, so an expired one taken over by another
# encoder is never extended or deleted by the first.
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Replies telling a cluster client to go elsewhere (or wait): what redis-py's cluster pipeline handles.
_REDIRECTS = (rexc.MovedError, rexc.AskError, rexc.TryAgainError, rexc.ClusterDownError)

# A staged upload outlives any put that is still running (op_timeout_s) and
# then expires by itself if its writer died between the upload and the place.
_UPLOAD_TTL_MS = 120_000

# Another writer changed the id between our look and our place; the next
# attempt sees its record and settles. Contention only, never a lost connection.
_MAX_PLACE_ATTEMPTS = 4

# Redis refuses a string value over 512 MB (proto-max-bulk-len): no chunk may be larger.
_REDIS_MAX_VALUE = 512 * 1024 * 1024

# The health probe's key (one per process, so replicas probe different slots).


@dataclass(frozen=True)
class PutResult:
    """Outcome of a put: the descriptor now stored, and whether this call stored it."""

    descriptor: EmbeddingDescriptor
    created: bool


@dataclass(frozen=True)
class StoredEmbedding:
    """A stored embedding: its descriptor and (unless asked not to) its tensors, in descriptor order."""

    descriptor: EmbeddingDescriptor
    tensors: list[RawTensor] = field(default_factory=list)

    def tensor(self, name: str) -> RawTensor:
        """The tensor called `name` (e.g. "embeddings", "deepstack.0")."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


class EmbeddingStore:
    """Stores and serves embeddings under content ids and client uuids, both scoped to a tenant (keys.py)."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        connect_timeout_s: float = 1.0,
        socket_timeout_s: float = 5.0,
        retries: int = 2,
        op_timeout_s: float = 10.0,
        max_connections: int = 64,
        ttl_refresh_s: int = 3600,
        chunk_bytes: int = 64 * 1024 * 1024,
        max_record_bytes: int = 2 * 1024 * 1024 * 1024,
    ) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0 (0: no expiry)")
        if ttl_refresh_s < 0:
            raise ValueError("ttl_refresh_s must be >= 0")
        if not 0 < chunk_bytes <= _REDIS_MAX_VALUE:
            raise ValueError(f"chunk_bytes must be between 1 and {_REDIS_MAX_VALUE} (Redis's value limit)")
        if max_record_bytes < 1:
            raise ValueError("max_record_bytes must be >= 1")
        self.ttl_refresh_s = ttl_refresh_s
        self.chunk_bytes = chunk_bytes
        self.max_record_bytes = max_record_bytes
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces (they would move the cluster hash tag)")
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self._op_timeout_s = op_timeout_s
        self._location = connect.parse_store_url(url).location
        self._redis = connect.async_client(
            url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s,
            retries=retries, max_connections=max_connections,
        )  # fmt: skip
        self._probe_key = f"{key_prefix}:probe:{{{secrets.token_hex(8)}}}"
        # redis-py's cluster client discovers the slots on first use; many first uses at once
        # (24 concurrent puts) made it drop connections mid-handshake, so discovery runs alone.
        self._discovered = not self.is_cluster
        self._discovery = asyncio.Lock()

    @property
    def is_cluster(self) -> bool:
        """True when the URL named a Redis Cluster."""
        return isinstance(self._redis, RedisCluster)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingStore:
        """A store configured from `MMSERVE_REDIS_URL`, `MMSERVE_EMBEDDING_TTL_S*` and `MMSERVE_STORE_*`."""
        return cls(
            settings.redis_url, ttl_s=settings.embedding_ttl_s, ttl_refresh_s=settings.embedding_ttl_refresh_s,
            chunk_bytes=settings.store_chunk_bytes, max_record_bytes=settings.store_max_record_bytes,
        )  # fmt: skip

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._redis.aclose()

    async def __aenter__(self) -> EmbeddingStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- errors ----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _guard(self, op: str) -> AsyncIterator[None]:
        """Turn Redis failures into mmserve errors, and bound the whole operation in time."""
        try:
            async with asyncio.timeout(self._op_timeout_s):
                if not self._discovered:
                    await self._discover()
                yield
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.InvalidResponse, TimeoutError, OSError) as exc:
            log.warning("embedding store %s failed (redis at %s): %s: %s", op, self._location, type(exc).__name__, exc)
            raise Unavailable(
                f"embedding store unavailable: no working connection to Redis ({type(exc).__name__}); retry later",
                reason=Reason.STORE_UNAVAILABLE,
            ) from exc
        except (rexc.ClusterError, rexc.RedisClusterException, rexc.AskError, rexc.TryAgainError) as exc:
            # What the cluster client gives up on: CLUSTERDOWN, uncovered slots, redirects without end.
            log.warning("embedding store %s failed (redis at %s): %s: %s", op, self._location, type(exc).__name__, exc)
            raise Unavailable(
                f"embedding store unavailable: the Redis cluster cannot serve this key now ({type(exc).__name__}); retry later",
                reason=Reason.STORE_UNAVAILABLE,
            ) from exc
        except (rexc.ReadOnlyError, rexc.BusyLoadingError) as exc:
            log.warning("embedding store %s refused (redis at %s): %s", op, self._location, exc)
            raise Unavailable(
                f"embedding store unavailable: Redis is not accepting writes ({type(exc).__name__}); retry later",
                reason=Reason.STORE_UNAVAILABLE,
            ) from exc
        except rexc.OutOfMemoryError as exc:
            log.error("embedding store %s: redis at %s is out of memory: %s", op, self._location, exc)
            raise ResourceExhausted("embedding store is full; retry later", reason=Reason.STORE_FULL) from exc
        except rexc.ResponseError as exc:
            if not str(exc).startswith("MISCONF"):
                log.exception("embedding store %s failed (redis at %s)", op, self._location)
                raise Internal("embedding store error") from exc
            log.error("embedding store %s refused (redis at %s): %s", op, self._location, exc)
            raise Unavailable(
                "embedding store unavailable: Redis refuses writes (it cannot persist); retry later",
                reason=Reason.STORE_UNAVAILABLE,
            ) from exc
        except rexc.RedisError as exc:
            log.exception("embedding store %s failed (redis at %s)", op, self._location)
            raise Internal("embedding store error") from exc

    async def _discover(self) -> None:
        async with self._discovery:
            if not self._discovered:
                await self._redis.initialize()
                self._discovered = True

    # --- keys ------------------------------------------------------------

    def keys_for(self, ref: str, *, tenant: str) -> EmbeddingKeys:
        """The Redis keys of a reference (content id, or a client uuid of `tenant`)."""
        return embedding_keys(ref, tenant=tenant, prefix=self.key_prefix)

    # --- operations ------------------------------------------------------

    async def ping(self) -> None:
        """Raise Unavailable unless Redis answers."""
        async with self._guard("ping"):
            await self._redis.ping()

    async def probe(self) -> None:
        """Raise Unavailable unless the store takes a write now (health: usable, not merely reachable).

        On a cluster, also unless the node asked reports cluster_state:ok.
        """
        async with self._guard("probe"):
            # DEL is a write command (refused as SET would be: read-only replica, MISCONF, CLUSTERDOWN on its
            # slot) that leaves nothing behind, so the store never holds a key that is not an embedding.
            await self._redis.delete(self._probe_key)
            if isinstance(self._redis, RedisCluster):
                info: dict[Any, Any] = await self._redis.cluster_info()  # its keys are str or bytes (decode_responses)
                state = info.get("cluster_state", info.get(b"cluster_state"))
                if state not in ("ok", b"ok"):
                    raise rexc.ClusterDownError(f"cluster_state is {state!r}")

    async def put(
        self,
        descriptor: EmbeddingDescriptor,
        tensors: Sequence[RawTensor],
        *,
        tenant: str,
        ttl_s: int | None = None,
    ) -> PutResult:
        """Store an embedding under `descriptor.id`, unless that id already holds the same one.

        Fills in the descriptor's tensors, nbytes, created_at, expires_at and
        canonical options_json. `ttl_s` overrides the store's lifetime for this
        embedding (0 pins it until evicted). An id already holding the same
        identity is kept as is and returned with created=False (its lifetime
        is extended, never shortened); one holding another identity raises
        Conflict. An id whose stored values are incomplete (e.g. half evicted)
        counts as empty.
        """
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl < 0:
            raise InvalidArgument("ttl_s must be >= 0", field="ttl_s")
        id_field = self._check_id(descriptor)
        identity = Identity.of(descriptor)
        if not tensors:
            raise InvalidArgument("an embedding needs at least one tensor", field="tensors")
        if not sum(t.nbytes for t in tensors):
            raise InvalidArgument("an embedding needs at least one byte of data", field="tensors")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"tensor names must be unique, got {names}", field="tensors")
        size = sum(t.nbytes for t in tensors)
        if size > self.max_record_bytes:
            # Refused before any upload: a retry cannot succeed, so this is the caller's input, not load.
            raise MediaTooLarge(
                f"embedding of {size} bytes exceeds the store's limit of {self.max_record_bytes} bytes per record "
                "(MMSERVE_STORE_MAX_RECORD_BYTES); send less media (fewer frames, lower resolution) per item",
                field="tensors",
                metadata={"setting": "store_max_record_bytes", "limit": str(self.max_record_bytes)},
            )
        keys = embedding_keys(descriptor.id, tenant=tenant, prefix=self.key_prefix, field=id_field)
        del descriptor.tensors[:]
        descriptor.tensors.extend(t.info() for t in tensors)
        payload = await codec.join(tensors)
        async with self._guard("put"):
            for _ in range(_MAX_PLACE_ATTEMPTS):
                placed = await self._upload_and_place(keys, descriptor, identity, payload, ttl)
                if placed is not None:
                    return placed
        log.error("embedding store put of %s gave up after %d contended attempts", descriptor.id, _MAX_PLACE_ATTEMPTS)
        raise Unavailable("embedding store busy: too many concurrent writes to one id; retry later")

    async def _upload_and_place(
        self,
        keys: EmbeddingKeys,
        descriptor: EmbeddingDescriptor,
        identity: Identity,
        payload: bytes | memoryview,
        ttl_s: int,
        replace_seal: bytes | None = None,
    ) -> PutResult | None:
        """One attempt, one round trip: the upload and the place script, pipelined; None if another writer changed the id meanwhile."""
        upload = keys.upload(secrets.token_hex(8))
        view = memoryview(payload) if len(payload) > self.chunk_bytes else payload
        chunks = [view[i : i + self.chunk_bytes] for i in range(0, len(payload), self.chunk_bytes)] or [payload]
        n = len(chunks)
        uploads = [upload if i == 0 else f"{upload}:{i}" for i in range(n)]
        place_keys = (keys.meta, *(keys.chunk(i) for i in range(n)), *uploads)
        sets: list[Command] = [("SET", key, chunk, "PX", _UPLOAD_TTL_MS) for key, chunk in zip(uploads, chunks, strict=True)]
        place: list[EncodableT] = []

        async def place_command() -> list[EncodableT]:
            # The data checksum and the sealed meta: computed while the uploads travel (_send_overlapped).
            check = await codec.data_checksum(payload)
            args = self._place_args(descriptor, identity, payload, check, ttl_s, replace_seal, n)
            place[:] = [*place_keys, *args]
            return ["EVALSHA", _PLACE_SCRIPT.sha, len(place_keys), *place]

        replies = await self._send_overlapped(keys.meta, sets, place_command)
        if replies is not None and any(isinstance(r, _REDIRECTS) for r in replies):
            replies = None  # the slot moved (resharding, failover): nothing was written, the pipeline follows it
        if replies is None:  # no direct connection to use: the same commands through a redis-py pipeline
            command = await place_command()
            async with self._redis.pipeline(transaction=False) as pipe:
                for cmd in sets:
                    pipe.execute_command(*cmd)
                # (the cluster pipeline blocks its evalsha method, not the command, which goes to the keys' slot)
                pipe.execute_command(*command)
                replies = await pipe.execute(raise_on_error=False)
        reply = replies[-1]
        for r in replies[:-1]:
            if isinstance(r, Exception):
                raise r
        if isinstance(reply, rexc.NoScriptError):
            # Redis lost its script cache (restart, SCRIPT FLUSH, a new node): the uploads are there, place them
            # with the script's body (which caches it again).
            reply = await self._redis.eval(_PLACE_SCRIPT.body, len(place_keys), *place)
        elif isinstance(reply, Exception):
            raise reply
        if reply[0] == 1:
            return PutResult(descriptor, created=True)
        if reply[0] == -1:
            raise ResourceExhausted("embedding store is full: the upload was evicted before it was stored", reason=Reason.STORE_FULL)
        fields = dict(zip(reply[1][::2], reply[1][1::2], strict=True))
        if not fields:
            return None  # deleted since we looked: try again as a new record
        try:
            existing, _ = await codec.open_record(descriptor.id, fields, reply[2])
        except codec.CorruptEmbedding as exc:
            if replace_seal is not None:
                return None  # a different damaged record than the one we saw: look again
            _report_corrupt(keys, exc, "replacing it")
            return await self._upload_and_place(
                keys, descriptor, identity, payload, ttl_s, fields.get(codec.F_RECORD_CHECKSUM.encode(), b"")
            )
        self._raise_if_other(existing, descriptor, identity)
        await self._extend(keys, existing, ttl_s * 1000)
        return PutResult(existing, created=False)

    async def _send_overlapped(self, key: str, first: list[Command], then: Callable[[], Awaitable[list[EncodableT]]]) -> list[Any] | None:
        """Send `first`, build the last command (`then`) while they travel, send it: every reply, in one round trip.

        Like a pipeline, on one pooled connection to the node of `key` (all
        commands share its slot), except that the upload is on the wire while
        the data checksum and the sealed meta are computed: at 1 MB that work
        was ~15% of a SET of the bytes, now it overlaps the transfer. Replies
        that are errors are returned in place (as `execute(raise_on_error=False)`).
        None, having sent nothing, when there is no connection to take here and
        now (a cluster node at its connection limit, no slot map yet): the
        caller uses a pipeline, as it does after a redirect reply (MOVED/ASK:
        the cluster pipeline follows it and refreshes the slot map). A
        connection failure disconnects and raises (the guard makes it
        Unavailable, as a pipeline's would be).
        """
        if isinstance(self._redis, RedisCluster):
            try:
                node = self._redis.get_node_from_key(key)
                taken = node.acquire_connection() if node is not None else None
            except (rexc.SlotNotCoveredError, rexc.MaxConnectionsError):
                return None
            if node is None or taken is None:
                return None
            conn = taken

            async def release() -> None:
                node.release(taken)
        else:
            pool = self._redis.connection_pool
            conn = await pool.get_connection()

            async def release() -> None:
                await pool.release(conn)

        try:
            await conn.send_packed_command(conn.pack_commands(first), check_health=False)
            last = await then()
            await conn.send_packed_command(conn.pack_commands([last]), check_health=False)
            replies: list[Any] = []  # Redis replies: whatever each command returns
            for _ in range(len(first) + 1):
                try:
                    replies.append(await conn.read_response())
                except rexc.ResponseError as exc:  # an error reply: the stream is intact, keep reading
                    replies.append(exc)
        except BaseException:
            await conn.disconnect(nowait=True)  # unknown protocol state: never reuse it
            raise
        finally:
            await release()
        return replies

    @staticmethod
    def _place_args(
        descriptor: EmbeddingDescriptor,
        identity: Identity,
        payload: bytes | memoryview,
        check: str,
        ttl_s: int,
        replace_seal: bytes | None,
        chunks: int = 1,
    ) -> list[bytes | str | int]:
        """Complete the descriptor (created now), seal its meta hash, and lay out _PLACE's ARGV."""
        now_ns = time.time_ns()
        descriptor.options_json = identity.options_json
        descriptor.nbytes = len(payload)
        descriptor.created_at.FromNanoseconds(now_ns)
        if ttl_s:
            descriptor.expires_at.FromNanoseconds(now_ns + ttl_s * 1_000_000_000)
        else:
            descriptor.ClearField("expires_at")
        meta = codec.encode_meta(descriptor, check, chunks)
        mode, seal = (b"new", b"") if replace_seal is None else (b"replace", replace_seal)
        return [ttl_s * 1000, mode, codec.F_RECORD_CHECKSUM, seal, chunks, *(x for kv in meta.items() for x in kv)]

    async def _extend(self, keys: EmbeddingKeys, existing: EmbeddingDescriptor, ttl_ms: int) -> None:
        """Extend (never shorten) a kept record's lifetime; set its expires_at from what Redis now says."""
        pttl = await self._redis.eval(_EXTEND, 2, keys.meta, keys.data, ttl_ms)
        _set_expiry(existing, int(pttl))

    @staticmethod
    def _raise_if_other(existing: EmbeddingDescriptor, new: EmbeddingDescriptor, identity: Identity) -> None:
        theirs = Identity(existing.modality, existing.content_sha256, existing.model_fingerprint, existing.options_json)
        if new.client_uuid:
            check_uuid_binding(new.id, stored=theirs, wanted=identity, field="uuid")
        elif differences := identity.differences(theirs):
            # A content id is derived from the identity: a mismatch is a bug in the caller.
            log.error("content id %s is stored with another identity (%s)", new.id, ", ".join(differences))
            raise Internal("content id does not match the stored embedding")

    @staticmethod
    def _check_id(descriptor: EmbeddingDescriptor) -> str:
        """The request field the id came from, after checking it has the form its kind requires."""
        if descriptor.client_uuid:
            validate_uuid(descriptor.id, "uuid")
            return "uuid"
        if not is_content_id(descriptor.id):
            raise InvalidArgument("id must be a content id (mmemb-<64 hex>) unless client_uuid is set", field="id")
        return "id"

    async def get(self, ref: str, *, tenant: str, with_tensors: bool = True, touch: bool | None = None) -> StoredEmbedding | None:
        """The embedding `ref` names, or None if it is absent, expired or damaged.

        `touch` (default: `with_tensors`, i.e. a read for use) slides the expiry:
        a record with less than ttl - ttl_refresh_s left gets the store's full
        ttl back, in the same round trip (a record read again soon after is
        not touched; one that never expires, or a store with ttl 0, neither).
        """
        keys = self.keys_for(ref, tenant=tenant)
        touch = with_tensors if touch is None else touch
        fields, data, pttl = await self._read(keys, with_tensors, atomic=False, touch=touch)
        if not fields:
            return None
        try:
            descriptor, tensors = await codec.open_record(ref, fields, data)
        except codec.CorruptEmbedding:
            # The one-round-trip read is not atomic: a put or delete between its commands pairs
            # one record's meta with another's data (the seal catches it). Only an atomic
            # re-read may call the record damaged, and only that one removes it.
            fields, data, pttl = await self._read(keys, with_tensors, atomic=True, touch=False, chunks=codec.chunk_count(fields))
            if not fields:
                return None
            try:
                descriptor, tensors = await codec.open_record(ref, fields, data)
            except codec.CorruptEmbedding as exc:
                # Left in place, it would look present to `exists` and to the
                # encoder's lookup (so nobody re-encodes) while every read fails.
                _report_corrupt(keys, exc, "removing it; reads see it as absent")
                await self._drop_damaged(keys, fields.get(codec.F_RECORD_CHECKSUM.encode(), b""))
                return None
        _set_expiry(descriptor, pttl)
        return StoredEmbedding(descriptor, tensors)

    async def _read(
        self, keys: EmbeddingKeys, with_tensors: bool, *, atomic: bool, touch: bool, chunks: int = 1
    ) -> tuple[dict[bytes, bytes], bytes | int | None, int]:
        """Meta, data (or its length) and remaining lifetime, pipelined in one round trip (in MULTI/EXEC if atomic).

        Reads `chunks` data values at once (a guess: 1 first); when the meta
        says more, a non-atomic read fetches the rest in a second round trip,
        an atomic one reads everything again with the count the meta gave.
        A missing chunk reads as data None (incomplete).
        """
        ttl_ms = self.ttl_s * 1000
        threshold = ttl_ms - min(self.ttl_refresh_s * 1000, ttl_ms // 2)
        async with self._guard("get"):
            for _ in range(3):
                async with self._redis.pipeline(transaction=atomic) as pipe:
                    pipe.hgetall(keys.meta)
                    for i in range(chunks):
                        pipe.get(keys.chunk(i)) if with_tensors else pipe.strlen(keys.chunk(i))
                    if touch and ttl_ms > 0:
                        pipe.execute_command("EVALSHA", _TOUCH_SCRIPT.sha, 2, keys.meta, keys.data, ttl_ms, threshold)
                    else:
                        pipe.pttl(keys.meta)
                    fields, *parts, pttl = await pipe.execute(raise_on_error=False)
                for r in (fields, *parts):
                    if isinstance(r, Exception):
                        raise r
                if isinstance(pttl, rexc.NoScriptError):
                    # The script cache was emptied (restart, SCRIPT FLUSH, a new node): touch with its body,
                    # which caches it again (one more round trip, that once).
                    pttl = await self._redis.eval(_TOUCH_SCRIPT.body, 2, keys.meta, keys.data, ttl_ms, threshold)
                elif isinstance(pttl, Exception):
                    raise pttl
                want = codec.chunk_count(fields) if fields else chunks
                if want > chunks and not atomic:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for i in range(chunks, want):
                            pipe.get(keys.chunk(i)) if with_tensors else pipe.strlen(keys.chunk(i))
                        parts += await pipe.execute()
                elif want != chunks and atomic:
                    chunks = want
                    continue
                break
        return fields, _assemble(parts[:want], with_tensors), int(pttl)

    async def _drop_damaged(self, keys: EmbeddingKeys, seal: bytes) -> None:
        """Best effort: the read already answered "missing", a failed cleanup changes nothing."""
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._redis.eval(_DROP_IF_UNCHANGED, 2, keys.meta, keys.data, codec.F_RECORD_CHECKSUM, seal)
        except (rexc.RedisError, TimeoutError, OSError) as exc:
            log.warning("could not remove damaged embedding %s: %s", keys.meta, exc)

    async def get_many(
        self, refs: Iterable[str], *, tenant: str, with_tensors: bool = True, touch: bool | None = None
    ) -> dict[str, StoredEmbedding | None]:
        """Several embeddings at once, keyed by reference (None where missing).

        Each embedding is read in its own MULTI/EXEC (its keys share a slot),
        all concurrently on pooled connections: one round trip in wall time,
        and no command spans two slots, so it works on Redis Cluster too.
        """
        unique = list(dict.fromkeys(refs))
        for ref in unique:  # refuse a bad reference before any I/O
            self.keys_for(ref, tenant=tenant)
        found = await asyncio.gather(*(self.get(r, tenant=tenant, with_tensors=with_tensors, touch=touch) for r in unique))
        return dict(zip(unique, found, strict=True))

    async def exists(self, ref: str, *, tenant: str) -> bool:
        """True if both keys of the embedding are present (no integrity check)."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("exists"):
            return int(await self._redis.exists(keys.meta, keys.data)) == 2

    async def delete(self, ref: str, *, tenant: str) -> bool:
        """Remove an embedding, every data chunk included (UNLINK: freed in the background); False if there was none."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("delete"):
            return int(await self._redis.eval(_DELETE, 2, keys.meta, keys.data)) > 0

    # --- encode leases (one model run per content across replicas) ---------

    async def take_lease(self, ref: str, *, tenant: str, token: str, ttl_ms: int) -> bool:
        """SET NX PX the encode lease of `ref`; True if this holder (`token`) now has it."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("lease"):
            return bool(await self._redis.set(keys.lease, token, nx=True, px=ttl_ms))

    async def renew_lease(self, ref: str, *, tenant: str, token: str, ttl_ms: int) -> bool:
        """Extend the lease if `token` still holds it (compare-and-pexpire); False if it was lost."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("lease"):
            return bool(await self._redis.eval(_LEASE_RENEW, 1, keys.lease, token, ttl_ms))

    async def release_lease(self, ref: str, *, tenant: str, token: str) -> bool:
        """Delete the lease if `token` still holds it (compare-and-delete); False otherwise."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("lease"):
            return bool(await self._redis.eval(_LEASE_RELEASE, 1, keys.lease, token))

    async def lease_holder(self, ref: str, *, tenant: str) -> str | None:
        """The token holding `ref`'s lease now, or None."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("lease"):
            value = await self._redis.get(keys.lease)
        return value.decode() if isinstance(value, bytes) else value

    # --- revalidating reads (the decoder's cache) ---------------------------

    async def seal_of(self, ref: str, *, tenant: str) -> tuple[bytes | None, int]:
        """The record's seal (meta record_checksum) and remaining lifetime, in one round trip and without its data.

        None when the record is absent or incomplete. A put or delete always
        changes or removes the seal (every write has a new one: the descriptor
        holds its creation time in ns), so an unchanged seal means unchanged data.
        """
        keys = self.keys_for(ref, tenant=tenant)
        ttl_ms = self.ttl_s * 1000
        async with self._guard("get"), self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(keys.meta, codec.F_RECORD_CHECKSUM)
            pipe.exists(keys.data)
            if ttl_ms > 0:  # a use from the cache slides the expiry as a read from Redis would (rate-limited alike)
                threshold = ttl_ms - min(self.ttl_refresh_s * 1000, ttl_ms // 2)
                pipe.eval(_TOUCH, 2, keys.meta, keys.data, ttl_ms, threshold)
            else:
                pipe.pttl(keys.meta)
            seal, has_data, pttl = await pipe.execute()
        return (seal if seal and has_data else None), pttl


def _report_corrupt(keys: EmbeddingKeys, exc: codec.CorruptEmbedding, action: str) -> None:
    """The one place a failed integrity check is logged and counted."""
    STORE_CORRUPT.labels(exc.reason).inc()
    log.warning("corrupt embedding record %s (%s: %s); %s", keys.meta, exc.reason, exc, action)


def _assemble(parts: list[bytes | int | None], with_tensors: bool) -> bytes | int | None:
    """One record's data from its chunk values (None if any is missing; lengths summed for STRLEN)."""
    if with_tensors:
        if any(p is None for p in parts):
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
    if len(parts) > 1 and any(not p for p in parts[1:]):
        return None  # STRLEN of a missing chunk is 0: incomplete
    return sum(int(p or 0) for p in parts) if parts[0] else None


def _set_expiry(descriptor: EmbeddingDescriptor, pttl_ms: int) -> None:
    """Set expires_at from the key's remaining lifetime (clear it when the key does not expire)."""
    if pttl_ms is not None and pttl_ms >= 0:
        descriptor.expires_at.FromNanoseconds(time.time_ns() + pttl_ms * 1_000_000)
    else:
        descriptor.ClearField("expires_at")
