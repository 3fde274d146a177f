"""The correctness bar for every family and modality, through the OpenAI SDK.

For Qwen2.5-VL, Qwen3-VL, the Qwen2.5-Omni thinker, Gemma 3 and Voxtral, greedy output of the
split path (gateway -> decoder -> encoder -> Redis -> decoder) for video,
audio and time-series prompts, and for a mixed two-turn conversation, must
equal the monolithic transformers model on the same inputs, text for text:
`model.generate(**processor(...), do_sample=False)` for the media transformers
knows (Voxtral: the processor's `apply_chat_template`, which encodes chat and audio together), and for time series (no transformers reference exists) the adapter's
own in-process forward spliced into `model.generate(inputs_embeds=...)`.

"The same inputs": the reference is given the frames, waveform and series that
mmserve's loaders produced from the same files (decoding is tested on its own
in test_*_decode.py); what is compared here is the model computation split
across services against the monolithic one.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from mmserve.config import Settings
from mmserve.localredis import LocalRedis
from services.encoder.media.audio import decode_audio
from services.encoder.media.budget import RequestBudget
from services.encoder.media.timeseries import load_time_series
from services.encoder.media.video import DecodedVideo, decode_video
from tests.conftest import CACHE_DIR, Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import Reference, data_url, png_bytes

MAX_TOKENS = 16
FAMILIES = {
    "qwen2_5_vl": "qwen2_5_vl-tiny",
    "qwen3_vl": "qwen3_vl-tiny",
    "qwen2_5_omni": "qwen2_5_omni-tiny",
    "gemma3": "gemma3-tiny",
    "voxtral": "voxtral-tiny",
}
#: The media each family takes (time series: through the adapter its checkpoint carries).
MODALITIES = {
    "qwen2_5_vl": ("image", "video", "time_series"),
    "qwen3_vl": ("image", "video", "time_series"),
    "qwen2_5_omni": ("image", "video", "audio", "time_series"),
    "gemma3": ("image", "time_series"),
    "voxtral": ("audio",),
}


def families_taking(modality: str) -> list[str]:
    """The families that take `modality`."""
    return [family for family, media in MODALITIES.items() if modality in media]


SETTINGS = Settings()
VIDEO_IO = {"video": {"fps": 2, "num_frames": 8}}


def mp4_bytes(frames: int = 8, fps: int = 4, width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(seed)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def wav_bytes(seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.random.default_rng(seed).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def npy_bytes(samples: int = 600, channels: int = 2, seed: int = 0) -> bytes:
    t = np.arange(samples)[:, None] / 100.0
    values = np.sin(2 * np.pi * t * np.array([[1.0, 3.0]])[:, :channels]) + 0.2 * np.random.default_rng(seed).standard_normal(
        (samples, channels)
    )
    buf = io.BytesIO()
    np.save(buf, values.astype(np.float32))
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def float_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A 32-bit float WAV of `samples`: read back bit for bit."""
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


VIDEO, AUDIO, SERIES, IMAGE = mp4_bytes(), wav_bytes(), npy_bytes(), png_bytes(128, 96, seed=11)


def decoded_video(data: bytes = VIDEO) -> DecodedVideo:
    return decode_video(data, settings=SETTINGS, budget=RequestBudget.from_settings(SETTINGS), fps=2.0, num_frames=8)


