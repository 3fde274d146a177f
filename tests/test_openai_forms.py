"""The request forms real OpenAI and vLLM clients send, and the values no server can represent.

Through the real stack (encoder, decoder, gateway of the tiny Qwen2.5-Omni
thinker: image, video and audio) with the official `openai` SDK:

* unrepresentable values (integers wider than their protobuf field, a lone
  UTF-16 surrogate in any string, a part `type` that is not a string, wrong
  JSON types inside a part) are 400s whose `param` names the field, never 500s;
* vLLM's forms: a video as a frame-list data URL, `{}` + uuid for a stored
  item, Ogg bytes labelled "wav";
* an image's `detail` (low / high / auto) as the pixel budget.

A lone surrogate cannot be sent with the SDK (it fails to encode the body as
UTF-8 before sending), so those requests are posted as raw JSON with httpx,
as a client with its own JSON encoder would send them.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from PIL import Image

from mmserve.api.common.v1 import media_pb2
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from tests.conftest import Stack
from tests.support import data_url, encoder_stub, png_bytes, scrape

ENCODE_OK = 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}'
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(inprocess_omni_stack: Stack) -> Stack:
    """The Omni thinker's stack (in-process): the one tiny model that takes images, video and audio."""
    return inprocess_omni_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str, **payload: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **payload}}


def chat(client: openai.OpenAI, content: Any, **kwargs: Any) -> Any:
    """One greedy user turn (12 tokens unless told otherwise)."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_completion_tokens", 12)
    return client.chat.completions.create(model="", messages=[{"role": "user", "content": content}], **kwargs)


def api_error(call: Callable[[], Any], status: int = 400) -> dict[str, Any]:
    """Run an SDK call that must fail with `status` in the OpenAI error shape; return the error object."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert info.value.status_code == status, body
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def post_raw(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST `body` as ASCII JSON (`\\ud800` stays an escape, as any JSON encoder may write it)."""
    raw = json.dumps(body, ensure_ascii=True).encode("ascii")
    return httpx.post(f"{stack.gateway.base_url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)


def encode_count(stack: Stack) -> float:
    return scrape(stack.encoder.metrics_url).get(ENCODE_OK, 0.0)


def jpeg_frames(count: int, *, size: tuple[int, int] = (64, 48), seed: int = 0) -> list[bytes]:
    """`count` noisy JPEG frames of one size."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


def frame_list_url(frames: list[bytes], mime: str = "video/jpeg") -> str:
    """vLLM's frame-list form: `data:video/jpeg;base64,<frame>,<frame>,...`."""
    return f"data:{mime};base64," + ",".join(base64.b64encode(f).decode() for f in frames)


def video(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def ogg_bytes(seconds: float = 0.5, rate: int = 16000, seed: int = 0) -> bytes:
    """A real Ogg Vorbis file of a noisy tone."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.05
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32), rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()


def input_audio(data: bytes, fmt: str) -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


# --- values that cannot be represented ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        ("seed", 2**64, UINT64_MAX),
        ("max_tokens", 2**32, UINT32_MAX),
        ("max_completion_tokens", 2**32, UINT32_MAX),
        ("top_k", 2**40, UINT32_MAX),
        ("n", 2**70, 16),
    ],
)
def test_integers_wider_than_their_field_are_400_naming_it(client: openai.OpenAI, name: str, value: int, bound: int) -> None:
    kwargs: dict[str, Any] = {"extra_body": {name: value}} if name == "top_k" else {name: value}
    if name == "max_tokens":
        kwargs["max_completion_tokens"] = None
    err = api_error(lambda: chat(client, "Hi", **kwargs))
    assert err["param"] == name and err["type"] == "invalid_request_error", err
    assert str(bound) in err["message"], err


def test_the_widest_representable_values_still_work(client: openai.OpenAI) -> None:
    """The bounds are the fields' widths, not lower: uint64 seed and uint32 top_k reach the decoder and are honoured."""
    a = chat(client, "Hi", seed=UINT64_MAX, temperature=1, extra_body={"top_k": UINT32_MAX})
    b = chat(client, "Hi", seed=UINT64_MAX, temperature=1, extra_body={"top_k": UINT32_MAX})
    assert a.choices[0].message.content == b.choices[0].message.content and a.usage.completion_tokens > 0
    err = api_error(lambda: chat(client, "Hi", max_completion_tokens=UINT32_MAX))
    assert err["param"] == "max_completion_tokens" and "context" in err["message"]  # refused by the model, not the schema


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]},
            "messages[0].content[0].text",
        ),
        ("/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\ud800"]}, "stop[1]"),
        (
            "/chat/completions",
            {"messages": [{"role": "system", "content": "be \ud83d"}, {"role": "user", "content": "hi"}]},
            "messages[0].content",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": None, "uuid": "id-\ud800"}]}]},
            "messages[0].content[0].uuid",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/\ud800.png"}}]}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            "/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "media_io_kwargs": {"image": {"rgba_background_color": "\ud800"}}},
            "media_io_kwargs.image.rgba_background_color",
        ),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "x-\ud800": 1}, "x-\\ud800"),
        (
            "/mm/encode",
            {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,\ud800"}}]},
            "content[0].image_url.url",
        ),
        ("/mm/encode", {"content": [{"type": "image_url", "image_url": None, "uuid": "\udc00"}]}, "content[0].uuid"),
    ],
)
def test_a_lone_surrogate_in_any_string_is_400_naming_its_path(stack: Stack, path: str, body: dict[str, Any], param: str) -> None:
    reply = post_raw(stack, path, body)
    assert reply.status_code == 400, reply.text
    reply.content.decode("utf-8")  # the error itself is valid UTF-8 (the surrogate is not echoed raw)
    error = reply.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error
    assert error["type"] == "invalid_request_error" and reply.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("kind", [["text"], {"type": "text"}, 7, None, True])
