"""Bad media of every modality, refused with the right status, field and message, storing nothing.

Each case goes through the encoder's gRPC API with a valid item of the same
modality first in the same request (so "Redis holds nothing new" proves that
nothing of a failed request is stored, not merely that the bad item was not),
and a representative subset goes through the gateway with the official OpenAI
SDK (HTTP 400, OpenAI error shape, `param` naming the part or the option).

One module stack runs the tiny Qwen2.5-Omni thinker (image, video, audio, time
series) with MMSERVE_AUDIO_MAX_DURATION_S=320: above the thinker's 300 s window,
so a 301 s clip is refused by the model's window and a 330 s clip by the cap.
"""

from __future__ import annotations

import base64
import io
import itertools
import struct
from collections.abc import Iterator
from typing import Any

import av
import grpc
import numpy as np
import openai
import pytest
import soundfile as sf

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.localredis import LocalRedis
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import data_url, encoder_stub, png_bytes, redis_keys, rpc_error, scrape
from tests.test_equivalence_modalities import mp4_bytes, npy_bytes, wav_bytes

OMNI = "tiny:qwen2_5_omni-tiny"
AUDIO_CAP_S = 320
RATE = 16000
IMAGE, VIDEO, AUDIO, SERIES = (
    media_pb2.MODALITY_IMAGE,
    media_pb2.MODALITY_VIDEO,
    media_pb2.MODALITY_AUDIO,
    media_pb2.MODALITY_TIME_SERIES,
)
_seeds = itertools.count(5000)


@pytest.fixture(scope="module")
def stack(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[Stack]:
    """Encoder, decoder and gateway of the Omni thinker (in-process), audio capped at 320 s."""
    stack = start_inprocess_stack(inprocess, module_redis.url, model=OMNI, audio_max_duration_s=AUDIO_CAP_S)
    yield stack
    stack.stop()


# --- media ---------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode_video(fmt: str, codec: str, n: int, *, rate: int = 2, size: tuple[int, int] = (32, 32)) -> bytes:
    """n gray frames at `rate` fps (as tests/test_video_decode.py makes them)."""
    width, height = size
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            rgb = np.full((height, width, 3), (10 + 20 * i) % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def mkv_with_duration(data: bytes, seconds: float) -> bytes:
    """Rewrite the Matroska Segment Info Duration (EBML id 0x4489, 8-byte float, milliseconds)."""
    at = data.find(b"\x44\x89\x88")
    assert at > 0
    return data[: at + 3] + struct.pack(">d", seconds * 1000) + data[at + 11 :]


def mp4_claiming_100k_frames() -> bytes:
    """A real 4-frame mp4 whose stts box claims 100,000 samples (50,000 s at 2 fps)."""
    data = bytearray(encode_video("mp4", "mpeg4", 4))
    stts = data.find(b"stts")
    struct.pack_into(">I", data, stts + 12, 100_000)  # first (only) entry: sample count
    with av.open(io.BytesIO(bytes(data))) as container:
        assert container.streams.video[0].frames == 100_000  # what the header now claims
    return bytes(data)


def pcm_wav(seconds: float, *, rate: int = RATE, seed: int = 0) -> bytes:
    """Mono 16-bit PCM noise: a real WAV of exactly seconds * rate samples."""
    samples = (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 3000).astype("<i2")
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def wav_chunk(data: bytes, name: bytes) -> int:
    """Offset of a WAV chunk's id."""
    at = data.find(name, 12)
    assert at > 0, name
    return at


def wav_with_rate(data: bytes, rate: int) -> bytes:
    """The same WAV with a forged sample rate (and byte rate) in its fmt chunk."""
    out = bytearray(data)
    fmt = wav_chunk(data, b"fmt ")
    struct.pack_into("<II", out, fmt + 12, rate, rate * 2)
    return bytes(out)


def wav_with_data_size(data: bytes, size: int) -> bytes:
    """The same WAV whose data chunk (and RIFF size) declares `size` bytes of samples."""
    out = bytearray(data)
    chunk = wav_chunk(data, b"data")
    struct.pack_into("<I", out, chunk + 4, size)
    struct.pack_into("<I", out, 4, min(size + chunk + 8 - 8, 0xFFFFFFFF))
    return bytes(out)


def npy(values: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=allow_pickle)
    return buf.getvalue()


# --- items ----------------------------------------------------------------------------------------


def item(modality: int, data: bytes, **options: Any) -> media_pb2.MediaInput:
    """A MediaInput carrying raw bytes, with per-modality options."""
    out = media_pb2.MediaInput(modality=modality, source=media_pb2.MediaSource(data=data))
    if options:
        name = {IMAGE: "image", VIDEO: "video", AUDIO: "audio", SERIES: "time_series"}[modality]
        getattr(out, name).CopyFrom(
            {
                IMAGE: media_pb2.ImageOptions,
                VIDEO: media_pb2.VideoOptions,
                AUDIO: media_pb2.AudioOptions,
                SERIES: media_pb2.TimeSeriesOptions,
            }[modality](**options)
        )
    return out


def good(modality: int) -> media_pb2.MediaInput:
    """A small valid item of `modality` that nothing has stored yet (fresh content)."""
    seed = next(_seeds)
    if modality == VIDEO:
        return item(VIDEO, mp4_bytes(frames=4, fps=4, width=32, height=32, seed=seed))
    if modality == AUDIO:
        return item(AUDIO, wav_bytes(0.5, seed=seed))
    if modality == SERIES:
        return item(SERIES, npy_bytes(200, 2, seed=seed), sampling_rate=100.0)
    return item(IMAGE, png_bytes(32, 32, seed=seed))


def expect_refused(
    stack: Stack,
    bad: media_pb2.MediaInput,
    field: str,
    words: list[str],
    *,
    setting: str | None = None,
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
) -> None:
    """[valid item of the same modality, bad] is refused naming items[1]; Redis gains nothing; the valid item alone is new."""
    first = good(bad.modality)
    before = redis_keys(stack.redis_url)
    with encoder_stub(stack.encoder.target) as stub:
        got, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[first, bad]))
        assert got == code, (got, err)
        assert err.field == field, err
        for word in words:
            assert word.lower() in err.message.lower(), err.message
        if setting is not None:
            assert err.metadata.get("setting") == setting, err.metadata
        assert redis_keys(stack.redis_url) == before  # not even the valid first item was stored
        alone = stub.Encode(pb.EncodeRequest(items=[first])).results[0]
    assert not alone.cached  # it was valid, and the failed request had not stored it


