"""The decoder's in-process cache of recently used embeddings (issue 14, item 5).

A hot image referenced by many chats is read from Redis once per decoder:
records are kept in a byte-bounded LRU keyed by (tenant, id, model
fingerprint). Invalidation is a version check on every use, not pub/sub: the
lookup reads only the record's seal (the meta hash's `record_checksum`, plus
EXISTS of the data and its TTL) in one round trip with no tensor bytes, and
the cached tensors are used only when the seal is the one they were read
with. Every write gets a new seal (the descriptor holds its creation time in
ns) and a delete removes it, so an overwrite or a DELETE on any replica is
seen by the very next chat, with no subscription to lose messages and no
window of staleness. On a miss (or a changed seal) the record is read in full
through the store's checked get and cached under the seal read before it, so
a write racing the read can only cause one more read later, never a stale hit.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

from mmserve.metrics import DECODER_CACHE_BYTES, DECODER_CACHE_HITS, DECODER_CACHE_MISSES
from mmserve.store import EmbeddingStore, StoredEmbedding

_Key = tuple[str, str, str]


class EmbeddingCache:
    """Byte-bounded LRU of stored embeddings in front of `store.get_many` (with tensors)."""

    def __init__(self, store: EmbeddingStore, fingerprint: str, max_bytes: int) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.max_bytes = max_bytes
        self._entries: OrderedDict[_Key, tuple[bytes, StoredEmbedding, int]] = OrderedDict()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    async def get_many(self, refs: list[str], *, tenant: str) -> dict[str, StoredEmbedding | None]:
        unique = list(dict.fromkeys(refs))
        if self.max_bytes <= 0:
            return await self.store.get_many(unique, tenant=tenant, with_tensors=True)
        for ref in unique:  # refuse a bad reference before any I/O
            self.store.keys_for(ref, tenant=tenant)
        seals = await asyncio.gather(*(self.store.seal_of(r, tenant=tenant) for r in unique))
        out: dict[str, StoredEmbedding | None] = {}
        fetch: list[tuple[str, bytes]] = []
        for ref, (seal, pttl) in zip(unique, seals, strict=True):
            key = (tenant, ref, self.fingerprint)
            if seal is None:
                self._drop(key)
                out[ref] = None
                continue
            entry = self._entries.get(key)
            if entry is not None and entry[0] == seal:
                self._entries.move_to_end(key)
                out[ref] = _fresh(entry[1], pttl)
                DECODER_CACHE_HITS.inc()
            else:
                fetch.append((ref, seal))
        if fetch:
            found = await self.store.get_many([r for r, _ in fetch], tenant=tenant, with_tensors=True)
            for ref, seal in fetch:
                stored = found.get(ref)
                DECODER_CACHE_MISSES.inc()
                out[ref] = stored
                key = (tenant, ref, self.fingerprint)
                self._drop(key)
                if stored is not None:
                    self._put(key, seal, stored)
        return {ref: out[ref] for ref in unique}

    def _put(self, key: _Key, seal: bytes, stored: StoredEmbedding) -> None:
        size = sum(t.nbytes for t in stored.tensors)
        if size > self.max_bytes:
            return
        self._entries[key] = (seal, stored, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
        DECODER_CACHE_BYTES.set(self._bytes)

    def _drop(self, key: _Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2]
            DECODER_CACHE_BYTES.set(self._bytes)


def _fresh(stored: StoredEmbedding, pttl_ms: int) -> StoredEmbedding:
    """The cached record with its expires_at as Redis says now (the tensors are shared, read-only)."""
    descriptor = type(stored.descriptor)()
    descriptor.CopyFrom(stored.descriptor)
    if pttl_ms is not None and pttl_ms >= 0:
        descriptor.expires_at.FromNanoseconds(time.time_ns() + pttl_ms * 1_000_000)
    else:
        descriptor.ClearField("expires_at")
    return StoredEmbedding(descriptor, stored.tensors)
