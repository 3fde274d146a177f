"""Hostile input against the live stack: never a 5xx, never INTERNAL, errors name the field, nothing dies.

One stack for the module (short header/body deadlines, so the slow-loris
tests are quick). REST bodies are sent as raw bytes with httpx (wrong types at
every level, huge and non-finite numbers, deep nesting, invalid UTF-8, lone
surrogates, duplicate keys, wrong content types, bad data URLs, redirects to
other schemes); gRPC messages go straight to the decoder and the encoder
(unknown enum values, edge numbers, missing fields, undecodable bytes).
After the tables, every process must still be alive and healthy.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from mmserve.api.common.v1 import media_pb2, tensor_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.launcher import ServiceProcess
from mmserve.localredis import LocalRedis, free_port
from mmserve.rpc.health import wait_serving
from mmserve.stack import wait_http_ok
from tests.conftest import CACHE_DIR, TINY, MediaServer, Stack, StartService, start_stack
from tests.support import data_url, encoder_stub, png_bytes, rpc_error

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 3.0
PNG = data_url(png_bytes(seed=1300))
U = "messages[0].content[0]"  # the first part of the one user message


@pytest.fixture(scope="module")
def hostile(start_service: StartService, module_redis: LocalRedis) -> Iterator[Stack]:
    stack = start_stack(
        start_service,
        module_redis.url,
        MMSERVE_GATEWAY_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        MMSERVE_GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    )
    yield stack
    stack.stop()


def user(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


def part(kind: str, payload: Any) -> list[dict[str, Any]]:
    return [{"type": kind, kind: payload}]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- the REST table: (id, raw body, content type, param the error must name or None) ---------------

_J = "application/json"
REST: list[tuple[str, bytes | str | dict[str, Any], str, str | None]] = [
    # whole-body shapes
    ("empty", b"", _J, None),
    ("null", "null", _J, None),
    ("array", "[]", _J, None),
    ("string", '"x"', _J, None),
    ("number", "1", _J, None),
    ("truncated", '{"messages": [', _J, None),
    ("trailing-garbage", '{"messages": []} x', _J, None),
    ("invalid-utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xfd"}]}', _J, None),
    ("utf16-bom", '{"messages": []}'.encode("utf-16"), _J, None),
    ("text-plain", json.dumps(user("Hi")), "text/plain", None),
    ("form", "messages=hi", "application/x-www-form-urlencoded", None),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x", None),
    ("no-content-type", json.dumps(user("Hi")), "", None),
    ("deep-array", '{"messages": [{"role": "user", "content": "Hi"}], "metadata": ' + deep(100_000) + "}", _J, None),
    ("deep-object", '{"messages": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}", _J, None),
    ("deep-content", '{"messages": [{"role": "user", "content": ' + deep(5000) + "}]}", _J, None),
    ("duplicate-keys", '{"messages": [{"role": "user", "content": "Hi"}], "messages": 5, "max_tokens": 2}', _J, "messages"),
    ("lone-surrogate-text", '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', _J, "messages[0].content"),
    ("lone-surrogate-parts", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}], "max_tokens": 2}', _J, U),
    ("lone-surrogate-stop", '{"messages": [{"role": "user", "content": "Hi"}], "stop": "\\ud83d", "max_tokens": 2}', _J, "stop"),
    ("lone-surrogate-model", '{"model": "\\ud800", "messages": [{"role": "user", "content": "Hi"}]}', _J, "model"),
    ("lone-surrogate-url", json.dumps(user(part("image_url", {"url": "http://x/"}))).replace("x/", "\\ud800"), _J, U),
    ("nan-temperature", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', _J, "temperature"),
    ("inf-top-p", '{"messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}', _J, "top_p"),
    ("neg-inf-penalty", '{"messages": [{"role": "user", "content": "Hi"}], "presence_penalty": -Infinity}', _J, "presence_penalty"),
    ("nan-max-tokens", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": NaN}', _J, "max_tokens"),
    ("1e400-temperature", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}', _J, "temperature"),
    ("huge-int-max-tokens", '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ' + "9" * 4000 + "}", _J, "max_tokens"),
    # wrong types at every level
    ("messages-string", {"messages": "hi"}, _J, "messages"),
    ("messages-null", {"messages": None}, _J, "messages"),
    ("messages-object", {"messages": {}}, _J, "messages"),
    ("messages-empty", {"messages": []}, _J, "messages"),
    ("message-string", {"messages": ["hi"]}, _J, "messages[0]"),
    ("message-number", {"messages": [7]}, _J, "messages[0]"),
    ("role-number", {"messages": [{"role": 1, "content": "Hi"}]}, _J, "messages[0]"),
    ("role-unknown", {"messages": [{"role": "wizard", "content": "Hi"}]}, _J, "messages[0]"),
    ("role-missing", {"messages": [{"content": "Hi"}]}, _J, "messages[0]"),
    ("content-number", user(5), _J, "messages[0]"),
    ("content-object", user({}), _J, "messages[0]"),
    ("part-number", user([5]), _J, U),
    ("part-empty", user([{}]), _J, U),
    ("part-type-number", user([{"type": 5}]), _J, U),
    ("part-unknown-type", user([{"type": "hologram", "hologram": {}}]), _J, U),
    ("text-number", user([{"type": "text", "text": 5}]), _J, U),
    ("text-missing", user([{"type": "text"}]), _J, U),
    ("image-url-number", user(part("image_url", 5)), _J, U),
    ("image-url-url-number", user(part("image_url", {"url": 5})), _J, U),
    ("image-url-empty", user(part("image_url", {"url": ""})), _J, U),
    ("image-url-list", user(part("image_url", [PNG])), _J, U),
    ("image-detail-bogus", user(part("image_url", {"url": PNG, "detail": "ultra"})), _J, U),
    ("image-uuid-number", user([{"type": "image_url", "image_url": {"url": PNG}, "uuid": 5}]), _J, U),
    ("max-tokens-string", {**user("Hi"), "max_tokens": "2"}, _J, None),
    ("max-tokens-negative", {**user("Hi"), "max_tokens": -1}, _J, "max_tokens"),
    ("max-tokens-2-64", {**user("Hi"), "max_tokens": 2**64}, _J, "max_tokens"),
    ("max-tokens-float", {**user("Hi"), "max_tokens": 1.5}, _J, "max_tokens"),
    ("max-tokens-bool", {**user("Hi"), "max_tokens": True}, _J, None),
    ("max-completion-tokens-huge", {**user("Hi"), "max_completion_tokens": 10**30}, _J, "max_completion_tokens"),
    ("temperature-string", {**user("Hi"), "temperature": "hot"}, _J, "temperature"),
    ("temperature-3", {**user("Hi"), "temperature": 3}, _J, "temperature"),
    ("top-p-0", {**user("Hi"), "top_p": 0}, _J, "top_p"),
    ("n-0", {**user("Hi"), "n": 0}, _J, "n"),
    ("n-2-31", {**user("Hi"), "n": 2**31}, _J, "n"),
    ("seed-2-64", {**user("Hi"), "seed": 2**64}, _J, "seed"),
    ("seed-negative-huge", {**user("Hi"), "seed": -(2**70)}, _J, "seed"),
    ("seed-float", {**user("Hi"), "seed": 1e30}, _J, "seed"),
    ("top-k-huge", {**user("Hi"), "top_k": 2**40}, _J, "top_k"),
    ("top-k-negative", {**user("Hi"), "top_k": -5}, _J, "top_k"),
    ("stop-number", {**user("Hi"), "stop": 5}, _J, "stop"),
    ("stop-list-number", {**user("Hi"), "stop": [1]}, _J, "stop"),
    ("stop-five", {**user("Hi"), "stop": ["a", "b", "c", "d", "e"]}, _J, "stop"),
    ("stop-empty", {**user("Hi"), "stop": [""]}, _J, "stop"),
    ("stream-string", {**user("Hi"), "stream": "yes"}, _J, None),
    ("stream-options-string", {**user("Hi"), "stream": True, "stream_options": "x"}, _J, "stream_options"),
    ("logit-bias-key", {**user("Hi"), "logit_bias": {"x": 1}}, _J, "logit_bias"),
    ("logit-bias-value", {**user("Hi"), "logit_bias": {"1": 1000}}, _J, "logit_bias"),
    ("logit-bias-huge-token", {**user("Hi"), "logit_bias": {"99999999999999": 1}}, _J, "logit_bias"),
    ("logit-bias-negative-token", {**user("Hi"), "logit_bias": {"-3": 1}}, _J, "logit_bias"),
    ("logprobs-huge", {**user("Hi"), "logprobs": True, "top_logprobs": 10**6}, _J, "top_logprobs"),
    ("response-format-string", {**user("Hi"), "response_format": "json"}, _J, "response_format"),
    ("response-format-bogus", {**user("Hi"), "response_format": {"type": "yaml"}}, _J, "response_format"),
    ("json-schema-missing", {**user("Hi"), "response_format": {"type": "json_schema"}}, _J, "response_format"),
    (
        "json-schema-not-schema",
        {**user("Hi"), "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
        _J,
        "response_format",
    ),
    ("tools-string", {**user("Hi"), "tools": "x"}, _J, "tools"),
    ("tools-no-function", {**user("Hi"), "tools": [{"type": "function"}]}, _J, "tools[0]"),
    ("tool-name-number", {**user("Hi"), "tools": [{"type": "function", "function": {"name": 5}}]}, _J, "tools[0]"),
    ("tool-choice-number", {**user("Hi"), "tool_choice": 5}, _J, "tool_choice"),
    ("tool-choice-unknown-tool", {**user("Hi"), "tool_choice": {"type": "function", "function": {"name": "nope"}}}, _J, "tool_choice"),
    ("media-io-kwargs-string", {**user("Hi"), "media_io_kwargs": "x"}, _J, "media_io_kwargs"),
    ("media-io-kwargs-frames", {**user(part("video_url", {"url": PNG})), "media_io_kwargs": {"video": {"num_frames": -1}}}, _J, None),
    ("media-io-kwargs-fps-huge", {**user(part("video_url", {"url": PNG})), "media_io_kwargs": {"video": {"fps": 1e308}}}, _J, None),
    ("mm-processor-kwargs-number", {**user("Hi"), "mm_processor_kwargs": 1}, _J, "mm_processor_kwargs"),
    ("min-pixels-huge", {**user(part("image_url", {"url": PNG})), "mm_processor_kwargs": {"min_pixels": 2**70}}, _J, None),
    ("max-pixels-negative", {**user(part("image_url", {"url": PNG})), "mm_processor_kwargs": {"max_pixels": -1}}, _J, None),
    # huge arrays within the body limit
    ("many-messages", {"messages": [{"role": "user", "content": "a"}] * 50_000, "max_tokens": 2}, _J, None),
    ("many-parts", user([{"type": "text", "text": "a"}] * 50_000), _J, None),
    ("many-images", user([{"type": "image_url", "image_url": {"url": PNG}}] * 200), _J, "messages"),
    ("many-stops", {**user("Hi"), "stop": ["x"] * 50_000}, _J, "stop"),
    ("many-logit-bias", {**user("Hi"), "logit_bias": {str(i): 1 for i in range(50_000)}}, _J, "logit_bias"),
    ("many-tools", {**user("Hi"), "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(20_000)]}, _J, None),
    ("long-text", user("word " * 400_000), _J, None),
    # bad data URLs and media payloads
    ("b64-bad-chars", user(part("image_url", {"url": "data:image/png;base64,!!!!"})), _J, U),
    ("b64-bad-padding", user(part("image_url", {"url": "data:image/png;base64,AAA"})), _J, U),
    ("b64-whitespace", user(part("image_url", {"url": "data:image/png;base64,AA AA"})), _J, U),
    ("b64-not-base64", user(part("image_url", {"url": "data:image/png,rawbytes"})), _J, U),
    ("b64-empty", user(part("image_url", {"url": "data:image/png;base64,"})), _J, U),
    ("b64-no-comma", user(part("image_url", {"url": "data:image/png;base64"})), _J, U),
    ("b64-not-an-image", user(part("image_url", {"url": data_url(b"hello world")})), _J, U),
    ("b64-truncated-png", user(part("image_url", {"url": data_url(png_bytes(seed=1301)[:200])})), _J, U),
    ("frame-list-bad", user(part("video_url", {"url": "data:video/jpeg;base64,AAAA,,!!"})), _J, U),
    ("video-not-a-video", user(part("video_url", {"url": data_url(b"\x00" * 64, "video/mp4")})), _J, U),
    ("audio-not-audio", user(part("audio_url", {"url": data_url(b"\x00" * 64, "audio/wav")})), _J, U),
    ("input-audio-bad-b64", user(part("input_audio", {"data": "!!", "format": "wav"})), _J, U),
    ("input-audio-bad-format", user(part("input_audio", {"data": "AAAA", "format": "midi"})), _J, U),
    ("time-series-garbage", user(part("time_series_url", {"url": data_url(b"\xff" * 10, "text/csv")})), _J, U),
    ("scheme-gopher", user(part("image_url", {"url": "gopher://example.com/"})), _J, U),
    ("scheme-file-outside", user(part("image_url", {"url": "file:///etc/passwd"})), _J, U),
    ("url-private", user(part("image_url", {"url": "http://10.0.0.1/x.png"})), _J, U),
    ("url-garbage", user(part("image_url", {"url": "http://[::1"})), _J, U),
    ("url-huge", user(part("image_url", {"url": "http://example.invalid/" + "a" * 100_000})), _J, U),
    ("uuid-huge", user([{"type": "image_url", "image_url": None, "uuid": "u" * 100_000}]), _J, U),
    ("uuid-content-id-forged", user([{"type": "image_url", "image_url": None, "uuid": "mmemb-zzz"}]), _J, U),
]


def _raw(body: bytes | str | dict[str, Any]) -> bytes:
    if isinstance(body, dict):
        return json.dumps(body).encode()
    return body.encode() if isinstance(body, str) else body


def _check_error(response: httpx.Response, param: str | None) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        for leak in ("Traceback", "127.0.0.1", "ipv4:", "/work/", 'File "'):
            assert leak not in error["message"], error
        if param is not None:
            assert (error["param"] or "").startswith(param), error


@pytest.mark.parametrize(("body", "content_type", "param"), [c[1:] for c in REST], ids=[c[0] for c in REST])
def test_hostile_chat_bodies(hostile: Stack, body: Any, content_type: str, param: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{hostile.gateway.base_url}/chat/completions", content=_raw(body), headers=headers, timeout=60)
    _check_error(response, param)
    assert response.status_code != 200 or param is None, response.text[:300]  # a case that names a field must be refused


OTHER_ROUTES: list[tuple[str, str, bytes | str | dict[str, Any], str | None]] = [
    ("completions-prompt-number", "/completions", {"prompt": 5}, "prompt"),
    ("completions-prompt-nested", "/completions", {"prompt": [[[1]]]}, "prompt"),
    ("completions-token-ids-huge", "/completions", {"prompt": [2**40], "max_tokens": 1}, "prompt"),
    ("completions-surrogate", "/completions", '{"prompt": "\\ud800", "max_tokens": 1}', "prompt"),
    ("completions-nan", "/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
    ("encode-empty", "/mm/encode", {"content": []}, "content"),
    ("encode-string", "/mm/encode", {"content": "x"}, "content"),
    ("encode-bad-b64", "/mm/encode", {"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}]}, "content[0]"),
    ("encode-text-part", "/mm/encode", {"content": [{"type": "text", "text": "x"}]}, "content[0]"),
    (
        "encode-surrogate-uuid",
        "/mm/encode",
        '{"content": [{"type": "image_url", "image_url": {"url": "' + PNG + '"}, "uuid": "\\ud800"}]}',
        "content[0]",
    ),
]


@pytest.mark.parametrize(("path", "body", "param"), [c[1:] for c in OTHER_ROUTES], ids=[c[0] for c in OTHER_ROUTES])
def test_hostile_bodies_on_other_routes(hostile: Stack, path: str, body: Any, param: str | None) -> None:
    response = httpx.post(f"{hostile.gateway.base_url}{path}", content=_raw(body), headers={"content-type": _J}, timeout=60)
    _check_error(response, param)
    assert response.status_code >= 400


@pytest.mark.parametrize("embedding_id", ["x" * 20_000, "%00", "..%2F..%2Fetc", "mmemb-" + "z" * 64, "%F0%9F%92%A9", "%ED%A0%80"])
def test_hostile_embedding_ids(hostile: Stack, embedding_id: str) -> None:
    base = hostile.gateway.base_url
    for response in (
        httpx.get(f"{base}/mm/embeddings/{embedding_id}", timeout=30),
        httpx.delete(f"{base}/mm/embeddings/{embedding_id}", timeout=30),
    ):
        _check_error(response, None)


@pytest.mark.parametrize(
    "location",
    [
        "data:image/png;base64,AAAA",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "ftp://example.com/x.png",
        "data:,",
        "//10.0.0.1/x",
    ],
)
def test_redirect_to_another_scheme_is_400_naming_the_part(hostile: Stack, media_server: MediaServer, location: str) -> None:
    url = media_server.redirect(f"/hostile-redirect-{abs(hash(location))}", location)
    body = user([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": url}}])
    response = httpx.post(f"{hostile.gateway.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]", error


# --- the gRPC table -------------------------------------------------------------------------------


def _text_request(**sampling: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="Hi")])],
        sampling=pb.SamplingParams(max_tokens=2, **sampling),
    )


def _media_request(item: media_pb2.MediaInput) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(media=item)])], sampling=pb.SamplingParams(max_tokens=2)
    )


def _image(**fields: Any) -> media_pb2.MediaInput:
    return media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, **fields)


def _with(request: pb.GenerateRequest, **fields: Any) -> pb.GenerateRequest:
    for name, value in fields.items():
        target = getattr(request, name)
        if isinstance(value, list):
            target.extend(value)
        else:
            target.CopyFrom(value)
    return request


IMG = media_pb2.MediaSource(data=png_bytes(seed=1302))
GENERATE: list[tuple[str, pb.GenerateRequest, str | None]] = [
    ("empty", pb.GenerateRequest(), "messages"),
    ("role-unknown-enum", pb.GenerateRequest(messages=[pb.ChatMessage(role=99, content=[pb.ContentPart(text="x")])]), "messages[0].role"),
    ("role-unspecified", pb.GenerateRequest(messages=[pb.ChatMessage(content=[pb.ContentPart(text="x")])]), "messages[0].role"),
    ("role-negative", pb.GenerateRequest(messages=[pb.ChatMessage(role=-1, content=[pb.ContentPart(text="x")])]), "messages[0].role"),
    ("part-empty", pb.GenerateRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart()])]), "messages[0].content[0]"),
    ("no-content", pb.GenerateRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER)]), None),
    ("modality-unknown-enum", _media_request(media_pb2.MediaInput(modality=77, source=IMG)), U),
    ("modality-unspecified", _media_request(media_pb2.MediaInput(source=IMG)), U),
    ("media-no-source", _media_request(_image()), U),
    ("media-empty-url", _media_request(_image(source=media_pb2.MediaSource(url=""))), U),
    ("media-empty-data", _media_request(_image(source=media_pb2.MediaSource(data=b""))), U),
    ("media-garbage-data", _media_request(_image(source=media_pb2.MediaSource(data=b"\x89PNG garbage"))), U),
    ("media-empty-embedding-id", _media_request(_image(source=media_pb2.MediaSource(embedding_id=""))), U),
    ("media-huge-embedding-id", _media_request(_image(source=media_pb2.MediaSource(embedding_id="e" * 1_000_000))), U),
    ("media-huge-uuid", _media_request(_image(uuid="u" * 1_000_000)), U),
    (
        "media-empty-frames",
        _media_request(
            media_pb2.MediaInput(modality=media_pb2.MODALITY_VIDEO, source=media_pb2.MediaSource(frames=media_pb2.VideoFrames()))
        ),
        U,
    ),
    (
        "media-frames-nan-fps",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_VIDEO,
                source=media_pb2.MediaSource(frames=media_pb2.VideoFrames(frames=[png_bytes(seed=1303)], fps=math.nan)),
            )
        ),
        U,
    ),
    (
        "media-array-bad-dtype",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_TIME_SERIES,
                source=media_pb2.MediaSource(array=tensor_pb2.Tensor(dtype=99, shape=[4], data=b"\x00" * 16)),
            )
        ),
        U,
    ),
    (
        "media-array-negative-shape",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_TIME_SERIES,
                source=media_pb2.MediaSource(array=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[-4], data=b"\x00" * 16)),
            )
        ),
        U,
    ),
    (
        "media-array-huge-shape",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_TIME_SERIES,
                source=media_pb2.MediaSource(
                    array=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2**62, 2**62], data=b"\x00" * 16)
                ),
            )
        ),
        U,
    ),
    (
        "media-array-short-data",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_TIME_SERIES,
                source=media_pb2.MediaSource(array=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1000], data=b"\x00" * 3)),
            )
        ),
        U,
    ),
    (
        "media-embeds-garbage",
        _media_request(_image(source=media_pb2.MediaSource(embeds=media_pb2.EmbeddingInput(safetensors=b"\xff" * 64)))),
        U,
    ),
    ("media-embeds-empty", _media_request(_image(source=media_pb2.MediaSource(embeds=media_pb2.EmbeddingInput()))), U),
    (
        "media-embeds-bad-grid",
        _media_request(
            _image(
                source=media_pb2.MediaSource(
                    embeds=media_pb2.EmbeddingInput(
                        tensors=[
                            tensor_pb2.NamedTensor(
                                name="image_embeds",
                                tensor=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 4], data=b"\x00" * 16),
                            )
                        ],
                        grid_thw=[-1, 2**40, 0],
                    )
                )
            )
        ),
        U,
    ),
    ("image-min-pixels-negative", _media_request(_image(source=IMG, image=media_pb2.ImageOptions(min_pixels=-5))), U),
    ("image-max-pixels-huge", _media_request(_image(source=IMG, image=media_pb2.ImageOptions(max_pixels=2**62))), None),
    ("image-min-over-max", _media_request(_image(source=IMG, image=media_pb2.ImageOptions(min_pixels=10**6, max_pixels=10))), None),
    ("image-bad-background", _media_request(_image(source=IMG, image=media_pb2.ImageOptions(rgba_background_color="not-a-colour"))), U),
    (
        "image-options-on-video",
        _media_request(media_pb2.MediaInput(modality=media_pb2.MODALITY_VIDEO, source=IMG, image=media_pb2.ImageOptions())),
        U,
    ),
    (
        "video-options-bad",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_VIDEO,
                source=IMG,
                video=media_pb2.VideoOptions(fps=-math.inf, num_frames=-(2**31), min_pixels=-1, max_pixels=-1),
            )
        ),
        U,
    ),
    (
        "audio-options-bad",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_AUDIO, source=IMG, audio=media_pb2.AudioOptions(format="\x00", sampling_rate=math.nan)
            )
        ),
        U,
    ),
    (
        "ts-options-bad",
        _media_request(
            media_pb2.MediaInput(
                modality=media_pb2.MODALITY_TIME_SERIES,
                source=IMG,
                time_series=media_pb2.TimeSeriesOptions(sampling_rate=-math.inf, format="bogus"),
            )
        ),
        U,
    ),
    ("max-tokens-max", _text_request(), None),  # max_tokens replaced below
    ("temperature-nan", _text_request(temperature=math.nan), "sampling.temperature"),
    ("temperature-inf", _text_request(temperature=math.inf), "sampling.temperature"),
    ("top-p-nan", _text_request(top_p=math.nan), "sampling.top_p"),
    ("top-k-max", _text_request(top_k=2**32 - 1), None),
    ("seed-max", _text_request(seed=2**64 - 1), None),
    ("n-max", _text_request(n=2**32 - 1), "sampling.n"),
    ("top-logprobs-max", _text_request(logprobs=True, top_logprobs=2**32 - 1), "sampling.top_logprobs"),
    ("min-tokens-max", _text_request(min_tokens=2**32 - 1), None),
    ("min-p-nan", _text_request(min_p=math.nan), "sampling.min_p"),
    ("presence-inf", _text_request(presence_penalty=math.inf), "sampling.presence_penalty"),
    ("repetition-zero", _text_request(repetition_penalty=0), "sampling.repetition_penalty"),
    ("logit-bias-extreme-ids", _text_request(logit_bias={2**31 - 1: 1.0, -(2**31): 1.0}), "sampling.logit_bias"),
    ("logit-bias-nan", _text_request(logit_bias={1: math.nan}), "sampling.logit_bias"),
    ("stop-empty", _text_request(stop=[""]), "sampling.stop"),
    ("stop-huge", _text_request(stop=["s" * 1_000_000]), None),
    ("guidance-bad-schema", _text_request(guidance=pb.Guidance(json_schema="{not json")), "sampling.guidance"),
    ("guidance-empty-schema", _text_request(guidance=pb.Guidance(json_schema="")), "sampling.guidance"),
    ("guidance-json-object-false", _text_request(guidance=pb.Guidance(json_object=False)), None),
    ("tool-choice-unknown-mode", _with(_text_request(), tool_choice=pb.ToolChoice(mode=99)), None),
    ("tool-choice-unknown-function", _with(_text_request(), tool_choice=pb.ToolChoice(function="nope")), "tool_choice"),
    ("tool-empty-name", _with(_text_request(), tools=[pb.Tool(name="")]), "tools"),
    ("tool-bad-parameters", _with(_text_request(), tools=[pb.Tool(name="f", parameters="{oops")]), "tools"),
    (
        "tool-calls-on-user",
        pb.GenerateRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="x")], tool_calls=[pb.ToolCall()])]),
        "messages[0].tool_calls",
    ),
    (
        "tool-message-no-id",
        pb.GenerateRequest(messages=[pb.ChatMessage(role=pb.ROLE_TOOL, content=[pb.ContentPart(text="x")])]),
        "messages[0].tool_call_id",
    ),
    ("prompt-and-messages", _text_request(), "prompt"),  # prompt set below
    ("prompt-huge", pb.GenerateRequest(prompt="word " * 2_000_000, sampling=pb.SamplingParams(max_tokens=1)), "prompt"),
    ("model-huge", pb.GenerateRequest(model="m" * 100_000, prompt="x"), "model"),
    (
        "text-nul-bytes",
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="\x00" * 1000)])],
            sampling=pb.SamplingParams(max_tokens=1),
        ),
        None,
    ),
]
for _name, _request, _ in GENERATE:
    if _name == "max-tokens-max":
        _request.sampling.max_tokens = 2**32 - 1
    if _name == "prompt-and-messages":
        _request.prompt = "x"


@pytest.fixture(scope="module")
def decoder_stub(hostile: Stack) -> Iterator[pb_grpc.DecoderServiceStub]:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(hostile.decoder.target, options=options) as channel:
        yield pb_grpc.DecoderServiceStub(channel)


def _generate(stub: pb_grpc.DecoderServiceStub, request: Any) -> None:
    for _ in stub.Generate(request, timeout=60):
        pass


@pytest.mark.parametrize(("request_", "field"), [c[1:] for c in GENERATE], ids=[c[0] for c in GENERATE])
def test_hostile_generate_requests(decoder_stub: pb_grpc.DecoderServiceStub, request_: pb.GenerateRequest, field: str | None) -> None:
    try:
        _generate(decoder_stub, request_)
    except grpc.RpcError:
        code, err = rpc_error(_generate, decoder_stub, request_)
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
        if field is not None:
            assert (err.field or "").startswith(field), (code, err.field, err.message)
        return
    assert field is None, "the decoder accepted a request it must refuse"


ENCODE: list[tuple[str, enc_pb.EncodeRequest, str | None]] = [
    ("empty", enc_pb.EncodeRequest(), "items"),
    ("item-empty", enc_pb.EncodeRequest(items=[media_pb2.MediaInput()]), "items[0]"),
    ("modality-unknown-enum", enc_pb.EncodeRequest(items=[media_pb2.MediaInput(modality=1234, source=IMG)]), "items[0]"),
    ("no-source", enc_pb.EncodeRequest(items=[_image()]), "items[0]"),
    ("garbage", enc_pb.EncodeRequest(items=[_image(source=media_pb2.MediaSource(data=b"GIF89a\x00"))]), "items[0]"),
    ("bad-url", enc_pb.EncodeRequest(items=[_image(source=media_pb2.MediaSource(url="data:image/png;base64,!!"))]), "items[0]"),
    ("many-items", enc_pb.EncodeRequest(items=[_image(source=media_pb2.MediaSource(data=b"x"))] * 10_000), "items"),
    ("uuid-content-prefix", enc_pb.EncodeRequest(items=[_image(source=IMG, uuid="mmemb-forged")]), "items[0]"),
    ("uuid-huge", enc_pb.EncodeRequest(items=[_image(source=IMG, uuid="u" * 1_000_000)]), "items[0]"),
]


@pytest.mark.parametrize(("request_", "field"), [c[1:] for c in ENCODE], ids=[c[0] for c in ENCODE])
def test_hostile_encode_requests(hostile: Stack, request_: enc_pb.EncodeRequest, field: str | None) -> None:
    with encoder_stub(hostile.encoder.target) as stub:
        code, err = rpc_error(stub.Encode, request_, timeout=60)
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), err
    if field is not None:
        assert (err.field or "").startswith(field), (code, err.field, err.message)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xff\xff", b"\x12\x05\x0a\x03\xff\xfe\xfd", b"\x0a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80", b"\x12\xff\xff\xff\xff\x0f"],
    ids=["bad-tag", "bad-utf8-string", "bad-varint", "length-past-end"],
)
@pytest.mark.parametrize("service", ["decoder", "encoder"])
def test_undecodable_messages_are_invalid_argument(hostile: Stack, service: str, raw: bytes) -> None:
    target, method = (
        (hostile.decoder.target, "/mmserve.decoder.v1.DecoderService/Generate")
        if service == "decoder"
        else (hostile.encoder.target, "/mmserve.encoder.v1.EncoderService/Encode")
    )
    with grpc.insecure_channel(target) as channel:
        call = (channel.unary_stream if service == "decoder" else channel.unary_unary)(
            method, request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            result = call(raw, timeout=30)
            if service == "decoder":
                list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()  # type: ignore[attr-defined]


# --- slow clients ---------------------------------------------------------------------------------


def _connect(stack: Stack) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10)
    sock.settimeout(0.2)
    return sock


def _closed_or_answered(sock: socket.socket, send: Iterator[bytes], limit_s: float) -> tuple[float, bytes]:
    """Send one piece per second until the server answers or closes; (seconds, what it sent)."""
    start, received = time.monotonic(), b""
    while time.monotonic() - start < limit_s:
        try:
            sock.send(next(send, b""))
        except OSError:
            break
        deadline = time.monotonic() + 1.0
        try:
            while time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    return time.monotonic() - start, received
                received += chunk
        except TimeoutError:
            pass
        except OSError:
            break
    return time.monotonic() - start, received


def test_slow_headers_are_cut_off_and_others_are_served(hostile: Stack) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nx-pad: " + b"a" * 100
    loris = [_connect(hostile) for _ in range(20)]
    results: list[tuple[float, bytes]] = []

    def trickle(sock: socket.socket) -> None:
        results.append(_closed_or_answered(sock, (bytes([b]) for b in request), HEADER_TIMEOUT_S + 8))

    threads = [threading.Thread(target=trickle, args=(s,)) for s in loris]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    start = time.monotonic()
    assert httpx.get(f"http://127.0.0.1:{hostile.gateway.port}/health", timeout=10).status_code == 200
    assert time.monotonic() - start < 2.0
    for thread in threads:
        thread.join()
    for sock in loris:
        sock.close()
    assert len(results) == 20
    for seconds, received in results:
        assert seconds < HEADER_TIMEOUT_S + 3, seconds
        assert not received or received.startswith(b"HTTP/1.1 408"), received[:100]


def test_slow_body_gets_408_and_close(hostile: Stack) -> None:
    body = json.dumps(user("Hi")).encode()
    sock = _connect(hostile)
    sock.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    seconds, received = _closed_or_answered(sock, (bytes([b]) for b in body), BODY_TIMEOUT_S + 8)
    sock.close()
    assert seconds < BODY_TIMEOUT_S + 3, seconds
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert b"connection: close" in received.lower() and b"request_timeout" in received


def test_idle_connection_is_closed(hostile: Stack) -> None:
    sock = _connect(hostile)
    seconds, _ = _closed_or_answered(sock, iter(()), HEADER_TIMEOUT_S + 8)
    sock.close()
    assert seconds < HEADER_TIMEOUT_S + 3


# --- outages: plain messages, no addresses --------------------------------------------------------


def test_decoder_and_encoder_outage_messages_name_no_address(hostile: Stack, tmp_path: Any) -> None:
    dead = free_port()
    port = free_port()
    env = {
        "MMSERVE_MODEL": f"tiny:{TINY}",
        "MMSERVE_CACHE_DIR": str(CACHE_DIR),
        "MMSERVE_GATEWAY_PORT": str(port),
        "MMSERVE_DECODER_TARGET": f"127.0.0.1:{dead}",
        "MMSERVE_ENCODER_TARGET": f"127.0.0.1:{dead}",
    }
    proc = ServiceProcess("gateway", env, log_path=tmp_path / "gateway.log").start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/metrics", timeout=60, alive=proc.alive)
        base = f"http://127.0.0.1:{port}/v1"
        for path, body, peer in (
            ("/chat/completions", user("Hi"), "decoder"),
            ("/mm/encode", {"content": [{"type": "image_url", "image_url": {"url": PNG}}]}, "encoder"),
        ):
            response = httpx.post(f"{base}{path}", json=body, timeout=30)
            assert response.status_code == 503, response.text
            message = response.json()["error"]["message"]
            assert message == f"the {peer} is unavailable; retry later", message
        models = httpx.get(f"{base}/models", timeout=30)
        assert models.status_code == 503 and str(dead) not in models.text and "ipv4" not in models.text
    finally:
        proc.stop()
    assert str(dead) in proc.log_text()  # the detail is logged, for the operator


# --- afterwards -----------------------------------------------------------------------------------


def test_every_process_is_alive_and_healthy_after_the_tables(hostile: Stack) -> None:
    for service in (hostile.encoder, hostile.decoder, hostile.gateway):
        assert service.process.alive(), service.process.role
    wait_serving(hostile.encoder.target, timeout=10)
    wait_serving(hostile.decoder.target, timeout=10)
    assert httpx.get(f"http://127.0.0.1:{hostile.gateway.port}/health", timeout=10).status_code == 200
    response = httpx.post(
        f"{hostile.gateway.base_url}/chat/completions",
        json=user([{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": PNG}}]),
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None
