"""Video decoding: containers, the sampling formula, caps from the header, corrupt frames, frame lists."""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from mmserve.config import Settings
from mmserve.errors import InvalidArgument, MediaTooLarge
from services.encoder.media import video
from services.encoder.media.budget import RequestBudget
from services.encoder.media.video import DecodedVideo, decode_video, frames_from_images, sample_count, sample_times

SETTINGS = Settings()
STEP = 20  # gray level step between consecutive frames: frame i is gray 10 + 20 * i


def gray(i: int) -> int:
    return 10 + STEP * i


def encode_video(
    fmt: str,
    codec: str,
    n: int = 10,
    *,
    rate: int = 2,
    size: tuple[int, int] = (32, 32),
    pixels: Callable[[int], np.ndarray] | None = None,
) -> bytes:
    """n frames at `rate` fps; frame i is uniformly gray(i) unless `pixels` says otherwise."""
    width, height = size
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(n):
            rgb = pixels(i) if pixels else np.full((height, width, 3), gray(i) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def decode(data: bytes, *, settings: Settings = SETTINGS, budget: RequestBudget | None = None, **kw: Any) -> DecodedVideo:
    kw.setdefault("fps", None)
    kw.setdefault("num_frames", None)
    return decode_video(data, settings=settings, budget=budget or RequestBudget.from_settings(settings), **kw)


def frame_ids(result: DecodedVideo) -> list[int]:
    """Which source frame each returned frame is, from its gray level."""
    return [round((float(frame.mean()) - 10) / STEP) for frame in result.frames]


@pytest.fixture(scope="module")
def avi20() -> bytes:
    """20 MJPEG frames at 4 fps (5 s): every frame independent and exact enough to identify."""
    return encode_video("avi", "mjpeg", 20, rate=4, size=(16, 16), pixels=_gray20)


def _gray20(i: int) -> np.ndarray:
    return np.full((16, 16, 3), 5 + 12 * i, np.uint8)


def ids20(result: DecodedVideo) -> list[int]:
    return [round((float(frame.mean()) - 5) / 12) for frame in result.frames]


# --- containers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "codec"),
    [("mp4", "libx264"), ("mp4", "mpeg4"), ("webm", "libvpx"), ("matroska", "libx264"), ("avi", "mjpeg"), ("mpegts", "mpeg2video")],
)
def test_containers_decode_every_frame_in_order(fmt: str, codec: str) -> None:
    result = decode(encode_video(fmt, codec), fps=2.0, num_frames=32)
    assert result.frames.shape == (10, 32, 32, 3)
    assert result.frames.dtype == np.uint8
    assert frame_ids(result) == list(range(10))
    for i, frame in enumerate(result.frames):
        assert abs(float(frame.mean()) - gray(i)) < 4
    assert result.timestamps == [i * 0.5 for i in range(10)]  # mpegts starts at 1.4 s: made relative
    assert result.duration_s == 5.0
    assert result.sampled_fps == 2.0
    assert result.source_fps == 2.0
    assert result.num_frames == 10


def test_frames_are_rgb_not_bgr() -> None:
    def red(i: int) -> np.ndarray:
        rgb = np.zeros((32, 32, 3), np.uint8)
        rgb[..., 0] = 220
        return rgb

    frame = decode(encode_video("avi", "mjpeg", 2, pixels=red)).frames[0]
    r, g, b = (float(frame[..., c].mean()) for c in range(3))
    assert r > 180 and g < 40 and b < 40


# --- sampling ------------------------------------------------------------------------------------


def test_sample_times_formula() -> None:
    assert sample_times(5.0, 2.0, 32) == [(i + 0.5) * 0.5 for i in range(10)]
    assert sample_times(5.0, 2.0, 4) == [0.625, 1.875, 3.125, 4.375]
    assert sample_times(5.0, 0.1, 32) == [2.5]  # shorter than one interval: one frame, in the middle
    assert sample_count(600.0, 2.0, 32) == 32
    assert sample_count(4.9999999999, 2.0, 100) == 10  # float noise does not lose a frame
    assert sample_count(4.99, 2.0, 100) == 9
    assert sample_count(1.0, 1e308, 7) == 7  # no overflow