def rest_refused(stack: Stack, content: list[dict[str, Any]], param: str, words: list[str], **extra: Any) -> dict[str, Any]:
    """The chat request is a 400 in OpenAI's error shape naming `param`; Redis gains nothing. Returns the error object."""
    before = redis_keys(stack.redis_url)
    with pytest.raises(openai.BadRequestError) as info:
        stack.client().chat.completions.create(
            model="",
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_completion_tokens=4,
            extra_body=extra or None,
        )
    exc = info.value
    assert exc.status_code == 400
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    for word in words:
        assert word.lower() in error["message"].lower(), error
    assert "Traceback" not in error["message"] and "/tmp" not in error["message"]
    assert exc.response.headers.get("x-should-retry") == "false"
    assert redis_keys(stack.redis_url) == before
    return error


def image_part(seed: int | None = None) -> dict[str, Any]:
    """A valid (fresh) image part, put first in REST requests."""
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32, seed=next(_seeds) if seed is None else seed))}}


def video_part(data: bytes) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(data)}"}}


def audio_part(data: bytes) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": "wav"}}


def series_part(data: bytes, **extra: Any) -> dict[str, Any]:
    return {"type": "time_series_url", "time_series_url": {"url": f"data:application/octet-stream;base64,{b64(data)}", **extra}}


# --- video ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def truncated_mp4() -> bytes:
    data = mp4_bytes(frames=8, fps=4, width=64, height=48, seed=1)
    return data[: len(data) // 2]


def test_truncated_mp4_grpc(stack: Stack, truncated_mp4: bytes) -> None:
    """A truncated mp4 is INVALID_ARGUMENT on items[1].source, said to be corrupt or truncated, not a size error."""
    expect_refused(stack, item(VIDEO, truncated_mp4), "items[1].source", ["video"])
    with encoder_stub(stack.encoder.target) as stub:
        _, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[item(VIDEO, truncated_mp4)]))
    assert any(w in err.message for w in ("corrupt", "truncated", "no frame")), err.message
    assert err.reason != "MEDIA_TOO_LARGE"


