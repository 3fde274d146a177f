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
from typing import Any

from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from mmserve.models.tiny import common
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec

FAMILY = "qwen3_vl"
ROPE_THETA = 5_000_000.0
MROPE_TEMPORAL_EIGHTHS = 3  # the real 24:20:20 split of the rotary pairs over (t, h, w)
PATCHING = common.Patching(patch_size=16, merge_size=2, temporal_patch_size=2)
NUM_POSITION_EMBEDDINGS = 2304  # 48 x 48 learned grid, bilinearly resampled to each image
NORM_MEAN_STD = [0.5, 0.5, 0.5]
# Processor budgets of the real checkpoints (preprocessor_config.json / video_preprocessor_config.json).
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


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
    vision = common.required_tower(spec, "vision")
    deepstack = deepstack_layers(vision.layers)
    if len(deepstack) > text.layers:
        raise ValueError(f"{spec.name}: {len(deepstack)} DeepStack layers need as many LLM layers")
    return Qwen3VLConfig(
        text_config=common.text_config(
            spec,
            vocab_size,
            rope_parameters=common.mrope_parameters(
                ROPE_THETA, common.mrope_section(text.head_dim, MROPE_TEMPORAL_EIGHTHS), mrope_interleaved=True
            ),
            head_dim=text.head_dim,
        ),
        vision_config=common.vision_config(
            spec,
            PATCHING,
            num_position_embeddings=NUM_POSITION_EMBEDDINGS,
            deepstack_visual_indexes=deepstack,
            hidden_act="gelu_pytorch_tanh",
        ),
        **common.vl_token_ids(),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_processor() -> Qwen3VLProcessor:
    """The real processor classes with the real checkpoints' settings, the tiny tokenizer and the template."""
    # Shared by the image and the video processor; only their pixel budgets differ.
    pixels: dict[str, Any] = {"image_mean": NORM_MEAN_STD, "image_std": NORM_MEAN_STD, **PATCHING.processor_kwargs()}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(IMAGE_SIZE), **pixels),
        video_processor=Qwen3VLVideoProcessor(size=dict(VIDEO_SIZE), **pixels),
        **common.text_processing(FAMILY),
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete `from_pretrained`-loadable checkpoint for `spec` into `out_dir`."""
    processor = build_processor()
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Qwen3VLForConditionalGeneration, config, seed=spec.seed)
    common.save_checkpoint(spec, out_dir, model, processor)