class FamilyReference(Reference):
    """The monolithic model of one family, fed what mmserve's loaders made of the same files."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.path = path

    def media_kwargs(self, images: list[bytes] = (), videos: list[bytes] = (), audios: list[bytes] = ()) -> dict:  # type: ignore[assignment]
        from PIL import Image
        from transformers.video_utils import VideoMetadata

        kwargs: dict = {}
        if images:
            kwargs["images"] = [Image.open(io.BytesIO(p)).convert("RGB") for p in images]
        if videos:
            decoded = [decoded_video(v) for v in videos]
            kwargs["videos"] = [d.frames for d in decoded]
            if self.family == "qwen2_5_omni":
                kwargs["fps"] = decoded[0].sampled_fps
            else:
                kwargs["do_sample_frames"] = False
                kwargs["video_metadata"] = [
                    VideoMetadata(
                        total_num_frames=round(d.duration_s * d.source_fps),
                        fps=d.source_fps,
                        frames_indices=[round(t * d.source_fps) for t in d.timestamps],
                    )
                    for d in decoded
                ]
        if audios:
            kwargs["audio"] = [self.decoded_audio(a) for a in audios]
        return kwargs

    def decoded_audio(self, data: bytes) -> np.ndarray:
        rate = self.processor.feature_extractor.sampling_rate
        return decode_audio(data, settings=SETTINGS, budget=RequestBudget.from_settings(SETTINGS), target_rate=rate, format=None).samples

    def voxtral_inputs(self, conversation: list[dict], audios: list[bytes]) -> dict:
        """Voxtral's processor takes audio inside the chat: each audio part gets its decoded clip, as a float WAV (exact)."""
        clips = iter(audios)
        filled = []
        for message in conversation:
            content = message["content"]
            if isinstance(content, list):
                content = [
                    {"type": "audio", "base64": b64(float_wav(self.decoded_audio(next(clips))))} if part["type"] == "audio" else part
                    for part in content
                ]
            filled.append({**message, "content": content})
        return self.processor.apply_chat_template(filled)

    def generate_media(self, conversation: list[dict], **media: list[bytes]) -> str:
        if self.family == "voxtral":
            inputs = self.voxtral_inputs(conversation, media.get("audios", []))
        else:
            text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(text=[text], return_tensors="pt", **self.media_kwargs(**media))
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=MAX_TOKENS)
        return self._text(out[0, inputs["input_ids"].shape[1] :].tolist())

    def generate_series(self, question: str, series: bytes, rate: float) -> str:
        """Time series: the adapter's own forward on the raw series, spliced into the prompt embeddings."""
        from mmserve.models.time_series_adapter import TimeSeriesAdapter

        adapter = TimeSeriesAdapter.from_pretrained(self.path / "time_series").eval()
        c = adapter.config
        loaded = load_time_series(series, settings=SETTINGS, sampling_rate=rate, format=None, mime=None)
        with torch.inference_mode():
            feats = adapter(torch.from_numpy(loaded.values), rate)
        marker = c.start_token + c.placeholder_token + c.end_token
        conversation = [{"role": "user", "content": [{"type": "text", "text": marker}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        text = text.replace(c.placeholder_token, c.placeholder_token * feats.shape[0])
        tokenizer = self.processor.tokenizer
        bos_written = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)  # Gemma's template writes <bos>
        ids = tokenizer([text], return_tensors="pt", add_special_tokens=not bos_written)["input_ids"]
        with torch.inference_mode():
            embeds = self.model.get_input_embeddings()(ids)
            mask = ids == self.processor.tokenizer.convert_tokens_to_ids(c.placeholder_token)
            embeds[mask] = feats.to(embeds.dtype)
            if self.family == "gemma3":  # its generate() takes no inputs_embeds: the same greedy steps through its forward
                return self._text(self._greedy_from_embeds(embeds))
            out = self.model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS)
        return self._text(out[0].tolist())

    def _greedy_from_embeds(self, embeds: torch.Tensor) -> list[int]:
        """Greedy decoding with the model's own forward and cache: the prompt as embeddings, then one token at a time, to EOS."""
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        out = self.model(inputs_embeds=embeds, use_cache=True)
        tokens: list[int] = []
        while True:
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in eos or len(tokens) == MAX_TOKENS:
                return tokens
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    def _text(self, ids: list[int]) -> str:
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos)
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def stacks(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[dict[str, Stack]]:
    """One in-process stack per family (started on first use), all on one Redis: fingerprints keep them apart."""
    started: dict[str, Stack] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Stack:
            self[family] = started[family] = start_inprocess_stack(inprocess, module_redis.url, model=f"tiny:{FAMILIES[family]}")
            return started[family]

    yield Lazy()
    for stack in started.values():
        stack.stop()


@pytest.fixture(scope="module")
def references() -> dict[str, FamilyReference]:
    from mmserve.models.tiny import ensure_checkpoint

    class Lazy(dict):
        def __missing__(self, family: str) -> FamilyReference:
            self[family] = FamilyReference(ensure_checkpoint(FAMILIES[family], CACHE_DIR))
            return self[family]

    return Lazy()


def ask(stack: Stack, content: list[dict], **extra: object) -> str:
    reply = stack.client().chat.completions.create(
        model="", messages=[{"role": "user", "content": content}], temperature=0, max_completion_tokens=MAX_TOKENS, extra_body=extra or None
    )
    return reply.choices[0].message.content or ""


def assert_informative(text: str) -> None:
    assert len(set(text)) > 5, f"degenerate output {text!r}: the comparison could not fail"


@pytest.mark.parametrize("family", families_taking("image"))
def test_image(stacks: dict[str, Stack], references: dict[str, FamilyReference], family: str) -> None:
    want = references[family].generate_media(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}], images=[IMAGE]
    )
    assert_informative(want)
    got = ask(stacks[family], [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}, {"type": "text", "text": "What is this?"}])
    assert got == want


@pytest.mark.parametrize("family", families_taking("video"))
def test_video(stacks: dict[str, Stack], references: dict[str, FamilyReference], family: str) -> None:
    want = references[family].generate_media(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}], videos=[VIDEO]
    )
    assert_informative(want)
    got = ask(
        stacks[family],
        [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(VIDEO)}"}}, {"type": "text", "text": "What happens?"}],
        media_io_kwargs=VIDEO_IO,
    )
    assert got == want


