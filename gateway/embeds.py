"""The `image_embeds` / `audio_embeds` content parts -> MediaSource.embeds, and encoder errors back to their JSON names.

The gateway only checks the JSON shape and undoes the base64 (strictly, and
for the raw form only after the text length has been found to match the
declared shape, so nothing larger than declared is ever allocated). Parsing
the tensors and checking them against the model is the encoder's job.

    {"type": "image_embeds", "image_embeds": "<base64 safetensors>", "image_grid_thw": [1, h, w]}
    {"type": "image_embeds", "image_embeds": {"data": "<base64>", "dtype": "float32", "shape": [tokens, hidden]},
     "image_grid_thw": [1, h, w], "deepstack": [{"data": ..., "dtype": ..., "shape": ...}, ...]}
    {"type": "audio_embeds", "audio_embeds": ..., "audio_feature_length": frames}
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import Any

from mmserve.api.common.v1 import media_pb2, tensor_pb2
from mmserve.errors import InvalidArgument

#: part type -> the placement keys it takes beside the tensor payload
PLACEMENT_KEYS = {"image_embeds": ("image_grid_thw", "deepstack"), "audio_embeds": ("audio_feature_length",)}
#: dtype names of the raw form -> (proto dtype, bytes per element)
DTYPES = {
    "float32": (tensor_pb2.DATA_TYPE_FLOAT32, 4),
    "float16": (tensor_pb2.DATA_TYPE_FLOAT16, 2),
    "bfloat16": (tensor_pb2.DATA_TYPE_BFLOAT16, 2),
    "float64": (tensor_pb2.DATA_TYPE_FLOAT64, 8),
}
INT64_MAX = 2**63 - 1
_ENCODER_FIELD = re.compile(r"^(messages\[(\d+)\]\.content\[(\d+)\]|content\[(\d+)\])\.source\.embeds(.*)$")
_TENSOR_FIELD = re.compile(r"^\.tensors\[(\d+)\](.*)$")


def _b64(text: Any, field: str) -> bytes:
    """Strict base64 (no stray characters, padding required)."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("must be a non-empty base64 string", field=field)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("is not valid base64", field=field) from None


def _size(value: Any, field: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT64_MAX:
        raise InvalidArgument(f"must be an integer >= {low}", field=field)
    return value


def _raw_tensor(value: Any, name: str, field: str) -> tensor_pb2.NamedTensor:
    """{"data", "dtype", "shape"} -> NamedTensor, the declared size checked against the base64 length first."""
    if not isinstance(value, dict):
        raise InvalidArgument('must be {"data": "<base64>", "dtype": "float32", "shape": [tokens, hidden]}', field=field)
    dtype = DTYPES.get(value.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}", field=f"{field}.dtype")
    shape = value.get("shape")
    if not isinstance(shape, list) or not shape:
        raise InvalidArgument("shape must be a list of sizes, e.g. [tokens, hidden]", field=f"{field}.shape")
    dims = [_size(d, f"{field}.shape[{i}]") for i, d in enumerate(shape)]
    need = math.prod(dims) * dtype[1]
    text = value.get("data")
    if not isinstance(text, str):
        raise InvalidArgument("data must be a base64 string", field=f"{field}.data")
    if len(text) != 4 * math.ceil(need / 3):  # padded base64 of exactly `need` bytes; checked before decoding
        raise InvalidArgument(
            f"shape {dims} of {value['dtype']} needs {need} bytes, data holds about {len(text) * 3 // 4}", field=f"{field}.shape"
        )
    data = _b64(text, f"{field}.data") if need else b""
    if len(data) != need:
        raise InvalidArgument(f"shape {dims} of {value['dtype']} needs {need} bytes, data holds {len(data)}", field=f"{field}.shape")
    return tensor_pb2.NamedTensor(name=name, tensor=tensor_pb2.Tensor(dtype=dtype[0], shape=dims, data=data))


def _placement(part: dict[str, Any], kind: str, field: str, embeds: media_pb2.EmbeddingInput) -> None:
    if kind == "image_embeds":
        grid = part.get("image_grid_thw")
        if not isinstance(grid, list) or len(grid) != 3:
            raise InvalidArgument("image_grid_thw [t, h, w] is required (the patch grid before merging)", field=f"{field}.image_grid_thw")
        embeds.grid_thw.extend(_size(v, f"{field}.image_grid_thw[{i}]", low=1) for i, v in enumerate(grid))
    else:
        embeds.audio_feature_length = _size(part.get("audio_feature_length"), f"{field}.audio_feature_length", low=1)


def fill_embeds(part: dict[str, Any], kind: str, field: str, item: media_pb2.MediaInput) -> None:
    """Set `item.source.embeds` from an embeds part; errors name the JSON field (`...image_embeds.shape`)."""
    payload = part[kind]
    embeds = item.source.embeds
    deepstack = part.get("deepstack")
    if isinstance(payload, str):
        if deepstack is not None:
            raise InvalidArgument("with safetensors, put the deepstack.<k> tensors in the file", field=f"{field}.deepstack")
        embeds.safetensors = _b64(payload, f"{field}.{kind}")
    else:
        embeds.tensors.append(_raw_tensor(payload, "embeddings", f"{field}.{kind}"))
        if deepstack is not None:
            if not isinstance(deepstack, list) or kind != "image_embeds":
                raise InvalidArgument("deepstack must be a list of tensors (images only)", field=f"{field}.deepstack")
            for k, layer in enumerate(deepstack):
                embeds.tensors.append(_raw_tensor(layer, f"deepstack.{k}", f"{field}.deepstack[{k}]"))
    _placement(part, kind, field, embeds)


def json_field(field: str | None, part_type: Any) -> str | None:
    """An encoder field under `source.embeds` in the request's JSON names; `part_type(path)` gives the part's type."""
    match = _ENCODER_FIELD.match(field or "")
    if not match:
        return field
    part, rest = match.group(1), match.group(5)
    kind = part_type(match)
    if kind not in PLACEMENT_KEYS:
        return field
    if rest == ".grid_thw":
        return f"{part}.image_grid_thw"
    if rest == ".audio_feature_length":
        return f"{part}.audio_feature_length"
    tensor = _TENSOR_FIELD.match(rest)
    if tensor:
        index, below = int(tensor.group(1)), tensor.group(2)
        return f"{part}.{kind}{below}" if index == 0 else f"{part}.deepstack[{index - 1}]{below}"
    return f"{part}.{kind}"


def chat_part_type(messages: list[Any]) -> Any:
    """`part_type` for json_field over chat messages (pydantic ChatMessage objects)."""

    def part_type(match: re.Match[str]) -> str | None:
        if match.group(2) is None:
            return None
        i, j = int(match.group(2)), int(match.group(3))
        content = messages[i].content if i < len(messages) else None
        return _type_at(content, j)

    return part_type


def content_part_type(content: list[Any]) -> Any:
    """`part_type` for json_field over a precompute request's `content`."""

    def part_type(match: re.Match[str]) -> str | None:
        return _type_at(content, int(match.group(4))) if match.group(4) is not None else None

    return part_type


def _type_at(content: Any, j: int) -> str | None:
    if not isinstance(content, list) or j >= len(content) or not isinstance(content[j], dict):
        return None
    kind = content[j].get("type")
    return kind if isinstance(kind, str) else None
