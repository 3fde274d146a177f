"""Client-supplied embeddings (MediaSource.embeds): checked against the model, then stored like encoded items.

The two forms end up as the same list of named raw tensors:
- `tensors`: raw little-endian bytes with a dtype and shape each; the declared
  size must equal the byte length before the bytes are looked at;
- `safetensors`: the file's header is read and checked here first (names,
  dtypes, shapes, offsets inside the buffer: nothing is allocated from what the
  header declares), then the safetensors library parses the file.
Pickle is never involved: bytes that look like pickle or torch.save are
refused by name. The model checks (hidden size, required tensors, token
count against the placement, finite values) come before anything is stored;
the placement rules are the family's (`client_tensor_names`,
`client_placement`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf import json_format

from mmserve.api.common.v1 import media_pb2, tensor_pb2
from mmserve.config import Settings
from mmserve.errors import InvalidArgument
from mmserve.models.families import EncodedItem
from mmserve.models.families.base import Family
from mmserve.models.tensors import TORCH_TO_PROTO, from_raw, to_raw
from mmserve.store import RawTensor, dtype_name, itemsize, tensor_nbytes
from services.encoder.media.budget import RequestBudget, item_too_large

FIELD = "source.embeds"
#: Element types a client embedding may have (cast to the model's dtype when stored).
FLOAT_DTYPES = frozenset(
    {tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT16, tensor_pb2.DATA_TYPE_BFLOAT16, tensor_pb2.DATA_TYPE_FLOAT64}
)
#: safetensors dtype names -> proto dtypes (only the floating types are accepted).
SAFETENSORS_DTYPES = {
    "F32": tensor_pb2.DATA_TYPE_FLOAT32,
    "F16": tensor_pb2.DATA_TYPE_FLOAT16,
    "BF16": tensor_pb2.DATA_TYPE_BFLOAT16,
    "F64": tensor_pb2.DATA_TYPE_FLOAT64,
}
#: Names accepted for the main tensor, stored as "embeddings".
MAIN_ALIASES = {"image_embeds": "embeddings", "audio_embeds": "embeddings"}
#: A safetensors header is JSON text of at most this many bytes (the library's own limit is 100 MB).
MAX_HEADER_BYTES = 1 << 20
#: Leading bytes of what this server never unpickles: pickle protocol 2+ and torch.save's zip.
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


@dataclass(frozen=True)
class _Named:
    """A parsed tensor with the field a client should fix when it is wrong."""

    raw: RawTensor
    field: str


def declared_bytes(embeds: media_pb2.EmbeddingInput) -> int:
    """Bytes the item carries, to check against the item and request limits before parsing."""
    return len(embeds.safetensors) + sum(len(t.tensor.data) for t in embeds.tensors)


def check_size(embeds: media_pb2.EmbeddingInput, settings: Settings, budget: RequestBudget) -> None:
    """Exactly one form, within the item byte limit, taken from the request budget."""
    if bool(embeds.safetensors) == bool(embeds.tensors):
        raise InvalidArgument("set exactly one of safetensors and tensors", field=FIELD)
    total = declared_bytes(embeds)
    if total > settings.max_item_bytes:
        raise item_too_large(settings.max_item_bytes, FIELD)
    budget.take_bytes(total, FIELD)


def _raw_form(embeds: media_pb2.EmbeddingInput) -> list[_Named]:
    out = []
    for i, named in enumerate(embeds.tensors):
        where = f"{FIELD}.tensors[{i}]"
        t = named.tensor
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidArgument("dtype must be float32, float16, bfloat16 or float64", field=f"{where}.dtype")
        shape = [int(d) for d in t.shape]
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"shape {shape} has a negative dimension", field=f"{where}.shape")
        need = tensor_nbytes(t.dtype, shape)
        if need != len(t.data):
            raise InvalidArgument(
                f"shape {shape} of {dtype_name(t.dtype)} needs {need} bytes, data holds {len(t.data)}", field=f"{where}.shape"
            )
        out.append(_Named(RawTensor(named.name, t.dtype, tuple(shape), t.data), where))
    return out


def _header(data: bytes) -> dict[str, Any]:
    """The safetensors header, checked so that every tensor lies inside the buffer with its declared size."""
    if data.startswith(PICKLE_MAGIC):
        raise InvalidArgument("this looks like pickle or torch.save data, which is never loaded: send safetensors", field=FIELD)
    if len(data) < 8:
        raise InvalidArgument("not a safetensors file: shorter than its 8-byte header length", field=FIELD)
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise InvalidArgument(f"not a safetensors file: header length {size} exceeds the data", field=FIELD)
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument("not a safetensors file: the header is not JSON", field=FIELD) from None
    if not isinstance(header, dict):
        raise InvalidArgument("not a safetensors file: the header is not an object", field=FIELD)
    body = len(data) - 8 - size
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(name, entry, body)
    return header


def _check_entry(name: str, entry: Any, body: int) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("data_offsets"), list):
        raise InvalidArgument(f"safetensors tensor {name!r}: malformed header entry", field=FIELD)
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise InvalidArgument(f"safetensors tensor {name!r}: dtype {entry.get('dtype')!r} is not one of F32, F16, BF16, F64", field=FIELD)
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidArgument(f"safetensors tensor {name!r}: shape {shape} is not a list of sizes", field=FIELD)
    if (
        len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= body
    ):
        raise InvalidArgument(f"safetensors tensor {name!r}: data offsets {offsets} lie outside the data", field=FIELD)
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize(dtype):
        raise InvalidArgument(f"safetensors tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes", field=FIELD)


def _safetensors_form(data: bytes) -> list[_Named]:
    import safetensors

    header = _header(data)
    try:
        parsed = safetensors.deserialize(data)
    except Exception as exc:  # the library's SafetensorError: still the client's bytes
        raise InvalidArgument(f"not a valid safetensors file: {exc}", field=FIELD) from None
    out = []
    for name, entry in parsed:
        dtype = SAFETENSORS_DTYPES[header[name]["dtype"]]  # the checked header's, whatever spelling the library returns
        raw = RawTensor(name, dtype, tuple(entry["shape"]), bytes(entry["data"]))
        out.append(_Named(raw, FIELD))
    return out


def _by_name(tensors: list[_Named], required: tuple[str, ...], modality: str) -> dict[str, _Named]:
    """The tensors under their stored names: exactly the required ones, each once."""
    out: dict[str, _Named] = {}
    for t in tensors:
        name = MAIN_ALIASES.get(t.raw.name, t.raw.name)
        if name not in required:
            raise InvalidArgument(f"unexpected tensor {t.raw.name!r}; this model takes: {', '.join(required)}", field=t.field)
        if name in out:
            raise InvalidArgument(f"tensor {name!r} is given twice", field=t.field)
        out[name] = t
    missing = [n for n in required if n not in out]
    if missing:
        raise InvalidArgument(f"missing tensor(s) {', '.join(missing)} for a {modality} embedding of this model", field=FIELD)
    return {name: out[name] for name in required}


def _check_values(tensors: dict[str, _Named], hidden: int, dtype: torch.dtype) -> tuple[list[RawTensor], int]:
    """[tokens, hidden] each, one token count, finite; cast to the model's dtype."""
    tokens = tensors["embeddings"].raw.shape[0] if tensors["embeddings"].raw.shape else 0
    out = []
    for name, t in tensors.items():
        shape = list(t.raw.shape)
        shape_field = t.field + (".shape" if t.field != FIELD else "")
        if len(shape) != 2 or shape[1] != hidden:
            raise InvalidArgument(f"tensor {name!r} has shape {shape}; this model needs [tokens, {hidden}]", field=shape_field)
        if shape[0] != tokens or tokens == 0:
            raise InvalidArgument(
                f"tensor {name!r} has {shape[0]} tokens, the embeddings {tokens}; need the same, at least 1", field=shape_field
            )
        value = from_raw(t.raw)
        if not bool(torch.isfinite(value).all()):
            raise InvalidArgument(f"tensor {name!r} has NaN or infinite values", field=t.field + (".data" if t.field != FIELD else ""))
        out.append(to_raw(name, value.to(dtype)))
    return out, tokens


