"""Encoder and store throughput, as ratios against baselines measured in the same run.

    python bench/encode.py [--model tiny|tiny:qwen2_5_vl-mid|<hub id or folder>] [--images 32] [--concurrency 8]

Prints one JSON line:
- encode: images/s through N concurrent Encode RPCs to a real `mmserve encoder`
  process (fetch-free inline PNG bytes, fresh images so nothing is cached),
  against images/s calling the same model's vision tower directly in-process
  (processor + get_image_features, one image at a time), and their ratio;
- store: MB/s of EmbeddingStore put/get for 1, 4 and 16 MB embeddings against
  plain redis-py asyncio SET/GET of the same bytes on the same server, and the
  ratios (bench/store.py measures only these, on one server or a cluster).
Both runs share this machine's cores, so absolute numbers vary; the ratios
are what to compare across changes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as pb_grpc
from mmserve.config import Settings
from mmserve.launcher import ServiceProcess
from mmserve.localredis import LocalRedis, free_port
from mmserve.rpc.health import wait_serving
from mmserve.store import EmbeddingStore, RawTensor, connect

MB = 1_000_000


def make_pngs(count: int, size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def direct_images_per_s(model: str, cache_dir: Path, pngs: list[bytes]) -> float:
    """Baseline: the model's own processor and vision tower, in this process, one image at a time."""
    import torch

    from mmserve.models.loading import load_model

    loaded = load_model(Settings(model=model, cache_dir=cache_dir), part="encoder")
    processor = loaded.family.processor
    hf_model: Any = loaded.family.model  # a transformers model: its towers are reached by attribute
    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    with torch.inference_mode():
        warm = processor.image_processor(images=images[:1], return_tensors="pt")
        hf_model.get_image_features(warm["pixel_values"], warm["image_grid_thw"])
        start = time.perf_counter()
        for image in images:
            batch = processor.image_processor(images=[image], return_tensors="pt")
            hf_model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        seconds = time.perf_counter() - start
    return len(images) / seconds


async def service_images_per_s(target: str, pngs: list[bytes], concurrency: int) -> float:
    """Images/s through `concurrency` concurrent single-image Encode calls."""
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.EncoderServiceStub(channel)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for png in pngs:
            queue.put_nowait(png)

        async def worker() -> None:
            while not queue.empty():
                png = queue.get_nowait()
                item = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=png))
                reply = await stub.Encode(pb.EncodeRequest(items=[item]))
                assert not reply.results[0].cached

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(pngs) / (time.perf_counter() - start)


