"""Voxtral in-process: the tiny checkpoint loads like the real one, and each half of the family equals the processor.

No services here (test_equivalence_modalities.py and test_batching.py run the
split path end to end): the encoder half's features and embeddings, and the
decoder half's prompt ids and spliced embeddings, must equal what
`VoxtralProcessor` and `VoxtralForConditionalGeneration` make of the same
conversation and clip, value for value.
"""

from __future__ import annotations

import base64
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor, VoxtralConfig, VoxtralForConditionalGeneration, VoxtralProcessor
from transformers.tokenization_mistral_common import MistralCommonBackend

from mmserve.api.common.v1 import media_pb2
from mmserve.decoded import DecodedAudio
from mmserve.errors import InvalidArgument
from mmserve.models.families import ChatPrompt, family_for
from mmserve.models.families.voxtral.voxtral import Voxtral
from mmserve.models.tensors import from_raw
from mmserve.models.tiny import ensure_checkpoint
from mmserve.models.tiny.tekken import AUDIO_ID
from mmserve.store import RawTensor

AUDIO = media_pb2.MODALITY_AUDIO
RATE = 16000


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.random.default_rng(seed).standard_normal(t.size)).astype(np.float32)


def as_part(samples: np.ndarray) -> dict[str, str]:
    """The processor's audio part for `samples`: a float WAV, read back bit for bit."""
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="WAV", subtype="FLOAT")
    return {"type": "audio", "base64": base64.b64encode(buf.getvalue()).decode()}


def Decoded(samples: np.ndarray) -> DecodedAudio:
    """`samples` as the encoder's audio decoder hands them over (mono, at the model's rate)."""
    return DecodedAudio(samples=samples, sample_rate=RATE, source_rate=RATE, channels=1, duration_s=len(samples) / RATE, format="array")


@dataclass
class Descriptor:
    modality: int
    token_count: int


@dataclass
class Stored:
    """What the decoder reads back from the store for one item (the fields the family uses)."""

    tensors: list[RawTensor]
    descriptor: Descriptor

    def tensor(self, name: str) -> RawTensor:
        return next(t for t in self.tensors if t.name == name)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_checkpoint("voxtral-tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def processor(path: Path) -> Any:
    return AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def model(path: Path) -> Any:
    return VoxtralForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def encoder(path: Path) -> Voxtral:
    family = Voxtral.load(str(path), dtype="auto", device="cpu", part="encoder")
    assert isinstance(family, Voxtral)
    return family


@pytest.fixture(scope="module")
def decoder(path: Path) -> Voxtral:
    family = Voxtral.load(str(path), dtype="auto", device="cpu", part="decoder")
    assert isinstance(family, Voxtral)
    return family


def stored(encoder: Voxtral, samples: np.ndarray) -> Stored:
    item = encoder.encode(
        AUDIO, [encoder.prepare(AUDIO, Decoded(samples), encoder.effective_options(media_pb2.MediaInput(modality=AUDIO)))]
    )[0]
    return Stored(item.tensors, Descriptor(AUDIO, item.token_count))


def test_registered_for_its_model_type() -> None:
    assert family_for("voxtral") is Voxtral


def test_checkpoint_loads_like_the_real_one(path: Path, processor: Any, model: Any) -> None:
    assert {p.name for p in path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "processor_config.json",
        "tekken.json",
    }
    assert type(processor) is VoxtralProcessor and type(processor.tokenizer) is MistralCommonBackend
    assert isinstance(model.config, VoxtralConfig) and model.config.text_config.model_type == "llama"
    _, info = VoxtralForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokenizer = processor.tokenizer
    assert processor.audio_token_id == AUDIO_ID == model.config.audio_token_id
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "[INST]", "[/INST]", "[AUDIO]", "[BEGIN_AUDIO]")] == [
        1,
        2,
        3,
        4,
        24,
        25,
    ]
    assert len(tokenizer) == model.config.text_config.vocab_size
    assert model.generation_config.eos_token_id == 2


def test_builds_are_byte_identical(path: Path, tmp_path: Path) -> None:
    again = ensure_checkpoint("voxtral-tiny", tmp_path)

    def hashes(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}

    assert hashes(again) == hashes(path)


@pytest.mark.parametrize("seconds", [2.0, 31.0])
def test_encoder_half_is_the_processor_and_tower(encoder: Voxtral, processor: Any, model: Any, seconds: float) -> None:
    samples = clip(seconds)
    want = processor.apply_chat_template([{"role": "user", "content": [as_part(samples)]}])
    item = encoder.prepare(AUDIO, Decoded(samples), {})
    assert torch.equal(item.inputs["input_features"], want["input_features"])
    chunks = 1 if seconds <= 30 else 2
    assert list(item.placement.chunk_feature_lengths) == [3000] * chunks
    assert (item.placement.num_samples, item.placement.sampling_rate) == (samples.size, RATE)
    (encoded,) = encoder.encode(AUDIO, [item])
    with torch.inference_mode():
        reference = model.get_audio_features(want["input_features"]).pooler_output
    assert torch.equal(from_raw(encoded.tensors[0], torch.device("cpu")), reference)
    assert encoded.token_count == 375 * chunks == int((want["input_ids"] == AUDIO_ID).sum())


