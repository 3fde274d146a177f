"""Decode one video into uniformly sampled RGB frames plus the timing the model needs.

Rules (docs/inputs.md section 3): the container is opened with PyAV from memory;
the duration and the frame size are refused from the header, before any frame
is decoded; frames are sampled uniformly by `fps` and capped by `num_frames`;
undecodable frames are skipped and their samples filled from the next good
frame; every kept frame is charged to the request's pixel budget.

Sampling (exact; `sample_times` implements it, a reference may reproduce it):

* Frame times: every video packet's timestamp (pts, else dts) relative to the
  smallest one, in seconds, computed exactly (`Fraction`) and then converted
  to float. These come from the demuxer, so a frame the decoder cannot decode
  still has its place on the timeline.
* `duration_s` = last frame time + the last frame's display time (its packet
  duration; else 1 / the stream's average rate; else the median spacing of
  the frame times; else 1 / fps). It is measured from the packets, not taken
  from the header (the header is only used to refuse early).
* `cap = min(num_frames, number of distinct frame times)`: sampling never
  invents duplicates of a short clip.
* `n = cap` if `duration_s * fps >= cap`, else
  `n = max(1, floor(duration_s * fps + 1e-6))` (the 1e-6 absorbs float noise
  such as 4.999999 frames). `sample_count(duration_s, fps, cap)`.
* Sample times `t_i = (i + 0.5) * duration_s / n` for `i = 0 .. n-1`: the
  centres of `n` equal slices of the video. `sample_times(duration_s, fps, cap)`.
* For each `t_i` the frame on screen at that time is taken: the last frame
  whose time is `<= t_i` (the first frame if none is); `pick_frames`. If that frame cannot
  be decoded, the next good frame in time is used instead, and the previous
  good one if none follows.
* `sampled_fps = n / duration_s`: the rate of the sample grid (the inverse of
  the spacing between consecutive `t_i`). It equals the requested fps when
  the video's length is a whole number of sample intervals, is lower when
  `num_frames` caps the count, and is higher when the video is shorter than one
  interval (one frame is always sampled). This is the rate a model uses to
  place the frames in time (e.g. Qwen2.5-VL's seconds per temporal patch is
  `temporal_patch_size / sampled_fps`).
* `timestamps` are the times of the frames actually returned (after fills);
  `sample_times` are the `t_i`.

Work is bounded by the duration cap, not by the header: packets are demuxed
(cheap, no decoding) and refused as soon as one lies beyond
`video_max_duration_s`; frames are then decoded sequentially, only the sampled
ones are converted to RGB and kept, and decoding stops after the last sample.

Only known containers are opened (MP4/MOV, Matroska/WebM, AVI, MPEG-TS,
MPEG-PS, FLV, Ogg, ASF), chosen by their magic bytes and passed to PyAV as an
explicit demuxer. Letting FFmpeg probe would also accept playlist and concat
formats (HLS, ffconcat, ...) that open further URLs or local files by
themselves, which must never happen with untrusted bytes.

Frames are returned as one uint8 array [N, H, W, 3] (RGB, in time order): what
video processors take, and one allocation instead of N images.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import statistics
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from mmserve.config import Settings
from mmserve.decoded import DecodedVideo
from mmserve.errors import InvalidArgument, MediaTooLarge
from services.encoder.media.budget import RequestBudget, check_decoded_bytes
from services.encoder.media.containers import is_iso_bmff, is_matroska
from services.encoder.media.image import decode_image

logger = logging.getLogger(__name__)

# Demuxers allowed for untrusted video, keyed by what `sniff_container` returns.
VIDEO_DEMUXERS: dict[str, str] = {
    "mp4": "mov",
    "matroska": "matroska",
    "avi": "avi",
    "mpegts": "mpegts",
    "mpeg": "mpeg",
    "flv": "flv",
    "ogg": "ogg",
    "asf": "asf",
}
_ACCEPTED_NAMES = "MP4/MOV, WebM/MKV, AVI, MPEG-TS, MPEG-PS, FLV, Ogg, ASF"
_ASF_GUID = bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")
# No real video has more than this many frames per second; a stream that does
# is a forgery meant to make the demux pass slow (each packet is Python work).
_MAX_SOURCE_FPS = 1000.0
_FLOOR_EPS = 1e-6


def resolve_sampling(settings: Settings, fps: float | None, num_frames: int | None) -> tuple[float, int]:
    """The effective (fps, num_frames) of a request: defaults filled in, bounds checked."""
    if fps is None:
        fps = settings.video_default_fps
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise InvalidArgument("fps must be a finite number of frames per second > 0", field="video.fps")
    cap = settings.video_max_num_frames
    if num_frames is None:
        num_frames = min(settings.video_default_num_frames, cap)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int | np.integer) or not 0 < num_frames <= cap:
        raise InvalidArgument(
            f"num_frames must be between 1 and {cap}",
            field="video.num_frames",
            metadata={"limit": str(cap), "setting": "video_max_num_frames"},
        )
    return float(fps), int(num_frames)


def sample_count(duration_s: float, fps: float, num_frames: int) -> int:
    """How many frames a video of `duration_s` yields: see the module docstring."""
    if duration_s * fps >= num_frames:  # also covers huge fps without overflowing floor()
        return num_frames
    return max(1, math.floor(duration_s * fps + _FLOOR_EPS))


def sample_times(duration_s: float, fps: float, num_frames: int) -> list[float]:
    """The sample grid `t_i = (i + 0.5) * duration_s / n` (seconds); see the module docstring."""
    n = sample_count(duration_s, fps, num_frames)
    return [(i + 0.5) * duration_s / n for i in range(n)]


def pick_frames(frame_times: list[float], times: list[float]) -> list[int]:
    """Index of the frame on screen at each time: the last one at or before it (else the first)."""
    return [max(0, bisect_right(frame_times, t) - 1) for t in times]


def sniff_container(head: bytes) -> str | None:
    """The allowed container whose signature `head` (first ~400 bytes) carries, or None."""
    if is_iso_bmff(head):
        return "mp4"
    if is_matroska(head):
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if head[:16] == _ASF_GUID:
        return "asf"
    if len(head) >= 377 and head[0] == head[188] == head[376] == 0x47:
        return "mpegts"
    return None


def decode_video(
    data: bytes,
    *,
    settings: Settings,
    budget: RequestBudget,
    fps: float | None,
    num_frames: int | None,
    field: str = "source",
) -> DecodedVideo:
    """Sample frames from an encoded video; CPU-bound, run it in a worker thread."""
    fps, num_frames = resolve_sampling(settings, fps, num_frames)
    kind = sniff_container(data[:512])
    if kind is None:
        raise InvalidArgument(f"not a supported video container (accepted: {_ACCEPTED_NAMES})", field=field)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=VIDEO_DEMUXERS[kind])
    except av.FFmpegError as exc:
        logger.info("video open failed: %r", exc)
        raise InvalidArgument("video could not be opened (corrupt or truncated container)", field=field) from None
    with container:
        try:
            return _decode(container, settings=settings, budget=budget, fps=fps, num_frames=num_frames, field=field)
        except av.FFmpegError as exc:  # demuxer errors past the header
            logger.info("video decode failed: %r", exc)
            raise InvalidArgument("video data is corrupt", field=field) from None


def frames_from_images(
    frames: list[bytes],
    fps: float,
    *,
    settings: Settings,
    budget: RequestBudget,
    field: str = "source.frames",
) -> DecodedVideo:
    """A video given as encoded images (gRPC `VideoFrames`): all decoded, same size required.

    Frame i is placed at i / fps seconds; `duration_s` is N / fps, so
    `sampled_fps` is `fps`, the same definition as for a decoded video.
    """
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise InvalidArgument("must be a finite number of frames per second > 0", field=f"{field}.fps")
    if not frames:
        raise InvalidArgument("a video needs at least one frame", field=f"{field}.frames")
    cap = settings.video_max_num_frames
    if len(frames) > cap:
        raise MediaTooLarge(
            f"has {len(frames)} frames, more than the allowed {cap}",
            field=f"{field}.frames",
            metadata={"limit": str(cap), "setting": "video_max_num_frames"},
        )
    # Frames are video frames: hold them to the (smaller) video frame cap, from their header.
    frame_settings = settings.model_copy(update={"image_max_pixels": min(settings.image_max_pixels, settings.video_max_frame_pixels)})
    arrays: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    for i, encoded in enumerate(frames):
        where = f"{field}.frames[{i}]"
        try:
            image = decode_image(encoded, settings=frame_settings, budget=budget, field=where)
        except MediaTooLarge as exc:
            if exc.metadata.get("setting") == "image_max_pixels":
                raise _frame_too_large(settings.video_max_frame_pixels, where) from None
            raise
        if size is None:
            size = image.size
            need = 2 * len(frames) * image.width * image.height * 3  # the frames and their stack
            check_decoded_bytes(need, settings.media_max_decoded_bytes, field, f"{len(frames)} frames")
        elif image.size != size:
            raise InvalidArgument(
                f"is {image.width}x{image.height}, but frame 0 is {size[0]}x{size[1]}; all frames must be the same size",
                field=where,
            )
        arrays.append(np.asarray(image, dtype=np.uint8))
    times = [i / fps for i in range(len(frames))]
    return DecodedVideo(
        frames=np.stack(arrays),
        timestamps=times,
        sample_times=list(times),
        sampled_fps=float(fps),
        duration_s=len(frames) / fps,
        source_fps=float(fps),
    )


# --- internals -------------------------------------------------------------------------------


def _decode(
    container: av.container.InputContainer,
    *,
    settings: Settings,
    budget: RequestBudget,
    fps: float,
    num_frames: int,
    field: str,
) -> DecodedVideo:
    # Cover art in an audio file is a "video stream" of one still picture: not a video.
    stills = av.stream.Disposition.attached_pic | av.stream.Disposition.still_image
    stream = next((s for s in container.streams.video if not s.disposition & stills), None)
    if stream is None:
        raise InvalidArgument("the container has no video stream", field=field)
    _check_header(container, stream, settings, field)
    timeline = _demux(container, stream, settings=settings, fps=fps, field=field)

    grid = sample_times(timeline.duration, fps, min(num_frames, len(timeline.frame_times)))
    ctx = stream.codec_context
    frame_bytes = int(ctx.width or 0) * int(ctx.height or 0) * 3
    check_decoded_bytes(
        2 * len(grid) * frame_bytes, settings.media_max_decoded_bytes, field, f"{len(grid)} sampled frames"
    )  # frames + their stack
    wanted = pick_frames(timeline.frame_times, grid)
    picked = _decode_wanted(timeline, stream, sorted(set(wanted)), settings=settings, budget=budget, field=field)

    # Duplicates (two samples on one frame) are copies in the output array: charge them too.
    height, width = next(iter(picked.values()))[1].shape[:2]
    converted = len({id(arr) for _, arr in picked.values()})
    for _ in range(len(grid) - converted):
        budget.take_pixels(width * height, field)
    chosen = [picked[k] for k in wanted]
    return DecodedVideo(
        frames=np.stack([arr for _, arr in chosen]),
        timestamps=[timeline.frame_times[src] for src, _ in chosen],
        sample_times=grid,
        sampled_fps=len(grid) / timeline.duration,
        duration_s=timeline.duration,
        source_fps=len(timeline.frame_times) / timeline.duration,
    )


def _check_header(container: av.container.InputContainer, stream: av.VideoStream, settings: Settings, field: str) -> None:
    """Refuse from what the header claims: frame size, then every duration it states."""
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width * height > settings.video_max_frame_pixels:
        raise _frame_too_large(settings.video_max_frame_pixels, field)
    claims: list[float] = []
    if container.duration is not None and container.duration > 0:
        claims.append(container.duration / av.time_base)
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        claims.append(float(stream.duration * stream.time_base))
    rate = stream.average_rate
    if stream.frames and rate and rate > 0:
        claims.append(float(stream.frames / rate))
    if claims and max(claims) > settings.video_max_duration_s:
        raise _too_long(settings.video_max_duration_s, field)


@dataclass
class _Timeline:
    """The stream's packets in decode order and where each frame sits in time."""

    packets: list[av.Packet]
    time_base: Fraction
    origin: int  # the smallest timestamp: time 0
    frame_times: list[float]  # distinct frame times (seconds from origin), ascending
    index_of: dict[int, int]  # timestamp -> index into frame_times
    duration: float


