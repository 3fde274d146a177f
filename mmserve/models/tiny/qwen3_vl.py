"""Tiny Qwen3-VL checkpoints: the real architecture and processor, small sizes, random weights.

Kept from the real model: DeepStack (merged features of several vision blocks
added to the first LLM layers' hidden states at the visual positions),
interleaved M-RoPE (`mrope_interleaved`, 24:20:20 split of the rotary pairs),
explicit `head_dim`, patch 16 / merge 2 / temporal patch 2, a learned
48x48 vision position grid, and the real processor settings (image and video
pixel budgets, 0.5 mean/std, 2 fps sampling, per-frame timestamps written into
the prompt by `Qwen3VLProcessor`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from mmserve.models.tiny.chat_templates import load_chat_template
from mmserve.models.tiny.qwen2_5_vl import generation_config
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec
from mmserve.models.tiny.time_series import attach_time_series_adapter
from mmserve.models.tiny.tokenizer import EOS_TOKEN, MAX_LENGTH, PAD_TOKEN, build_tokenizer, special_token_id

FAMILY = "qwen3_vl"
ROPE_THETA = 5_000_000.0
PATCH_SIZE = 16
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
NUM_POSITION_EMBEDDINGS = 2304  # 48 x 48 learned grid, bilinearly resampled to each image
NORM_MEAN_STD = [0.5, 0.5, 0.5]
# Processor budgets of the real checkpoints (preprocessor_config.json / video_preprocessor_config.json).
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


def mrope_section(head_dim: int) -> list[int]:
    """head_dim/2 rotary pairs over (t, h, w) in the real 24:20:20 proportion (128 -> [24, 20, 20])."""
    half = head_dim // 2
    temporal = half * 3 // 8
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def deepstack_layers(depth: int) -> list[int]:
    """Vision blocks whose output feeds DeepStack: up to 3, spread over the tower, never the last block.

    The real 27-block tower uses [8, 16, 24]; a 3-block tiny tower uses [0, 1].
    """
    count = min(3, depth - 1)
    if count < 2:
        raise ValueError("Qwen3-VL tiny towers need depth >= 3 for two DeepStack layers")
    step = (depth - 1) / count
    return sorted({max(0, round(step * (i + 1)) - 1) for i in range(count)})


def build_config(spec: CheckpointSpec, vocab_size: int) -> Qwen3VLConfig:
    text = spec.text
    vision = spec.vision
    if vision is None:
        raise ValueError(f"{spec.name}: a qwen3_vl checkpoint needs a vision tower size")
    pad_id = special_token_id(PAD_TOKEN)
    deepstack = deepstack_layers(vision.layers)
    if len(deepstack) > text.layers:
        raise ValueError(f"{spec.name}: {len(deepstack)} DeepStack layers need as many LLM layers")
    return Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text.hidden,
            "intermediate_size": text.intermediate,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "num_key_value_heads": text.kv_heads or text.heads,
            "head_dim": text.head_dim,
            "max_position_embeddings": MAX_LENGTH,
            "rms_norm_eps": 1e-6,
            "initializer_range": spec.initializer_range,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": ROPE_THETA,
                "mrope_section": mrope_section(text.head_dim),
                "mrope_interleaved": True,
            },
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
            "num_position_embeddings": NUM_POSITION_EMBEDDINGS,
            "deepstack_visual_indexes": deepstack,
            "hidden_act": "gelu_pytorch_tanh",
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


def build_processor() -> Qwen3VLProcessor:
    """The real processor classes with the real checkpoints' settings, the tiny tokenizer and the template."""
    chat_template = load_chat_template(FAMILY)
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=dict(IMAGE_SIZE),
            image_mean=NORM_MEAN_STD,
            image_std=NORM_MEAN_STD,
            patch_size=PATCH_SIZE,
            merge_size=SPATIAL_MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
        ),
        video_processor=Qwen3VLVideoProcessor(
            size=dict(VIDEO_SIZE),
            image_mean=NORM_MEAN_STD,
            image_std=NORM_MEAN_STD,
            patch_size=PATCH_SIZE,
            merge_size=SPATIAL_MERGE_SIZE,
            temporal_patch_size=TEMPORAL_PATCH_SIZE,
        ),
        tokenizer=build_tokenizer(chat_template),
        chat_template=chat_template,
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete `from_pretrained`-loadable checkpoint for `spec` into `out_dir`."""
    processor = build_processor()
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Qwen3VLForConditionalGeneration, config, seed=spec.seed)
    model.generation_config = generation_config()
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise RuntimeError(f"{spec.name}: expected fp32 weights")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    attach_time_series_adapter(spec, out_dir, llm_hidden_size=spec.text.hidden)
