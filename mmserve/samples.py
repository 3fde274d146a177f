"""Deterministic sample media for the tests and benchmarks (one definition, so both measure the same inputs)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_bytes(width: int = 96, height: int = 64, seed: int = 0, mode: str = "RGB") -> bytes:
    """A noisy PNG; noise makes different seeds give different embeddings."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode=mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """A `data:` URL (strict base64) of `data`."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