@pytest.mark.parametrize("family", families_taking("audio"))
def test_audio(stacks: dict[str, Stack], references: dict[str, FamilyReference], family: str) -> None:
    want = references[family].generate_media(
        [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is said?"}]}], audios=[AUDIO]
    )
    assert_informative(want)
    via_input_audio = ask(
        stacks[family],
        [{"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}}, {"type": "text", "text": "What is said?"}],
    )
    via_url = ask(
        stacks[family],
        [{"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64(AUDIO)}"}}, {"type": "text", "text": "What is said?"}],
    )
    assert via_input_audio == via_url == want


def test_voxtral_two_turns_with_two_clips(stacks: dict[str, Stack], references: dict[str, FamilyReference]) -> None:
    """Two clips in different turns (one longer than a 30 s chunk: two chunks), an assistant turn between them."""
    long_clip = wav_bytes(seconds=31.0, seed=5)
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Listen:"}, {"type": "audio"}]},
        {"role": "assistant", "content": "I heard a tone."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this one?"}]},
    ]
    want = references["voxtral"].generate_media(conversation, audios=[AUDIO, long_clip])
    assert_informative(want)
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Listen:"}, {"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}}],
        },
        {"role": "assistant", "content": "I heard a tone."},
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": b64(long_clip), "format": "wav"}},
                {"type": "text", "text": "And this one?"},
            ],
        },
    ]
    reply = stacks["voxtral"].client().chat.completions.create(model="", messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == want


@pytest.mark.parametrize("family", families_taking("time_series"))
def test_time_series(stacks: dict[str, Stack], references: dict[str, FamilyReference], family: str) -> None:
    want = references[family].generate_series("Describe the trend.", SERIES, 100.0)
    assert_informative(want)
    got = ask(
        stacks[family],
        [
            {
                "type": "time_series_url",
                "time_series_url": {"url": f"data:application/octet-stream;base64,{b64(SERIES)}", "sampling_rate": 100},
            },
            {"type": "text", "text": "Describe the trend."},
        ],
    )
    assert got == want


def test_mixed_two_turn_conversation(stacks: dict[str, Stack], references: dict[str, FamilyReference]) -> None:
    """Image, video, audio and text interleaved, two user turns with an assistant turn between."""
    image2 = png_bytes(120, 80, seed=8)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                {"type": "image"},
                {"type": "text", "text": "then"},
                {"type": "video"},
                {"type": "text", "text": "and listen"},
                {"type": "audio"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "I saw and heard them."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is this the same as the first?"}]},
    ]
    want = references["qwen2_5_omni"].generate_media(conversation, images=[IMAGE, image2], videos=[VIDEO], audios=[AUDIO])
    assert_informative(want)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                {"type": "text", "text": "then"},
                {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{b64(VIDEO)}"}},
                {"type": "text", "text": "and listen"},
                {"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}},
            ],
        },
        {"role": "assistant", "content": "I saw and heard them."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image2)}},
                {"type": "text", "text": "Is this the same as the first?"},
            ],
        },
    ]
    reply = (
        stacks["qwen2_5_omni"]
        .client()
        .chat.completions.create(
            model="", messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS, extra_body={"media_io_kwargs": VIDEO_IO}
        )
    )
    assert reply.choices[0].message.content == want


def test_a_modality_the_model_cannot_take_is_a_clear_400(stacks: dict[str, Stack]) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        ask(stacks["qwen2_5_vl"], [{"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}}])
    error = caught.value.response.json()["error"]
    assert error["param"] == "messages[0].content[0]"
    assert "does not accept audio" in error["message"] and "image" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(stacks["voxtral"], [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}])
    error = caught.value.response.json()["error"]
    assert error["param"] == "messages[0].content[1]"
    assert "does not accept image" in error["message"] and "audio" in error["message"]


def test_gemma3_two_images_a_system_prompt_and_two_turns(stacks: dict[str, Stack], references: dict[str, FamilyReference]) -> None:
    """Two images in one turn (two bidirectional blocks), a system prompt folded into the first turn, a second turn,
    and a prompt longer than the tiny model's sliding window."""
    image2 = png_bytes(120, 80, seed=8)
    question = "Compare the two pictures and tell me which one has more red in it, and why you think so. " * 2
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}, {"type": "text", "text": question}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
        {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
    ]
    ref = references["gemma3"]
    want = ref.generate_media(conversation, images=[IMAGE, image2])
    assert_informative(want)
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                {"type": "text", "text": "versus"},
                {"type": "image_url", "image_url": {"url": data_url(image2)}},
                {"type": "text", "text": question},
            ],
        },
        {"role": "assistant", "content": "The first."},
        {"role": "user", "content": "Are you sure?"},
    ]
    reply = stacks["gemma3"].client().chat.completions.create(model="", messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS)
    assert reply.usage.prompt_tokens > 2 * ref.model.config.text_config.sliding_window
    assert reply.choices[0].message.content == want
