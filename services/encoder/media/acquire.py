"""Get a media item's source material, whatever form it came in, with the digest that identifies it.

Bytes (inline, data:, file://, http(s)://) go through `sources`; a video given
as frames (gRPC `VideoFrames`, or a frame-list data URL, which is the same
video and gets the same digest) and a raw sample array are taken as they are. The digest (sha256) is
over exactly what decoding will read, framed so that different forms can never
collide: it is the content part of the embedding's identity.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmserve.api.common.v1 import media_pb2, tensor_pb2
from mmserve.config import Settings
from mmserve.errors import InvalidArgument
from services.encoder.media.budget import RequestBudget, item_too_large
from services.encoder.media.fetch import GuardedFetcher
from services.encoder.media.sources import decode_frame_list_url, is_frame_list_url, load_source_bytes
from services.encoder.media.video import resolve_sampling

#: Element types accepted for raw arrays (audio PCM, time series).
ARRAY_DTYPES: dict[int, np.dtype[Any]] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_INT16: np.dtype("<i2"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
}


@dataclass
class Acquired:
    """Exactly one of data / frames / array is set."""

    sha256: str
    data: bytes | None = None
    frames: list[bytes] = field(default_factory=list)
    frames_fps: float = 0.0
    array: np.ndarray | None = None
    mime: str = ""

    @property
    def kind(self) -> str:
        return "frames" if self.frames else "array" if self.array is not None else "bytes"


def _array(tensor: tensor_pb2.Tensor, settings: Settings, budget: RequestBudget) -> np.ndarray:
    where = "source.array"
    dtype = ARRAY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument("array dtype must be float32, float64, int16 or int32", field=f"{where}.dtype")
    shape = tuple(int(d) for d in tensor.shape)
    if not 1 <= len(shape) <= 2 or any(d <= 0 for d in shape):
        raise InvalidArgument(f"array shape must be [T] or [T, C] with positive sizes, got {list(shape)}", field=f"{where}.shape")
    if len(tensor.data) != int(np.prod(shape)) * dtype.itemsize:
        raise InvalidArgument(
            f"array data has {len(tensor.data)} bytes, shape and dtype need {int(np.prod(shape)) * dtype.itemsize}", field=f"{where}.data"
        )
    if len(tensor.data) > settings.max_item_bytes:
        raise item_too_large(settings.max_item_bytes, f"{where}.data")
    budget.take_bytes(len(tensor.data), f"{where}.data")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def frame_list_fps(item: media_pb2.MediaInput, settings: Settings) -> float:
    """The rate a frame-list data URL is played at: `media_io_kwargs.video.fps`, else the default fps."""
    fps = item.video.fps if item.HasField("video") and item.video.HasField("fps") else None
    return resolve_sampling(settings, fps, None)[0]


def _frames(frames: list[bytes], fps: float) -> Acquired:
    """A video given as encoded frames; the digest frames the rate and each frame's length."""
    digest = hashlib.sha256(b"frames\0%r\0" % fps)
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "little"))
        digest.update(frame)
    return Acquired(digest.hexdigest(), frames=frames, frames_fps=fps)


async def acquire(
    item: media_pb2.MediaInput,
    *,
    modality: str,
    settings: Settings,
    budget: RequestBudget,
    fetcher: GuardedFetcher,
    preloaded: bytes | None = None,
) -> Acquired:
    """Fetch or take the item's material; errors name fields relative to the item."""
    digest = hashlib.sha256()
    source = item.source
    kind = source.WhichOneof("kind")
    if preloaded is not None:
        digest.update(preloaded)
        return Acquired(digest.hexdigest(), data=preloaded, mime=source.mime_type)
    if kind == "frames":
        if item.modality != media_pb2.MODALITY_VIDEO:
            raise InvalidArgument("frames are only accepted for video", field="source.frames")
        frames = list(source.frames.frames)
        if not frames:
            raise InvalidArgument("at least one frame is required", field="source.frames")
        total = sum(len(f) for f in frames)
        if total > settings.max_item_bytes:
            raise item_too_large(settings.max_item_bytes, "source.frames")
        budget.take_bytes(total, "source.frames")
        return _frames(frames, float(source.frames.fps))
    if kind == "url" and item.modality == media_pb2.MODALITY_VIDEO and is_frame_list_url(source.url):
        frames = decode_frame_list_url(source.url, settings=settings, budget=budget, field="source.url")
        return _frames(frames, frame_list_fps(item, settings))
    if kind == "array":
        if item.modality not in (media_pb2.MODALITY_AUDIO, media_pb2.MODALITY_TIME_SERIES):
            raise InvalidArgument("raw arrays are only accepted for audio and time series", field="source.array")
        array = _array(source.array, settings, budget)
        digest.update(b"array\0%s\0%r\0" % (array.dtype.str.encode(), array.shape))
        digest.update(array.tobytes())
        return Acquired(digest.hexdigest(), array=array)
    data = await load_source_bytes(source, modality=modality, settings=settings, budget=budget, fetcher=fetcher, field="source")
    digest.update(data)
    return Acquired(digest.hexdigest(), data=data, mime=source.mime_type)
