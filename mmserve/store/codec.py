"""How one embedding maps onto its two Redis values, and the one check that a stored record is whole.

`:data` is the tensors' raw bytes concatenated in descriptor order (offsets
follow from the TensorInfo list, so no framing is stored). `:meta` is a hash:
the serialized EmbeddingDescriptor (the source of truth for readers), the
data's checksum, a few human-readable copies of descriptor fields (so an
operator can understand a key with `redis-cli HGETALL` alone), and the record
checksum, which covers every other field of the hash, names and values.

Two levels so that a metadata-only read (STRLEN instead of GET) is checked
too: the record checksum seals the hash, data_checksum (inside the seal)
seals the tensor bytes. `open_record` is the only way the store reads a
record: nothing parses a stored descriptor before the seal is checked.

Checksums: the data's is xxh3-64 (xxhash). Measured on 16 MB on the dev machine
(2 shared cores): xxh3_64 0.66 ms (~24 GB/s), zlib crc32 7-9 ms, sha256 ~12 ms;
it guards against torn, truncated or flipped values, not against an attacker
(who could rewrite every key), so the fastest one wins: at crc32's speed the
checksum alone cost a 1 MB put or get ~20% of a raw SET/GET. The record's is
sha256: the hash is a few hundred bytes, so it costs microseconds. Both name
their algorithm ("xxh3_64:<hex>", "sha256:<hex>"); records sealed with a
"crc32:<hex>" data checksum (before xxh3) are still verified with crc32.

Records of the first format (a crc32 of the tensor bytes only, in `checksum`)
are read as corrupt with reason "old_format": their descriptor is covered by
nothing, so serving them would keep the hole the seal closes, and embeddings
expire anyway; re-encoding the media writes a sealed record.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

import xxhash
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.store.tensors import RawTensor, dtype_name, tensor_nbytes

# Hash fields of `:meta` that readers use (every field is under the record checksum).
F_DESCRIPTOR = "descriptor"
F_DATA_CHECKSUM = "data_checksum"
F_RECORD_CHECKSUM = "record_checksum"
F_CHUNKS = "chunks"  # how many values hold the data (absent: one)
F_OLD_CHECKSUM = "checksum"  # the first format's only checksum (tensor bytes)

_RECORD_DOMAIN = b"mmserve.embedding-record.v2\0"

# One compact JSON encoder, built once: json.dumps(..., separators=...) builds a new encoder on every
# call (~5 us each, three per put). Same output as json.dumps with those separators.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode

# Above this size, joining tensors runs in a worker thread (bytes.join releases
# the GIL there, and the event loop keeps serving).
OFFLOAD_BYTES = 2 * 1024 * 1024
# Above this size, checksumming does too (xxh3 hashes 64 MiB in ~3 ms: below, a thread costs more than it saves).
CHECKSUM_OFFLOAD_BYTES = 64 * 1024 * 1024

#: Why a record was judged corrupt (the label of mmserve_store_corrupt_records_total).
CorruptReason = Literal["checksum", "incomplete", "old_format"]


class CorruptEmbedding(Exception):
    """Stored values that do not fit together; readers treat the embedding as missing."""

    def __init__(self, message: str, reason: CorruptReason = "checksum") -> None:
        super().__init__(message)
        self.reason: CorruptReason = reason


def _crc32(data: bytes | memoryview) -> str:
    return f"{zlib.crc32(data):08x}"


#: Data checksum algorithms by name: the first one writes, every one verifies what it wrote.
DATA_CHECKSUMS: dict[str, Callable[[bytes | memoryview], str]] = {
    "xxh3_64": xxhash.xxh3_64_hexdigest,
    "crc32": _crc32,
}
_WRITE_ALGORITHM = next(iter(DATA_CHECKSUMS))


def checksum(data: bytes | memoryview, algorithm: str = _WRITE_ALGORITHM) -> str:
    """Self-describing checksum of an embedding's tensor bytes ("xxh3_64:<hex>")."""
    return f"{algorithm}:{DATA_CHECKSUMS[algorithm](data)}"


def record_checksum(fields: Mapping[bytes, bytes]) -> bytes:
    """Self-describing checksum of a meta hash: every field but itself, sorted, length-framed."""
    digest = hashlib.sha256(_RECORD_DOMAIN)
    seal = F_RECORD_CHECKSUM.encode()
    for name in sorted(fields):
        if name == seal:
            continue
        value = fields[name]
        digest.update(len(name).to_bytes(4, "big") + name + len(value).to_bytes(8, "big"))
        digest.update(value)
    return b"sha256:" + digest.hexdigest().encode()


def _join_sync(tensors: Sequence[RawTensor]) -> bytes | memoryview:
    return tensors[0].data if len(tensors) == 1 else b"".join(t.data for t in tensors)


async def join(tensors: Sequence[RawTensor]) -> bytes | memoryview:
    """The `:data` value: one copy at most, none for a single tensor."""
    if len(tensors) > 1 and sum(t.nbytes for t in tensors) >= OFFLOAD_BYTES:
        return await asyncio.to_thread(_join_sync, tensors)
    return _join_sync(tensors)


async def data_checksum(payload: bytes | memoryview, algorithm: str = _WRITE_ALGORITHM) -> str:
    """`checksum`, in a worker thread for very large values (the event loop keeps serving)."""
    if len(payload) >= CHECKSUM_OFFLOAD_BYTES:
        return await asyncio.to_thread(checksum, payload, algorithm)
    return checksum(payload, algorithm)


