"""Tiny Qwen2.5-VL checkpoints: the real architecture and processor, small sizes, random weights.

Sizes shrink but every structural choice of the real model is kept (window
attention with some full-attention vision blocks, M-RoPE, untied lm_head,
patch 14 / merge 2 / temporal patch 2) so code written against these
checkpoints runs unchanged on `Qwen/Qwen2.5-VL-*`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from mmserve.models.tiny import common
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec

FAMILY = "qwen2_5_vl"
ROPE_THETA = 1_000_000.0
MROPE_TEMPORAL_EIGHTHS = 2  # the real model's 16:24:24 split of the rotary pairs over (t, h, w)
# As in the real vision tower: patch 14 px, 2x2 patches merged into one LLM
# token, 2 frames per temporal patch, 112 px attention windows, 2 M-RoPE
# temporal positions per second of video.
PATCHING = common.Patching(patch_size=14, merge_size=2, temporal_patch_size=2)
WINDOW_SIZE = 112
TOKENS_PER_SECOND = 2


def full_attention_blocks(depth: int) -> list[int]:
    """Every few vision blocks attend globally (real 32-block tower: 7, 15, 23, 31); the rest use windows."""
    step = max(2, depth // 4)
    return list(range(step - 1, depth, step))


def build_config(spec: CheckpointSpec, vocab_size: int) -> Qwen2_5_VLConfig:
    """The model config for `spec`; ids of the vision tokens come from the shared special block."""
    vision = common.required_tower(spec, "vision")
    return Qwen2_5_VLConfig(
        text_config=common.text_config(
            spec,
            vocab_size,
            rope_parameters=common.mrope_parameters(ROPE_THETA, common.mrope_section(spec.text.head_dim, MROPE_TEMPORAL_EIGHTHS)),
            use_sliding_window=False,
        ),
        vision_config=common.vision_config(
            spec,
            PATCHING,
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=full_attention_blocks(vision.layers),
            tokens_per_second=TOKENS_PER_SECOND,
        ),
        **common.vl_token_ids(),
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_processor() -> Qwen2_5_VLProcessor:
    """Real processor classes with their default settings, plus the tiny tokenizer and chat template."""
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**PATCHING.processor_kwargs()),
        video_processor=Qwen2VLVideoProcessor(**PATCHING.processor_kwargs()),
        **common.text_processing(FAMILY),
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete `from_pretrained`-loadable checkpoint for `spec` into `out_dir`."""
    processor = build_processor()
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Qwen2_5_VLForConditionalGeneration, config, seed=spec.seed)
    common.save_checkpoint(spec, out_dir, model, processor)