def test_a_part_type_that_is_not_a_string_is_400_naming_it(stack: Stack, client: openai.OpenAI, kind: Any) -> None:
    err = api_error(lambda: chat(client, [text("Look:"), {"type": kind, "text": "x"}]))
    assert err["param"] == "messages[0].content[1].type" and "must be a string" in err["message"], err
    reply = httpx.post(f"{stack.gateway.base_url}/mm/encode", json={"content": [{"type": kind}]}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "content[0].type", reply.text


@pytest.mark.parametrize(
    ("part", "param", "words"),
    [
        (7, "messages[0].content[1]", ["object"]),
        ("just a string", "messages[0].content[1]", ["object"]),
        ({"type": "text", "text": ["x"]}, "messages[0].content[1]", ["text must be a string"]),
        ({"type": "image_url", "image_url": ["https://example.com/a.png"]}, "messages[0].content[1]", ["url"]),
        ({"type": "image_url", "image_url": {"url": 5}}, "messages[0].content[1]", ["url"]),
        ({"type": "image_url", "image_url": None, "uuid": 12}, "messages[0].content[1]", ["uuid must be a string"]),
        (
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": ["low"]}},
            "messages[0].content[1].image_url.detail",
            ["low, high, auto"],
        ),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": ["wav"]}}, "messages[0].content[1]", ["format"]),
        ({"type": "input_audio", "input_audio": "AAAA"}, "messages[0].content[1]", ["input_audio must be"]),
        ({"type": "input_audio", "input_audio": {"data": 5, "format": "wav"}}, "messages[0].content[1]", ["input_audio must be"]),
        ({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, "media_io_kwargs.video.fps", ["too large"]),
    ],
)
def test_wrong_json_types_inside_a_part_are_400_naming_it(client: openai.OpenAI, part: Any, param: str, words: list[str]) -> None:
    extra = {"media_io_kwargs": {"video": {"fps": 10**400}}} if param.startswith("media_io_kwargs") else None
    err = api_error(lambda: chat(client, [text("Look:"), part], extra_body=extra))
    assert err["param"] == param, err
    for word in words:
        assert word in err["message"], err


def test_union_fields_name_the_field_not_the_union_member(client: openai.OpenAI) -> None:
    err = api_error(lambda: chat(client, "Hi", stop=5))
    assert err["param"] == "stop", err
    err = api_error(lambda: client.chat.completions.create(model="", messages=[{"role": "user", "content": 5}]))
    assert err["param"] == "messages[0].content", err


# --- vLLM's forms --------------------------------------------------------------------------------


def test_frame_list_video_is_the_same_video_as_its_frames(stack: Stack, client: openai.OpenAI) -> None:
    """vLLM's `data:video/jpeg;base64,<f>,<f>,...` is these frames as a video: same identity, tokens and answer as gRPC VideoFrames."""
    frames = jpeg_frames(4, seed=11)
    question = text("What happens in this video?")
    got = chat(client, [question, video(frame_list_url(frames))])
    assert got.choices[0].message.content and got.usage.completion_tokens > 0

    item = media_pb2.MediaInput(
        modality=media_pb2.MODALITY_VIDEO, source=media_pb2.MediaSource(frames=media_pb2.VideoFrames(frames=frames, fps=2.0))
    )
    with encoder_stub(stack.encoder.target) as enc:
        result = enc.Encode(enc_pb.EncodeRequest(items=[item])).results[0]
    assert result.cached, "the frame list and the same frames over gRPC are one embedding (the chat stored it)"
    t, h, w = result.embedding.video.grid_thw
    assert t == len(frames) // 2  # temporal patches of 2 frames: every frame of the list is in the video
    assert result.embedding.token_count == t * h * w // 4

    by_frames = chat(client, [question, {"type": "video_url", "video_url": None, "uuid": result.embedding.id}])
    assert by_frames.choices[0].message.content == got.choices[0].message.content
    assert by_frames.usage.prompt_tokens == got.usage.prompt_tokens
    text_only = chat(client, [question])
    assert got.usage.prompt_tokens - text_only.usage.prompt_tokens >= result.embedding.token_count

    longer = chat(client, [question, video(frame_list_url(jpeg_frames(8, seed=11)))])
    per_two_frames = h * w // 4
    assert longer.usage.prompt_tokens - got.usage.prompt_tokens == 2 * per_two_frames  # 4 more frames: 2 more temporal patches


def test_frame_list_errors_name_the_part_before_decoding(client: openai.OpenAI) -> None:
    frames = jpeg_frames(2, seed=12)
    bad = f"data:video/jpeg;base64,{base64.b64encode(frames[0]).decode()},not*base64"
    err = api_error(lambda: chat(client, [text("Look:"), video(bad)]))
    assert err["param"] == "messages[0].content[1]" and "frame 1" in err["message"] and "base64" in err["message"], err
    too_many = frame_list_url(frames[:1] * 769)  # over MMSERVE_VIDEO_MAX_NUM_FRAMES (768)
    err = api_error(lambda: chat(client, [text("Look:"), video(too_many)]))
    assert err["param"] == "messages[0].content[1]" and "769 frames" in err["message"] and "768" in err["message"], err
    mixed = frame_list_url([frames[0], jpeg_frames(1, size=(32, 32))[0]])
    err = api_error(lambda: chat(client, [text("Look:"), video(mixed)]))
    assert err["param"] == "messages[0].content[1]" and "same size" in err["message"], err


def test_empty_object_with_a_uuid_is_the_stored_item(stack: Stack, client: openai.OpenAI) -> None:
    """`"image_url": {}` + uuid (vLLM's form) reuses the stored item exactly as null + uuid does: no encode."""
    png = png_bytes(80, 56, seed=31)
    stored = httpx.post(
        f"{stack.gateway.base_url}/mm/encode",
        timeout=60,
        json={
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png)}, "uuid": "forms-31"},
                {
                    "type": "input_audio",
                    "input_audio": {"data": base64.b64encode(ogg_bytes(seed=31)).decode(), "format": "ogg"},
                    "uuid": "forms-31-audio",
                },
            ]
        },
    )
    assert stored.status_code == 200, stored.text
    question = text("Describe:")
    want = chat(client, [question, image(data_url(png))])
    encodes = encode_count(stack)
    for payload in (None, {}):
        got = chat(client, [question, {"type": "image_url", "image_url": payload, "uuid": "forms-31"}])
        assert got.choices[0].message.content == want.choices[0].message.content, payload
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
    audio = [
        chat(client, [question, {"type": kind, kind: payload, "uuid": "forms-31-audio"}])
        for kind in ("input_audio", "audio_url")
        for payload in (None, {})
    ]
    assert len({(a.choices[0].message.content, a.usage.prompt_tokens) for a in audio}) == 1
    assert encode_count(stack) == encodes, "a stored item was encoded again"
    err = api_error(lambda: chat(client, [question, {"type": "image_url", "image_url": {}}]))
    assert err["param"] == "messages[0].content[1]" and "uuid" in err["message"], err


