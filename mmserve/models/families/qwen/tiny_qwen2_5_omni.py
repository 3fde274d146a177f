"""Tiny Qwen2.5-Omni checkpoints: the THINKER (vision + audio towers + LLM), small sizes, random weights.

Laid out like the real `Qwen/Qwen2.5-Omni-*` checkpoints: a full Omni config
(`model_type: qwen2_5_omni`, `enable_audio_output: false`) whose weights are
the thinker's, under the `thinker.` prefix. Load it exactly as a real one:
`Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path)` (which
reads `thinker_config` and strips the prefix) and `AutoProcessor`. The talker
and token2wav (speech output) are left out: they play no part in text output,
and the full `Qwen2_5OmniForConditionalGeneration` class is not meant to load
this folder (it also wants the real checkpoint's `spk_dict.pt`).

Kept from the real model: window-attention vision tower (patch 14, merge 2,
temporal patch 2), Whisper-style audio tower (128 mel bins, 2 s attention
windows, 1500 positions), M-RoPE with 25 temporal positions per second, the
real processor settings (WhisperFeatureExtractor padding to 300 s like the
real preprocessor_config.json, image pixel budget, 0.48/0.27 CLIP mean/std).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    WhisperFeatureExtractor,
)

from mmserve.models.families.qwen.tiny_qwen2_5_vl import full_attention_blocks
from mmserve.models.tiny import common
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec
from mmserve.models.tiny.tokenizer import special_token_id

FAMILY = "qwen2_5_omni"
ROPE_THETA = 1_000_000.0
MROPE_TEMPORAL_EIGHTHS = 2  # Qwen2.5-VL's 16:24:24 split of the rotary pairs over (t, h, w)
PATCHING = common.Patching(patch_size=14, merge_size=2, temporal_patch_size=2)
WINDOW_SIZE = 112
POSITION_ID_PER_SECONDS = 25
SECONDS_PER_CHUNK = 2
# Audio front end of the real checkpoints: 16 kHz, 128 mel bins, 10 ms hop, padded to 300 s.
SAMPLING_RATE = 16000
NUM_MEL_BINS = 128
CHUNK_LENGTH_S = 300
MAX_SOURCE_POSITIONS = 1500
AUDIO_WINDOW = 100  # n_window: attention runs over 2 * 100 mel frames (2 s) at a time
IMAGE_SIZE = {"shortest_edge": 3136, "longest_edge": 12845056}  # min_pixels / max_pixels of the real image processor
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Tokenizer attributes Qwen2_5OmniProcessor reads.
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}


def build_thinker_config(spec: CheckpointSpec, vocab_size: int) -> dict[str, object]:
    vision, audio = common.required_tower(spec, "vision"), common.required_tower(spec, "audio")
    return {
        "text_config": common.text_config(
            spec,
            vocab_size,
            rope_parameters=common.mrope_parameters(ROPE_THETA, common.mrope_section(spec.text.head_dim, MROPE_TEMPORAL_EIGHTHS)),
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
        "vision_config": common.vision_config(
            spec,
            PATCHING,
            window_size=WINDOW_SIZE,
            fullatt_block_indexes=full_attention_blocks(vision.layers),
        ),
        "audio_config": {
            "num_mel_bins": NUM_MEL_BINS,
            "encoder_layers": audio.layers,
            "encoder_attention_heads": audio.heads,
            "encoder_ffn_dim": audio.intermediate,
            "d_model": audio.hidden,
            "output_dim": spec.text.hidden,
            "max_source_positions": MAX_SOURCE_POSITIONS,
            "n_window": AUDIO_WINDOW,
            "initializer_range": spec.initializer_range,
            "dtype": "float32",
        },
        "image_token_index": special_token_id("<|IMAGE|>"),
        "video_token_index": special_token_id("<|VIDEO|>"),
        "audio_token_index": special_token_id("<|AUDIO|>"),
        "audio_start_token_id": special_token_id("<|audio_bos|>"),
        "audio_end_token_id": special_token_id("<|audio_eos|>"),
        # Not declared by the config class, but read by get_rope_index (the real config carries both).
        "vision_start_token_id": special_token_id("<|vision_bos|>"),
        "vision_end_token_id": special_token_id("<|vision_eos|>"),
        "position_id_per_seconds": POSITION_ID_PER_SECONDS,
        "seconds_per_chunk": SECONDS_PER_CHUNK,
        "initializer_range": spec.initializer_range,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def build_config(spec: CheckpointSpec, vocab_size: int) -> Qwen2_5OmniConfig:
    """A full Omni config, speech output disabled: only the thinker gets weights."""
    return Qwen2_5OmniConfig(
        thinker_config=build_thinker_config(spec, vocab_size),
        enable_audio_output=False,
        dtype="float32",
    )


def build_processor() -> Qwen2_5OmniProcessor:
    """The real processor classes with the real checkpoint's settings, the tiny tokenizer and the template.

    The video processor keeps its class defaults; `Qwen2_5OmniProcessor` itself supplies the real video
    pixel budget (128..768 merged tokens' worth of pixels per frame) and 2 fps for `video_second_per_grid`.
    """
    # Shared by the image and the video processor; only the image one gets a pixel budget here.
    pixels: dict[str, Any] = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, **PATCHING.processor_kwargs()}
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=dict(IMAGE_SIZE), **pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=NUM_MEL_BINS,
            sampling_rate=SAMPLING_RATE,
            hop_length=160,
            n_fft=400,
            chunk_length=CHUNK_LENGTH_S,
            padding_value=0.0,
            padding_side="right",
            return_attention_mask=True,
        ),
        **common.text_processing(FAMILY, named_tokens=NAMED_TOKENS),
    )


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete checkpoint for `spec` into `out_dir` (thinker weights, processor, adapter)."""
    processor = build_processor()
    config = build_config(spec, vocab_size=len(processor.tokenizer))
    model = random_model(Qwen2_5OmniForConditionalGeneration, config, seed=spec.seed)
    model.thinker.generation_config = common.generation_config()  # save_checkpoint sets the outer model's
    common.save_checkpoint(spec, out_dir, model, processor)