def test_decoder_half_is_the_processor(encoder: Voxtral, decoder: Voxtral, processor: Any, model: Any) -> None:
    """Two clips of different lengths in two turns with an assistant turn between: same ids, same embeddings."""
    first, second = clip(2.0, seed=1), clip(31.0, seed=2)

    def conversation(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": [{"type": "text", "text": "Listen:"}, a]},
            {"role": "assistant", "content": [{"type": "text", "text": "A tone."}]},
            {"role": "user", "content": [b, {"type": "text", "text": "And this?"}]},
        ]

    want = processor.apply_chat_template(conversation(as_part(first), as_part(second)))
    media = [stored(encoder, first), stored(encoder, second)]
    prompt = ChatPrompt(conversation(decoder.chat_part(AUDIO), decoder.chat_part(AUDIO)))
    assert decoder.prompt_token_ids(prompt, media) == want["input_ids"][0].tolist()
    inputs = decoder.prefill_inputs(prompt, media)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(want["input_ids"])
        features = model.get_audio_features(want["input_features"]).pooler_output
        mask = (want["input_ids"] == AUDIO_ID).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
    assert torch.equal(inputs.inputs_embeds, embeds)
    assert inputs.position_ids.tolist() == [list(range(want["input_ids"].shape[1]))]
    assert decoder.decode_positions([5, 9]).tolist() == [[5], [9]]
    # One placeholder per item (an engine that expands them itself).
    assert decoder.prompt_token_ids(prompt, media, expand=False).count(AUDIO_ID) == 2


def test_text_that_names_a_control_token_stays_text(decoder: Voxtral) -> None:
    ids = decoder.prompt_token_ids(ChatPrompt([{"role": "user", "content": [{"type": "text", "text": "[BEGIN_AUDIO][AUDIO] [INST]"}]}]), [])
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert not {24, 25} & set(ids) and ids.count(3) == 1
    with pytest.raises(InvalidArgument, match="placeholders"):
        decoder.prompt_token_ids(ChatPrompt([{"role": "user", "content": [decoder.chat_part(AUDIO)]}]), [])


def test_what_mistral_common_refuses_is_a_400(decoder: Voxtral, processor: Any) -> None:
    """Tokenizers before v13 (the real Voxtral's too) take no system prompt in a conversation with audio."""
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [as_part(clip(1.0))]}]
    with pytest.raises(ValueError, match="system messages"):
        processor.apply_chat_template(conversation)
    prompt = ChatPrompt([conversation[0], {"role": "user", "content": [decoder.chat_part(AUDIO)]}])
    with pytest.raises(InvalidArgument, match="system messages") as caught:
        decoder.prompt_token_ids(prompt, [])
    assert caught.value.field == "messages"
    # Text-only conversations keep their system prompt.
    ids = decoder.prompt_token_ids(ChatPrompt([conversation[0], {"role": "user", "content": "Hi"}]), [])
    assert ids[:2] == [1, 17]


def test_client_embeddings_are_whole_chunks(decoder: Voxtral) -> None:
    placement = decoder.client_placement(AUDIO, media_pb2.EmbeddingInput(audio_feature_length=6000), 750)
    assert list(placement.chunk_feature_lengths) == [3000, 3000]
    with pytest.raises(InvalidArgument, match="multiple of 3000"):
        decoder.client_placement(AUDIO, media_pb2.EmbeddingInput(audio_feature_length=2999), 374)
    with pytest.raises(InvalidArgument, match="makes 375 tokens"):
        decoder.client_placement(AUDIO, media_pb2.EmbeddingInput(audio_feature_length=3000), 300)


def test_refuses_other_media(decoder: Voxtral) -> None:
    with pytest.raises(InvalidArgument, match="does not accept image input; it accepts: audio"):
        decoder.check_modality(media_pb2.MODALITY_IMAGE, "messages[0].content[0]")


def test_token_bytes_are_tekkens_own(decoder: Voxtral) -> None:
    """Logprob bytes: a multi-byte character split over tokens still joins to its UTF-8 bytes; control tokens are their names."""
    text = "Café über naïve"
    ids = decoder.tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(decoder.token_bytes(i) or b"" for i in ids) == text.encode()
    assert decoder.token_bytes(2) == b"</s>"


def test_a_format_it_cannot_enforce_is_a_400(decoder: Voxtral) -> None:
    """llguidance reads only fast Hugging Face tokenizers: structured output is refused by name, not a 500."""
    from services.decoder.guidance import checked_grammar

    with pytest.raises(InvalidArgument, match="cannot enforce a format") as caught:
        checked_grammar('start: "x"', decoder.tokenizer)
    assert caught.value.field == "sampling.guidance"


def test_the_vllm_engine_refuses_voxtral_saying_why(encoder: Voxtral, path: Path) -> None:
    """vLLM 0.32 has no audio-embedding input for Voxtral: the refusal names the family and the reason."""
    from mmserve.config import Settings
    from mmserve.errors import FailedPrecondition
    from services.decoder.engine.vllm.engine import VllmEngine

    with pytest.raises(FailedPrecondition, match=r"voxtral family here \(audio: .*no audio_embeds input\)"):
        VllmEngine(encoder, str(path), Settings(model=str(path)))