def test_a_bare_url_string_stays_accepted_for_image_url(client: openai.OpenAI) -> None:
    """docs/inputs.md section 1: `"image_url": "<url>"` is the same image as `{"url": "<url>"}`; input_audio must be an object."""
    url = data_url(png_bytes(64, 64, seed=41))
    assert chat(client, [text("Look:"), {"type": "image_url", "image_url": url}]).choices[0].message.content == (
        chat(client, [text("Look:"), image(url)]).choices[0].message.content
    )
    err = api_error(lambda: chat(client, [text("Hear:"), {"type": "input_audio", "input_audio": "AAAA"}]))
    assert err["param"] == "messages[0].content[1]"


def test_ogg_labelled_wav_is_decoded_as_ogg(stack: Stack, client: openai.OpenAI, caplog: pytest.LogCaptureFixture) -> None:
    """vLLM's example client sends Ogg Vorbis as `"format": "wav"`: decoded by what the bytes are, and logged by the encoder."""
    ogg = ogg_bytes(seed=51)
    assert ogg[:4] == b"OggS"
    question = text("Transcribe:")
    caplog.set_level(logging.INFO, logger="services.encoder")
    labelled_wav = chat(client, [question, input_audio(ogg, "wav")])
    honest = chat(client, [question, input_audio(ogg, "ogg")])
    assert labelled_wav.choices[0].message.content == honest.choices[0].message.content
    assert labelled_wav.usage.prompt_tokens == honest.usage.prompt_tokens
    assert any(r.name.startswith("services.encoder.") and "audio labelled wav is ogg" in r.getMessage() for r in caplog.records)
    err = api_error(lambda: chat(client, [question, input_audio(b"no audio here " * 16, "wav")]))
    assert err["param"] == "messages[0].content[1]" and "not a recognised audio format" in err["message"], err
    err = api_error(lambda: chat(client, [question, input_audio(ogg, "aiff")]))
    assert err["param"] == "messages[0].content[1]" and "wav, mp3, flac, ogg" in err["message"], err


