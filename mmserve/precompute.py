"""`mmserve encode`: precompute embeddings for later requests and print their ids.

    mmserve encode photo.jpg clip.mp4 speech.wav https://example.com/cat.png
    mmserve encode --uuid demo-cat cat.png            # refer to it later as uuid "demo-cat"
    mmserve encode --sampling-rate 100 sensor.npy      # time series need their rate
    mmserve encode --json ...                          # one JSON object per item

Local files are read here and sent as raw bytes over gRPC (files larger than
the inline limit go through the streaming EncodeUpload RPC); URLs are fetched
by the encoder through its fetch guard. Each printed id can be used in chat as
`{"type": "image_url", "image_url": null, "uuid": "<id>"}` (or the modality's
part type), from any replica, with no refetch and no re-encode.

A thin gRPC client: imports neither torch nor the services.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.api.encoder.v1 import encoder_service_pb2_grpc as pb_grpc
from mmserve.errors import MmserveError, from_rpc_error
from mmserve.modality import BY_NAME, name_of
from mmserve.rpc.auth import token_metadata

INLINE_LIMIT = 32 * 1024 * 1024
CHUNK = 2 * 1024 * 1024
EXTENSIONS = {
    "image": {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"},
    "video": {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"},
    "audio": {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a"},
    "time_series": {".npy", ".csv"},
}


def guess_modality(source: str, *, sampling_rate: float | None) -> str:
    """From the file extension; .wav/.flac are audio unless a time-series sampling rate is given."""
    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    if sampling_rate is not None and suffix in {".wav", ".flac", ".npy", ".csv"}:
        return "time_series"
    for modality, suffixes in EXTENSIONS.items():
        if suffix in suffixes:
            return modality
    raise SystemExit(f"cannot tell the modality of {source!r}: pass --modality")


def build_item(source: str, modality: str, *, uuid: str, sampling_rate: float | None) -> tuple[media_pb2.MediaInput, bytes | None]:
    """The MediaInput for one source, and the local file's bytes when it needs uploading."""
    item = media_pb2.MediaInput(modality=BY_NAME[modality].proto, uuid=uuid)
    if modality == "time_series":
        if sampling_rate is None:
            raise SystemExit(f"{source}: time series need --sampling-rate")
        item.time_series.sampling_rate = sampling_rate
    if "://" in source or source.startswith("data:"):
        item.source.url = source
        return item, None
    data = Path(source).read_bytes()
    item.source.mime_type = Path(source).suffix.lstrip(".").lower()
    if len(data) <= INLINE_LIMIT:
        item.source.data = data
        return item, None
    return item, data


def _upload(
    stub: pb_grpc.EncoderServiceStub, item: media_pb2.MediaInput, data: bytes, timeout: float, metadata: tuple[tuple[str, str], ...] = ()
) -> pb.EncodeResult:
    header_item = media_pb2.MediaInput()
    header_item.CopyFrom(item)
    header_item.ClearField("source")

    def messages() -> Iterator[pb.EncodeUploadRequest]:
        yield pb.EncodeUploadRequest(header=pb.UploadHeader(item=header_item, total_bytes=len(data)))
        for start in range(0, len(data), CHUNK):
            yield pb.EncodeUploadRequest(chunk=data[start : start + CHUNK])

    return stub.EncodeUpload(messages(), timeout=timeout, metadata=metadata).result


def main(argv: list[str] | None = None) -> int:
    """Precompute embeddings of files or URLs, print their ids."""
    parser = argparse.ArgumentParser(prog="mmserve encode", description="Precompute embeddings and print their ids.")
    parser.add_argument("sources", nargs="+", help="local files or URLs (http, https, data, file)")
    parser.add_argument("--target", default=None, help="encoder host:port (default: MMSERVE_ENCODER_TARGET or 127.0.0.1:50051)")
    parser.add_argument("--modality", choices=sorted(BY_NAME), help="modality of every source (default: from the extension)")
    parser.add_argument("--uuid", action="append", default=[], help="client uuid for the source at the same position (repeatable)")
    parser.add_argument("--sampling-rate", type=float, help="sampling rate in Hz (required for time series)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per item")
    parser.add_argument("--json", action="store_true", help="print one JSON object per item")
    ns = parser.parse_args(argv)
    if len(ns.uuid) > len(ns.sources):
        parser.error("more --uuid than sources")

    from mmserve.config import Settings

    settings = Settings()
    target = ns.target or settings.encoder_target
    metadata = token_metadata(settings)  # MMSERVE_SERVICE_TOKEN, when the encoder requires one
    options = [("grpc.max_send_message_length", INLINE_LIMIT + (1 << 20)), ("grpc.max_receive_message_length", 64 << 20)]
    failures = 0
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.EncoderServiceStub(channel)
        for i, source in enumerate(ns.sources):
            modality = ns.modality or guess_modality(source, sampling_rate=ns.sampling_rate)
            uuid = ns.uuid[i] if i < len(ns.uuid) else ""
            item, upload = build_item(source, modality, uuid=uuid, sampling_rate=ns.sampling_rate)
            try:
                if upload is not None:
                    result = _upload(stub, item, upload, ns.timeout, metadata)
                else:
                    result = stub.Encode(pb.EncodeRequest(items=[item]), timeout=ns.timeout, metadata=metadata).results[0]
            except grpc.RpcError as exc:
                err: MmserveError = from_rpc_error(exc)
                print(f"{source}: {err.status.name}: {err}", file=sys.stderr)
                failures += 1
                continue
            desc = result.embedding
            row = {
                "id": desc.id,
                "modality": name_of(desc.modality),
                "tokens": desc.token_count,
                "cached": result.cached,
                "expires_at": desc.expires_at.ToJsonString() if desc.HasField("expires_at") else None,
                "source": source,
            }
            print(json.dumps(row) if ns.json else "\t".join(str(row[k]) for k in ("id", "modality", "tokens", "cached", "source")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
