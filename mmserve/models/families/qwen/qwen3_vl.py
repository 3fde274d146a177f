"""Qwen3-VL: image and video with deepstack features and timestamped video prompts.

Deepstack: the vision tower also emits features from intermediate layers
("deepstack.<k>", one tensor per item per layer); the language model adds
layer k's features to the visual positions after its decoder layer k. They
are stored with the embedding and passed at prefill (`visual_pos_masks`,
`deepstack_visual_embeds`, in sequence order over images and videos).

Timestamps: the processor writes `<t seconds>` before every temporal block
of a video, t being the mean time of the block's first and last frames; the
decoder rebuilds that text from the stored frame timestamps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmserve.api.common.v1 import embedding_pb2
from mmserve.decoded import DecodedVideo
from mmserve.models.families.base import TensorKwargs
from mmserve.models.families.qwen.common import IMAGE, VIDEO, QwenFamily, placement_of
from mmserve.models.tensors import from_raw, to_raw
from mmserve.store import RawTensor, StoredEmbedding


class Qwen3_VL(QwenFamily):
    name = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"

    def _video_processor_kwargs(self, video: DecodedVideo) -> dict[str, Any]:
        return {"do_sample_frames": False}

    def _item_tensors(self, output: Any, index: int) -> list[RawTensor]:
        tensors = [to_raw("embeddings", output.pooler_output[index])]
        for layer, features in enumerate(output.deepstack_features or []):
            tensors.append(to_raw(f"deepstack.{layer}", features[index]))
        return tensors

    def _client_image_tensors(self) -> tuple[str, ...]:
        """Images also need every deepstack layer's features: without them the output changes."""
        layers = len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or [])
        return ("embeddings", *(f"deepstack.{k}" for k in range(layers)))

    def _vllm_features(self, stored: StoredEmbedding) -> torch.Tensor:
        """The deepstack features concatenated after the main ones on the last axis, as vLLM's tower returns them."""
        deepstack = sorted((t for t in stored.tensors if t.name.startswith("deepstack.")), key=lambda t: int(t.name.split(".")[1]))
        cpu = torch.device("cpu")
        return torch.cat([from_raw(stored.tensor("embeddings"), cpu), *(from_raw(t, cpu) for t in deepstack)], dim=-1)

    def vllm_mm_data(self, modality: int, items: list[StoredEmbedding]) -> TensorKwargs:
        """Videos also carry the time of each temporal block, from which vLLM writes the `<t seconds>` text
        (the times the built-in engine writes, from the same stored frame times)."""
        entry = super().vllm_mm_data(modality, items)
        if modality == VIDEO:
            entry["timestamps"] = [torch.tensor(self.block_times(s)[: self.visual_placement(s).grid_thw[0]]) for s in items]
        return entry

    def block_times(self, stored: StoredEmbedding) -> list[float]:
        """Mean time of the first and last frame of every temporal block (the processor's rule)."""
        times = list(placement_of(stored, embedding_pb2.VideoPlacement).frame_timestamps)
        step = int(self.visual_placement(stored).temporal_patch_size) or 2
        if len(times) % step:
            times += [times[-1]] * (step - len(times) % step)
        return [(times[i] + times[i + step - 1]) / 2 for i in range(0, len(times), step)]

    def placeholder_text(self, stored: StoredEmbedding) -> str:
        if stored.descriptor.modality != VIDEO:
            return super().placeholder_text(stored)
        placement = self.visual_placement(stored)
        t, h, w = placement.grid_thw
        per_frame = self.processor.video_token * int(h * w // placement.spatial_merge_size**2)
        start, end = self.processor.vision_start_token, self.processor.vision_end_token
        return "".join(f"<{time:.1f} seconds>{start}{per_frame}{end}" for time in self.block_times(stored)[: int(t)])

    def rope_index(self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]]) -> tuple[torch.Tensor, int]:
        positions, deltas = self.model.model.get_rope_index(
            ids, self._types(ids), image_grid_thw=self._grid(media.get(IMAGE, [])), video_grid_thw=self._grid(media.get(VIDEO, []))
        )
        return positions, int(deltas.view(-1)[0])

    def prefill_extra(
        self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]], masks: dict[int, torch.Tensor], embeds: torch.Tensor
    ) -> TensorKwargs:
        visual = [m for m in (IMAGE, VIDEO) if media.get(m)]
        if not visual:
            return {}
        vis = torch.zeros_like(ids, dtype=torch.bool)
        for modality in visual:
            vis |= masks[modality]
        layers = int(np.max([len([t for t in m.tensors if t.name.startswith("deepstack.")]) for mod in visual for m in media[mod]]))
        deepstack = []
        for layer in range(layers):
            joined = embeds.new_zeros(int(vis.sum()), embeds.shape[-1])
            for modality in visual:
                feats = torch.cat([from_raw(m.tensor(f"deepstack.{layer}"), self.device) for m in media[modality]]).to(embeds.dtype)
                joined[masks[modality][vis]] = feats
            deepstack.append(joined)
        return {"visual_pos_masks": vis, "deepstack_visual_embeds": deepstack}

    def slice_extra(self, extra: TensorKwargs, ids: torch.Tensor, start: int, end: int) -> TensorKwargs:
        if not extra:
            return extra
        vis, layers = extra["visual_pos_masks"], extra["deepstack_visual_embeds"]
        assert isinstance(vis, torch.Tensor) and isinstance(layers, list), "built by prefill_extra"
        if start == 0 and end == vis.shape[1]:
            return extra
        part = vis[:, start:end]
        if not bool(part.any()):
            return {}
        first = int(vis[:, :start].sum())
        count = int(part.sum())
        return {
            "visual_pos_masks": part,
            "deepstack_visual_embeds": [layer[first : first + count] for layer in layers],
        }
