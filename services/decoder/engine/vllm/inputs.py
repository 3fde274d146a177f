"""Stored embeddings -> vLLM's embedding inputs (`multi_modal_data`), per family and modality.

vLLM takes precomputed multimodal embeddings (`enable_mm_embeds`) in the form
its own vision tower would hand to the language model: for Qwen2.5-VL an
item's `image_embeds`/`video_embeds` [tokens, hidden] with its grid (videos
also their seconds per grid, for M-RoPE; the Qwen2.5-Omni thinker takes the
same); for Qwen3-VL the deepstack features concatenated after the main
features on the last axis, as its tower returns them, and for a video the
time of each temporal block, from which vLLM writes the `<t seconds>` text
(the times the built-in engine writes, from the same stored frame times).
What vLLM cannot take as embeddings is refused by name, never sent as
something else.

This module imports no vLLM code: the mapping is plain tensors and dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmserve.api.common.v1 import media_pb2
from mmserve.modality import BY_PROTO
from mmserve.models.families import Family
from mmserve.models.families.qwen.common import placement_of
from mmserve.models.families.qwen.qwen3_vl import Qwen3_VL
from mmserve.models.tensors import from_raw
from mmserve.store import StoredEmbedding

IMAGE, VIDEO, TIME_SERIES = media_pb2.MODALITY_IMAGE, media_pb2.MODALITY_VIDEO, media_pb2.MODALITY_TIME_SERIES

#: family name -> modalities the vLLM engine serves for it (the README's model table says the same), besides time
#: series: a checkpoint with the time-series adapter gets them as prompt embeddings (`prompt_embeds`).
SUPPORTED: dict[str, frozenset[int]] = {
    "qwen2_5_vl": frozenset({IMAGE, VIDEO}),
    "qwen3_vl": frozenset({IMAGE, VIDEO}),
    "qwen2_5_omni": frozenset({IMAGE, VIDEO}),
}

#: Why the rest is refused, for the error message.
REFUSED_WHY = {
    "audio": "vLLM takes this family's audio only as mel features for its own audio tower, not as embeddings",
}


@dataclass
class VllmMedia:
    """`multi_modal_data` and `multi_modal_uuids` of one prompt."""

    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    uuids: dict[str, list[str]] = field(default_factory=dict)


def _features(family: str, stored: StoredEmbedding) -> torch.Tensor:
    main = from_raw(stored.tensor("embeddings"), torch.device("cpu"))
    if family != "qwen3_vl":
        return main
    deepstack = sorted((t for t in stored.tensors if t.name.startswith("deepstack.")), key=lambda t: int(t.name.split(".")[1]))
    return torch.cat([main, *(from_raw(t, torch.device("cpu")) for t in deepstack)], dim=-1)


def vllm_media(family: Family, media: list[StoredEmbedding]) -> VllmMedia:
    """The embedding inputs of a prompt's items (prompt order within each modality)."""
    out = VllmMedia()
    grouped: dict[int, list[StoredEmbedding]] = {}
    for stored in media:
        grouped.setdefault(int(stored.descriptor.modality), []).append(stored)
    for modality, items in grouped.items():
        name = BY_PROTO[modality].name
        feats = torch.cat([_features(family.name, s) for s in items])
        placements = [placement_of(s) for s in items]
        grids = torch.tensor([list(p.grid_thw) for p in placements], dtype=torch.long)
        entry: dict[str, Any] = {f"{name}_embeds": feats, f"{name}_grid_thw": grids}
        if modality == VIDEO:
            entry["second_per_grid_ts"] = torch.tensor([float(p.second_per_grid or 1.0) for p in placements])
            if isinstance(family, Qwen3_VL):
                entry["timestamps"] = [torch.tensor(family.block_times(p)[: p.grid_thw[0]]) for p in placements]
        out.data[name] = entry
        out.uuids[name] = [s.descriptor.id for s in items]
    return out
