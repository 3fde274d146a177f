"""Turn a byte-carrying `MediaSource` (raw bytes or a URL) into the encoded media bytes.

One entry point for every modality, so the rules of docs/inputs.md section 2 are
enforced in one place: size caps before anything large is held in memory,
strict base64 for data URLs, file:// confined below an operator-chosen root,
and the guarded fetcher for http(s). Source kinds that carry no encoded file
(embedding_id, frames, array) are dispatched by the caller.

Data URLs are parsed by hand: the stdlib has no data-URL parser, and
`urllib.request`'s handler decodes leniently (it skips invalid base64
characters), which the contract forbids.

A video may also come as vLLM's frame-list data URL,
`data:video/jpeg;base64,<frame>,<frame>,...`: comma-separated base64 images,
one per frame (`is_frame_list_url`, `decode_frame_list_url`). The frame count
and the decoded size are checked before any frame is decoded.
"""

from __future__ import annotations

import asyncio
import binascii
import errno
import os
import stat
import urllib.parse
from pathlib import Path

from mmserve.api.common.v1 import media_pb2
from mmserve.config import Settings
from mmserve.errors import FetchRefused, InvalidArgument, MediaTooLarge
from services.encoder.media.budget import RequestBudget, item_too_large
from services.encoder.media.fetch import GuardedFetcher

ACCEPTED_SCHEMES = ("http", "https", "data", "file")
_BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
#: Media types of a data URL whose payload is comma-separated base64 images, one per video frame (vLLM's form).
FRAME_LIST_MIMES = frozenset({"video/jpeg", "video/png"})
_MAX_HEADER = 256  # a data URL's media type and parameters fit in this many characters


async def load_source_bytes(
    source: media_pb2.MediaSource,
    *,
    modality: str,
    settings: Settings,
    budget: RequestBudget,
    fetcher: GuardedFetcher,
    field: str = "source",
) -> bytes:
    """The encoded bytes of a `data` or `url` source, with every cap applied and charged to `budget`."""
    kind = source.WhichOneof("kind")
    if kind == "data":
        return _take_inline(source.data, settings=settings, budget=budget, field=f"{field}.data")
    if kind == "url":
        return await load_url_bytes(source.url, modality=modality, settings=settings, budget=budget, fetcher=fetcher, field=f"{field}.url")
    if kind is None:
        raise InvalidArgument("no media source is set (expected data or url)", field=field)
    raise InvalidArgument(f"a '{kind}' source carries no media file to load", field=f"{field}.{kind}")


async def load_url_bytes(
    url: str,
    *,
    modality: str,
    settings: Settings,
    budget: RequestBudget,
    fetcher: GuardedFetcher,
    field: str = "source.url",
) -> bytes:
    """The bytes behind an http(s), data: or file:// URL; any other scheme is refused."""
    scheme, sep, _ = url.partition(":")
    scheme = scheme.strip().lower() if sep else ""
    if scheme in ("http", "https"):
        return await fetcher.fetch(url, modality=modality, budget=budget, field=field)
    if scheme == "data":
        return decode_data_url(url, settings=settings, budget=budget, field=field)
    if scheme == "file":
        return await read_file_url(url, settings=settings, budget=budget, field=field)
    shown = f"'{scheme}'" if scheme and len(scheme) <= 32 and scheme.isascii() else "(none)"
    raise InvalidArgument(
        f"unsupported URL scheme {shown} (accepted: {', '.join(ACCEPTED_SCHEMES)})",
        field=field,
    )


def _take_inline(data: bytes, *, settings: Settings, budget: RequestBudget, field: str) -> bytes:
    if len(data) > settings.max_item_bytes:
        raise item_too_large(settings.max_item_bytes, field)
    budget.take_bytes(len(data), field)
    return data


def _base64_decoded_size(payload: str) -> int:
    """Exact decoded size of valid base64 text, computed without decoding it."""
    padding = len(payload) - len(payload.rstrip("="))
    return len(payload) // 4 * 3 - min(padding, 2)


