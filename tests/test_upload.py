"""Large media over gRPC: the client-streaming EncodeUpload RPC, and videos given as lists of frames.

A real, decodable ~100 MB video (an MJPEG AVI of high-quality noise frames,
too large for one gRPC message) is streamed in 1-4 MiB chunks and encoded;
the same bytes again are served from the store. Malformed streams (no header,
more or fewer bytes than announced) and uploads over MMSERVE_MAX_UPLOAD_BYTES
are refused naming the field, the latter while the client is still streaming.
A video sent as encoded PNG frames plus fps encodes, and chatting with it by
uuid gives the same answer as the same frames in a lossless video file.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import grpc
import numpy as np
import pytest
from PIL import Image

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.localredis import LocalRedis
from tests.conftest import Stack
from tests.inprocess import InProcessService, InProcessServices
from tests.support import encoder_stub, png_bytes, redis_keys, rpc_error, scrape

OMNI = "tiny:qwen2_5_omni-tiny"
MiB = 1024 * 1024
BIG_FPS = 10
BIG_SIZE = (1280, 720)
UPLOAD_LIMIT = 8 * MiB
GRPC_MESSAGE_LIMIT = 80 * MiB  # MMSERVE_GRPC_MAX_MESSAGE_BYTES default: the big video cannot go inline
#: The big video is encoded with few, small frames to keep the tower cheap (the upload is what is tested).
BIG_OPTIONS = media_pb2.VideoOptions(num_frames=8, max_pixels=12544)
ENCODED_VIDEOS = 'mmserve_encoder_items_encoded_total{modality="video"}'


@pytest.fixture(scope="module")
def stack(inprocess_omni_stack: Stack) -> Stack:
    """Encoder, decoder and gateway of the Omni thinker (in-process), default upload limit (1 GiB)."""
    return inprocess_omni_stack


@pytest.fixture(scope="module")
def small_encoder(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[InProcessService]:
    """A second encoder (in-process) that takes uploads of at most 8 MiB."""
    service = inprocess.start("encoder", redis_url=module_redis.url, model=OMNI, max_upload_bytes=UPLOAD_LIMIT)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def big_video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real MJPEG AVI of 1280x720 noise frames at 10 fps, best JPEG quality, about 100 MiB (made once, kept in a file)."""
    path = tmp_path_factory.mktemp("upload") / "big.avi"
    width, height = BIG_SIZE
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=BIG_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        stream.codec_context.qmin = stream.codec_context.qmax = 1  # noise at best quality: ~1.2 MB a frame
        rng = np.random.default_rng(0)
        for _ in range(85):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert 95 * MiB < len(data) < 110 * MiB, len(data)
    return data


def video_header(total_bytes: int, *, uuid: str = "", options: media_pb2.VideoOptions = BIG_OPTIONS) -> pb.EncodeUploadRequest:
    item = media_pb2.MediaInput(modality=media_pb2.MODALITY_VIDEO, uuid=uuid, video=options)
    return pb.EncodeUploadRequest(header=pb.UploadHeader(item=item, total_bytes=total_bytes))


def chunks(data: bytes, *, seed: int, low: int = MiB, high: int = 4 * MiB) -> Iterator[pb.EncodeUploadRequest]:
    """The bytes in order, in chunks of random sizes between `low` and `high`."""
    rng = np.random.default_rng(seed)
    start = 0
    while start < len(data):
        size = int(rng.integers(low, high + 1))
        yield pb.EncodeUploadRequest(chunk=data[start : start + size])
        start += size


class Counting:
    """A request iterator that counts what gRPC has pulled from it."""

    def __init__(self, messages: Iterator[pb.EncodeUploadRequest]) -> None:
        self._messages = messages
        self.yielded = 0
        self.bytes = 0

    def __iter__(self) -> Counting:
        return self

    def __next__(self) -> pb.EncodeUploadRequest:
        message = next(self._messages)
        self.yielded += 1
        self.bytes += len(message.chunk)
        return message


# --- a ~100 MB video through EncodeUpload ------------------------------------------------------------


@pytest.fixture(scope="module")
def uploaded(stack: Stack, big_video: bytes) -> pb.EncodeResult:
    """The big video streamed once, in 1-4 MiB chunks."""
    with encoder_stub(stack.encoder.target) as stub:
        return stub.EncodeUpload(itertools.chain([video_header(len(big_video))], chunks(big_video, seed=1)), timeout=300).result


