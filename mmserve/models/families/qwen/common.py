"""What Qwen2.5-VL, Qwen3-VL and the Qwen2.5-Omni thinker share, written once.

All three are `model.model.{visual, audio_tower?, language_model}` + `lm_head`
with M-RoPE positions from `model.model.get_rope_index`. Subclasses say what
differs: the model class, the media they take, how positions are computed,
and (Qwen3-VL) deepstack features and timestamp text; Omni adds audio.

Encoder half: the checkpoint's own processors (so preprocessing is the
reference's, byte for byte), then `get_*_features(...)`, whose pooled output
is already in the LLM's hidden space; one tensor [tokens, hidden] per item
(plus model-specific extras), and the placement metadata (grids, timing)
that fixes both the placeholder count and the positions.

Decoder half: render the chat template with one pad token per item, expand
each pad exactly as the processor would (so the ids equal the reference's),
scatter the stored embeddings over the pads, compute M-RoPE positions from
the stored metadata, and run the language model with explicit positions
(never the model's mutable `rope_deltas`, which concurrent requests would
share).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, ClassVar, TypeVar

import torch
from google.protobuf.message import Message
from PIL import Image

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.families.qwen.v1 import placement_pb2 as qwen_pb2
from mmserve.decoded import DecodedVideo, MediaOptions
from mmserve.errors import FailedPrecondition, InvalidArgument
from mmserve.modality import ModalityValue, name_of
from mmserve.models.families.base import (
    HERMES_TOOL_CALLS,
    ChatPrompt,
    EncodedItem,
    Family,
    MediaHandler,
    PrefillInputs,
    PreparedItem,
    TensorKwargs,
    prompt_part_config,
    taking,
)
from mmserve.models.tensors import from_raw, to_raw
from mmserve.store import RawTensor, StoredEmbedding

IMAGE, VIDEO, AUDIO, TIME_SERIES = (
    media_pb2.MODALITY_IMAGE,
    media_pb2.MODALITY_VIDEO,
    media_pb2.MODALITY_AUDIO,
    media_pb2.MODALITY_TIME_SERIES,
)
#: mm_token_type_ids values used by the Qwen-VL rope index.
TYPE_IDS = {IMAGE: 1, VIDEO: 2}
M = TypeVar("M", bound=Message)


def placement_of(stored: StoredEmbedding, kind: type[M]) -> M:
    """The stored item's shared placement message, which must be a `kind` (the modality decides which one is set)."""
    desc = stored.descriptor
    which = desc.WhichOneof("placement")
    placement = getattr(desc, which) if which is not None else None
    if not isinstance(placement, kind):
        raise FailedPrecondition(f"stored embedding {desc.id} has no {kind.__name__} metadata", field="messages")
    return placement


def family_message(stored: StoredEmbedding, message: M) -> M | None:
    """The stored item's family placement as `message` (filled in place), or None if it has none of that type."""
    packed = stored.descriptor.family_placement
    return message if stored.descriptor.HasField("family_placement") and packed.Unpack(message) else None


