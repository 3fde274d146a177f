"""Decode one encoded image into an RGB `PIL.Image` the model processors can take.

Rules (docs/inputs.md section 3): only JPEG, PNG, WebP, GIF (first frame), BMP and
TIFF are opened; the size is refused from the header before any pixel memory
is allocated; the request's pixel budget is charged; the image is fully
decoded so a truncated file fails here, not later inside a model processor;
EXIF orientation is applied; transparency is flattened onto a background.

Opening goes through Pillow's plugin registry (`Image.OPEN`, the table
`Image.open(formats=...)` itself walks) instead of `Image.open`, because
`Image.open` applies Pillow's process-global `MAX_IMAGE_PIXELS` check, which
any other library may change; the limit here must be
`Settings.image_max_pixels`, nothing else. Pillow's own bomb error or warning
from inside a plugin (a GIF frame larger than its screen, a TIFF tile) is
mapped to `MediaTooLarge` as well.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from collections.abc import Callable
from typing import IO

from PIL import Image, ImageFile, ImageOps

from mmserve.config import Settings
from mmserve.errors import Internal, InvalidArgument, MediaTooLarge, MmserveError
from services.encoder.media.budget import RequestBudget, check_decoded_bytes

logger = logging.getLogger(__name__)

# Pillow format ids, in the order they are tried. "MPO" is what Pillow calls a
# camera JPEG carrying extra pictures; it is opened by the JPEG plugin.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_RESULT_FORMATS = frozenset(IMAGE_FORMATS) | {"MPO"}
_ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HEX_COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")
WHITE: tuple[int, int, int] = (255, 255, 255)


def parse_color(value: str, field: str) -> tuple[int, int, int]:
    """Parse "#RRGGBB" or "#RGB" (the `rgba_background_color` option) into an RGB tuple."""
    if not isinstance(value, str) or not _HEX_COLOR.fullmatch(value.strip()):
        raise InvalidArgument('must be a color as "#RRGGBB" or "#RGB"', field=field)
    digits = value.strip()[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return (int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16))


def sniff_image_format(head: bytes) -> str | None:
    """The accepted format whose signature `head` (first 16+ bytes) carries, or None.

    Cheap routing help for callers (e.g. video frames, the mime hint check);
    `decode_image` still decides by actually opening the bytes.
    """
    for fmt in IMAGE_FORMATS:
        entry = _plugin(fmt)
        if entry is None:
            continue
        _, accept = entry
        verdict = True if accept is None else accept(head[:16])
        if verdict and not isinstance(verdict, str):
            return fmt
    return None


def decode_image(
    data: bytes,
    *,
    settings: Settings,
    budget: RequestBudget,
    background: tuple[int, int, int] = WHITE,
    field: str = "source",
) -> Image.Image:
    """Decode `data` into a fully loaded RGB image; CPU-bound, run it in a worker thread."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some other code switched Pillow into accepting truncated files; decoding now
        # would silently accept half images, so fail loudly instead.
        logger.error("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code; refusing to decode")
        raise Internal("image decoding is misconfigured on this server", field=field)
    try:
        return _decode(data, settings=settings, budget=budget, background=background, field=field)
    except (MmserveError, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(settings.image_max_pixels, field) from None
    except Exception as exc:  # Pillow decoders raise many types on corrupt input
        logger.info("image decode failed: %r", exc)
        raise InvalidArgument("image data is corrupt or truncated", field=field) from None


def _decode(
    data: bytes,
    *,
    settings: Settings,
    budget: RequestBudget,
    background: tuple[int, int, int],
    field: str,
) -> Image.Image:
    opened = _open_allowed(io.BytesIO(data), field=field)
    _check_size(opened, settings.image_max_pixels, field)
    _fit_memory(opened, settings.media_max_decoded_bytes, field)
    width, height = opened.size
    budget.take_pixels(width * height, field)
    opened.load()  # full decode: a truncated or corrupt file raises here
    _check_size(opened, settings.image_max_pixels, field)  # a GIF frame may have grown it
    return _to_rgb(ImageOps.exif_transpose(opened), background)


_Opener = tuple[
    Callable[[IO[bytes], str | bytes], ImageFile.ImageFile],
    Callable[[bytes], bool | str] | None,
]


def _plugin(fmt: str) -> _Opener | None:
    if fmt not in Image.OPEN:
        Image.init()
    return Image.OPEN.get(fmt)


def _open_allowed(fp: IO[bytes], *, field: str) -> ImageFile.ImageFile:
    """What `Image.open(fp, formats=IMAGE_FORMATS)` does, minus the global bomb check."""
    Image.preinit()
    prefix = fp.read(16)
    for fmt in IMAGE_FORMATS:
        entry = _plugin(fmt)
        if entry is None:  # this Pillow build lacks the codec (e.g. no libwebp)
            continue
        factory, accept = entry
        if accept is not None:
            verdict = accept(prefix)
            if isinstance(verdict, str) or not verdict:  # a str means "would be this, codec missing"
                continue
        fp.seek(0)
        try:
            image = factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # same set Image.open treats as "not this format"
        if image.format in _ACCEPTED_RESULT_FORMATS:
            return image
    raise InvalidArgument(f"not a supported image (accepted: {_ACCEPTED_NAMES})", field=field)


#: Bytes per pixel of a decoded image, by Pillow mode (others: 4).
_MODE_BYTES = {
    "1": 1,
    "L": 1,
    "P": 1,
    "LA": 2,
    "PA": 2,
    "I;16": 2,
    "I;16L": 2,
    "I;16B": 2,
    "I;16N": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
}


def decoded_bytes(size: tuple[int, int], mode: str, *, alpha: bool) -> int:
    """Peak bytes of decoding: the decoded pixels plus what `_to_rgb` makes of them (RGBA copies when flattening)."""
    width, height = size
    conversion = 4 + 4 + 4 + 3 if alpha else 3
    return width * height * (_MODE_BYTES.get(mode, 4) + conversion)


def _fit_memory(image: ImageFile.ImageFile, limit: int, field: str) -> None:
    """Hold one image's decode to `limit` bytes: a JPEG decodes at 1/2, 1/4 or 1/8 scale (its DCT allows it), else refuse.

    Checked from the header, before any pixel is decoded: a 420 KB 12000x12000 PNG is refused in milliseconds
    instead of taking seconds and gigabytes. Images that fit are decoded exactly as before.
    """
    alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    need = decoded_bytes(image.size, image.mode, alpha=alpha)
    if need > limit and image.format in ("JPEG", "MPO"):
        scale = math.ceil(math.sqrt(need / limit))
        width, height = image.size
        image.draft("RGB", (max(1, width // scale), max(1, height // scale)))
        need = decoded_bytes(image.size, image.mode, alpha=False)
    check_decoded_bytes(need, limit, field, f"this {image.width}x{image.height} image")


def _check_size(image: ImageFile.ImageFile, limit: int, field: str) -> None:
    sizes = [image.size]
    tile_size = getattr(image, "_tile_size", None)  # TIFF allocates this, not `size`
    if isinstance(tile_size, tuple) and len(tile_size) == 2:
        sizes.append(tile_size)
    for width, height in sizes:
        if width <= 0 or height <= 0:
            raise InvalidArgument("image has an empty size", field=field)
        if width * height > limit:
            raise _too_many_pixels(limit, field)


def _too_many_pixels(limit: int, field: str) -> MediaTooLarge:
    return MediaTooLarge(
        f"image has more than the allowed {limit} pixels",
        field=field,
        metadata={"limit": str(limit), "setting": "image_max_pixels"},
    )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Flatten transparency onto `background` and convert to 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") would clip 16-bit values at 255 (an almost white image).
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        image.info.pop("transparency", None)  # a 16-bit key colour means nothing in 8 bits
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return image.convert("RGB")
