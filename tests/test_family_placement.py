"""Placement is family-owned in the contract: the shared *Placement message plus the family's own message.

A Qwen item's descriptor carries `family_placement` (a packed qwen.v1.VisualPlacement) beside the shared
ImagePlacement/VideoPlacement; the family's decoder half reads its own message, and a record written before the
field existed (shared placement only) still places the item exactly as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as pb
from mmserve.api.families.qwen.v1 import placement_pb2 as qwen_pb2
from mmserve.decoded import DecodedVideo
from mmserve.models.families import ChatPrompt
from mmserve.models.families.qwen.qwen2_5_vl import Qwen2_5_VL
from mmserve.store import StoredEmbedding
from tests.conftest import CACHE_DIR, TINY, GrpcServices
from tests.support import encoder_stub, png_bytes

IMAGE, VIDEO = media_pb2.MODALITY_IMAGE, media_pb2.MODALITY_VIDEO


def test_an_encoded_image_carries_its_family_placement(grpc_services: GrpcServices) -> None:
    item = media_pb2.MediaInput(modality=IMAGE, source=media_pb2.MediaSource(data=png_bytes(80, 56, seed=31)))
    with encoder_stub(grpc_services.encoder.target) as stub:
        desc = stub.Encode(pb.EncodeRequest(items=[item])).results[0].embedding
    family = qwen_pb2.VisualPlacement()
    assert desc.family_placement.Is(family.DESCRIPTOR) and desc.family_placement.Unpack(family)
    assert list(family.grid_thw) == list(desc.image.grid_thw) and family.grid_thw[1] > 0
    assert family.spatial_merge_size == desc.image.spatial_merge_size == 2
    assert list(desc.image.source_size) == [80, 56]  # the shared message keeps what every family shares


@pytest.fixture(scope="module")
def family() -> Qwen2_5_VL:
    from mmserve.models.tiny import ensure_checkpoint

    loaded = Qwen2_5_VL.load(str(ensure_checkpoint(TINY, CACHE_DIR)), dtype=torch.float32, device="cpu", part="full")
    assert isinstance(loaded, Qwen2_5_VL)
    return loaded


def _video(family: Qwen2_5_VL) -> StoredEmbedding:
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    times = [0.0, 0.5, 1.0, 1.5]
    video = DecodedVideo(frames, times, times, sampled_fps=2.0, duration_s=2.0, source_fps=2.0)
    options = family.effective_options(media_pb2.MediaInput(modality=VIDEO))
    (encoded,) = family.encode(VIDEO, [family.prepare(VIDEO, video, options)])
    desc = embedding_pb2.EmbeddingDescriptor(modality=VIDEO, token_count=encoded.token_count, video=encoded.placement)
    packed = family.family_placement(VIDEO, encoded.placement)
    assert isinstance(packed, qwen_pb2.VisualPlacement)
    desc.family_placement.Pack(packed)
    return StoredEmbedding(desc, encoded.tensors)


def _positions(family: Qwen2_5_VL, stored: StoredEmbedding) -> torch.Tensor:
    prompt = ChatPrompt(messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}])
    return family.prefill_inputs(prompt, [stored]).position_ids


def test_the_decoder_reads_the_family_message_and_older_records_still_place(family: Qwen2_5_VL) -> None:
    stored = _video(family)
    placed = family.visual_placement(stored)
    assert placed.second_per_grid == pytest.approx(1.0) and placed.temporal_patch_size == 2  # 2 frames per step, 2 fps
    positions = _positions(family, stored)

    older = embedding_pb2.EmbeddingDescriptor()
    older.CopyFrom(stored.descriptor)
    older.ClearField("family_placement")  # a record written before the field: the shared placement places it
    assert torch.equal(_positions(family, StoredEmbedding(older, stored.tensors)), positions)

    faster = embedding_pb2.EmbeddingDescriptor()
    faster.CopyFrom(stored.descriptor)
    changed = qwen_pb2.VisualPlacement()
    changed.CopyFrom(placed)
    changed.second_per_grid = 0.25  # only the family message says so: the temporal positions follow it
    faster.family_placement.Pack(changed)
    assert not torch.equal(_positions(family, StoredEmbedding(faster, stored.tensors)), positions)
