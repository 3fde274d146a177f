"""Qwen2.5-VL: image and video through one vision tower + patch merger.

Encoder half: the processor's own image processor (so preprocessing is the
reference's, byte for byte), then `get_image_features(...).pooler_output`,
which is already the merged embedding in the LLM's hidden space; one tensor
[tokens, hidden] per item, plus the patch grid that fixes both the
placeholder count and the M-RoPE positions.

Decoder half: render the chat template with one pad token per item, expand
each to the stored token count (exactly what the processor does, so the ids
equal the reference's), scatter the stored embeddings over the pads, compute
M-RoPE positions with the model's own `get_rope_index` from the stored grids,
then run the language model with explicit positions (never the model's
mutable `rope_deltas`, which concurrent requests would share).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from mmserve.common.v1 import embedding_pb2, media_pb2
from mmserve.errors import InvalidArgument
from mmserve.models.families.base import EncodedItem, Family, PrefillInputs, PreparedItem
from mmserve.models.tensors import from_raw, to_raw


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
        elif part == "decoder":
            # The decoder never runs the towers (positions come from config + stored grids).
            model.model.visual = None
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

    # --- decoder half ----------------------------------------------------------
    def _pad_token(self, modality: int) -> str:
        return {media_pb2.MODALITY_IMAGE: self.processor.image_token, media_pb2.MODALITY_VIDEO: self.processor.video_token}[modality]

    def chat_part(self, modality: int) -> dict[str, Any]:
        return {media_pb2.MODALITY_IMAGE: {"type": "image"}, media_pb2.MODALITY_VIDEO: {"type": "video"}}[modality]

    def reserved_strings(self) -> tuple[str, ...]:
        ids = [self.config.image_token_id, self.config.video_token_id, self.config.vision_start_token_id, self.config.vision_end_token_id]
        return tuple(self.tokenizer.convert_ids_to_tokens(ids))

    def _expand(self, text: str, media: list[Any]) -> str:
        """Repeat each item's pad token to its stored token count, in prompt order."""
        out: list[str] = []
        pos = 0
        for stored in media:
            pad = self._pad_token(stored.descriptor.modality)
            found = text.find(pad, pos)
            if found < 0:
                raise InvalidArgument("the chat template dropped a media placeholder", field="messages")
            out.append(text[pos:found])
            out.append(pad * int(stored.descriptor.token_count))
            pos = found + len(pad)
        out.append(text[pos:])
        return "".join(out)

    def prefill_inputs(self, conversation: list[dict[str, Any]], media: list[Any]) -> PrefillInputs:
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer([self._expand(text, media)], return_tensors="pt")["input_ids"].to(self.device)
        embeds = self.embed_tokens(ids)
        types = torch.zeros_like(ids, dtype=torch.int)
        grids: dict[int, list[list[int]]] = {media_pb2.MODALITY_IMAGE: [], media_pb2.MODALITY_VIDEO: []}
        seconds: list[float] = []
        for modality, token_id, type_id in (
            (media_pb2.MODALITY_IMAGE, self.config.image_token_id, 1),
            (media_pb2.MODALITY_VIDEO, self.config.video_token_id, 2),
        ):
            items = [m for m in media if m.descriptor.modality == modality]
            mask = ids == token_id
            types[mask] = type_id
            if not items:
                continue
            feats = torch.cat([from_raw(m.tensor("embeddings"), self.device) for m in items]).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise InvalidArgument("media placeholders do not match the stored embeddings", field="messages")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats)
            for m in items:
                placement = getattr(m.descriptor, m.descriptor.WhichOneof("placement"))
                grids[modality].append(list(placement.grid_thw))
                if modality == media_pb2.MODALITY_VIDEO:
                    seconds.append(placement.second_per_grid)
        image_grid = torch.tensor(grids[media_pb2.MODALITY_IMAGE], device=self.device) if grids[media_pb2.MODALITY_IMAGE] else None
        video_grid = torch.tensor(grids[media_pb2.MODALITY_VIDEO], device=self.device) if grids[media_pb2.MODALITY_VIDEO] else None
        second_per_grid = torch.tensor(seconds, device=self.device) if seconds else None
        positions, deltas = self.model.model.get_rope_index(
            ids, types, image_grid_thw=image_grid, video_grid_thw=video_grid, second_per_grid_ts=second_per_grid
        )
        return PrefillInputs(ids, embeds, positions, int(deltas.view(-1)[0]))

    def decode_positions(self, seen: int, rope_delta: int, batch: int) -> torch.Tensor:
        return torch.full((3, batch, 1), seen + rope_delta, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: Any, extra: dict[str, Any]) -> torch.Tensor:
        out = self.model.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=cache, use_cache=True, **extra
        )
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_input_embeddings()(ids)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config.text_config)