async def verify(data: bytes, expected: str) -> bool:
    """True if `data` has the stored checksum (computed with the algorithm it names; unknown: False)."""
    algorithm = expected.partition(":")[0]
    return algorithm in DATA_CHECKSUMS and await data_checksum(data, algorithm) == expected


def unpack(descriptor: embedding_pb2.EmbeddingDescriptor, data: bytes) -> list[RawTensor]:
    """Split `:data` into tensors as zero-copy views, checking the sizes add up."""
    view = memoryview(data)
    tensors: list[RawTensor] = []
    offset = 0
    try:
        for info in descriptor.tensors:
            size = tensor_nbytes(info.dtype, info.shape)
            tensors.append(RawTensor.from_info(info, view[offset : offset + size]))
            offset += size
    except Exception as exc:  # an InvalidArgument here means stored garbage, not a bad request
        raise CorruptEmbedding(f"tensor list does not match the data: {exc}") from exc
    if offset != len(data):
        raise CorruptEmbedding(f"tensors cover {offset} bytes, data has {len(data)}")
    return tensors


def modality_name(modality: int) -> str:
    """Short modality name ("image", "video", ...) for the meta hash."""
    try:
        return media_pb2.Modality.Name(modality).removeprefix("MODALITY_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(modality)


def _iso(ts_nanos: int) -> str:
    return datetime.fromtimestamp(ts_nanos / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_bytes(value: bytes | str | int) -> bytes:
    """A hash value exactly as Redis will store it (and HGETALL return it)."""
    if isinstance(value, bytes):
        return value
    return (str(value) if isinstance(value, int) else value).encode()


def encode_meta(descriptor: embedding_pb2.EmbeddingDescriptor, data_check: str, chunks: int = 1) -> dict[bytes, bytes]:
    """The sealed `:meta` hash for a complete descriptor and its data's checksum (over all `chunks` values)."""
    first = descriptor.tensors[0]
    placement = descriptor.WhichOneof("placement")
    fields: dict[str, bytes | str | int] = {
        F_DESCRIPTOR: descriptor.SerializeToString(deterministic=True),
        F_DATA_CHECKSUM: data_check,
        "id": descriptor.id,
        "modality": modality_name(descriptor.modality),
        "model": descriptor.model,
        "fingerprint": descriptor.model_fingerprint,
        "content_sha256": descriptor.content_sha256,
        "options": descriptor.options_json,
        "token_count": descriptor.token_count,
        "dtype": dtype_name(first.dtype),
        "shape": _compact_json(list(first.shape)),
        "tensors": _compact_json([[t.name, dtype_name(t.dtype), list(t.shape)] for t in descriptor.tensors]),
        "placement": _compact_json(
            {placement: json_format.MessageToDict(getattr(descriptor, placement), preserving_proto_field_name=True)} if placement else {}
        ),
        "created": _iso(descriptor.created_at.ToNanoseconds()),
        "nbytes": descriptor.nbytes,
    }
    if chunks > 1:
        fields[F_CHUNKS] = chunks
    meta = {name.encode(): _as_bytes(value) for name, value in fields.items()}
    meta[F_RECORD_CHECKSUM.encode()] = record_checksum(meta)
    return meta


def decode_descriptor(raw: bytes) -> embedding_pb2.EmbeddingDescriptor:
    """Parse the stored descriptor."""
    descriptor = embedding_pb2.EmbeddingDescriptor()
    try:
        descriptor.ParseFromString(raw)
    except DecodeError as exc:
        raise CorruptEmbedding("stored descriptor does not parse") from exc
    return descriptor


def chunk_count(fields: Mapping[bytes, bytes]) -> int:
    """How many values hold a record's data, as its meta says (1 when unsaid or unreadable: the seal decides)."""
    raw = fields.get(F_CHUNKS.encode(), b"1")
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def check_seal(fields: Mapping[bytes, bytes]) -> None:
    """Raise CorruptEmbedding unless the meta hash is exactly what a writer sealed."""
    seal = fields.get(F_RECORD_CHECKSUM.encode())
    if seal is None:
        if F_OLD_CHECKSUM.encode() in fields:
            raise CorruptEmbedding("written by an older mmserve (descriptor not checksummed)", reason="old_format")
        raise CorruptEmbedding("record checksum missing")
    if record_checksum(fields) != seal:
        raise CorruptEmbedding("record checksum mismatch")


async def open_record(
    ref: str, fields: Mapping[bytes, bytes], data: bytes | int | None
) -> tuple[embedding_pb2.EmbeddingDescriptor, list[RawTensor]]:
    """The one integrity check of the read path: a whole, sealed record for `ref`, or CorruptEmbedding.

    `fields` is the meta hash (non-empty), `data` the data value (GET; None if
    the key is gone) or its length (STRLEN, for metadata-only reads: the data
    is then checked by size only). Returns the descriptor and the tensors
    (none for a length).
    """
    check_seal(fields)
    if data is None:
        raise CorruptEmbedding("data key missing (evicted?)", reason="incomplete")
    descriptor = decode_descriptor(fields.get(F_DESCRIPTOR.encode(), b""))
    if descriptor.id != ref:
        raise CorruptEmbedding(f"descriptor names {descriptor.id!r}")
    size = data if isinstance(data, int) else len(data)
    if size != descriptor.nbytes:
        raise CorruptEmbedding(f"data has {size} bytes, descriptor says {descriptor.nbytes}", reason="incomplete")
    if isinstance(data, int):
        return descriptor, []
    expected = fields.get(F_DATA_CHECKSUM.encode(), b"").decode("ascii", "replace")
    if not await verify(data, expected):
        raise CorruptEmbedding("data checksum mismatch")
    return descriptor, unpack(descriptor, data)