class QwenFamily(Family):
    """Shared implementation; see the module docstring."""

    model_class: ClassVar[str]
    base_modalities: ClassVar[frozenset[ModalityValue]] = frozenset({IMAGE, VIDEO})
    vllm_modalities: ClassVar[frozenset[ModalityValue]] = frozenset({IMAGE, VIDEO})
    #: The transformers model: its towers, rope index and LLM are reached by attribute, which torch's typing of
    #: modules (every attribute a Tensor or a Module) cannot follow.
    model: Any
    towers: ClassVar[tuple[str, ...]] = ("visual",)
    tool_call_format = HERMES_TOOL_CALLS  # used where the checkpoint's chat template renders tools
    #: config attributes holding token ids a user's text may not contain
    reserved_id_attrs: ClassVar[tuple[str, ...]] = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        import transformers
        from transformers import AutoProcessor

        if part == "prompt":
            return cls._load_prompt_part(path, dtype)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype).to(device).eval()
        if part == "encoder":  # the encoder never runs the LLM: free its weights
            model.model.language_model = None
            model.lm_head = None
        elif part == "decoder":  # the decoder never runs the towers: positions come from config + stored metadata
            for tower in cls.towers:
                setattr(model.model, tower, None)
        processor = AutoProcessor.from_pretrained(path)
        return cls(model, processor, model.config)

    @classmethod
    def _load_prompt_part(cls, path: str, dtype: torch.dtype | str) -> Family:
        """Processor and config, no LLM or towers: for an engine that runs the LLM itself (vLLM).

        (`Family.attach_time_series` then reads the token embedding table if the checkpoint has the adapter.)
        """
        from transformers import AutoProcessor

        config, dtype, generation = prompt_part_config(path, dtype)
        processor = AutoProcessor.from_pretrained(path)
        return cls(None, processor, config, dtype=dtype, generation_config=generation)

    @property
    def max_context(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 32768))

    # --- encoder half ------------------------------------------------------------------
    @property
    def _factor(self) -> int:
        """Pixels per side of one merged token (patch size x spatial merge)."""
        vision = self.config.vision_config
        return int(vision.patch_size * vision.spatial_merge_size)

    def _pixel_bounds(self, processor: Any, opts: media_pb2.ImageOptions | media_pb2.VideoOptions, name: str) -> MediaOptions:
        """min/max pixels from the item's options, clamped to [one token, the processor's default maximum]."""
        for key in ("min_pixels", "max_pixels"):
            if opts.HasField(key) and getattr(opts, key) <= 0:  # nonsense, not a value to clamp
                raise InvalidArgument(f"{key} must be a positive number of pixels", field=f"{name}.{key}")
        size = processor.size
        default_min, default_max = int(size["shortest_edge"]), int(size["longest_edge"])
        floor = self._factor**2
        max_pixels = min(max(int(opts.max_pixels), floor), default_max) if opts.HasField("max_pixels") else default_max
        min_pixels = max(int(opts.min_pixels), floor) if opts.HasField("min_pixels") else default_min
        return {"min_pixels": min(min_pixels, max_pixels), "max_pixels": max_pixels}

    def media_handlers(self) -> dict[int, MediaHandler]:
        return {
            IMAGE: MediaHandler(
                taking(Image.Image, self._prepare_image),
                functools.partial(self._encode_visual, IMAGE),
                options=lambda item: self._pixel_bounds(self.processor.image_processor, item.image, "image"),
                client_tensors=self._client_image_tensors(),
                client_placement=self._client_image_placement,
            ),
            VIDEO: MediaHandler(
                taking(DecodedVideo, self._prepare_video),
                functools.partial(self._encode_visual, VIDEO),
                options=lambda item: self._pixel_bounds(self.processor.video_processor, item.video, "video"),
            ),
        }

    def _size(self, options: MediaOptions) -> dict[str, int]:
        return {"shortest_edge": options["min_pixels"], "longest_edge": options["max_pixels"]}  # filled by _pixel_bounds

    def _prepare_image(self, image: Image.Image, options: MediaOptions) -> PreparedItem:
        batch = self.processor.image_processor(images=[image], size=self._size(options), return_tensors="pt")
        grid = batch["image_grid_thw"]
        placement = embedding_pb2.ImagePlacement(
            grid_thw=[int(v) for v in grid[0]],
            spatial_merge_size=int(self.config.vision_config.spatial_merge_size),
            source_size=[image.width, image.height],
        )
        return PreparedItem(IMAGE, {"pixel_values": batch["pixel_values"], "grid_thw": grid}, placement)

    def _video_processor_kwargs(self, video: DecodedVideo) -> dict[str, Any]:
        return {}

    def _prepare_video(self, video: DecodedVideo, options: MediaOptions) -> PreparedItem:
        batch = self.processor.video_processor(
            videos=[video.frames], size=self._size(options), return_tensors="pt", **self._video_processor_kwargs(video)
        )
        grid = batch["video_grid_thw"]
        temporal = int(self.config.vision_config.temporal_patch_size)
        placement = embedding_pb2.VideoPlacement(
            grid_thw=[int(v) for v in grid[0]],
            spatial_merge_size=int(self.config.vision_config.spatial_merge_size),
            second_per_grid=temporal / video.sampled_fps,
            sampled_fps=video.sampled_fps,
            frame_timestamps=[float(t) for t in video.timestamps],
            duration_s=float(video.duration_s),
            temporal_patch_size=temporal,
        )
        return PreparedItem(VIDEO, {"pixel_values": batch["pixel_values_videos"], "grid_thw": grid}, placement)

    def _item_tensors(self, output: Any, index: int) -> list[RawTensor]:
        """The tensors stored for item `index` of a tower output (Qwen3-VL adds deepstack)."""
        return [to_raw("embeddings", output.pooler_output[index])]

    @torch.inference_mode()
    def _encode_visual(self, modality: int, batch: list[PreparedItem]) -> list[EncodedItem]:
        """Images or videos through the vision tower, batched: one pixel tensor, one grid per item."""
        pixels = torch.cat([p.inputs["pixel_values"] for p in batch]).to(self.device)
        grid = torch.cat([p.inputs["grid_thw"] for p in batch]).to(self.device)
        features = self.model.get_image_features if modality == IMAGE else self.model.get_video_features
        output = features(pixels, grid)
        return [
            EncodedItem(self._item_tensors(output, i), int(output.pooler_output[i].shape[0]), item.placement)
            for i, item in enumerate(batch)
        ]

    def vllm_mm_data(self, modality: int, items: list[StoredEmbedding]) -> TensorKwargs:
        """An item's `image_embeds`/`video_embeds` [tokens, hidden] with its grid; videos also their seconds per grid (M-RoPE)."""
        name = name_of(modality)
        placements = [self.visual_placement(s) for s in items]
        entry: TensorKwargs = {
            f"{name}_embeds": torch.cat([self._vllm_features(s) for s in items]),
            f"{name}_grid_thw": torch.tensor([list(p.grid_thw) for p in placements], dtype=torch.long),
        }
        if modality == VIDEO:
            entry["second_per_grid_ts"] = torch.tensor([float(p.second_per_grid or 1.0) for p in placements])
        return entry

    def _vllm_features(self, stored: StoredEmbedding) -> torch.Tensor:
        """The features vLLM's tower would return for the item."""
        return from_raw(stored.tensor("embeddings"), torch.device("cpu"))

    def _client_image_tensors(self) -> tuple[str, ...]:
        """What a client-supplied image embedding carries (Qwen3-VL adds its deepstack layers)."""
        return ("embeddings",)

    def _client_image_placement(self, embeds: media_pb2.EmbeddingInput, tokens: int) -> embedding_pb2.ImagePlacement:
        """The grid [1, h, w] must give exactly `tokens` merged tokens, as the processor's grid would."""
        where = "source.embeds.grid_thw"
        grid = [int(v) for v in embeds.grid_thw]
        merge = int(self.config.vision_config.spatial_merge_size)
        if len(grid) != 3 or grid[0] != 1 or min(grid) <= 0:
            raise InvalidArgument(f"grid_thw must be [1, h, w] with positive h and w (an image), got {grid}", field=where)
        if grid[1] % merge or grid[2] % merge:
            raise InvalidArgument(f"h and w of grid_thw {grid} must be multiples of the spatial merge size {merge}", field=where)
        if grid[1] * grid[2] // merge**2 != tokens:
            raise InvalidArgument(
                f"grid_thw {grid} makes {grid[1] * grid[2] // merge**2} tokens (t*h*w/{merge}^2), the embeddings have {tokens}",
                field=where,
            )
        return embedding_pb2.ImagePlacement(grid_thw=grid, spatial_merge_size=merge)

    def family_placement(self, modality: int, placement: Message) -> Message | None:
        """Images and videos: their M-RoPE grid (and a video's time per grid step) as a qwen.v1.VisualPlacement."""
        if isinstance(placement, embedding_pb2.ImagePlacement):
            return qwen_pb2.VisualPlacement(grid_thw=placement.grid_thw, spatial_merge_size=placement.spatial_merge_size)
        if isinstance(placement, embedding_pb2.VideoPlacement):
            return qwen_pb2.VisualPlacement(
                grid_thw=placement.grid_thw,
                spatial_merge_size=placement.spatial_merge_size,
                second_per_grid=placement.second_per_grid,
                temporal_patch_size=placement.temporal_patch_size,
            )
        return None

    def visual_placement(self, stored: StoredEmbedding) -> qwen_pb2.VisualPlacement:
        """A stored image's or video's placement: its family message, or (a record from before it) the shared fields."""
        found = family_message(stored, qwen_pb2.VisualPlacement())
        if found is not None:
            return found
        kind = embedding_pb2.VideoPlacement if stored.descriptor.modality == VIDEO else embedding_pb2.ImagePlacement
        rebuilt = self.family_placement(stored.descriptor.modality, placement_of(stored, kind))
        if not isinstance(rebuilt, qwen_pb2.VisualPlacement):
            raise FailedPrecondition(f"stored embedding {stored.descriptor.id} has no image or video placement", field="messages")
        return rebuilt

    def warmup(self) -> None:
        image = Image.new("RGB", (self._factor * 2, self._factor * 2), (127, 127, 127))
        options = self.effective_options(media_pb2.MediaInput(modality=IMAGE))
        self.encode(IMAGE, [self.prepare(IMAGE, image, options)])

    # --- decoder half --------------------------------------------------------------------
    def media_placeholder_token(self, modality: int) -> str:
        tokens: dict[int, str] = {IMAGE: self.processor.image_token, VIDEO: self.processor.video_token}
        return tokens[modality]

    def media_chat_part(self, modality: int) -> dict[str, str]:
        parts: dict[int, dict[str, str]] = {IMAGE: {"type": "image"}, VIDEO: {"type": "video"}, AUDIO: {"type": "audio"}}
        return parts[modality]

    def media_reserved_strings(self) -> tuple[str, ...]:
        ids = [getattr(self.config, attr) for attr in self.reserved_id_attrs if getattr(self.config, attr, None) is not None]
        tokens = list(self.tokenizer.convert_ids_to_tokens(ids))
        return tuple(tokens)

    def placeholder_text(self, stored: StoredEmbedding) -> str:
        """What one item's pad token becomes in the prompt text (the processor's expansion)."""
        return self.placeholder_token(stored.descriptor.modality) * int(stored.descriptor.token_count)

    def _expand(self, text: str, media: list[StoredEmbedding]) -> str:
        out: list[str] = []
        pos = 0
        for stored in media:
            pad = self.placeholder_token(stored.descriptor.modality)
            found = text.find(pad, pos)
            if found < 0:
                raise InvalidArgument("the chat template dropped a media placeholder", field="messages")
            out += [text[pos:found], self.placeholder_text(stored)]
            pos = found + len(pad)
        out.append(text[pos:])
        return "".join(out)

    def prompt_token_ids(self, prompt: ChatPrompt, media: list[StoredEmbedding], *, expand: bool = True) -> list[int]:
        """The rendered prompt's token ids, each media placeholder expanded to its item's token count (or left single)."""
        text = self.render(prompt)
        return list(self.tokenizer([self._expand(text, media) if expand else text])["input_ids"][0])

    def prefill_inputs(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> PrefillInputs:
        ids, embeds, by_modality, masks = self.prompt_embeds(prompt, media)
        positions, delta = self.rope_index(ids, by_modality)
        return PrefillInputs(ids, embeds, positions, delta, self.prefill_extra(ids, by_modality, masks, embeds))

    def prompt_embeds(
        self, prompt: ChatPrompt, media: list[StoredEmbedding]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[StoredEmbedding]], dict[int, torch.Tensor]]:
        """The expanded prompt's ids [1, L] and embeddings [1, L, hidden] with each item's spliced in; items and masks by modality."""
        ids = torch.tensor([self.prompt_token_ids(prompt, media)], device=self.device)
        embeds = self.embed_tokens(ids)
        by_modality: dict[int, list[StoredEmbedding]] = defaultdict(list)
        for stored in media:
            by_modality[stored.descriptor.modality].append(stored)
        masks: dict[int, torch.Tensor] = {}
        for modality, items in by_modality.items():
            mask = ids == self.token_id(self.placeholder_token(modality))
            feats = torch.cat([from_raw(m.tensor("embeddings"), self.device) for m in items]).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise InvalidArgument("media placeholders do not match the stored embeddings", field="messages")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats)
            masks[modality] = mask
        return ids, embeds, by_modality, masks

    def _grid(self, items: list[StoredEmbedding]) -> torch.Tensor | None:
        return torch.tensor([list(self.visual_placement(m).grid_thw) for m in items], device=self.device) if items else None

    def _types(self, ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(ids, dtype=torch.int)
        for modality, value in TYPE_IDS.items():
            types[ids == self.token_id(self.placeholder_token(modality))] = value
        return types

    def rope_index(self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, 1, L] and the decode-time delta (family-specific)."""
        raise NotImplementedError

    def prefill_extra(
        self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]], masks: dict[int, torch.Tensor], embeds: torch.Tensor
    ) -> TensorKwargs:
        """Extra keyword arguments for the prefill forward (Qwen3-VL: deepstack)."""
        return {}

    def decode_positions(self, positions: list[int]) -> torch.Tensor:
        rows = torch.tensor(positions, dtype=torch.long, device=self.device)
        return rows.view(1, -1, 1).expand(3, -1, 1)

    def placeholder_token_ids(self) -> frozenset[int]:
        return frozenset(self.token_id(self.placeholder_token(m)) for m in self.modalities)
