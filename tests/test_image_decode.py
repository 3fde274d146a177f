"""Image decoding: format allowlist, header size refusal, truncation, EXIF, transparency, budget."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmserve.config import Settings
from mmserve.errors import Internal, InvalidArgument, MediaTooLarge
from services.encoder.media.budget import RequestBudget
from services.encoder.media.image import decode_image, parse_color, sniff_image_format

SETTINGS = Settings()
FIELD = "messages[0].content[1]"


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def decode(data: bytes, *, budget: RequestBudget | None = None, settings: Settings = SETTINGS, **kw: object) -> Image.Image:
    return decode_image(
        data,
        settings=settings,
        budget=budget or RequestBudget.from_settings(settings),
        field=FIELD,
        **kw,  # type: ignore[arg-type]
    )


def close(a: object, b: tuple[int, ...], tol: int = 12) -> bool:
    """Pixel `a` (as getpixel returns it) is within `tol` of `b` in every channel."""
    assert isinstance(a, tuple)
    return all(abs(int(x) - y) <= tol for x, y in zip(a, b, strict=True))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height but which carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_frame_larger_than_screen(width: int, height: int) -> bytes:
    """A GIF with a 1x1 logical screen whose first frame claims width x height."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


# --- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tol"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 12),
        ("WEBP", {"quality": 95}, 12),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_accepted_formats_decode_to_rgb(fmt: str, kwargs: dict[str, object], tol: int) -> None:
    source = Image.new("RGB", (33, 17), (200, 40, 90))
    source.paste((0, 0, 255), (20, 0, 33, 17))
    image = decode(encode(source, fmt, **kwargs))
    assert image.mode == "RGB"
    assert image.size == (33, 17)
    assert close(image.getpixel((2, 8)), (200, 40, 90), tol)
    assert close(image.getpixel((30, 8)), (0, 0, 255), tol)


