"""Per-modality decoding: acquired material -> what a family's `prepare` takes.

Also the media-level options (how to load, as opposed to how the model's
processor resizes), validated and given their defaults here because they are
part of an embedding's identity and must be known before anything is fetched
or decoded.
"""

from __future__ import annotations

from typing import Any

from mmserve.api.common.v1 import media_pb2
from mmserve.config import Settings
from mmserve.decoded import MediaOptions
from mmserve.errors import InvalidArgument
from mmserve.modality import audio_format
from services.encoder.media.acquire import Acquired, frame_list_fps
from services.encoder.media.audio import audio_from_array, decode_audio
from services.encoder.media.budget import RequestBudget
from services.encoder.media.image import decode_image, parse_color
from services.encoder.media.sources import is_frame_list_url
from services.encoder.media.timeseries import load_time_series, series_from_array
from services.encoder.media.video import decode_video, frames_from_images, resolve_sampling

SERIES_FORMATS = ("npy", "csv", "wav", "flac")


def media_options(item: media_pb2.MediaInput, settings: Settings) -> MediaOptions:
    """Loading options of an item, defaults filled in, canonical values; errors name the field."""
    kind = item.source.WhichOneof("kind") if item.HasField("source") else None
    if item.modality == media_pb2.MODALITY_IMAGE:
        opts = item.image
        color = opts.rgba_background_color if opts.HasField("rgba_background_color") else "#ffffff"
        r, g, b = parse_color(color, "image.rgba_background_color")
        return {"background": f"#{r:02x}{g:02x}{b:02x}"}
    if item.modality == media_pb2.MODALITY_VIDEO:
        if kind == "frames":
            fps = item.source.frames.fps
            if not fps > 0:
                raise InvalidArgument("frames.fps must be > 0", field="source.frames.fps")
            return {"frames_fps": float(fps)}
        if kind == "url" and is_frame_list_url(item.source.url):
            return {"frames_fps": frame_list_fps(item, settings)}  # as the same frames over gRPC: one identity
        video = item.video
        fps, num_frames = resolve_sampling(
            settings, video.fps if video.HasField("fps") else None, video.num_frames if video.HasField("num_frames") else None
        )
        return {"fps": fps, "num_frames": num_frames}
    if item.modality == media_pb2.MODALITY_AUDIO:
        audio = item.audio
        out: MediaOptions = {}
        if audio.HasField("format"):
            out["format"] = audio_format(audio.format, "audio.format")
        if kind == "array":
            if not audio.HasField("sampling_rate") or not audio.sampling_rate > 0:
                raise InvalidArgument("sampling_rate (Hz, > 0) is required for raw audio arrays", field="audio.sampling_rate")
            out["sampling_rate"] = float(audio.sampling_rate)
        return out
    if item.modality == media_pb2.MODALITY_TIME_SERIES:
        series = item.time_series
        if not series.HasField("sampling_rate") or not series.sampling_rate > 0:
            raise InvalidArgument("sampling_rate (Hz, > 0) is required for time series", field="time_series.sampling_rate")
        series_out: MediaOptions = {"sampling_rate": float(series.sampling_rate)}
        if series.HasField("format"):
            if series.format not in SERIES_FORMATS:
                raise InvalidArgument(f"format must be one of {', '.join(SERIES_FORMATS)}", field="time_series.format")
            series_out["format"] = series.format
        return series_out
    return {}


def decode_media(modality: int, acquired: Acquired, options: MediaOptions, settings: Settings, budget: RequestBudget) -> Any:
    """Decode one item (CPU-bound: call from a worker thread)."""
    if modality == media_pb2.MODALITY_IMAGE:
        background = parse_color(options["background"], "image.rgba_background_color")
        return decode_image(acquired.data or b"", settings=settings, budget=budget, background=background, field="source")
    if modality == media_pb2.MODALITY_VIDEO:
        if acquired.kind == "frames":
            return frames_from_images(acquired.frames, acquired.frames_fps, settings=settings, budget=budget)
        return decode_video(acquired.data or b"", settings=settings, budget=budget, fps=options["fps"], num_frames=options["num_frames"])
    if modality == media_pb2.MODALITY_AUDIO:
        if acquired.kind == "array":
            assert acquired.array is not None
            return audio_from_array(acquired.array, options["sampling_rate"], settings=settings, target_rate=options["target_rate"])
        return decode_audio(
            acquired.data or b"", settings=settings, budget=budget, target_rate=options["target_rate"], format=options.get("format")
        )
    if modality == media_pb2.MODALITY_TIME_SERIES:
        if acquired.kind == "array":
            assert acquired.array is not None
            return series_from_array(acquired.array, options["sampling_rate"], settings=settings)
        return load_time_series(
            acquired.data or b"",
            settings=settings,
            sampling_rate=options["sampling_rate"],
            format=options.get("format"),
            mime=acquired.mime or None,
        )
    raise InvalidArgument("unsupported modality", field="modality")