def test_truncated_mp4_rest(stack: Stack, truncated_mp4: bytes) -> None:
    """Through the SDK: 400 naming the video part (the second part of the message)."""
    error = rest_refused(
        stack, [image_part(), video_part(truncated_mp4), {"type": "text", "text": "?"}], "messages[0].content[1]", ["video"]
    )
    assert any(w in error["message"] for w in ("corrupt", "truncated", "no frame")), error


def test_random_bytes_as_video(stack: Stack) -> None:
    """Random bytes are not a video container: refused before FFmpeg probes them, accepted containers listed."""
    junk = np.random.default_rng(3).bytes(4096)
    expect_refused(stack, item(VIDEO, junk), "items[1].source", ["not a supported video container", "MP4"])
    rest_refused(stack, [image_part(), video_part(junk)], "messages[0].content[1]", ["not a supported video container"])


def test_video_header_claiming_100k_frames(stack: Stack) -> None:
    """An mp4 whose header claims 100,000 frames is refused as too long (the 600 s cap), by the header."""
    forged = mp4_claiming_100k_frames()
    expect_refused(stack, item(VIDEO, forged), "items[1].source", ["longer than the allowed 600 s"], setting="video_max_duration_s")
    error = rest_refused(stack, [image_part(), video_part(forged)], "messages[0].content[1]", ["longer than the allowed 600 s"])
    assert error["code"] == "media_too_large"


def test_video_header_claiming_11_minutes(stack: Stack) -> None:
    """A Matroska file whose Segment duration says 660 s is over the 600 s cap."""
    forged = mkv_with_duration(encode_video("matroska", "mpeg4", 4), 660.0)
    expect_refused(stack, item(VIDEO, forged), "items[1].source", ["longer than the allowed 600 s"], setting="video_max_duration_s")


# --- audio ------------------------------------------------------------------------------------------


def test_zero_length_audio(stack: Stack) -> None:
    """Zero bytes of audio, and a WAV holding zero samples, are refused as empty."""
    expect_refused(stack, item(AUDIO, b""), "items[1].source", ["audio is empty"])
    expect_refused(stack, item(AUDIO, pcm_wav(0.0)), "items[1].source", ["audio is empty"])
    rest_refused(stack, [image_part(), audio_part(pcm_wav(0.0))], "messages[0].content[1]", ["audio is empty"])


@pytest.mark.parametrize("rate", [0, 7, 999_999_999])
def test_wav_with_forged_sample_rate(stack: Stack, rate: int) -> None:
    """A WAV header declaring an absurd sample rate is refused before anything is allocated from it."""
    forged = wav_with_rate(pcm_wav(0.5, seed=4), rate)
    expect_refused(stack, item(AUDIO, forged), "items[1].source", [f"sample rate of {rate} Hz"])


def test_wav_header_claiming_10_hours(stack: Stack) -> None:
    """A 1 s WAV whose data chunk declares 10 hours is refused from the header, naming the duration cap."""
    forged = wav_with_data_size(pcm_wav(1.0, seed=5), 10 * 3600 * RATE * 2)
    expect_refused(
        stack, item(AUDIO, forged), "items[1].source", [f"longer than the allowed {AUDIO_CAP_S} s"], setting="audio_max_duration_s"
    )
    rest_refused(stack, [image_part(), audio_part(forged)], "messages[0].content[1]", [f"longer than the allowed {AUDIO_CAP_S} s"])


@pytest.fixture(scope="module")
def audio_301s() -> bytes:
    """301 s of 16 kHz mono PCM (~9.6 MB): one second more than the thinker's window."""
    return pcm_wav(301.0, seed=6)


def test_audio_longer_than_the_model_window_grpc(stack: Stack, audio_301s: bytes) -> None:
    """301 s is under the server cap but over the Omni thinker's 300 s window: refused, never silently cut."""
    expect_refused(stack, item(AUDIO, audio_301s), "items[1].source", ["301.0 s long", "at most 300 s in one item"])


def test_audio_longer_than_the_model_window_rest(stack: Stack, audio_301s: bytes) -> None:
    """The same through the SDK, as input_audio: 400 naming the part and the window."""
    rest_refused(stack, [image_part(), audio_part(audio_301s)], "messages[0].content[1]", ["301.0 s long", "at most 300 s"])


