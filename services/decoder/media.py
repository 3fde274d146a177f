"""Resolve a conversation's media parts to stored embeddings.

References (an embedding id, or a uuid with no payload) are read from the
store and never reach the encoder. Everything else goes to the encoder in one
Encode call (it fetches, dedupes, batches and stores), and is then read back
from the store like a reference. Errors are re-anchored on the message part
they concern.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as enc_grpc
from mmserve.config import Settings
from mmserve.errors import MmserveError, NotFound, Reason, Unavailable, from_rpc_error
from mmserve.mediainput import is_reference, reference_of, source_kind
from mmserve.rpc.channel import client_channel
from mmserve.rpc.metadata import outgoing_metadata
from mmserve.store import EmbeddingStore, StoredEmbedding
from mmserve.store.identity import check_usable
from mmserve.store.keys import slot_of
from services.decoder.conversation import MediaPart
from services.decoder.embcache import EmbeddingCache

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN}


@dataclass
class ResolvedMedia:
    """Stored embeddings in prompt order, and how many were served without encoding."""

    embeddings: list[StoredEmbedding]
    cached: int


class EncoderClient:
    """The decoder's channel to the encoders: round-robin over the SERVING ones, Encode retried on UNAVAILABLE (mmserve.rpc.channel)."""

    def __init__(self, settings: Settings) -> None:
        self._channel = client_channel(settings.encoder_target, settings)
        self.stub = enc_grpc.EncoderServiceStub(self._channel)
        self.calls = 0

    async def encode(self, items: list[media_pb2.MediaInput], timeout: float | None) -> list[enc_pb.EncodeResult]:
        self.calls += 1
        reply = await self.stub.Encode(enc_pb.EncodeRequest(items=items), timeout=timeout, metadata=outgoing_metadata())
        return list(reply.results)

    async def close(self) -> None:
        await self._channel.close()


class MediaResolver:
    """Media parts -> stored embeddings for one model."""

    def __init__(self, store: EmbeddingStore, encoder: EncoderClient, fingerprint: str, *, cache_bytes: int = 0) -> None:
        self.store = store
        self.encoder = encoder
        self.fingerprint = fingerprint
        self.cache = EmbeddingCache(store, fingerprint, cache_bytes)

    async def resolve(self, parts: list[MediaPart], *, tenant: str, timeout: float | None) -> ResolvedMedia:
        if not parts:
            return ResolvedMedia([], 0)
        ids: list[str] = [""] * len(parts)
        cached = 0
        to_encode = [i for i, part in enumerate(parts) if not is_reference(part.item)]
        for i, part in enumerate(parts):
            if is_reference(part.item):
                ids[i] = reference_of(part.item)
                named = "source.embedding_id" if source_kind(part.item) == "embedding_id" else "uuid"
                slot_of(ids[i], tenant=tenant, field=f"{part.field}.{named}")  # a malformed reference, named on its part
                cached += 1
        if to_encode:
            results = await self._encode([parts[i] for i in to_encode], timeout)
            for i, result in zip(to_encode, results, strict=True):
                ids[i] = result.embedding.id
                cached += int(result.cached)
        found = await self.cache.get_many(list(dict.fromkeys(ids)), tenant=tenant)
        missing = [(part, ref) for part, ref in zip(parts, ids, strict=True) if found.get(ref) is None]
        if missing:
            refs = list(dict.fromkeys(ref for _, ref in missing))
            raise NotFound(
                f"no stored embedding for: {', '.join(refs)}",
                field=missing[0][0].field,
                reason=Reason.EMBEDDING_NOT_FOUND,
                metadata={"missing": ",".join(refs)},
            )
        embeddings = []
        for part, ref in zip(parts, ids, strict=True):
            stored = found[ref]
            assert stored is not None
            self._check(stored, part)
            embeddings.append(stored)
        return ResolvedMedia(embeddings, cached)

    def _check(self, stored: StoredEmbedding, part: MediaPart) -> None:
        check_usable(stored.descriptor, modality=part.item.modality, fingerprint=self.fingerprint, field=part.field)

    async def _encode(self, parts: list[MediaPart], timeout: float | None) -> list[enc_pb.EncodeResult]:
        try:
            return await self.encoder.encode([p.item for p in parts], timeout)
        except grpc.RpcError as exc:
            err = from_rpc_error(exc, peer="encoder")
            if exc.code() in _UNREACHABLE and err.reason in {Reason.UNAVAILABLE, Reason.INTERNAL}:
                raise Unavailable("the encoder is unavailable; retry later", reason=Reason.ENCODER_UNAVAILABLE) from None
            raise _reanchor(err, parts) from None


def _reanchor(err: MmserveError, parts: list[MediaPart]) -> MmserveError:
    """Map the encoder's `items[k].x` field onto `messages[i].content[j].x`."""
    field = err.field or ""
    if field.startswith("items["):
        index, _, rest = field[len("items[") :].partition("]")
        if index.isdigit() and int(index) < len(parts):
            err.field = parts[int(index)].field + rest
            return err
    if field == "items":
        err.field = "messages"
    return err
