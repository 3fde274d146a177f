"""The embedding store: stored embeddings in Redis, shared by every encoder and decoder.

Design points (conventions.md, "Redis (embedding store)"):
- both keys of an embedding are written in one MULTI/EXEC with the same TTL,
  so a reader never sees half an embedding, and read in one MULTI/EXEC, so a
  reader never pairs a new meta with old data;
- every read goes through `codec.open_record`, which checks the record's
  seal (descriptor, every meta field, the data's checksum) before anything
  parses it: a corrupt record is logged, counted, removed and read as absent,
  so callers answer NOT_FOUND and the next encode stores a good one;
- a write is a check-and-set under WATCH: an id already bound to the same
  identity is kept (its lifetime extended), one bound to another identity is a
  Conflict, and concurrent writers cannot both win. WATCH rather than a Lua
  script because Redis copies a script's arguments into Lua and back: with a
  16 MiB value a script put ran at ~70 MB/s here against ~500 MB/s for
  WATCH + MULTI/EXEC, which is on par with a bare SET;
- every operation has bounded retries with jittered exponential backoff
  (redis-py's Retry) and an overall deadline, so an outage turns into
  `Unavailable` within seconds, and the pool reconnects by itself afterwards;
- keys of different embeddings live in different cluster slots and no command
  spans two embeddings, so the layout works on Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from mmserve.common.v1 import embedding_pb2
from mmserve.errors import Conflict, Internal, InvalidArgument, ResourceExhausted, Unavailable
from mmserve.metrics import STORE_CORRUPT
from mmserve.store import codec
from mmserve.store.identity import Identity, is_content_id
from mmserve.store.keys import DEFAULT_KEY_PREFIX, EmbeddingKeys, embedding_keys, validate_uuid
from mmserve.store.tensors import RawTensor

if TYPE_CHECKING:
    from mmserve.config import Settings

log = logging.getLogger(__name__)

EmbeddingDescriptor = embedding_pb2.EmbeddingDescriptor

# Removes a damaged embedding only if its meta still has the seal the reader
# saw ("" for none), so a writer that repaired it meanwhile is never undone
# (every write has a new seal: the descriptor holds its creation time in ns).
_DROP_IF_UNCHANGED = """
if (redis.call('HGET', KEYS[1], ARGV[1]) or '') == ARGV[2] then
  return redis.call('UNLINK', KEYS[1], KEYS[2])