def test_sniff() -> None:
    assert sniff_image_format(encode(Image.new("RGB", (2, 2)), "PNG")) == "PNG"
    assert sniff_image_format(encode(Image.new("RGB", (2, 2)), "JPEG")) == "JPEG"
    assert sniff_image_format(encode(Image.new("RGB", (2, 2)), "WEBP")) == "WEBP"
    assert sniff_image_format(b"%PDF-1.7\n") is None


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert decode(out.getvalue()).getpixel((4, 4)) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = decode(encode(Image.fromarray(values), "PNG"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_jpeg() -> None:
    image = decode(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert image.mode == "RGB"
    assert close(image.getpixel((4, 4)), (255, 0, 0), 12)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        os.urandom(4096),
        b"",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n",
        encode(Image.new("RGB", (16, 16)), "ICO"),
        encode(Image.new("RGB", (16, 16)), "PPM"),
        encode(Image.new("RGB", (16, 16)), "TGA"),
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    ],
    ids=["random", "empty", "pdf", "ico", "ppm", "tga", "svg"],
)
def test_unsupported_bytes(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert type(info.value) is InvalidArgument
    assert info.value.field == FIELD
    assert "not a supported image (accepted: JPEG, PNG, WebP, GIF, BMP, TIFF)" in info.value.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_truncated_file(fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    with pytest.raises(InvalidArgument) as info:
        decode(data[: len(data) * 2 // 3])
    assert info.value.field == FIELD
    assert "corrupt or truncated" in info.value.message
    assert "Traceback" not in info.value.message


def test_decompression_bomb_header_refused_fast() -> None:
    budget = RequestBudget.from_settings(SETTINGS)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge) as info:
        decode(bomb_png(40000, 40000), budget=budget)
    assert time.monotonic() - started < 0.5
    assert info.value.field == FIELD
    assert str(SETTINGS.image_max_pixels) in info.value.message
    assert budget.pixels_left == SETTINGS.request_pixel_budget  # nothing charged


@pytest.mark.parametrize("pil_global", [None, 10, 10**12])
def test_pixel_limit_ignores_pillow_global(monkeypatch: pytest.MonkeyPatch, pil_global: int | None) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_global)
    with pytest.raises(MediaTooLarge):
        decode(bomb_png(40000, 40000))
    settings = Settings(image_max_pixels=1000)
    with pytest.raises(MediaTooLarge) as info:
        decode(encode(Image.new("RGB", (40, 40)), "PNG"), settings=settings)
    assert info.value.metadata["setting"] == "image_max_pixels"
    assert decode(encode(Image.new("RGB", (30, 30)), "PNG"), settings=settings).size == (30, 30)


@pytest.mark.parametrize("pil_global", [None, Image.MAX_IMAGE_PIXELS])
def test_gif_frame_larger_than_its_screen(monkeypatch: pytest.MonkeyPatch, pil_global: int | None) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_global)
    started = time.monotonic()
    with pytest.raises(MediaTooLarge):
        decode(gif_frame_larger_than_screen(30000, 30000))
    assert time.monotonic() - started < 0.5


def test_load_truncated_images_set_elsewhere_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(Internal) as info:
        decode(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert "misconfigured" in info.value.message


# --- EXIF and transparency ---------------------------------------------------------------------


def test_exif_orientation_applied() -> None:
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode(encode(source, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), (255, 0, 0), 20)  # the left edge is now on top
    assert close(image.getpixel((10, 35)), (0, 0, 255), 20)


def _half_transparent() -> Image.Image:
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # left: fully transparent red
    image.paste((0, 0, 255, 255), (5, 0, 10, 10))  # right: opaque blue
    image.putpixel((0, 0), (255, 0, 0, 128))  # one half-transparent red pixel
    return image


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_composited_on_white(fmt: str) -> None:
    options = {"lossless": True} if fmt == "WEBP" else {}
    image = decode(encode(_half_transparent(), fmt, **options))
    assert image.mode == "RGB"
    assert image.getpixel((2, 5)) == (255, 255, 255)
    assert image.getpixel((7, 5)) == (0, 0, 255)
    assert close(image.getpixel((0, 0)), (255, 127, 127), 2)


def test_rgba_composited_on_given_background() -> None:
    background = parse_color("#008040", "media_io_kwargs.image.rgba_background_color")
    image = decode(encode(_half_transparent(), "PNG"), background=background)
    assert image.getpixel((2, 5)) == (0, 128, 64)
    assert image.getpixel((7, 5)) == (0, 0, 255)


def test_la_and_palette_transparency() -> None:
    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((3, 3), (0, 255))
    decoded = decode(encode(la, "PNG"), background=(10, 20, 30))
    assert decoded.getpixel((0, 0)) == (10, 20, 30)
    assert decoded.getpixel((3, 3)) == (0, 0, 0)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    for fmt in ("PNG", "GIF"):
        decoded = decode(encode(palette, fmt, transparency=1), background=(10, 20, 30))
        assert decoded.getpixel((0, 0)) == (255, 0, 0)
        assert decoded.getpixel((2, 2)) == (10, 20, 30)


# --- the request's pixel budget ----------------------------------------------------------------


def test_pixel_budget_across_images() -> None:
    budget = RequestBudget(max_bytes=10**9, max_pixels=1000)
    data = encode(Image.new("RGB", (20, 20)), "PNG")  # 400 pixels each
    decode(data, budget=budget)
    decode(data, budget=budget)
    assert budget.pixels_left == 200
    with pytest.raises(MediaTooLarge) as info:
        decode(data, budget=budget)
    assert info.value.field == FIELD
    assert info.value.metadata["setting"] == "request_pixel_budget"
    assert "1000 pixels" in info.value.message


# --- colors -----------------------------------------------------------------------------------


def test_parse_color() -> None:
    assert parse_color("#ff8000", "f") == (255, 128, 0)
    assert parse_color("#FFF", "f") == (255, 255, 255)
    assert parse_color("#0a0", "f") == (0, 170, 0)


@pytest.mark.parametrize("value", ["ff8000", "#ff80", "#gg0000", "red", "", "#ff800000", "rgb(1,2,3)"])
def test_parse_color_errors(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_color(value, "media_io_kwargs.image.rgba_background_color")
    assert info.value.field == "media_io_kwargs.image.rgba_background_color"
    assert "#RRGGBB" in info.value.message


def big_png(width: int, height: int) -> bytes:
    """A real width x height RGB PNG (all black), compressed row by row: ~420 KB for 12000x12000."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_image_over_the_decoded_bytes_limit_is_refused_from_its_header() -> None:
    """A 12000x12000 PNG is under the pixel cap but would decode to ~860 MB: refused before any pixel is decoded."""
    data = big_png(12000, 12000)
    assert len(data) < 1 << 20 and SETTINGS.image_max_pixels > 12000 * 12000
    budget = RequestBudget.from_settings(SETTINGS)
    with pytest.raises(MediaTooLarge) as info:
        decode(data, budget=budget)
    assert info.value.metadata["setting"] == "media_max_decoded_bytes" and info.value.field == FIELD
    assert budget.pixels_left == SETTINGS.request_pixel_budget  # nothing charged


def test_large_jpeg_decodes_at_a_reduced_scale_within_the_limit() -> None:
    image = Image.new("RGB", (4000, 3000), (200, 30, 30))
    small = Settings(media_max_decoded_bytes=20 * (1 << 20))  # 4000x3000 RGB decodes to ~69 MB
    out = decode(encode(image, "JPEG", quality=90), settings=small)
    assert out.size in ((2000, 1500), (1000, 750)) and close(out.getpixel((10, 10)), (200, 30, 30))
    exact = decode(encode(image, "JPEG", quality=90))  # under the default limit: full size, as before
    assert exact.size == (4000, 3000)
