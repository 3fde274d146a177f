"""Tiny Gemma 3 (image + text) checkpoints: the real architecture and processor, small sizes, random weights.

Every structural choice of `google/gemma-3-*-it` is kept: a SigLIP vision tower
without its pooling head, the multimodal projector (RMS norm + average pool to
`mm_tokens_per_image` tokens + projection), scaled token embeddings,
sliding-window layers between full-attention ones with their own rope
base, q/k norms, `query_pre_attn_scalar`; and the processor's fixed square
resize and `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n` expansion.
Sizes shrink, and so does the sliding window, so that the test prompts are
longer than it and the window is exercised. One departure: the lm_head is not
tied to the token embeddings. With random weights the residual stream is
mostly the input token's (sqrt(hidden)-scaled) embedding, so a tied head
predicts the input token again and greedy output repeats one token: a test
could not fail on it. And the projector's weight, which transformers
initializes to zeros (images would embed as zeros and change nothing), is
drawn like the other weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from mmserve.models.tiny import common
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec
from mmserve.models.tiny.tokenizer import MAX_LENGTH, PAD_TOKEN, special_token_id

FAMILY = "gemma3"
BOS, EOS = "<bos>", "<end_of_turn>"
BOI, IMAGE_TOKEN, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
#: The tokenizer attributes Gemma3Processor reads.
NAMED_TOKENS = {"boi_token": BOI, "image_token": IMAGE_TOKEN, "eoi_token": EOI}
PATCH_SIZE = 14
NORM_MEAN_STD = [0.5, 0.5, 0.5]  # the real image processor's mean and std
#: The real models have 1 full-attention layer in 6; the window shrinks with the model (the real one is 1024).
FULL_ATTENTION_EVERY = 6
ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
#: The projector weight's own random stream (the time-series adapter uses offset 1).
PROJECTION_SEED_OFFSET = 2
#: Per tier: (image side in pixels, image tokens, sliding window). The real models: 896 px, 256 tokens, 1024.
SHAPES = {"tiny": (112, 16, 32), "mid": (224, 64, 256)}


def layer_types(layers: int) -> list[str]:
    """Every `FULL_ATTENTION_EVERY`-th layer attends globally, the last one too when the model is shorter than that."""
    types = ["full_attention" if (i + 1) % FULL_ATTENTION_EVERY == 0 else "sliding_attention" for i in range(layers)]
    if "full_attention" not in types:
        types[-1] = "full_attention"
    return types


def _shape(spec: CheckpointSpec) -> tuple[int, int, int]:
    return SHAPES[spec.name.removeprefix(f"{FAMILY}-")]


def build_config(spec: CheckpointSpec, vocab_size: int) -> Gemma3Config:
    """The model config for `spec`; the image token ids come from the shared special block."""
    text, vision = spec.text, common.required_tower(spec, "vision")
    image_size, tokens, window = _shape(spec)
    text_config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=text.hidden,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        num_key_value_heads=text.kv_heads or text.heads,
        head_dim=text.head_dim,
        query_pre_attn_scalar=text.head_dim,
        max_position_embeddings=MAX_LENGTH,
        sliding_window=window,
        layer_types=layer_types(text.layers),
        rope_parameters={kind: dict(params) for kind, params in ROPE.items()},
        initializer_range=spec.initializer_range,
        bos_token_id=special_token_id(BOS),
        eos_token_id=special_token_id(EOS),
        pad_token_id=special_token_id(PAD_TOKEN),
        tie_word_embeddings=False,
        dtype="float32",
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
        dtype="float32",
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=tokens,
        boi_token_index=special_token_id(BOI),
        eoi_token_index=special_token_id(EOI),
        image_token_index=special_token_id(IMAGE_TOKEN),
        initializer_range=spec.initializer_range,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build_processor(spec: CheckpointSpec) -> Gemma3Processor:
    """The real processor classes with the real checkpoints' settings at this size, the tiny tokenizer and template."""
    image_size, tokens, _ = _shape(spec)
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": image_size, "width": image_size}, image_mean=NORM_MEAN_STD, image_std=NORM_MEAN_STD
        ),
        image_seq_length=tokens,
        **common.text_processing(FAMILY, named_tokens=NAMED_TOKENS, eos_token=EOS, bos_token=BOS),
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete `from_pretrained`-loadable checkpoint for `spec` into `out_dir`."""
    processor = build_processor(spec)
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Gemma3ForConditionalGeneration, config, seed=spec.seed)
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    generator = torch.Generator().manual_seed(spec.seed + PROJECTION_SEED_OFFSET)
    with torch.no_grad():
        projection.copy_(torch.randn(projection.shape, generator=generator) * spec.initializer_range)
    common.save_checkpoint(spec, out_dir, model, processor, common.generation_config(EOS, BOS))
