"""Qwen2.5-VL: image and video through one vision tower + patch merger (see `qwen` for the shared parts)."""

from __future__ import annotations

import torch

from mmserve.models.families.qwen.common import IMAGE, VIDEO, QwenFamily
from mmserve.store import StoredEmbedding


class Qwen2_5_VL(QwenFamily):
    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"

    def rope_index(self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]]) -> tuple[torch.Tensor, int]:
        videos = media.get(VIDEO, [])
        seconds = torch.tensor([self.visual_placement(v).second_per_grid for v in videos], device=self.device) if videos else None
        positions, deltas = self.model.model.get_rope_index(
            ids,
            self._types(ids),
            image_grid_thw=self._grid(media.get(IMAGE, [])),
            video_grid_thw=self._grid(videos),
            second_per_grid_ts=seconds,
        )
        return positions, int(deltas.view(-1)[0])
