"""Per-modality decoding: encoded bytes -> what a family's `prepare` takes.

Also the media-level options (how to decode, as opposed to how the model's
processor resizes), validated here because they are part of an embedding's
identity and must be known before anything is fetched or decoded.
"""

from __future__ import annotations

from typing import Any

from mmserve.common.v1 import media_pb2
from mmserve.config import Settings
from mmserve.errors import InvalidArgument
from services.encoder.media.budget import RequestBudget
from services.encoder.media.image import decode_image, parse_color


def media_options(item: media_pb2.MediaInput) -> dict[str, Any]:
    """Decoding options of an item, defaults filled in, canonical values."""
    if item.modality == media_pb2.MODALITY_IMAGE:
        color = item.image.rgba_background_color if item.image.HasField("rgba_background_color") else "#ffffff"
        r, g, b = parse_color(color, "image.rgba_background_color")
        return {"background": f"#{r:02x}{g:02x}{b:02x}"}
    return {}


def decode_media(modality: int, data: bytes, options: dict[str, Any], settings: Settings, budget: RequestBudget) -> Any:
    """Decode one item's bytes (CPU-bound: call from a worker thread)."""
    if modality == media_pb2.MODALITY_IMAGE:
        background = parse_color(options["background"], "image.rgba_background_color")
        return decode_image(data, settings=settings, budget=budget, background=background, field="source")
    raise InvalidArgument("this modality is not supported by the encoder yet", field="modality")