@pytest.mark.parametrize(
    ("fps", "num_frames", "ids", "sampled_fps"),
    [
        # 20 frames at 4 fps: frame k is on screen during [k/4, (k+1)/4).
        (1.0, 32, [2, 6, 10, 14, 18], 1.0),  # t = 0.5, 1.5, ...
        (2.0, 4, [2, 7, 12, 17], 0.8),  # capped: t = 0.625, 1.875, 3.125, 4.375
        (3.0, 32, [0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16, 18, 19], 3.0),  # t = 1/6 is on frame 0, not the nearer 1
        (0.1, 32, [10], 0.2),  # one sample at 2.5 s
        (30.0, 32, list(range(20)), 4.0),  # more than the source has: each frame once, no duplicates
        (None, None, list(range(1, 20, 2)), 2.0),  # defaults: 2 fps, at most 32
    ],
)
def test_sampling_picks_the_frame_on_screen(
    avi20: bytes, fps: float | None, num_frames: int | None, ids: list[int], sampled_fps: float
) -> None:
    result = decode(avi20, fps=fps, num_frames=num_frames)
    assert ids20(result) == ids
    assert result.timestamps == [k / 4 for k in ids]
    assert result.sample_times == sample_times(5.0, fps or 2.0, min(num_frames or 32, 20))
    assert result.sampled_fps == pytest.approx(sampled_fps)
    assert result.duration_s == 5.0
    assert result.source_fps == 4.0


def test_hard_cap_of_768_frames() -> None:
    assert SETTINGS.video_max_num_frames == 768
    data = encode_video("avi", "mjpeg", 800, rate=100, size=(16, 16), pixels=lambda i: np.full((16, 16, 3), i % 256, np.uint8))
    result = decode(data, fps=1000.0, num_frames=768)
    assert result.frames.shape == (768, 16, 16, 3)
    assert result.timestamps == sorted(set(result.timestamps))  # 768 distinct frames, in order
    with pytest.raises(InvalidArgument) as info:
        decode(data, fps=2.0, num_frames=769)
    assert info.value.field == "video.num_frames"