# --- image detail -----------------------------------------------------------------------------


def test_detail_low_is_a_smaller_pixel_budget(client: openai.OpenAI) -> None:
    url = data_url(png_bytes(700, 700, seed=61))
    question = text("Describe:")
    tokens = {
        detail: chat(client, [question, image(url, **({"detail": detail} if detail else {}))], max_completion_tokens=2).usage.prompt_tokens
        for detail in (None, "auto", "high", "low")
    }
    assert tokens[None] == tokens["auto"] == tokens["high"]
    base = chat(client, [question], max_completion_tokens=2).usage.prompt_tokens
    assert tokens["high"] - base >= 625  # 700 x 700 at 28 x 28 pixels per token
    assert tokens["low"] - base <= 256 + 2 < tokens["high"] - base  # at most 256 * 28 * 28 pixels (+ vision start/end)
    small = data_url(png_bytes(112, 112, seed=62))  # already under the low budget: detail changes nothing
    assert (
        chat(client, [question, image(small, detail="low")]).usage.prompt_tokens
        == chat(client, [question, image(small)]).usage.prompt_tokens
    )


def test_an_unknown_detail_is_400_naming_it(client: openai.OpenAI) -> None:
    err = api_error(lambda: chat(client, [text("Look:"), text("and"), image(data_url(png_bytes(seed=63)), detail="medium")]))
    assert err["param"] == "messages[0].content[2].image_url.detail" and "low, high, auto" in err["message"], err
    err = api_error(lambda: chat(client, [{"type": "image_url", "image_url": {"detail": "ultra"}, "uuid": "forms-31"}]))
    assert err["param"] == "messages[0].content[0].image_url.detail", err
