"""Qwen2.5-VL: image and video through one vision tower + patch merger.

Encoder half: the processor's own image processor (so preprocessing is the
reference's, byte for byte), then `get_image_features(...).pooler_output`,
which is already the merged embedding in the LLM's hidden space; one tensor
[tokens, hidden] per item, plus the patch grid that fixes both the
placeholder count and the M-RoPE positions.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmserve.common.v1 import embedding_pb2, media_pb2
from mmserve.models.families.base import EncodedItem, Family, PreparedItem
from mmserve.models.tensors import to_raw


class Qwen2_5_VL(Family):
    name = "qwen2_5_vl"
    modalities = frozenset({media_pb2.MODALITY_IMAGE})
    model_class = "Qwen2_5_VLForConditionalGeneration"

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        import transformers
        from transformers import AutoProcessor

        model_cls = getattr(transformers, cls.model_class)
        model = model_cls.from_pretrained(path, dtype=dtype).to(device).eval()
        if part == "encoder":
            # The encoder never runs the LLM: free its weights.
            model.model.language_model = None
            model.lm_head = None
        processor = AutoProcessor.from_pretrained(path)
        return cls(model, processor, model.config)

    # --- encoder half ----------------------------------------------------------
    @property
    def _vision(self) -> Any:
        return self.config.vision_config

    @property
    def _factor(self) -> int:
        """Pixels per side of one merged token (patch_size * merge_size)."""
        return int(self._vision.patch_size * self._vision.spatial_merge_size)

    def _pixel_bounds(self, processor: Any, opts: Any) -> dict[str, int]:
        """min/max pixels clamped to [one token, the model's default maximum]."""
        size = processor.size
        default_min, default_max = int(size["shortest_edge"]), int(size["longest_edge"])
        floor = self._factor**2
        max_pixels = default_max
        if opts.HasField("max_pixels"):
            max_pixels = min(max(int(opts.max_pixels), floor), default_max)
        min_pixels = default_min
        if opts.HasField("min_pixels"):
            min_pixels = max(int(opts.min_pixels), floor)
        return {"min_pixels": min(min_pixels, max_pixels), "max_pixels": max_pixels}

    def effective_options(self, item: media_pb2.MediaInput) -> dict[str, Any]:
        if item.modality == media_pb2.MODALITY_IMAGE:
            opts = item.image
            return self._pixel_bounds(self.processor.image_processor, opts)
        raise NotImplementedError(item.modality)

    def prepare(self, modality: int, media: Any, options: dict[str, Any]) -> PreparedItem:
        image: Image.Image = media
        size = {"shortest_edge": options["min_pixels"], "longest_edge": options["max_pixels"]}
        batch = self.processor.image_processor(images=[image], size=size, return_tensors="pt")
        grid = batch["image_grid_thw"]
        placement = embedding_pb2.ImagePlacement(
            grid_thw=[int(v) for v in grid[0]],
            spatial_merge_size=int(self._vision.spatial_merge_size),
            source_size=[image.width, image.height],
        )
        return PreparedItem(modality, {"pixel_values": batch["pixel_values"], "grid_thw": grid}, placement)

    @torch.inference_mode()
    def encode(self, modality: int, batch: list[PreparedItem]) -> list[EncodedItem]:
        pixel_values = torch.cat([p.inputs["pixel_values"] for p in batch]).to(self.device)
        grid = torch.cat([p.inputs["grid_thw"] for p in batch]).to(self.device)
        features = self.model.get_image_features(pixel_values, grid).pooler_output
        out = []
        for prepared, embeds in zip(batch, features, strict=True):
            out.append(EncodedItem([to_raw("embeddings", embeds)], int(embeds.shape[0]), prepared.placement))
        return out

    def warmup(self) -> None:
        image = Image.new("RGB", (self._factor * 2, self._factor * 2), (127, 127, 127))
        options = self.effective_options(media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE))
        self.encode(media_pb2.MODALITY_IMAGE, [self.prepare(media_pb2.MODALITY_IMAGE, image, options)])