@pytest.mark.parametrize("declared", ["honest", "unknown-length"])
def test_audio_over_the_configured_duration_cap(stack: Stack, declared: str) -> None:
    """330 s of audio with MMSERVE_AUDIO_MAX_DURATION_S=320: refused from the header, or while decoding when the header does not say."""
    wav = pcm_wav(330.0, seed=7)
    if declared == "unknown-length":
        wav = wav_with_data_size(wav, 0xFFFFFFFF)  # as streamed WAVs are written: the length is unknown
    expect_refused(stack, item(AUDIO, wav), "items[1].source", [f"longer than the allowed {AUDIO_CAP_S} s"], setting="audio_max_duration_s")


def test_input_audio_format_aiff(stack: Stack) -> None:
    """input_audio.format "aiff" is a 400 listing the accepted formats; over gRPC it names audio.format."""
    wav = pcm_wav(0.5, seed=8)
    rest_refused(
        stack,
        [image_part(), {"type": "input_audio", "input_audio": {"data": b64(wav), "format": "aiff"}}],
        "messages[0].content[1]",
        ["format", "wav, mp3, flac, ogg"],
    )
    expect_refused(stack, item(AUDIO, wav, format="aiff"), "items[1].audio.format", ["wav, mp3, flac, ogg"])


def test_audio_bytes_that_are_no_audio_format(stack: Stack) -> None:
    """input_audio says wav but the bytes are no supported container: 400 naming audio.format.

    (Bytes of another supported container than the label are decoded as what they are: tests/test_openai_forms.py.)
    """
    expect_refused(
        stack,
        item(AUDIO, b"plain text, not audio " * 8, format="wav"),
        "items[1].audio.format",
        ["not wav", "not a recognised audio format"],
    )


# --- time series ------------------------------------------------------------------------------------


def test_time_series_with_nan(stack: Stack) -> None:
    """A NaN is refused, naming the sample and channel (no silent filling)."""
    values = np.ones((300, 2), np.float32)
    values[17, 1] = np.nan
    bad = item(SERIES, npy(values), sampling_rate=100.0)
    expect_refused(stack, bad, "items[1].source", ["sample 17, channel 1", "NaN"])
    rest_refused(stack, [image_part(), series_part(npy(values), sampling_rate=100)], "messages[0].content[1]", ["NaN"])


def test_npy_with_pickled_objects(stack: Stack) -> None:
    """An .npy of Python objects (a pickle) is refused from its header, never unpickled."""
    pickled = npy(np.array([{"a": 1}, [2, 3], "x"], dtype=object), allow_pickle=True)
    assert b"\x80" in pickled[128:]  # really a pickle stream after the header
    expect_refused(stack, item(SERIES, pickled, sampling_rate=100.0), "items[1].source", ["pickled"])


def test_time_series_too_short_for_one_token(stack: Stack) -> None:
    """50 samples at 100 Hz: one patch needs 100 (1 s), so not one token."""
    short = item(SERIES, npy(np.sin(np.arange(50, dtype=np.float32))), sampling_rate=100.0)
    expect_refused(stack, short, "items[1].source", ["too short for one token", "50 samples", "needs 100"])
    rest_refused(
        stack,
        [image_part(), series_part(npy(np.sin(np.arange(50, dtype=np.float32))), sampling_rate=100)],
        "messages[0].content[1]",
        ["too short for one token"],
    )


def test_rank_3_time_series(stack: Stack) -> None:
    """A [T, C, K] array is not a time series: refused naming the rank, never reshaped."""
    cube = item(SERIES, npy(np.zeros((200, 2, 2), np.float32)), sampling_rate=100.0)
    expect_refused(stack, cube, "items[1].source", ["wrong rank", "3 dimensions"])


def test_time_series_without_sampling_rate(stack: Stack) -> None:
    """time_series_url without sampling_rate is a 400 naming the part; over gRPC the option field."""
    series = npy_bytes(200, 2, seed=10)
    rest_refused(stack, [image_part(), series_part(series)], "messages[0].content[1]", ["sampling_rate", "required"])
    rest_refused(stack, [image_part(), series_part(series, sampling_rate=0)], "messages[0].content[1]", ["sampling_rate", "> 0"])
    expect_refused(stack, item(SERIES, series), "items[1].time_series.sampling_rate", ["required"])