def decode_data_url(url: str, *, settings: Settings, budget: RequestBudget, field: str) -> bytes:
    """Decode `data:<mime>;base64,<payload>` strictly; size is checked before decoding."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise InvalidArgument("data URL has no ',' before its payload", field=field)
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    if params[-1] != "base64":
        raise InvalidArgument("only base64 data URLs are accepted (expected data:<mime>;base64,<payload>)", field=field)
    decoded_size = _base64_decoded_size(payload)
    if decoded_size > settings.max_item_bytes:
        raise item_too_large(settings.max_item_bytes, field)
    budget.ensure_bytes(decoded_size, field)
    data = _strict_base64(payload, field)
    budget.take_bytes(len(data), field)
    return data


def is_frame_list_url(url: str) -> bool:
    """True for a frame-list data URL: `data:video/jpeg;base64,...` (or video/png), each frame a base64 image."""
    if url[:5].lower() != "data:":
        return False
    comma = url.find(",", 5, _MAX_HEADER)
    params = [p.strip().lower() for p in url[5:comma].split(";")] if comma > 0 else []
    return len(params) >= 2 and params[0] in FRAME_LIST_MIMES and params[-1] == "base64"


def decode_frame_list_url(url: str, *, settings: Settings, budget: RequestBudget, field: str) -> list[bytes]:
    """The encoded images of a frame-list data URL; frame count and decoded size checked before decoding."""
    payload = url[url.index(",") + 1 :]
    frames = payload.split(",")
    cap = settings.video_max_num_frames
    if len(frames) > cap:
        raise MediaTooLarge(
            f"the frame list has {len(frames)} frames, more than the allowed {cap}",
            field=field,
            metadata={"limit": str(cap), "setting": "video_max_num_frames"},
        )
    decoded_size = sum(_base64_decoded_size(frame) for frame in frames)
    if decoded_size > settings.max_item_bytes:
        raise item_too_large(settings.max_item_bytes, field)
    budget.ensure_bytes(decoded_size, field)
    out = []
    for index, frame in enumerate(frames):
        if not frame:
            raise InvalidArgument(f"frame {index} of the frame list is empty", field=field)
        out.append(_strict_base64(frame, field, what=f"frame {index} of the frame list"))
    budget.take_bytes(sum(len(f) for f in out), field)
    return out


def _strict_base64(payload: str, field: str, what: str = "data URL payload") -> bytes:
    """Decode base64 that must be exactly valid (no skipped characters, padding in place)."""
    if not payload.isascii() or len(payload) % 4:
        raise InvalidArgument(_bad_base64(payload, what), field=field)
    try:
        return binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except binascii.Error:
        raise InvalidArgument(_bad_base64(payload, what), field=field) from None


def _bad_base64(payload: str, what: str = "data URL payload") -> str:
    """Say where the base64 goes wrong, without echoing the payload."""
    for index, char in enumerate(payload):
        if not char.isascii() or ord(char) not in _BASE64_ALPHABET:
            return f"{what} is not valid base64 (invalid character at offset {index})"
    if len(payload) % 4:
        return f"{what} is not valid base64 (length is not a multiple of 4)"
    return f"{what} is not valid base64 (misplaced '=' padding)"


async def read_file_url(url: str, *, settings: Settings, budget: RequestBudget, field: str) -> bytes:
    """Read a file:// URL that resolves (symlinks, `..`) to a regular file below Settings.file_root."""
    if settings.file_root is None:
        raise FetchRefused("file:// URLs are not enabled on this server", field=field)
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchRefused("file:// URLs must not name a host", field=field)
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise InvalidArgument("file:// URL must hold an absolute path", field=field)
    return await asyncio.to_thread(_read_below_root, path, Path(settings.file_root), settings.max_item_bytes, budget, field)


def _read_below_root(path: str, root: Path, limit: int, budget: RequestBudget, field: str) -> bytes:
    """Resolve, confine, open and read with the cap; messages never show a local path.

    There is a window between resolving and opening in which a symlink inside
    the root could be swapped; O_NOFOLLOW closes it for the last component.
    The root is chosen by the operator, so exploiting the rest needs write
    access below it.
    """
    not_found = InvalidArgument("file not found below the server's file root", field=field)
    try:
        real_root = root.resolve(strict=True)
        target = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise not_found from None
    if not target.is_relative_to(real_root):
        raise FetchRefused("file:// path is outside the server's file root", field=field)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EACCES, errno.EPERM):
            raise FetchRefused("file:// path cannot be read", field=field) from None
        raise not_found from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument("file:// path is not a regular file", field=field)
        if info.st_size > limit:
            raise item_too_large(limit, field)
        budget.ensure_bytes(info.st_size, field)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)  # the file may have grown since fstat
    if len(data) > limit:
        raise item_too_large(limit, field)
    budget.take_bytes(len(data), field)
    return data


__all__ = [
    "ACCEPTED_SCHEMES",
    "FRAME_LIST_MIMES",
    "decode_data_url",
    "decode_frame_list_url",
    "is_frame_list_url",
    "load_source_bytes",
    "load_url_bytes",
    "read_file_url",
]
