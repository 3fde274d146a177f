"""Tiny Qwen2.5-VL checkpoints: the real architecture and processor, small sizes, random weights.

Sizes shrink but every structural choice of the real model is kept (window
attention with some full-attention vision blocks, M-RoPE, untied lm_head,
patch 14 / merge 2 / temporal patch 2) so code written against these
checkpoints runs unchanged on `Qwen/Qwen2.5-VL-*`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from mmserve.models.tiny.chat_templates import load_chat_template
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec, TowerSize
from mmserve.models.tiny.time_series import attach_time_series_adapter
from mmserve.models.tiny.tokenizer import EOS_TOKEN, MAX_LENGTH, PAD_TOKEN, build_tokenizer, special_token_id

FAMILY = "qwen2_5_vl"
ROPE_THETA = 1_000_000.0
# As in the real vision tower: patch 14 px, 2x2 patches merged into one LLM
# token, 2 frames per temporal patch, 112 px attention windows, 2 M-RoPE
# temporal positions per second of video.
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
WINDOW_SIZE = 112
TOKENS_PER_SECOND = 2


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary pairs over (t, h, w) in the real model's 16:24:24 proportion."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def full_attention_blocks(depth: int) -> list[int]:
    """Every few vision blocks attend globally (real 32-block tower: 7, 15, 23, 31); the rest use windows."""
    step = max(2, depth // 4)
    return list(range(step - 1, depth, step))


def build_config(spec: CheckpointSpec, vocab_size: int) -> Qwen2_5_VLConfig:
    """The model config for `spec`; ids of the vision tokens come from the shared special block."""
    text: TowerSize = spec.text
    vision = spec.vision
    if vision is None:
        raise ValueError(f"{spec.name}: a qwen2_5_vl checkpoint needs a vision tower size")
    pad_id = special_token_id(PAD_TOKEN)
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text.hidden,
            "intermediate_size": text.intermediate,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "num_key_value_heads": text.kv_heads or text.heads,
            "max_position_embeddings": MAX_LENGTH,
            "rms_norm_eps": 1e-6,
            "initializer_range": spec.initializer_range,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": ROPE_THETA,
                "mrope_section": mrope_section(text.head_dim),
            },
            "use_sliding_window": False,
            "bos_token_id": pad_id,
            "eos_token_id": special_token_id(EOS_TOKEN),
            "pad_token_id": pad_id,
            "dtype": "float32",
        },
        vision_config={
            "depth": vision.layers,
            "hidden_size": vision.hidden,
            "intermediate_size": vision.intermediate,
            "num_heads": vision.heads,
            "out_hidden_size": text.hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": SPATIAL_MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "window_size": WINDOW_SIZE,
            "fullatt_block_indexes": full_attention_blocks(vision.layers),
            "tokens_per_second": TOKENS_PER_SECOND,
            "initializer_range": spec.initializer_range,
            "dtype": "float32",
        },
        image_token_id=special_token_id("<|image_pad|>"),
        video_token_id=special_token_id("<|video_pad|>"),
        vision_start_token_id=special_token_id("<|vision_start|>"),
        vision_end_token_id=special_token_id("<|vision_end|>"),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_processor() -> Qwen2_5_VLProcessor:
    """Real processor classes with their default settings, plus the tiny tokenizer and chat template."""
    chat_template = load_chat_template(FAMILY)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=PATCH_SIZE, merge_size=SPATIAL_MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE
        ),
        video_processor=Qwen2VLVideoProcessor(
            patch_size=PATCH_SIZE, merge_size=SPATIAL_MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE
        ),
        tokenizer=build_tokenizer(chat_template),
        chat_template=chat_template,
    )


def generation_config() -> GenerationConfig:
    """Greedy by default (no sampling settings), stopping at the end of a turn or of a document."""
    pad_id = special_token_id(PAD_TOKEN)
    return GenerationConfig(
        bos_token_id=pad_id,
        eos_token_id=[special_token_id(EOS_TOKEN), pad_id],
        pad_token_id=pad_id,
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete `from_pretrained`-loadable checkpoint for `spec` into `out_dir`."""
    processor = build_processor()
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Qwen2_5_VLForConditionalGeneration, config, seed=spec.seed)
    model.generation_config = generation_config()
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError(f"{spec.name}: expected fp32 weights")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    attach_time_series_adapter(spec, out_dir, llm_hidden_size=spec.text.hidden)