def _demux(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    *,
    settings: Settings,
    fps: float,
    field: str,
) -> _Timeline:
    """All packets of the stream (no decoding), their times and the measured duration."""
    limit = settings.video_max_duration_s
    max_packets = math.ceil(limit * _MAX_SOURCE_FPS)
    time_base = Fraction(stream.time_base) if stream.time_base else Fraction(1, 90000)
    rate = Fraction(stream.average_rate) if stream.average_rate and stream.average_rate > 0 else None
    packets: list[av.Packet] = []
    stamps: set[int] = set()
    previous: int | None = None
    lowest: int | None = None
    highest: int | None = None
    last_duration = 0
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None:  # untimed packet: one frame interval after the previous one
            if previous is None:
                stamp = 0
            elif rate is not None:
                stamp = previous + max(1, round(1 / (rate * time_base)))
            else:
                raise InvalidArgument("video packets carry no timestamps", field=field)
        lowest = stamp if lowest is None else min(lowest, stamp)
        if (stamp - lowest) * time_base > limit:
            raise _too_long(limit, field)
        if len(packets) >= max_packets:
            raise MediaTooLarge(
                f"video has more than {_MAX_SOURCE_FPS:g} frames per second",
                field=field,
                metadata={"limit": f"{limit:g}", "setting": "video_max_duration_s"},
            )
        if highest is None or stamp >= highest:
            highest, last_duration = stamp, packet.duration or 0
        packets.append(packet)
        stamps.add(stamp)
        previous = stamp
    if lowest is None or highest is None:
        raise InvalidArgument("the video stream has no frames", field=field)
    ordered = sorted(stamps)
    frame_times = [float((s - lowest) * time_base) for s in ordered]
    if last_duration > 0:
        tail = float(last_duration * time_base)
    elif rate is not None:
        tail = float(1 / rate)
    elif len(frame_times) > 1:
        tail = statistics.median(b - a for a, b in itertools.pairwise(frame_times))
    else:
        tail = 1 / fps
    duration = frame_times[-1] + tail
    if duration > limit:
        raise _too_long(limit, field)
    return _Timeline(
        packets=packets,
        time_base=time_base,
        origin=lowest,
        frame_times=frame_times,
        index_of={s: k for k, s in enumerate(ordered)},
        duration=duration,
    )


