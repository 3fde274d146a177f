"""Stored embeddings -> vLLM's embedding inputs (`multi_modal_data`), per family and modality.

vLLM takes precomputed multimodal embeddings (`enable_mm_embeds`) in the form
its own vision tower would hand to the language model: for Qwen2.5-VL an
item's `image_embeds`/`video_embeds` [tokens, hidden] with its grid (videos
also their seconds per grid, for M-RoPE); for Qwen3-VL the deepstack features
concatenated after the main features on the last axis, as its tower returns
them. What vLLM cannot take as embeddings is refused by name, never sent as
something else.

This module imports no vLLM code: the mapping is plain tensors and dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmserve.common.v1 import media_pb2
from mmserve.mediainput import MODALITY_NAMES
from mmserve.models.tensors import from_raw
from mmserve.store import StoredEmbedding

IMAGE, VIDEO = media_pb2.MODALITY_IMAGE, media_pb2.MODALITY_VIDEO

#: family name -> modalities the vLLM engine serves for it (the README's model table says the same).
SUPPORTED: dict[str, frozenset[int]] = {
    "qwen2_5_vl": frozenset({IMAGE, VIDEO}),
    "qwen3_vl": frozenset({IMAGE}),
}

#: Why the rest is refused, for the error message.
REFUSED_WHY = {
    "time_series": "the time-series adapter's embeddings need the built-in engine",
    "audio": "audio embeddings are not mapped to vLLM inputs here",
    "video": "vLLM re-renders this family's timestamped video prompt from frames, not from embeddings",
}


@dataclass
class VllmMedia:
    """`multi_modal_data` and `multi_modal_uuids` of one prompt."""

    data: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    uuids: dict[str, list[str]] = field(default_factory=dict)


def _features(family: str, stored: StoredEmbedding) -> torch.Tensor:
    main = from_raw(stored.tensor("embeddings"), torch.device("cpu"))
    if family != "qwen3_vl":
        return main
    deepstack = sorted((t for t in stored.tensors if t.name.startswith("deepstack.")), key=lambda t: int(t.name.split(".")[1]))
    return torch.cat([main, *(from_raw(t, torch.device("cpu")) for t in deepstack)], dim=-1)


def vllm_media(family: str, media: list[StoredEmbedding], placement: Any) -> VllmMedia:
    """The embedding inputs of a prompt's items (prompt order within each modality); `placement(stored)` gives grid_thw etc."""
    out = VllmMedia()
    grouped: dict[int, list[StoredEmbedding]] = {}
    for stored in media:
        grouped.setdefault(int(stored.descriptor.modality), []).append(stored)
    for modality, items in grouped.items():
        name = MODALITY_NAMES[modality]
        feats = torch.cat([_features(family, s) for s in items])
        grids = torch.tensor([list(placement(s).grid_thw) for s in items], dtype=torch.long)
        entry = {f"{name}_embeds": feats, f"{name}_grid_thw": grids}
        if modality == VIDEO:
            entry["second_per_grid_ts"] = torch.tensor([float(placement(s).second_per_grid or 1.0) for s in items])
        out.data[name] = entry
        out.uuids[name] = [s.descriptor.id for s in items]
    return out