def test_big_video_upload_is_encoded(stack: Stack, big_video: bytes, uploaded: pb.EncodeResult) -> None:
    """~100 MB (more than one gRPC message may hold) is streamed, decoded and stored, with its frame timing."""
    assert len(big_video) > GRPC_MESSAGE_LIMIT
    frames = 85
    duration = frames / BIG_FPS
    desc = uploaded.embedding
    assert not uploaded.cached
    assert desc.id.startswith("mmemb-") and desc.modality == media_pb2.MODALITY_VIDEO
    assert desc.WhichOneof("placement") == "video"
    video = desc.video
    assert video.duration_s == pytest.approx(duration)
    # 8 samples at the centres of 8 equal slices of 8.5 s; each takes the 10 fps frame on screen then.
    want = [np.floor((i + 0.5) * duration / 8 * BIG_FPS + 1e-9) / BIG_FPS for i in range(8)]
    assert list(video.frame_timestamps) == pytest.approx(want)
    assert video.sampled_fps == pytest.approx(8 / duration)
    assert video.temporal_patch_size == 2 and video.second_per_grid == pytest.approx(2 / video.sampled_fps)
    # max_pixels 12544 -> 1280x720 is resized to 140x84 -> 10x6 patches -> 15 tokens per temporal patch, 4 of them.
    assert list(video.grid_thw) == [4, 6, 10]
    assert desc.token_count == 60
    with encoder_stub(stack.encoder.target) as stub:
        stored = stub.GetEmbedding(pb.GetEmbeddingRequest(id=desc.id)).embedding
    assert stored.content_sha256 == desc.content_sha256 and stored.token_count == 60
    import hashlib

    assert desc.content_sha256 == hashlib.sha256(big_video).hexdigest()  # every byte arrived, in order


def test_same_bytes_uploaded_again_are_cached(stack: Stack, big_video: bytes, uploaded: pb.EncodeResult) -> None:
    """The same ~100 MB again, cut differently: same id, `cached`, and the video tower does not run."""
    before = scrape(stack.encoder.metrics_url)
    with encoder_stub(stack.encoder.target) as stub:
        again = stub.EncodeUpload(
            itertools.chain([video_header(len(big_video))], chunks(big_video, seed=2, low=MiB, high=MiB)), timeout=300
        ).result
    after = scrape(stack.encoder.metrics_url)
    assert again.cached
    assert again.embedding.id == uploaded.embedding.id
    assert again.embedding.created_at == uploaded.embedding.created_at
    assert after[ENCODED_VIDEOS] == before[ENCODED_VIDEOS]


# --- malformed streams -------------------------------------------------------------------------------


def upload_refused(target: str, redis_url: str, messages: Iterator[pb.EncodeUploadRequest], field: str, words: list[str]) -> Counting:
    """The upload fails with INVALID_ARGUMENT naming `field`; Redis is unchanged. Returns the counted iterator."""
    before = redis_keys(redis_url)
    counted = Counting(messages)
    with encoder_stub(target) as stub:
        code, err = rpc_error(stub.EncodeUpload, counted, timeout=120)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, err)
    assert err.field == field, err
    for word in words:
        assert word.lower() in err.message.lower(), err.message
    assert redis_keys(redis_url) == before
    return counted