def _decode_wanted(
    timeline: _Timeline,
    stream: av.VideoStream,
    wanted: list[int],
    *,
    settings: Settings,
    budget: RequestBudget,
    field: str,
) -> dict[int, tuple[int, np.ndarray]]:
    """Decode in order; for each wanted frame index keep (index actually used, RGB pixels).

    A wanted frame that never comes out of the decoder in good shape is served
    by the next good frame; those still open at the end by the last good one.
    Only served frames are converted to RGB (and charged to the budget).
    """
    stream.thread_type = "AUTO"
    ctx = stream.codec_context
    picked: dict[int, tuple[int, np.ndarray]] = {}
    size: tuple[int, int] | None = None
    pending = 0  # wanted[pending] is the next wanted index not yet served
    last_good: tuple[int, av.VideoFrame] | None = None
    previous = -1
    bad = 0

    def rgb(frame: av.VideoFrame) -> np.ndarray:
        nonlocal size
        if frame.width * frame.height > settings.video_max_frame_pixels:
            raise _frame_too_large(settings.video_max_frame_pixels, field)
        if size is None:
            size = (frame.width, frame.height)
        budget.take_pixels(size[0] * size[1], field)
        return _to_rgb(frame, size)

    def decoded() -> Iterator[av.VideoFrame]:
        nonlocal bad
        for packet in [*timeline.packets, None]:  # None flushes the decoder
            try:
                frames = ctx.decode(packet)
            except av.FFmpegError as exc:
                bad += 1
                logger.debug("skipping an undecodable video packet: %r", exc)
                continue
            yield from frames

    for frame in decoded():
        if frame.is_corrupt:
            bad += 1
            continue
        index = _frame_index(frame, timeline, previous)
        previous = index
        last_good = (index, frame)
        pixels: np.ndarray | None = None
        while pending < len(wanted) and wanted[pending] <= index:
            if pixels is None:
                pixels = rgb(frame)
            picked[wanted[pending]] = (index, pixels)
            pending += 1
        if pending == len(wanted):
            break
    if last_good is None:
        raise InvalidArgument("no frame of the video could be decoded", field=field)
    if pending < len(wanted):
        index, frame = last_good
        pixels = rgb(frame)
        for k in wanted[pending:]:
            picked[k] = (index, pixels)
    if bad:
        logger.info("video: %d undecodable frames skipped", bad)
    return picked