async def store_vs_raw(url: str, sizes_mb: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """MB/s of store put/get against raw SET/GET of the same bytes.

    Medians of interleaved rounds (`repeats` at 16 MB, 16/size times as many below), after one untimed round.
    """
    out: dict[str, dict[str, float]] = {}
    # The same client the store builds for this URL (a cluster client for redis+cluster://), used bare.
    raw = connect.async_client(url, connect_timeout_s=1.0, socket_timeout_s=30.0, retries=2, max_connections=8)
    async with EmbeddingStore(url, ttl_s=600, socket_timeout_s=30.0, op_timeout_s=60.0) as store:
        for size in sizes_mb:
            hidden = 1024
            rows = size * MB // (hidden * 4)
            data = np.random.default_rng(size).standard_normal((rows, hidden), dtype=np.float32).tobytes()
            mb = len(data) / MB
            timings: dict[str, list[float]] = {"put": [], "get": [], "set": [], "get_raw": []}

            async def store_round(
                i: int, size: int = size, rows: int = rows, hidden: int = hidden, data: bytes = data
            ) -> tuple[float, float]:
                desc = embedding_pb2.EmbeddingDescriptor(
                    id=f"bench-{size}-{i}",
                    modality=media_pb2.MODALITY_IMAGE,
                    model="bench",
                    model_fingerprint="bench",
                    token_count=rows,
                    content_sha256=f"{i + 1:064x}",
                    client_uuid=True,
                    options_json="{}",
                )
                tensor = RawTensor("embeddings", 1, (rows, hidden), data)
                t = time.perf_counter()
                await store.put(desc, [tensor], tenant="bench")
                put_s = time.perf_counter() - t
                t = time.perf_counter()
                got = await store.get(desc.id, tenant="bench")
                get_s = time.perf_counter() - t
                assert got is not None and bytes(got.tensors[0].data) == data
                return put_s, get_s

            async def raw_round(i: int, size: int = size, data: bytes = data) -> tuple[float, float]:
                t = time.perf_counter()
                await raw.set(f"raw-{size}-{i}", data, ex=600)
                set_s = time.perf_counter() - t
                t = time.perf_counter()
                got = await raw.get(f"raw-{size}-{i}")
                assert got is not None and len(got) == len(data)
                return set_s, time.perf_counter() - t

            # One untimed round each first (connections, script cache), then interleaved rounds whose
            # order alternates, so neither side always runs on a server the other has just warmed or loaded.
            await store_round(-1)
            await raw_round(-1)
            # The same bytes per size: `repeats` rounds at 16 MB, proportionally more below (a 1 MB round
            # is ~2 ms, so 5 of them were mostly scheduling noise on a shared machine).
            for i in range(repeats * max(1, 16 // size)):
                if i % 2:
                    put_s, get_s = await store_round(i)
                    set_s, get_raw_s = await raw_round(i)
                else:
                    set_s, get_raw_s = await raw_round(i)
                    put_s, get_s = await store_round(i)
                timings["put"].append(put_s)
                timings["get"].append(get_s)
                timings["set"].append(set_s)
                timings["get_raw"].append(get_raw_s)
            mbps = {k: mb / statistics.median(v) for k, v in timings.items()}
            out[f"{size}MB"] = {
                "put_mb_s": round(mbps["put"], 1),
                "raw_set_mb_s": round(mbps["set"], 1),
                "put_ratio": round(mbps["put"] / mbps["set"], 3),
                "get_mb_s": round(mbps["get"], 1),
                "raw_get_mb_s": round(mbps["get_raw"], 1),
                "get_ratio": round(mbps["get"] / mbps["get_raw"], 3),
            }
    await raw.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny (default), tiny:qwen2_5_vl-mid, a hub id or a folder")
    parser.add_argument("--images", type=int, default=32, help="images per measurement")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent Encode calls")
    parser.add_argument("--repeats", type=int, default=9, help="store rounds at 16 MB (16/size times as many at smaller sizes)")
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir)
    ns = parser.parse_args()

    with LocalRedis(maxmemory="2gb") as redis_server:
        port = free_port()
        env = {
            "MMSERVE_MODEL": ns.model,
            "MMSERVE_CACHE_DIR": str(ns.cache_dir),
            "MMSERVE_REDIS_URL": redis_server.url,
            "MMSERVE_ENCODER_PORT": str(port),
            "MMSERVE_LOG_LEVEL": "WARNING",
        }
        log = Path(tempfile.mkdtemp(prefix="mmserve-bench-")) / "encoder.log"
        encoder = ServiceProcess("encoder", env, log_path=log).start()
        try:
            wait_serving(f"127.0.0.1:{port}", timeout=600, alive=encoder.alive)
            direct = direct_images_per_s(ns.model, ns.cache_dir, make_pngs(ns.images, ns.size, seed=1))
            service = asyncio.run(service_images_per_s(f"127.0.0.1:{port}", make_pngs(ns.images, ns.size, seed=2), ns.concurrency))
        finally:
            encoder.stop()
        store = asyncio.run(store_vs_raw(redis_server.url, [1, 4, 16], ns.repeats))

    print(
        json.dumps(
            {
                "bench": "encode",
                "model": ns.model,
                "images": ns.images,
                "image_size": ns.size,
                "concurrency": ns.concurrency,
                "cpus": os.cpu_count(),
                "encode": {
                    "service_images_per_s": round(service, 2),
                    "direct_images_per_s": round(direct, 2),
                    "ratio": round(service / direct, 3),
                },
                "store": store,
            }
        )
    )


if __name__ == "__main__":
    main()
