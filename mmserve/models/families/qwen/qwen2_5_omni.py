"""Qwen2.5-Omni (the thinker: the part that produces text): image, video and audio.

Loaded with `Qwen2_5OmniThinkerForConditionalGeneration`, which reads the
thinker weights of a full Omni checkpoint (the talker and vocoder produce
speech, not text, and are never loaded). Media pads are <|IMAGE|>, <|VIDEO|>
and <|AUDIO|>, each wrapped in bos/eos tokens by the chat template;
`get_rope_index` finds items by those bos tokens and places audio by its mel
feature length, which is stored with the embedding.

Audio longer than the feature extractor's window (`n_samples`, 300 s for
the real checkpoints) is refused, never silently cut.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from google.protobuf.message import Message

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.api.families.qwen.v1 import placement_pb2 as qwen_pb2
from mmserve.decoded import DecodedAudio, MediaOptions
from mmserve.errors import InvalidArgument
from mmserve.models.families.base import EncodedItem, MediaHandler, PreparedItem, taking
from mmserve.models.families.qwen.common import AUDIO, IMAGE, VIDEO, QwenFamily, family_message, placement_of
from mmserve.models.tensors import to_raw
from mmserve.store import StoredEmbedding


def audio_tokens(feature_length: int) -> int:
    """Tokens the audio tower makes of `feature_length` mel frames (two stride-2 stages)."""
    return ((feature_length - 1) // 2 + 1 - 2) // 2 + 1


class Qwen2_5_Omni(QwenFamily):
    name = "qwen2_5_omni"
    model_types = ("qwen2_5_omni", "qwen2_5_omni_thinker")  # a thinker-only checkpoint too
    model_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    base_modalities = frozenset({IMAGE, VIDEO, AUDIO})
    vllm_refused_why: ClassVar[dict[str, str]] = {
        "audio": "vLLM takes this family's audio only as mel features for its own audio tower, not as embeddings"
    }
    towers = ("visual", "audio_tower")
    reserved_id_attrs = (
        "image_token_index",
        "video_token_index",
        "audio_token_index",
        "vision_start_token_id",
        "vision_end_token_id",
        "audio_start_token_id",
        "audio_end_token_id",
    )

    def media_placeholder_token(self, modality: int) -> str:
        if modality == AUDIO:
            return str(self.processor.audio_token)
        return super().media_placeholder_token(modality)

    # --- encoder half: audio ----------------------------------------------------------
    def media_handlers(self) -> dict[int, MediaHandler]:
        audio = MediaHandler(
            taking(DecodedAudio, self._prepare_audio),
            self._encode_audio,
            options=lambda item: {"target_rate": int(self.processor.feature_extractor.sampling_rate)},
            client_placement=self._client_audio_placement,
        )
        return {**super().media_handlers(), AUDIO: audio}

    def _prepare_audio(self, audio: DecodedAudio, options: MediaOptions) -> PreparedItem:
        extractor = self.processor.feature_extractor
        samples = audio.samples
        window = extractor.n_samples
        if samples.shape[0] > window:
            raise InvalidArgument(
                f"audio is {samples.shape[0] / extractor.sampling_rate:.1f} s long; this model takes at most "
                f"{window / extractor.sampling_rate:.0f} s in one item: split it into several audio parts",
                field="source",
            )
        # Padding to the hop grid (plus one FFT window) gives the same valid frames as padding to the
        # whole window, at a fraction of the cost; only valid frames reach the tower.
        padded = min(window, math.ceil(samples.shape[0] / extractor.hop_length) * extractor.hop_length + extractor.n_fft)
        features = extractor(
            [samples],
            sampling_rate=extractor.sampling_rate,
            padding="max_length",
            max_length=padded,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = features["attention_mask"]
        length = int(mask.sum())
        placement = embedding_pb2.AudioPlacement(
            feature_length=length,
            num_samples=int(samples.shape[0]),
            sampling_rate=int(extractor.sampling_rate),
            chunk_feature_lengths=[length],
        )
        return PreparedItem(AUDIO, {"input_features": features["input_features"], "mask": mask}, placement)

    def _client_audio_placement(self, embeds: media_pb2.EmbeddingInput, tokens: int) -> embedding_pb2.AudioPlacement:
        """The mel feature length places the item (rope index); the tower's output length for it must be `tokens`."""
        where = "source.embeds.audio_feature_length"
        extractor = self.processor.feature_extractor
        length, window = int(embeds.audio_feature_length), extractor.n_samples // extractor.hop_length
        if not 0 < length <= window:
            raise InvalidArgument(f"audio_feature_length must be 1..{window} mel frames (100 per second), got {length}", field=where)
        expected = audio_tokens(length)
        if expected != tokens:
            raise InvalidArgument(f"audio_feature_length {length} makes {expected} tokens, the embeddings have {tokens}", field=where)
        return embedding_pb2.AudioPlacement(
            feature_length=length, sampling_rate=int(extractor.sampling_rate), chunk_feature_lengths=[length]
        )

    def family_placement(self, modality: int, placement: Message) -> Message | None:
        """Audio also: its mel feature length (the audio's M-RoPE extent) as a qwen.v1.AudioPlacement."""
        if isinstance(placement, embedding_pb2.AudioPlacement):
            return qwen_pb2.AudioPlacement(feature_length=placement.feature_length)
        return super().family_placement(modality, placement)

    def audio_placement(self, stored: StoredEmbedding) -> qwen_pb2.AudioPlacement:
        """A stored clip's placement: its family message, or (a record from before it) the shared fields."""
        found = family_message(stored, qwen_pb2.AudioPlacement())
        return (
            found
            if found is not None
            else qwen_pb2.AudioPlacement(feature_length=placement_of(stored, embedding_pb2.AudioPlacement).feature_length)
        )

    @torch.inference_mode()
    def _encode_audio(self, batch: list[PreparedItem]) -> list[EncodedItem]:
        """One clip per tower call (each has its own valid length)."""
        out = []
        for item in batch:
            hidden = self.model.get_audio_features(
                item.inputs["input_features"].to(self.device, self.dtype), feature_attention_mask=item.inputs["mask"].to(self.device)
            ).last_hidden_state
            out.append(EncodedItem([to_raw("embeddings", hidden)], int(hidden.shape[0]), item.placement))
        return out

    # --- decoder half -------------------------------------------------------------------
    def rope_index(self, ids: torch.Tensor, media: dict[int, list[StoredEmbedding]]) -> tuple[torch.Tensor, int]:
        videos, audios = media.get(VIDEO, []), media.get(AUDIO, [])
        seconds = torch.tensor([self.visual_placement(v).second_per_grid for v in videos], device=self.device) if videos else None
        lengths = torch.tensor([self.audio_placement(a).feature_length for a in audios], device=self.device) if audios else None
        positions, deltas = self.model.model.get_rope_index(
            ids,
            image_grid_thw=self._grid(media.get(IMAGE, [])),
            video_grid_thw=self._grid(videos),
            attention_mask=torch.ones_like(ids),
            use_audio_in_video=False,
            audio_seqlens=lengths,
            second_per_grids=seconds,
        )
        return positions, int(deltas.view(-1)[0])