def _digest(tensors: list[RawTensor], placement: Any) -> str:
    """Content sha256 over the stored tensors and placement (the same values in either form are one embedding)."""
    digest = hashlib.sha256(b"mmserve.client_embeds.v1\0")
    placed = json_format.MessageToDict(placement, preserving_proto_field_name=True)
    digest.update(json.dumps(placed, sort_keys=True, separators=(",", ":")).encode())
    for t in tensors:
        digest.update(json.dumps([t.name, int(t.dtype), list(t.shape)]).encode() + b"\0")
        digest.update(t.data)
    return digest.hexdigest()


def client_embedding(family: Family, modality: int, embeds: media_pb2.EmbeddingInput, modality_name: str) -> tuple[EncodedItem, str]:
    """Parse and check one client embedding; the item to store and its content sha256. Sizes were checked already."""
    required = family.client_tensor_names(modality)
    if not required:
        raise InvalidArgument(f"this model ({family.name}) does not accept {modality_name} embeddings", field=FIELD)
    named = _safetensors_form(embeds.safetensors) if embeds.safetensors else _raw_form(embeds)
    tensors = _by_name(named, required, modality_name)
    hidden = int(family.text_config.hidden_size)
    if family.dtype not in TORCH_TO_PROTO:
        raise InvalidArgument(f"the model's dtype {family.dtype} cannot hold client embeddings", field=FIELD)
    stored, tokens = _check_values(tensors, hidden, family.dtype)
    placement = family.client_placement(modality, embeds, tokens)
    return EncodedItem(stored, tokens, placement), _digest(stored, placement)
