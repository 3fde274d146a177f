"""Per-modality encode cost: time per item, tokens per item, stored bytes per token.

    python bench/modalities.py [--models tiny:qwen2_5_omni-tiny,tiny:qwen2_5_omni-mid] [--items 3]

For each model (default: the Omni thinker with the time-series adapter, the
one family that takes all four modalities, tiny and mid sizes) starts Redis
and a real `mmserve encoder`, then for each modality encodes fresh items (so
nothing is cached) one Encode RPC at a time and reports the median seconds
per item, the tokens per item, and the stored embedding's bytes per token;
as a baseline measured in the same run, the same decode + preprocess + tower
in this process without gRPC, Redis or the service (ratio service / direct).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import grpc
import numpy as np
import soundfile as sf
from PIL import Image

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as pb_grpc
from mmserve.config import Settings
from mmserve.decoded import MediaOptions
from mmserve.launcher import ServiceProcess
from mmserve.localredis import LocalRedis, free_port
from mmserve.modality import ModalityValue
from mmserve.rpc.health import wait_serving


def image(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def video(seed: int, seconds: int = 4, fps: int = 8, side: int = 224) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for _ in range(seconds * fps):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def audio(seed: int, seconds: float = 5.0, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(
        buf, np.random.default_rng(seed).uniform(-0.3, 0.3, int(seconds * rate)).astype(np.float32), rate, format="WAV", subtype="PCM_16"
    )
    return buf.getvalue()


def series(seed: int, samples: int = 2000, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).standard_normal((samples, channels)).astype(np.float32))
    return buf.getvalue()


MODALITIES: dict[str, tuple[ModalityValue, Callable[[int], bytes]]] = {
    "image": (media_pb2.MODALITY_IMAGE, image),
    "video": (media_pb2.MODALITY_VIDEO, video),
    "audio": (media_pb2.MODALITY_AUDIO, audio),
    "time_series": (media_pb2.MODALITY_TIME_SERIES, series),
}
SERIES_RATE = 100.0


def item(modality: str, data: bytes) -> media_pb2.MediaInput:
    value, _ = MODALITIES[modality]
    out = media_pb2.MediaInput(modality=value, source=media_pb2.MediaSource(data=data))
    if modality == "time_series":
        out.time_series.sampling_rate = SERIES_RATE
    if modality == "video":
        out.video.fps, out.video.num_frames = 2.0, 8
    return out


def direct_seconds(model: str, cache_dir: Path, modality: str, payloads: list[bytes]) -> float:
    """Decode + preprocess + tower in this process (no gRPC, no Redis): the baseline."""
    from mmserve.models.loading import load_model
    from services.encoder.media.acquire import Acquired
    from services.encoder.media.budget import RequestBudget
    from services.encoder.media.decode import decode_media, media_options

    settings = Settings(model=model, cache_dir=cache_dir)
    family = load_model(settings, part="encoder").family
    times = []
    for i, data in enumerate([payloads[0], *payloads]):
        start = time.perf_counter()
        it = item(modality, data)
        options: MediaOptions = {**media_options(it, settings), **family.effective_options(it)}
        media = decode_media(it.modality, Acquired("", data=data), options, settings, RequestBudget.from_settings(settings))
        family.encode(it.modality, [family.prepare(it.modality, media, options)])
        if i:  # the first run warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(model: str, cache_dir: Path, items: int) -> dict[str, object]:
    out: dict[str, object] = {"model": model}
    payloads = {m: [make(1000 + i) for i in range(items)] for m, (_, make) in MODALITIES.items()}
    with LocalRedis(maxmemory="2gb") as redis_server:
        port = free_port()
        env = {
            "MMSERVE_MODEL": model,
            "MMSERVE_CACHE_DIR": str(cache_dir),
            "MMSERVE_REDIS_URL": redis_server.url,
            "MMSERVE_ENCODER_PORT": str(port),
            "MMSERVE_LOG_LEVEL": "WARNING",
        }
        log = Path(tempfile.mkdtemp(prefix="mmserve-bench-")) / "encoder.log"
        encoder = ServiceProcess("encoder", env, log_path=log).start()
        try:
            wait_serving(f"127.0.0.1:{port}", timeout=900, alive=encoder.alive)
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
                stub = pb_grpc.EncoderServiceStub(channel)
                stub.Encode(pb.EncodeRequest(items=[item("image", image(1))]))  # warm the request path
                for modality in MODALITIES:
                    times, results = [], []
                    for data in payloads[modality]:
                        start = time.perf_counter()
                        result = stub.Encode(pb.EncodeRequest(items=[item(modality, data)])).results[0]
                        times.append(time.perf_counter() - start)
                        assert not result.cached
                        results.append(result.embedding)
                    tokens = statistics.median(d.token_count for d in results)
                    out[modality] = {
                        "encode_s_per_item": round(statistics.median(times), 4),
                        "tokens_per_item": tokens,
                        "stored_bytes_per_token": round(statistics.median(d.nbytes / d.token_count for d in results), 1),
                        "input_bytes_per_item": round(statistics.median(len(p) for p in payloads[modality])),
                    }
        finally:
            encoder.stop()
    for modality in MODALITIES:
        direct = direct_seconds(model, cache_dir, modality, payloads[modality])
        entry = out[modality]
        assert isinstance(entry, dict)
        entry["direct_s_per_item"] = round(direct, 4)
        entry["service_over_direct"] = round(entry["encode_s_per_item"] / direct, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny:qwen2_5_omni-tiny,tiny:qwen2_5_omni-mid")
    parser.add_argument("--items", type=int, default=3, help="fresh items per modality")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    ns = parser.parse_args()
    runs = [bench_model(m, ns.cache_dir, ns.items) for m in ns.models.split(",")]
    print(json.dumps({"bench": "modalities", "cpus": os.cpu_count(), "runs": runs}))


if __name__ == "__main__":
    main()
