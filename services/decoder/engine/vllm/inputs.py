"""Stored embeddings -> vLLM's embedding inputs (`multi_modal_data` and `multi_modal_uuids`) of one prompt.

vLLM takes precomputed multimodal embeddings (`enable_mm_embeds`) in the form
its own tower would hand to the language model. What that form is belongs to
each family (`Family.vllm_modalities`, `Family.vllm_mm_data`, in the family's
folder); this module groups a prompt's items by modality and asks it. What
vLLM cannot take as embeddings is refused by name (`Family.vllm_refused_why`),
never sent as something else.

This module imports no vLLM code: the mapping is plain tensors and dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmserve.modality import BY_PROTO
from mmserve.models.families import Family, TensorKwargs
from mmserve.store import StoredEmbedding


@dataclass
class VllmMedia:
    """`multi_modal_data` and `multi_modal_uuids` of one prompt."""

    data: dict[str, TensorKwargs] = field(default_factory=dict)
    uuids: dict[str, list[str]] = field(default_factory=dict)


def vllm_media(family: Family, media: list[StoredEmbedding]) -> VllmMedia:
    """The embedding inputs of a prompt's items (prompt order within each modality)."""
    out = VllmMedia()
    grouped: dict[int, list[StoredEmbedding]] = {}
    for stored in media:
        grouped.setdefault(int(stored.descriptor.modality), []).append(stored)
    for modality, items in grouped.items():
        name = BY_PROTO[modality].name
        out.data[name] = family.vllm_mm_data(modality, items)
        out.uuids[name] = [s.descriptor.id for s in items]
    return out