@pytest.mark.parametrize("num_frames", [0, -1, 769, True])
def test_num_frames_out_of_range(avi20: bytes, num_frames: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(avi20, fps=2.0, num_frames=num_frames)
    assert info.value.field == "video.num_frames"


@pytest.mark.parametrize("fps", [0.0, -1.0, float("nan"), float("inf")])
def test_fps_out_of_range(avi20: bytes, fps: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(avi20, fps=fps, num_frames=8)
    assert info.value.field == "video.fps"


def test_num_frames_cap_comes_from_settings(avi20: bytes) -> None:
    settings = Settings(video_max_num_frames=4, video_default_num_frames=4)
    assert decode(avi20, settings=settings).num_frames == 4
    with pytest.raises(InvalidArgument):
        decode(avi20, settings=settings, fps=2.0, num_frames=5)


# --- refused containers ------------------------------------------------------------------------


def test_truncated_mp4_is_invalid() -> None:
    data = encode_video("mp4", "libx264", 10)
    with pytest.raises(InvalidArgument) as info:
        decode(data[: len(data) // 2])
    assert info.value.field == "source"
    assert not isinstance(info.value, MediaTooLarge)


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(4096),
        b"\x00\x00\x00\x18ftypisom" + np.random.default_rng(1).bytes(4096),  # MP4 magic, garbage after
        b"\x1a\x45\xdf\xa3" + np.random.default_rng(2).bytes(4096),  # Matroska magic, garbage after
        b"",
    ],
)
def test_garbage_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert info.value.field == "source"


def test_playlists_and_images_are_never_opened(tmp_path: Any) -> None:
    secret = tmp_path / "secret.ts"
    secret.write_bytes(encode_video("mpegts", "mpeg2video", 2))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()
    concat = f"ffconcat version 1.0\nfile '{secret}'\n".encode()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    for data in (playlist, concat, png.getvalue()):
        with pytest.raises(InvalidArgument) as info:
            decode(data)
        assert "not a supported video container" in info.value.message
        assert str(tmp_path) not in str(info.value)


def test_audio_only_container_is_invalid() -> None:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with pytest.raises(InvalidArgument) as info:
        decode(out.getvalue())
    assert "no video stream" in info.value.message


# --- caps from the header ------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if frames would be demuxed or decoded: the refusal must come from the header."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("went past the header")

    monkeypatch.setattr(video, "_demux", forbidden)
    monkeypatch.setattr(video, "_decode_wanted", forbidden)


def mkv_with_duration(data: bytes, seconds: float) -> bytes:
    """Rewrite the Matroska Segment Info Duration (EBML id 0x4489, 8-byte float, milliseconds)."""
    at = data.find(b"\x44\x89\x88")
    assert at > 0
    return data[: at + 3] + struct.pack(">d", seconds * 1000) + data[at + 11 :]


@pytest.mark.usefixtures("no_decoding")
def test_header_claiming_11_minutes_is_refused_before_demuxing() -> None:
    data = mkv_with_duration(encode_video("matroska", "mpeg4", 4), 660.0)
    with pytest.raises(MediaTooLarge) as info:
        decode(data)
    assert info.value.field == "source"
    assert info.value.metadata["setting"] == "video_max_duration_s"


@pytest.mark.usefixtures("no_decoding")
def test_header_claiming_100k_frames_is_refused_before_demuxing() -> None:
    data = bytearray(encode_video("mp4", "mpeg4", 4))
    stts = data.find(b"stts")
    struct.pack_into(">I", data, stts + 12, 100_000)  # first (only) entry: sample count
    with av.open(io.BytesIO(bytes(data))) as container:
        assert container.streams.video[0].frames == 100_000  # what the header now claims
    with pytest.raises(MediaTooLarge) as info:
        decode(bytes(data))
    assert info.value.metadata["setting"] == "video_max_duration_s"


def test_long_video_with_a_lying_header_is_refused_while_demuxing(monkeypatch: pytest.MonkeyPatch) -> None:
    # 700 s of 16x16 frames at 1 fps whose header claims 5 s: the packets give it away.
    data = mkv_with_duration(encode_video("matroska", "mpeg4", 700, rate=1, size=(16, 16)), 5.0)
    with av.open(io.BytesIO(data)) as container:
        assert container.duration == 5 * av.time_base
    monkeypatch.setattr(video, "_decode_wanted", lambda *a, **k: pytest.fail("decoded frames"))
    with pytest.raises(MediaTooLarge) as info:
        decode(data)
    assert info.value.metadata["setting"] == "video_max_duration_s"


def test_duration_cap_comes_from_settings(avi20: bytes) -> None:
    assert decode(avi20, settings=Settings(video_max_duration_s=5.0)).duration_s == 5.0
    with pytest.raises(MediaTooLarge):
        decode(avi20, settings=Settings(video_max_duration_s=4.9))


@pytest.mark.usefixtures("no_decoding")
def test_too_large_frames_are_refused_from_the_header() -> None:
    data = encode_video("mp4", "mpeg4", 2, size=(64, 32))
    with pytest.raises(MediaTooLarge) as info:
        decode(data, settings=Settings(video_max_frame_pixels=64 * 32 - 1))
    assert info.value.metadata["setting"] == "video_max_frame_pixels"


def test_frames_at_the_pixel_cap_pass() -> None:
    assert decode(encode_video("mp4", "mpeg4", 2, size=(64, 32)), settings=Settings(video_max_frame_pixels=64 * 32)).num_frames == 2


def test_default_frame_cap_is_4k() -> None:
    assert SETTINGS.video_max_frame_pixels == 3840 * 2160


# --- pixel budget --------------------------------------------------------------------------------


def test_each_returned_frame_is_charged_to_the_budget(avi20: bytes) -> None:
    budget = RequestBudget(max_bytes=1 << 20, max_pixels=10 * 16 * 16)
    assert decode(avi20, budget=budget).num_frames == 10
    assert budget.pixels_left == 0
    with pytest.raises(MediaTooLarge) as info:
        decode(avi20, budget=RequestBudget(max_bytes=1 << 20, max_pixels=10 * 16 * 16 - 1))
    assert info.value.metadata["setting"] == "request_pixel_budget"


# --- corrupt frames ------------------------------------------------------------------------------


def corrupt_mjpeg_frames(data: bytes, indexes: set[int]) -> bytes:
    """Zero the JPEG payload of the given frames of an MJPEG AVI (the container stays intact)."""
    out = bytearray(data)
    frames = [m.start() for m in re.finditer(b"00dc", data) if data[m.start() + 8 : m.start() + 10] == b"\xff\xd8"]
    for k in indexes:
        start = frames[k]
        (size,) = struct.unpack_from("<I", data, start + 4)
        out[start + 8 : start + 8 + size] = bytes(size)
    return bytes(out)


def test_corrupt_frames_are_filled_from_the_next_good_frame() -> None:
    data = corrupt_mjpeg_frames(encode_video("avi", "mjpeg", 10), {4, 5})
    budget = RequestBudget.from_settings(SETTINGS)
    result = decode(data, fps=2.0, num_frames=32, budget=budget)
    assert frame_ids(result) == [0, 1, 2, 3, 6, 6, 6, 7, 8, 9]
    assert result.timestamps == [0.0, 0.5, 1.0, 1.5, 3.0, 3.0, 3.0, 3.5, 4.0, 4.5]
    assert result.sample_times == sample_times(5.0, 2.0, 10)  # the grid does not move
    assert SETTINGS.request_pixel_budget - budget.pixels_left == 10 * 32 * 32  # fills are charged too


def test_corrupt_frames_at_the_end_are_filled_from_the_previous_good_frame() -> None:
    data = corrupt_mjpeg_frames(encode_video("avi", "mjpeg", 10), {8, 9})
    assert frame_ids(decode(data, fps=2.0, num_frames=32)) == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]


def test_no_decodable_frame_is_invalid() -> None:
    data = corrupt_mjpeg_frames(encode_video("avi", "mjpeg", 4), {0, 1, 2, 3})
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert "no frame" in info.value.message
    assert not isinstance(info.value, MediaTooLarge)


# --- rotation ------------------------------------------------------------------------------------


def test_display_matrix_rotation_is_applied() -> None:
    def left_white(i: int) -> np.ndarray:
        rgb = np.zeros((16, 32, 3), np.uint8)
        rgb[:, :16] = 255
        return rgb

    data = bytearray(encode_video("mp4", "mpeg4", 1, size=(32, 16), pixels=left_white))
    matrix = data.find(b"tkhd") + 4 + 4 + 4 * 5 + 8 + 8
    struct.pack_into(">9i", data, matrix, 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)  # 90° clockwise (phone portrait)
    frame = decode(bytes(data)).frames[0]
    assert frame.shape == (32, 16, 3)  # upright: portrait
    assert frame[:16].mean() > 200 and frame[16:].mean() < 50  # the left edge is now on top


# --- a list of encoded images --------------------------------------------------------------------


def png(value: int, size: tuple[int, int] = (8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 0)).save(out, "PNG")
    return out.getvalue()


def from_images(
    frames: list[bytes], fps: float = 2.0, *, settings: Settings = SETTINGS, budget: RequestBudget | None = None
) -> DecodedVideo:
    return frames_from_images(frames, fps, settings=settings, budget=budget or RequestBudget.from_settings(settings))


def test_frames_from_images() -> None:
    budget = RequestBudget.from_settings(SETTINGS)
    result = from_images([png(0), png(100), png(200)], 2.0, budget=budget)
    assert result.frames.shape == (3, 6, 8, 3)
    assert result.frames.dtype == np.uint8
    assert [tuple(int(v) for v in f[0, 0]) for f in result.frames] == [(0, 255, 0), (100, 155, 0), (200, 55, 0)]
    assert result.timestamps == [0.0, 0.5, 1.0]
    assert result.duration_s == 1.5
    assert result.sampled_fps == 2.0
    assert SETTINGS.request_pixel_budget - budget.pixels_left == 3 * 8 * 6


@pytest.mark.parametrize("fps", [0.0, -2.0, float("nan"), float("inf")])
def test_frames_from_images_fps_must_be_positive(fps: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        from_images([png(0)], fps)
    assert info.value.field == "source.frames.fps"


def test_frames_from_images_must_share_one_size() -> None:
    with pytest.raises(InvalidArgument) as info:
        from_images([png(0), png(0, (6, 8))])
    assert info.value.field == "source.frames.frames[1]"


def test_frames_from_images_caps() -> None:
    with pytest.raises(MediaTooLarge) as info:
        from_images([png(0)] * 3, settings=Settings(video_max_num_frames=2))
    assert info.value.metadata["setting"] == "video_max_num_frames"
    with pytest.raises(MediaTooLarge) as info:
        from_images([png(0), png(0, (9, 6))], settings=Settings(video_max_frame_pixels=48))
    assert info.value.field == "source.frames.frames[1]"
    assert info.value.metadata["setting"] == "video_max_frame_pixels"
    with pytest.raises(InvalidArgument):
        from_images([])


def test_frames_from_images_corrupt_frame_is_named() -> None:
    with pytest.raises(InvalidArgument) as info:
        from_images([png(0), png(0)[:40]])
    assert info.value.field == "source.frames.frames[1]"
