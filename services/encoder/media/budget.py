"""Per-request media budget: encoded bytes and decoded pixels shared by all items.

Per-item caps stop one huge file; they do not stop eight large-but-allowed
files in one request from exhausting memory together. Every fetch, inline
payload and decoder of one request draws from one `RequestBudget`, so the
request as a whole stays bounded (docs/inputs.md section 4).

A lock makes the check-and-take atomic: decoders run in worker threads
(`asyncio.to_thread`) while fetches run on the event loop, and both draw from
the same budget.
"""

from __future__ import annotations

import threading

from mmserve.config import Settings
from mmserve.errors import MediaTooLarge


def human_bytes(n: int) -> str:
    """Show a byte count the way an operator configured it (e.g. "64 MiB")."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


class RequestBudget:
    """What one request may still consume: encoded media bytes and decoded pixels."""

    def __init__(self, *, max_bytes: int, max_pixels: int) -> None:
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._bytes_left = max_bytes
        self._pixels_left = max_pixels
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestBudget:
        """A fresh budget with the server's per-request limits."""
        return cls(max_bytes=settings.max_request_media_bytes, max_pixels=settings.request_pixel_budget)

    @property
    def bytes_left(self) -> int:
        """Encoded bytes the request may still bring in."""
        return self._bytes_left

    @property
    def pixels_left(self) -> int:
        """Decoded pixels (images and video frames) the request may still produce."""
        return self._pixels_left

    def ensure_bytes(self, n: int, field: str | None) -> None:
        """Refuse early (e.g. from a Content-Length) without taking anything."""
        if n > self._bytes_left:
            raise self._bytes_error(field)

    def take_bytes(self, n: int, field: str | None) -> None:
        """Consume `n` encoded bytes, or raise `MediaTooLarge` naming `field` and the limit."""
        with self._lock:
            if n > self._bytes_left:
                raise self._bytes_error(field)
            self._bytes_left -= n

    def take_pixels(self, n: int, field: str | None) -> None:
        """Consume `n` decoded pixels, or raise `MediaTooLarge` naming `field` and the limit."""
        with self._lock:
            if n > self._pixels_left:
                raise MediaTooLarge(
                    f"the media in this request decode to more than the per-request budget of {self._max_pixels} pixels",
                    field=field,
                    metadata={"limit": str(self._max_pixels), "setting": "request_pixel_budget"},
                )
            self._pixels_left -= n

    def _bytes_error(self, field: str | None) -> MediaTooLarge:
        return MediaTooLarge(
            f"the media in this request together exceed the per-request limit of {human_bytes(self._max_bytes)}",
            field=field,
            metadata={"limit": str(self._max_bytes), "setting": "max_request_media_bytes"},
        )


def item_too_large(limit: int, field: str | None) -> MediaTooLarge:
    """The error for one item over Settings.max_item_bytes (shared by every source kind)."""
    return MediaTooLarge(
        f"the media item exceeds the per-item limit of {human_bytes(limit)}",
        field=field,
        metadata={"limit": str(limit), "setting": "max_item_bytes"},
    )


def check_decoded_bytes(n: int, limit: int, field: str | None, what: str) -> None:
    """Refuse one item whose decoded pixels would take more than `limit` bytes (before decoding them)."""
    if n > limit:
        raise MediaTooLarge(
            f"{what} would decode to {n / (1 << 20):.0f} MiB, more than the per-item limit of {human_bytes(limit)}",
            field=field,
            metadata={"limit": str(limit), "setting": "media_max_decoded_bytes"},
        )