def _frame_index(frame: av.VideoFrame, timeline: _Timeline, previous: int) -> int:
    """Where a decoded frame sits on the packet timeline."""
    last = len(timeline.frame_times) - 1
    if frame.pts is None:
        return min(previous + 1, last)
    k = timeline.index_of.get(frame.pts)
    if k is not None:
        return k
    # A pts the demuxer never gave (the decoder derived it): the frame on screen at that time.
    t = float((frame.pts - timeline.origin) * timeline.time_base)
    return max(0, bisect_right(timeline.frame_times, t) - 1)


def _to_rgb(frame: av.VideoFrame, size: tuple[int, int]) -> np.ndarray:
    """Upright RGB pixels at `size` (a mid-stream resolution change is scaled to the first frame's).

    The display matrix (phone videos are stored sideways with a rotation tag)
    is applied the way players do, like EXIF orientation for images.
    """
    width, height = size
    if (frame.width, frame.height) != size:
        frame = frame.reformat(width=width, height=height)
    pixels: np.ndarray = frame.to_ndarray(format="rgb24")
    quarter_turns = _quarter_turns(frame)
    if quarter_turns:
        pixels = np.rot90(pixels, quarter_turns)
    return np.ascontiguousarray(pixels)


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counterclockwise quarter turns that make the frame upright (0 if none or not a multiple of 90°)."""
    degrees = frame.rotation  # FFmpeg's convention: counterclockwise degrees; 0 without a display matrix
    if not degrees or not math.isfinite(degrees) or round(degrees) % 90:
        return 0
    return (round(degrees) // 90) % 4


def _too_long(limit: float, field: str) -> MediaTooLarge:
    return MediaTooLarge(
        f"video is longer than the allowed {limit:g} s",
        field=field,
        metadata={"limit": f"{limit:g}", "setting": "video_max_duration_s"},
    )


def _frame_too_large(limit: int, field: str) -> MediaTooLarge:
    return MediaTooLarge(
        f"video frames have more than the allowed {limit} pixels",
        field=field,
        metadata={"limit": str(limit), "setting": "video_max_frame_pixels"},
    )


__all__ = [
    "DecodedVideo",
    "decode_video",
    "frames_from_images",
    "pick_frames",
    "resolve_sampling",
    "sample_count",
    "sample_times",
    "sniff_container",
]