end
return 0
"""

# A WATCH fails only when another writer touched the same id; the retry then
# sees that writer's embedding and settles. More attempts mean a hot loop.
_MAX_WATCH_ATTEMPTS = 8


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


def _safe_location(url: str) -> str:
    """host:port/db of a Redis URL for logs, never its credentials."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"
    except ValueError:
        return "<unparsable url>"


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
    ) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0 (0: no expiry)")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces (they would move the cluster hash tag)")
        self.ttl_s = ttl_s
        self.key_prefix = key_prefix
        self._op_timeout_s = op_timeout_s
        self._location = _safe_location(url)
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout_s,  # wait for a free pooled connection
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
            decode_responses=False,
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._drop_if_unchanged = self._redis.register_script(_DROP_IF_UNCHANGED)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddingStore:
        """A store configured from `MMSERVE_REDIS_URL` and `MMSERVE_EMBEDDING_TTL_S`."""
        return cls(settings.redis_url, ttl_s=settings.embedding_ttl_s)

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
                yield
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.InvalidResponse, TimeoutError, OSError) as exc:
            log.warning("embedding store %s failed (redis at %s): %s: %s", op, self._location, type(exc).__name__, exc)
            raise Unavailable(
                f"embedding store unavailable: no working connection to Redis ({type(exc).__name__}); retry later",
                reason="STORE_UNAVAILABLE",
            ) from exc
        except (rexc.ReadOnlyError, rexc.TryAgainError, rexc.ClusterDownError) as exc:
            log.warning("embedding store %s refused (redis at %s): %s", op, self._location, exc)
            raise Unavailable(
                f"embedding store unavailable: Redis is not accepting writes ({type(exc).__name__}); retry later",
                reason="STORE_UNAVAILABLE",
            ) from exc
        except rexc.OutOfMemoryError as exc:
            log.error("embedding store %s: redis at %s is out of memory: %s", op, self._location, exc)
            raise ResourceExhausted("embedding store is full; retry later", reason="STORE_FULL") from exc
        except rexc.RedisError as exc:
            log.exception("embedding store %s failed (redis at %s)", op, self._location)
            raise Internal("embedding store error") from exc

    # --- keys ------------------------------------------------------------

    def keys_for(self, ref: str, *, tenant: str) -> EmbeddingKeys:
        """The Redis keys of a reference (content id, or a client uuid of `tenant`)."""
        return embedding_keys(ref, tenant=tenant, prefix=self.key_prefix)

    # --- operations ------------------------------------------------------

    async def ping(self) -> None:
        """Raise Unavailable unless Redis answers."""
        async with self._guard("ping"):
            await self._redis.ping()

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
        keys = embedding_keys(descriptor.id, tenant=tenant, prefix=self.key_prefix, field=id_field)

        payload, check = await codec.pack(tensors)
        now_ns = time.time_ns()
        descriptor.options_json = identity.options_json
        del descriptor.tensors[:]
        descriptor.tensors.extend(t.info() for t in tensors)
        descriptor.nbytes = len(payload)
        descriptor.created_at.FromNanoseconds(now_ns)
        if ttl:
            descriptor.expires_at.FromNanoseconds(now_ns + ttl * 1_000_000_000)
        else:
            descriptor.ClearField("expires_at")
        meta = codec.encode_meta(descriptor, check)

        async with self._guard("put"):
            return await self._check_and_set(keys, descriptor, identity, payload, meta, ttl * 1000)

    async def _check_and_set(
        self,
        keys: EmbeddingKeys,
        descriptor: EmbeddingDescriptor,
        identity: Identity,
        payload: bytes | memoryview,
        meta: dict[bytes, bytes],
        ttl_ms: int,
    ) -> PutResult:
        async with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_WATCH_ATTEMPTS):
                try:
                    await pipe.watch(keys.meta, keys.data)
                    existing = await self._read_existing(pipe, keys, descriptor.id)
                    if existing is not None:
                        self._raise_if_other(existing, descriptor, identity)
                        # Extending the lifetime needs no WATCH (it is harmless on whatever the
                        # keys hold by now), and under one would make concurrent readers of the
                        # same embedding invalidate each other's transactions.
                        await pipe.unwatch()
                        pipe.multi()
                        if ttl_ms:
                            pipe.pexpire(keys.data, ttl_ms, gt=True)
                            pipe.pexpire(keys.meta, ttl_ms, gt=True)
                        else:
                            pipe.persist(keys.data)
                            pipe.persist(keys.meta)
                        pipe.pttl(keys.meta)
                        *_, pttl = await pipe.execute()
                        _set_expiry(existing, pttl)
                        return PutResult(existing, created=False)
                    pipe.multi()
                    pipe.set(keys.data, payload, px=ttl_ms or None)
                    pipe.delete(keys.meta)  # no stale fields from a broken predecessor
                    pipe.hset(keys.meta, mapping=meta)  # type: ignore[arg-type]
                    if ttl_ms:
                        pipe.pexpire(keys.meta, ttl_ms)
                    await pipe.execute()
                    return PutResult(descriptor, created=True)
                except rexc.WatchError:
                    continue  # another writer got there first: look again
        log.error("embedding store put of %s gave up after %d contended attempts", descriptor.id, _MAX_WATCH_ATTEMPTS)
        raise Unavailable("embedding store busy: too many concurrent writes to one id; retry later")

    async def _read_existing(self, pipe: Pipeline, keys: EmbeddingKeys, ref: str) -> EmbeddingDescriptor | None:
        """The descriptor an id holds, or None if it holds nothing usable (absent, broken, half evicted)."""
        fields = await pipe.hgetall(keys.meta)
        if not fields:
            return None
        stored = await pipe.strlen(keys.data)
        try:
            existing, _ = await codec.open_record(ref, fields, stored)
        except codec.CorruptEmbedding as exc:
            _report_corrupt(keys, exc, "replacing it")
            return None
        return existing

    @staticmethod
    def _raise_if_other(existing: EmbeddingDescriptor, new: EmbeddingDescriptor, identity: Identity) -> None:
        theirs = Identity(existing.modality, existing.content_sha256, existing.model_fingerprint, existing.options_json)
        differences = identity.differences(theirs)
        if not differences:
            return
        if not new.client_uuid:
            # A content id is derived from the identity: a mismatch is a bug in the caller.
            log.error("content id %s is stored with another identity (%s)", new.id, ", ".join(differences))
            raise Internal("content id does not match the stored embedding")
        raise Conflict(
            f"uuid {new.id!r} is already bound to {' and '.join(differences)}; use a new uuid, "
            "or delete the old embedding first",
            field="uuid",
            metadata={"uuid": new.id},
        )

    @staticmethod
    def _check_id(descriptor: EmbeddingDescriptor) -> str:
        """The request field the id came from, after checking it has the form its kind requires."""
        if descriptor.client_uuid:
            validate_uuid(descriptor.id, "uuid")
            return "uuid"
        if not is_content_id(descriptor.id):
            raise InvalidArgument("id must be a content id (mmemb-<64 hex>) unless client_uuid is set", field="id")
        return "id"

    async def get(self, ref: str, *, tenant: str, with_tensors: bool = True) -> StoredEmbedding | None:
        """The embedding `ref` names, or None if it is absent, expired or damaged."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("get"), self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.meta)
            if with_tensors:
                pipe.get(keys.data)
            else:
                pipe.strlen(keys.data)
            pipe.pttl(keys.meta)
            fields, data, pttl = await pipe.execute()
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

    async def _drop_damaged(self, keys: EmbeddingKeys, seal: bytes) -> None:
        """Best effort: the read already answered "missing", a failed cleanup changes nothing."""
        try:
            async with asyncio.timeout(self._op_timeout_s):
                await self._drop_if_unchanged(keys=[keys.meta, keys.data], args=[codec.F_RECORD_CHECKSUM, seal])
        except (rexc.RedisError, TimeoutError, OSError) as exc:
            log.warning("could not remove damaged embedding %s: %s", keys.meta, exc)

    async def get_many(
        self, refs: Iterable[str], *, tenant: str, with_tensors: bool = True
    ) -> dict[str, StoredEmbedding | None]:
        """Several embeddings at once, keyed by reference (None where missing).

        Each embedding is read in its own MULTI/EXEC (its keys share a slot),
        all concurrently on pooled connections: one round trip in wall time,
        and no command spans two slots, so it works on Redis Cluster too.
        """
        unique = list(dict.fromkeys(refs))
        for ref in unique:  # refuse a bad reference before any I/O
            self.keys_for(ref, tenant=tenant)
        found = await asyncio.gather(*(self.get(r, tenant=tenant, with_tensors=with_tensors) for r in unique))
        return dict(zip(unique, found, strict=True))

    async def exists(self, ref: str, *, tenant: str) -> bool:
        """True if both keys of the embedding are present (no integrity check)."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("exists"):
            return int(await self._redis.exists(keys.meta, keys.data)) == 2

    async def delete(self, ref: str, *, tenant: str) -> bool:
        """Remove an embedding (UNLINK: freed in the background); False if there was none."""
        keys = self.keys_for(ref, tenant=tenant)
        async with self._guard("delete"):
            return int(await self._redis.unlink(keys.meta, keys.data)) > 0


def _report_corrupt(keys: EmbeddingKeys, exc: codec.CorruptEmbedding, action: str) -> None:
    """The one place a failed integrity check is logged and counted."""
    STORE_CORRUPT.labels(exc.reason).inc()
    log.warning("corrupt embedding record %s (%s: %s); %s", keys.meta, exc.reason, exc, action)


def _set_expiry(descriptor: EmbeddingDescriptor, pttl_ms: int) -> None:
    """Set expires_at from the key's remaining lifetime (clear it when the key does not expire)."""
    if pttl_ms is not None and pttl_ms >= 0:
        descriptor.expires_at.FromNanoseconds(time.time_ns() + pttl_ms * 1_000_000)
    else:
        descriptor.ClearField("expires_at")