# --- per-request options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"media_io_kwargs": {"video": {"bogus": 1}}}, "media_io_kwargs.video.bogus", ["bogus", "allowed: fps, num_frames"]),
        ({"mm_processor_kwargs": {"audio": {"x": 1}}}, "mm_processor_kwargs.audio.x", ["'x'", "allowed: none"]),
        ({"media_io_kwargs": {"hologram": {"fps": 1}}}, "media_io_kwargs.hologram", ["unknown modality"]),
        ({"media_io_kwargs": {"video": {"fps": "fast"}}}, "media_io_kwargs.video.fps", ["number"]),
    ],
)
def test_options_outside_the_allowlist(stack: Stack, extra: dict[str, Any], param: str, words: list[str]) -> None:
    """Unknown option keys (or modalities, or non-numbers) are refused by the gateway, naming the kwargs field."""
    video = mp4_bytes(frames=4, fps=4, width=32, height=32, seed=11)
    before = scrape(stack.encoder.metrics_url)
    rest_refused(stack, [video_part(video), {"type": "text", "text": "?"}], param, words, **extra)
    after = scrape(stack.encoder.metrics_url)
    encodes = [k for k in after if k.startswith("mmserve_requests_total{") and 'rpc="Encode"' in k]
    assert all(after[k] == before.get(k, 0) for k in encodes)  # refused before anything reached the encoder


@pytest.mark.parametrize(
    ("extra", "grpc_options", "field", "words"),
    [
        ({"media_io_kwargs": {"video": {"num_frames": 100_000}}}, {"num_frames": 100_000}, "video.num_frames", ["between 1 and 768"]),
        ({"media_io_kwargs": {"video": {"fps": 0}}}, {"fps": 0.0}, "video.fps", ["> 0"]),
        ({"mm_processor_kwargs": {"video": {"max_pixels": -1}}}, {"max_pixels": -1}, "video.max_pixels", ["max_pixels"]),
    ],
)
def test_options_over_the_caps(stack: Stack, extra: dict[str, Any], grpc_options: dict[str, Any], field: str, words: list[str]) -> None:
    """Option values outside the server's limits are a 400 (REST) / INVALID_ARGUMENT (gRPC) naming the option."""
    video = mp4_bytes(frames=4, fps=4, width=32, height=32, seed=12)
    error = rest_refused(stack, [image_part(), video_part(video)], "messages[0].content[1]", words, **extra)
    assert field.split(".")[-1] in error["message"], error  # the message says which option, the param which part
    data = mp4_bytes(frames=4, fps=4, width=32, height=32, seed=13)
    expect_refused(stack, item(VIDEO, data, **grpc_options), f"items[1].{field}", words)


def test_num_frames_beyond_int32_is_a_400(stack: Stack) -> None:
    """A num_frames too large for the wire type is still a clean 400, not a server error."""
    video = mp4_bytes(frames=4, fps=4, width=32, height=32, seed=14)
    rest_refused(
        stack, [video_part(video)], "media_io_kwargs.video.num_frames", ["num_frames"], media_io_kwargs={"video": {"num_frames": 10**12}}
    )


# --- per-request item limits ------------------------------------------------------------------------


def test_too_many_videos_in_one_request(stack: Stack) -> None:
    """Three videos with MMSERVE_MAX_VIDEOS_PER_REQUEST at its default 2: 400 naming the limit, nothing encoded."""
    videos = [mp4_bytes(frames=4, fps=4, width=32, height=32, seed=20 + i) for i in range(3)]
    before = scrape(stack.encoder.metrics_url)
    error = rest_refused(stack, [video_part(v) for v in videos], "messages", ["too many video items: 3", "limit 2 per request"])
    assert error["code"] == "invalid_argument"
    after = scrape(stack.encoder.metrics_url)
    encodes = [k for k in after if k.startswith("mmserve_requests_total{") and 'rpc="Encode"' in k]
    assert all(after[k] == before.get(k, 0) for k in encodes)  # the decoder refused it without calling the encoder

    before_keys = redis_keys(stack.redis_url)
    with encoder_stub(stack.encoder.target) as stub:
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[item(VIDEO, v) for v in videos]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.field == "items"
    assert "limit 2 per request" in err.message
    assert redis_keys(stack.redis_url) == before_keys