def small_video(seed: int) -> bytes:
    """A small real MJPEG AVI (a few MiB would be wasted here)."""
    out = io.BytesIO()
    with av.open(out, "w", format="avi") as container:
        stream = container.add_stream("mjpeg", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        rng = np.random.default_rng(seed)
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def test_chunks_beyond_the_announced_size(stack: Stack) -> None:
    """More bytes than header.total_bytes (and fewer) is INVALID_ARGUMENT on header.total_bytes; nothing stored."""
    data = small_video(3)
    more = [video_header(len(data) - 100), pb.EncodeUploadRequest(chunk=data[:1000]), pb.EncodeUploadRequest(chunk=data[1000:])]
    # refused as soon as the count passes the announced size, not after the whole stream
    upload_refused(stack.encoder.target, stack.redis_url, iter(more), "header.total_bytes", [f"more than the {len(data) - 100} bytes"])
    fewer = [video_header(len(data) + 1), pb.EncodeUploadRequest(chunk=data)]
    upload_refused(stack.encoder.target, stack.redis_url, iter(fewer), "header.total_bytes", [f"announced {len(data) + 1}"])
    with encoder_stub(stack.encoder.target) as stub:  # the same bytes, announced right, are a valid video
        ok = stub.EncodeUpload(iter([video_header(len(data)), pb.EncodeUploadRequest(chunk=data)])).result
    assert not ok.cached and ok.embedding.modality == media_pb2.MODALITY_VIDEO


def test_upload_without_a_header(stack: Stack) -> None:
    """A first message that is a chunk, an empty stream, and a second header are refused naming `header`."""
    data = small_video(4)
    upload_refused(
        stack.encoder.target, stack.redis_url, iter([pb.EncodeUploadRequest(chunk=data)]), "header", ["first message must be the header"]
    )
    upload_refused(stack.encoder.target, stack.redis_url, iter([]), "header", ["no header"])
    twice = [video_header(len(data)), video_header(len(data)), pb.EncodeUploadRequest(chunk=data)]
    upload_refused(stack.encoder.target, stack.redis_url, iter(twice), "header", ["once"])


def test_upload_header_with_a_source(stack: Stack) -> None:
    """The header's item must not carry a source of its own: the chunks are its bytes."""
    data = small_video(5)
    header = video_header(len(data))
    header.header.item.source.url = "http://example.com/other.mp4"
    upload_refused(
        stack.encoder.target, stack.redis_url, iter([header, pb.EncodeUploadRequest(chunk=data)]), "header.item.source", ["unset"]
    )


def test_upload_that_is_not_a_video(stack: Stack) -> None:
    """Uploaded bytes are decoded like any other: noise is refused naming the uploaded item's source."""
    junk = np.random.default_rng(6).bytes(3 * MiB)
    upload_refused(
        stack.encoder.target,
        stack.redis_url,
        itertools.chain([video_header(len(junk))], chunks(junk, seed=6)),
        "header.item.source",
        ["not a supported video container"],
    )


# --- MMSERVE_MAX_UPLOAD_BYTES -----------------------------------------------------------------------


def test_upload_over_the_limit_is_refused_while_streaming(
    small_encoder: InProcessService, module_redis: LocalRedis, big_video: bytes
) -> None:
    """Size unknown in the header: refused once 8 MiB have arrived, long before the client has produced the ~100 chunks."""
    total = -(-len(big_video) // MiB)
    counted = upload_refused(
        small_encoder.target,
        module_redis.url,
        itertools.chain([video_header(0)], chunks(big_video, seed=7, low=MiB, high=MiB)),
        "chunk",
        ["exceeds the limit", str(UPLOAD_LIMIT)],
    )
    assert counted.yielded - 1 < total // 3, f"{counted.yielded} of {total + 1} messages were produced before the refusal"


def test_upload_announced_over_the_limit_is_refused_at_the_header(
    small_encoder: InProcessService, module_redis: LocalRedis, big_video: bytes
) -> None:
    """header.total_bytes over the limit: refused from the header, before the chunks are needed."""
    total = -(-len(big_video) // MiB)
    counted = upload_refused(
        small_encoder.target,
        module_redis.url,
        itertools.chain([video_header(len(big_video))], chunks(big_video, seed=8, low=MiB, high=MiB)),
        "header.total_bytes",
        [str(len(big_video)), str(UPLOAD_LIMIT)],
    )
    assert counted.yielded - 1 < total // 3, f"{counted.yielded} of {total + 1} messages were produced before the refusal"


def test_upload_at_the_limit_passes(small_encoder: InProcessService, module_redis: LocalRedis) -> None:
    """An upload under the limit on the same encoder is accepted: the refusals above are about size."""
    data = small_video(9)
    assert len(data) < UPLOAD_LIMIT
    with encoder_stub(small_encoder.target) as stub:
        result = stub.EncodeUpload(iter([video_header(len(data)), pb.EncodeUploadRequest(chunk=data)])).result
    assert result.embedding.modality == media_pb2.MODALITY_VIDEO


# --- a video as a list of frames -----------------------------------------------------------------------


def frame_arrays(seed: int, n: int = 4, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    width, height = size
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def png_of(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def lossless_avi(frames: list[np.ndarray], fps: int) -> bytes:
    """The same frames in a PNG-coded AVI: decodes to exactly the same pixels."""
    height, width = frames[0].shape[:2]
    out = io.BytesIO()
    with av.open(out, "w", format="avi") as container:
        stream = container.add_stream("png", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def frames_item(frames: list[bytes], fps: float, *, uuid: str = "") -> media_pb2.MediaInput:
    source = media_pb2.MediaSource(frames=media_pb2.VideoFrames(frames=frames, fps=fps))
    return media_pb2.MediaInput(modality=media_pb2.MODALITY_VIDEO, source=source, uuid=uuid)


def ask(stack: Stack, content: list[dict[str, Any]]) -> str:
    reply = stack.client().chat.completions.create(
        model="", messages=[{"role": "user", "content": content}], temperature=0, max_completion_tokens=16
    )
    return reply.choices[0].message.content or ""


def test_video_as_frames_encodes_and_chats_by_uuid(stack: Stack) -> None:
    """PNG frames + fps encode with their timing; by uuid the chat answers as for the same frames in a video file."""
    arrays = frame_arrays(10)
    with encoder_stub(stack.encoder.target) as stub:
        result = stub.Encode(pb.EncodeRequest(items=[frames_item([png_of(a) for a in arrays], 2.0, uuid="frames-clip")])).results[0]
    desc = result.embedding
    assert not result.cached and desc.id == "frames-clip" and desc.modality == media_pb2.MODALITY_VIDEO
    assert list(desc.video.frame_timestamps) == [0.0, 0.5, 1.0, 1.5]
    assert desc.video.sampled_fps == 2.0 and desc.video.duration_s == 2.0
    assert desc.video.grid_thw[0] == 2  # 4 frames, 2 per temporal patch
    assert desc.token_count > 0

    encoded = 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}'
    before = scrape(stack.encoder.metrics_url).get(encoded, 0)
    question = {"type": "text", "text": "What happens?"}
    by_uuid = ask(stack, [{"type": "video_url", "video_url": None, "uuid": "frames-clip"}, question])
    assert scrape(stack.encoder.metrics_url).get(encoded, 0) == before  # by uuid: no Encode call

    avi = base64.b64encode(lossless_avi(arrays, 2)).decode()
    inline = ask(stack, [{"type": "video_url", "video_url": {"url": f"data:video/x-msvideo;base64,{avi}"}}, question])
    assert len(set(inline)) > 5, inline
    assert by_uuid == inline

    other = frame_arrays(11)
    with encoder_stub(stack.encoder.target) as stub:
        stub.Encode(pb.EncodeRequest(items=[frames_item([png_of(a) for a in other], 2.0, uuid="frames-other")]))
    assert ask(stack, [{"type": "video_url", "video_url": None, "uuid": "frames-other"}, question]) != by_uuid


def frames_refused(stack: Stack, bad: media_pb2.MediaInput, field: str, words: list[str]) -> None:
    """[valid image, bad frames] is INVALID_ARGUMENT naming `field`; Redis is unchanged."""
    before = redis_keys(stack.redis_url)
    first = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=png_bytes(32, 32, seed=77)))
    with encoder_stub(stack.encoder.target) as stub:
        code, err = rpc_error(stub.Encode, pb.EncodeRequest(items=[first, bad]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, err)
    assert err.field == field, err
    for word in words:
        assert word.lower() in err.message.lower(), err.message
    assert redis_keys(stack.redis_url) == before


def test_frames_of_different_sizes(stack: Stack) -> None:
    """A frame whose size differs from frame 0 is refused naming that frame and both sizes."""
    frames = [png_of(a) for a in frame_arrays(12)]
    frames[2] = png_of(frame_arrays(13, n=1, size=(32, 48))[0])
    frames_refused(stack, frames_item(frames, 2.0), "items[1].source.frames.frames[2]", ["32x48", "64x48", "same size"])


@pytest.mark.parametrize("fps", [0.0, -2.0, float("nan")])
def test_frames_with_bad_fps(stack: Stack, fps: float) -> None:
    """fps 0 (or negative, or NaN) cannot place frames in time: refused naming frames.fps."""
    frames = [png_of(a) for a in frame_arrays(14)]
    frames_refused(stack, frames_item(frames, fps), "items[1].source.frames.fps", ["> 0"])


def test_empty_frame_list_and_undecodable_frame(stack: Stack) -> None:
    """No frames at all, or a frame that is not an image, are refused naming the field."""
    frames_refused(stack, frames_item([], 2.0), "items[1].source.frames", ["at least one frame"])
    frames = [png_of(a) for a in frame_arrays(15)]
    frames[1] = b"not an image at all"
    frames_refused(stack, frames_item(frames, 2.0), "items[1].source.frames.frames[1]", [])


def test_big_video_is_a_real_mjpeg_avi(big_video: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The generated video is a real container PyAV opens, with the frame count and rate it was made with."""
    path = next(Path(tmp_path_factory.getbasetemp()).glob("upload*/big.avi"))
    assert path.stat().st_size == len(big_video)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.frames, int(stream.average_rate)) == ("mjpeg", 85, BIG_FPS)
