"""What a MediaInput means, in one place for every service (no heavy imports).

A part is a *reference* when its source is an embedding id, or when it has a
uuid and no source at all (OpenAI's "payload null + uuid" form): references
are looked up, never fetched and never encoded.
"""

from __future__ import annotations

from mmserve.api.common.v1 import media_pb2

#: Prefix of content-derived embedding ids ("mmemb-<64 hex>"); client uuids may not use it.
CONTENT_ID_PREFIX = "mmemb-"


def source_kind(item: media_pb2.MediaInput) -> str | None:
    return item.source.WhichOneof("kind") if item.HasField("source") else None


def is_reference(item: media_pb2.MediaInput) -> bool:
    kind = source_kind(item)
    return kind == "embedding_id" or (kind is None and bool(item.uuid))


def reference_of(item: media_pb2.MediaInput) -> str:
    """The stored id a reference names."""
    return item.source.embedding_id if source_kind(item) == "embedding_id" else item.uuid
