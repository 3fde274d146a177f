"""What the family builders share: the LLM and vision config fields, token ids, processor pieces, saving.

Each family module keeps its own constants and the config fields only it has
(window attention, DeepStack, the audio tower, ...); the fields every Qwen
multimodal family writes the same way, and the build's closing steps, live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, ProcessorMixin

from mmserve.models.tiny.chat_templates import load_chat_template
from mmserve.models.tiny.registry import CheckpointSpec, TowerSize
from mmserve.models.tiny.time_series import attach_time_series_adapter
from mmserve.models.tiny.tokenizer import EOS_TOKEN, MAX_LENGTH, PAD_TOKEN, build_tokenizer, special_token_id


@dataclass(frozen=True)
class Patching:
    """How a vision tower cuts pixels into LLM tokens; the model config and its processors must agree."""

    patch_size: int  # pixels per side of one patch
    merge_size: int  # merge_size x merge_size patches become one LLM token
    temporal_patch_size: int  # frames per temporal patch

    def config_fields(self) -> dict[str, int]:
        """The vision config's spelling of these settings."""
        return {
            "patch_size": self.patch_size,
            "spatial_merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }

    def processor_kwargs(self) -> dict[str, Any]:
        """The image and video processors' spelling of these settings."""
        return {
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }


def required_tower(spec: CheckpointSpec, kind: str) -> TowerSize:
    """`spec.<kind>` (e.g. "vision", "audio"), or a ValueError saying the family needs that tower."""
    size: TowerSize | None = getattr(spec, kind)
    if size is None:
        raise ValueError(f"{spec.name}: a {spec.family} checkpoint needs a {kind} tower size")
    return size


def mrope_section(head_dim: int, temporal_eighths: int) -> list[int]:
    """Split head_dim/2 rotary pairs over (t, h, w): `temporal_eighths`/8 to time, the rest halved (h rounds down).

    Qwen2.5-VL's 16:24:24 is `temporal_eighths=2`; Qwen3-VL's 24:20:20 is 3 (128 -> [24, 20, 20]).
    """
    half = head_dim // 2
    temporal = half * temporal_eighths // 8
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def mrope_parameters(rope_theta: float, section: list[int], **family_fields: object) -> dict[str, object]:
    """`rope_parameters` of an M-RoPE text config (plain rope type, the family's theta and section)."""
    return {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": section, **family_fields}


def text_config(
    spec: CheckpointSpec, vocab_size: int, *, rope_parameters: Mapping[str, object], **family_fields: object
) -> dict[str, object]:
    """The LLM's `text_config` fields every family writes alike, plus `family_fields`.

    The LLM is sized by `spec.text`; bos and pad are `<|endoftext|>`, eos `<|im_end|>`.
    """
    text = spec.text
    pad_id = special_token_id(PAD_TOKEN)
    return {
        "vocab_size": vocab_size,
        "hidden_size": text.hidden,
        "intermediate_size": text.intermediate,
        "num_hidden_layers": text.layers,
        "num_attention_heads": text.heads,
        "num_key_value_heads": text.kv_heads or text.heads,
        "max_position_embeddings": MAX_LENGTH,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.initializer_range,
        "rope_parameters": dict(rope_parameters),
        **family_fields,
        "bos_token_id": pad_id,
        "eos_token_id": special_token_id(EOS_TOKEN),
        "pad_token_id": pad_id,
        "dtype": "float32",
    }


def vision_config(spec: CheckpointSpec, patching: Patching, **family_fields: object) -> dict[str, object]:
    """The vision tower's `vision_config` fields every family writes alike, plus `family_fields`.

    The tower is sized by `spec.vision` and projects into the LLM's hidden size.
    """
    vision = required_tower(spec, "vision")
    return {
        "depth": vision.layers,
        "hidden_size": vision.hidden,
        "intermediate_size": vision.intermediate,
        "num_heads": vision.heads,
        "out_hidden_size": spec.text.hidden,
        **patching.config_fields(),
        **family_fields,
        "initializer_range": spec.initializer_range,
        "dtype": "float32",
    }


def vl_token_ids() -> dict[str, Any]:
    """Config kwargs naming the vision placeholder and wrapper tokens of Qwen2.5-VL and Qwen3-VL."""
    return {
        "image_token_id": special_token_id("<|image_pad|>"),
        "video_token_id": special_token_id("<|video_pad|>"),
        "vision_start_token_id": special_token_id("<|vision_start|>"),
        "vision_end_token_id": special_token_id("<|vision_end|>"),
    }


def text_processing(
    family: str, named_tokens: Mapping[str, str] | None = None, *, eos_token: str = EOS_TOKEN, bos_token: str | None = None
) -> dict[str, Any]:
    """A processor's `tokenizer` and `chat_template` kwargs: the shared tokenizer with the family's template."""
    chat_template = load_chat_template(family)
    tokenizer = build_tokenizer(chat_template, named_tokens=named_tokens, eos_token=eos_token, bos_token=bos_token)
    return {"tokenizer": tokenizer, "chat_template": chat_template}


def generation_config(eos_token: str = EOS_TOKEN, bos_token: str = PAD_TOKEN) -> GenerationConfig:
    """Greedy by default (no sampling settings), stopping at the end of a turn (`eos_token`) or of a document."""
    pad_id = special_token_id(PAD_TOKEN)
    return GenerationConfig(
        bos_token_id=special_token_id(bos_token),
        eos_token_id=[special_token_id(eos_token), pad_id],
        pad_token_id=pad_id,
    )


def save_pretrained(
    spec: CheckpointSpec, out_dir: Path, model: PreTrainedModel, processor: ProcessorMixin, generation: GenerationConfig
) -> None:
    """Save model (with `generation`) and processor, after checking that the weights are fp32."""
    model.generation_config = generation
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError(f"{spec.name}: expected fp32 weights")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def save_checkpoint(
    spec: CheckpointSpec, out_dir: Path, model: PreTrainedModel, processor: ProcessorMixin, generation: GenerationConfig | None = None
) -> None:
    """Finish a build of the shared vocabulary: the generation config (the shared one by default), model, processor, time-series adapter."""
    save_pretrained(spec, out_dir, model, processor, generation or generation_config())
    attach_time_series_adapter(spec, out_dir, llm_hidden_size=spec.text.hidden)
