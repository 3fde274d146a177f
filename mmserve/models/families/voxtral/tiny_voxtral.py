"""Tiny Voxtral checkpoints: Whisper-style audio encoder + projector + Llama LM, small sizes, random weights.

Laid out like `mistralai/Voxtral-Mini-3B-2507`: `config.json` (`model_type:
voxtral`), the weights, `preprocessor_config.json` (the WhisperFeatureExtractor)
and `tekken.json` (the tokenizer, `tekken.py`); `AutoProcessor` gives a
`VoxtralProcessor` over `MistralCommonBackend`, as for the real model.

Kept from the real model: 16 kHz audio, 128 mel bins, 10 ms hop, 30 s chunks
of 3000 frames (1500 encoder positions after the stride-2 conv), 4 encoder
frames stacked per LLM token (the projector takes `intermediate_size` = 4 x
the encoder width), so 12.5 audio tokens per second and 375 per chunk; the
same frame rate in `tekken.json`'s audio section; an untied lm_head; rope
theta 1e8. No time-series adapter: its placeholder tokens belong to the shared
Qwen-style vocabulary, not to Tekken.
"""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig, VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor, WhisperFeatureExtractor
from transformers.tokenization_mistral_common import MistralCommonBackend

from mmserve.models.tiny import common, tekken
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec
from mmserve.models.tiny.tokenizer import MAX_LENGTH

FAMILY = "voxtral"
ROPE_THETA = 100_000_000.0
SAMPLING_RATE = 16000
NUM_MEL_BINS = 128
HOP_LENGTH = 160
N_FFT = 400
CHUNK_LENGTH_S = 30
MAX_SOURCE_POSITIONS = 1500  # encoder positions per chunk: 3000 mel frames after the stride-2 conv
FRAME_RATE = 12.5  # audio tokens per second
FRAMES_PER_TOKEN = 4  # encoder frames stacked into one projector input


def tekken_audio() -> dict[str, object]:
    """`tekken.json`'s audio section: what mistral_common pads a clip to and how many tokens it counts."""
    return {
        "sampling_rate": SAMPLING_RATE,
        "frame_rate": FRAME_RATE,
        "audio_encoding_config": {"num_mel_bins": NUM_MEL_BINS, "hop_length": HOP_LENGTH, "window_size": N_FFT},
        "chunk_length_s": float(CHUNK_LENGTH_S),
    }


def build_config(spec: CheckpointSpec) -> VoxtralConfig:
    text, audio = spec.text, common.required_tower(spec, "audio")
    if audio.intermediate != FRAMES_PER_TOKEN * audio.hidden:
        raise ValueError(
            f"{spec.name}: the projector stacks {FRAMES_PER_TOKEN} frames: audio intermediate must be {FRAMES_PER_TOKEN} x hidden"
        )
    return VoxtralConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": tekken.vocab_size(),
            "hidden_size": text.hidden,
            "intermediate_size": text.intermediate,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "num_key_value_heads": text.kv_heads or text.heads,
            "head_dim": text.head_dim,
            "max_position_embeddings": MAX_LENGTH,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
            "initializer_range": spec.initializer_range,
            "tie_word_embeddings": False,
            "bos_token_id": tekken.BOS_ID,
            "eos_token_id": tekken.EOS_ID,
            "pad_token_id": tekken.PAD_ID,
            "dtype": "float32",
        },
        audio_config={
            "model_type": "voxtral_encoder",
            "hidden_size": audio.hidden,
            "intermediate_size": audio.intermediate,
            "num_hidden_layers": audio.layers,
            "num_attention_heads": audio.heads,
            "num_mel_bins": NUM_MEL_BINS,
            "max_source_positions": MAX_SOURCE_POSITIONS,
            "initializer_range": spec.initializer_range,
            "dtype": "float32",
        },
        audio_token_id=tekken.AUDIO_ID,
        projector_hidden_act="gelu",
        dtype="float32",
    )


def build_processor(out_dir: Path) -> VoxtralProcessor:
    """The real processor classes: a WhisperFeatureExtractor with the real settings and the tiny `tekken.json`."""
    path = tekken.write_tekken(out_dir, tekken_audio())
    return VoxtralProcessor(
        feature_extractor=WhisperFeatureExtractor(
            feature_size=NUM_MEL_BINS,
            sampling_rate=SAMPLING_RATE,
            hop_length=HOP_LENGTH,
            n_fft=N_FFT,
            chunk_length=CHUNK_LENGTH_S,
            padding_value=0.0,
            return_attention_mask=False,
        ),
        tokenizer=MistralCommonBackend(tokenizer_path=str(path)),
    )


def generation_config() -> GenerationConfig:
    """Greedy by default, stopping at `</s>` (Mistral models end a turn with eos)."""
    return GenerationConfig(bos_token_id=tekken.BOS_ID, eos_token_id=tekken.EOS_ID, pad_token_id=tekken.PAD_ID)


def build(spec: CheckpointSpec, out_dir: Path) -> None:
    """Write a complete checkpoint for `spec` into `out_dir` (weights, feature extractor, tekken.json)."""
    processor = build_processor(out_dir)
    model = random_model(VoxtralForConditionalGeneration, build_config(spec), seed=spec.seed)
    common.save_pretrained(spec, out_dir, model, processor, generation_config())
