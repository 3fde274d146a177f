"""The OpenAI-compatible gateway, driven with the official `openai` SDK against real processes.

Media by reference (never fetched, never encoded), every error in the OpenAI
shape with the right status and `param`, sampling options, the streaming
protocol, request ids across services, auth and body limits, disconnects that
free the decoder slot, and dependency outages (Redis, encoder) as 503.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from mmserve.localredis import LocalRedis
from mmserve.stack import wait_http_ok
from tests.conftest import MediaServer, RunningService, Stack, StartService, start_stack
from tests.inprocess import InProcessGateway, InProcessService, InProcessServices
from tests.support import data_url, encoder_stub, image_item, png_bytes, scrape

MODEL = "mmserve-tiny-random"
ENCODE_OK = 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}'
RUNNING = "mmserve_num_requests_running"
SUPPORTED = ("text", "image_url", "video_url", "audio_url", "input_audio", "time_series_url")


# --- helpers ---------------------------------------------------------------------------


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def by_ref(uuid: str) -> dict[str, Any]:
    """A media part with a null payload: a reference to a stored embedding."""
    return {"type": "image_url", "image_url": None, "uuid": uuid}


def chat(client: openai.OpenAI, content: Any, **kwargs: Any) -> Any:
    """One greedy user turn (16 tokens unless told otherwise)."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_completion_tokens", 16)
    kwargs.setdefault("model", MODEL)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kwargs)


def answer(client: openai.OpenAI, content: Any, **kwargs: Any) -> str:
    return chat(client, content, **kwargs).choices[0].message.content or ""


def api_error(call: Callable[[], Any], status: int) -> tuple[dict[str, Any], Any]:
    """Run an SDK call that must fail with `status`; check the OpenAI error shape; return (error, headers)."""
    with pytest.raises(openai.APIStatusError) as info:
        call()
    exc = info.value
    body = exc.response.json()
    assert exc.status_code == status, body
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"] and "/work/" not in err["message"]
    assert exc.response.headers["content-type"].startswith("application/json")
    return err, exc.response.headers


def encode_count(stack: Stack) -> float:
    return scrape(stack.encoder.metrics_url).get(ENCODE_OK, 0.0)


def running(decoder: RunningService | InProcessService) -> float:
    return scrape(decoder.metrics_url)[RUNNING]


def wait_running(decoder: RunningService | InProcessService, value: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running(decoder) == value:
            return
        time.sleep(0.05)
    raise AssertionError(f"{RUNNING} is {running(decoder)}, not {value}, after {timeout}s")


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process (`process_stack` for the tests that read the services' logs)."""
    return inprocess_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


# --- media by reference -------------------------------------------------------------------


def test_image_by_uuid_or_content_id_equals_data_url_and_never_encodes(
    stack: Stack, client: openai.OpenAI, media_server: MediaServer
) -> None:
    png = png_bytes(120, 80, seed=501)
    url = media_server.add("/gw/ref-501.png", png, content_type="image/png")
    with encoder_stub(stack.encoder.target) as enc:
        by_uuid = enc.Encode(enc_pb.EncodeRequest(items=[image_item(url=url, uuid="gw-ref-501")])).results[0].embedding
        by_content = enc.Encode(enc_pb.EncodeRequest(items=[image_item(url=url)])).results[0].embedding
    assert by_uuid.id == "gw-ref-501" and by_content.id.startswith("mmemb-")
    assert len(media_server.hits) > 0

    question = text("What is in this picture?")
    want = chat(client, [question, image(data_url(png))])
    other = answer(client, [question, image(data_url(png_bytes(120, 80, seed=502)))])
    assert other != want.choices[0].message.content, "the answer does not depend on the image: the test could not fail"

    hits, encodes = len(media_server.hits), encode_count(stack)
    for ref in ("gw-ref-501", by_content.id):
        got = chat(client, [question, by_ref(ref)])
        assert got.choices[0].message.content == want.choices[0].message.content, ref
        assert got.usage.prompt_tokens == want.usage.prompt_tokens
    stream = chat(client, [question, by_ref("gw-ref-501")], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.choices[0].message.content
    assert encode_count(stack) == encodes, "the encoder was called for a request by reference"
    assert len(media_server.hits) == hits, "the media was fetched again for a request by reference"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_uuid_is_404_naming_it(client: openai.OpenAI) -> None:
    err, headers = api_error(lambda: chat(client, [text("Look:"), by_ref("gw-no-such-uuid")]), 404)
    assert "gw-no-such-uuid" in err["message"]
    assert err["type"] == "not_found_error" and err["param"] == "messages[0].content[1]"
    assert headers["x-should-retry"] == "false"


def test_two_unknown_uuids_are_both_named(client: openai.OpenAI) -> None:
    fake = "mmemb-" + "cd" * 32
    err, _ = api_error(lambda: chat(client, [by_ref("gw-missing-a"), text("and"), by_ref(fake)]), 404)
    assert "gw-missing-a" in err["message"] and fake in err["message"]
    assert err["param"] == "messages[0].content[0]"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "data:image/png;base64,iVBOR*not-base64*",
        "ftp://example.com/a.png",
    ],
)
def test_bad_image_url_is_400_naming_the_part(stack: Stack, client: openai.OpenAI, url: str) -> None:
    err, headers = api_error(lambda: chat(client, [text("Look:"), image(url)]), 400)
    assert err["param"] == "messages[0].content[1]" and err["type"] == "invalid_request_error"
    assert headers["x-should-retry"] == "false"


def test_unknown_content_type_is_400_listing_the_supported_ones(client: openai.OpenAI) -> None:
    err, headers = api_error(lambda: chat(client, [text("Look:"), {"type": "hologram_url", "hologram_url": {"url": "x"}}]), 400)
    assert "hologram_url" in err["message"] and all(kind in err["message"] for kind in SUPPORTED)
    assert err["param"] == "messages[0].content[1]" and headers["x-should-retry"] == "false"


def test_media_io_kwargs_with_an_unknown_key_is_400_naming_it(client: openai.OpenAI) -> None:
    content = [text("Look:"), image(data_url(png_bytes(seed=503)))]
    err, _ = api_error(lambda: chat(client, content, extra_body={"media_io_kwargs": {"image": {"frobnicate": 1}}}), 400)
    assert "frobnicate" in err["message"] and err["param"] == "media_io_kwargs.image.frobnicate"
    # an allowed key passes
    assert answer(client, content, extra_body={"media_io_kwargs": {"image": {"rgba_background_color": "#000000"}}})


def test_remote_404_is_422(client: openai.OpenAI, media_server: MediaServer) -> None:
    err, headers = api_error(lambda: chat(client, [text("Look:"), image(media_server.url("/gw/not-there.png"))]), 422)
    assert err["param"] == "messages[0].content[1]" and err["code"] == "remote_fetch_failed"
    assert "404" in err["message"] and headers["x-should-retry"] == "false"
    assert "/gw/not-there.png" in media_server.hits


def test_max_tokens_over_the_context_names_the_field_that_was_sent(client: openai.OpenAI) -> None:
    err, _ = api_error(lambda: chat(client, "Hi", max_completion_tokens=None, max_tokens=40000), 400)
    assert err["param"] == "max_tokens"
    err, _ = api_error(lambda: chat(client, "Hi", max_completion_tokens=40000), 400)
    assert err["param"] == "max_completion_tokens"


def test_gateway_side_validation_errors(client: openai.OpenAI) -> None:
    err, _ = api_error(lambda: chat(client, "Hi", temperature=3), 400)
    assert err["param"] == "temperature"
    err, _ = api_error(lambda: client.chat.completions.create(model=MODEL, messages=[]), 400)
    assert err["param"] == "messages"
    err, _ = api_error(lambda: chat(client, "Hi", model="gpt-7"), 404)
    assert "gpt-7" in err["message"] and err["param"] == "model"


def test_error_before_the_first_token_of_a_stream_is_a_real_http_error(stack: Stack, client: openai.OpenAI) -> None:
    err, headers = api_error(lambda: chat(client, [text("Look:"), by_ref("gw-stream-missing")], stream=True), 404)
    assert "gw-stream-missing" in err["message"] and "text/event-stream" not in headers["content-type"]
    err, _ = api_error(lambda: chat(client, [text("Look:"), image("http://10.0.0.1/x.png")], stream=True), 400)
    assert err["param"] == "messages[0].content[1]"

    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": [by_ref("gw-stream-missing")]}]}
    with httpx.stream("POST", f"{stack.gateway.base_url}/chat/completions", json=body, timeout=30) as response:
        response.read()
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    assert "data:" not in response.text


# --- sampling ------------------------------------------------------------------------------


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    def tokens(**kwargs: Any) -> int:
        kwargs.setdefault("max_completion_tokens", None)
        return chat(client, "Count to ten.", extra_body={"ignore_eos": True}, **kwargs).usage.completion_tokens

    assert tokens(max_completion_tokens=3, max_tokens=7) == 3
    assert tokens(max_completion_tokens=7, max_tokens=3) == 7
    assert tokens(max_tokens=5) == 5


def test_n_choices_greedy_and_seeded(client: openai.OpenAI) -> None:
    greedy = chat(client, "Tell me a story.", n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content != ""

    def sampled() -> list[str]:
        reply = chat(client, "Tell me a story.", n=2, temperature=1, seed=1234)
        assert len(reply.choices) == 2
        return [c.message.content or "" for c in reply.choices]

    first = sampled()
    assert sampled() == first
    assert first[0] != first[1], "both sampled choices are the same sequence"

    stream = chat(client, "Tell me a story.", n=2, temperature=1, seed=1234, stream=True)
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == first


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return answer(client, "Tell me a story.", temperature=1, seed=seed, max_completion_tokens=24, extra_body={"ignore_eos": True})

    a = sample(11)
    assert sample(11) == a
    assert sample(12) != a


def test_stop_string_cuts_the_answer_in_full_and_streamed(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"max_completion_tokens": 32, "extra_body": {"ignore_eos": True}}
    pieces = [c.choices[0].delta.content or "" for c in chat(client, "Tell me a story.", stream=True, **kwargs) if c.choices]
    full = "".join(pieces)
    assert full == answer(client, "Tell me a story.", **kwargs) and len(full) > 12
    # a stop string across the boundary of two streamed pieces (tokens), near the middle
    k = next(
        k for k in range(len(pieces) // 2, len(pieces) - 1)
        if pieces[k].strip() and pieces[k + 1].strip() and "\ufffd" not in pieces[k] + pieces[k + 1]
    )  # fmt: skip
    boundary = len("".join(pieces[: k + 1]))
    stop = full[boundary - 2 : boundary + 2]
    want = full[: full.index(stop)]
    assert want, "the stop string occurs at the very start: pick another"

    reply = chat(client, "Tell me a story.", stop=stop, **kwargs)
    assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 32

    chunks = list(chat(client, "Tell me a story.", stop=[stop, "\x00never"], stream=True, **kwargs))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == want
    assert not any(stop in d for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


# --- protocol -----------------------------------------------------------------------------


def test_models_list_shape(stack: Stack, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = models.data[0]
    assert model.object == "model" and model.owned_by == "mmserve" and abs(model.created - time.time()) < 24 * 3600

    raw = httpx.get(f"{stack.gateway.base_url}/models", timeout=10).json()
    assert raw["object"] == "list"
    entry = raw["data"][0]
    assert {"id", "object", "created", "owned_by"} <= set(entry)
    assert entry["random_weights"] is True and entry["family"] == "qwen2_5_vl" and "image" in entry["modalities"]
    assert set(entry["modalities"]) <= {"image", "video", "audio", "time_series"}


def test_health(stack: Stack) -> None:
    response = httpx.get(f"http://127.0.0.1:{stack.gateway.port}/health", timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_unknown_fields_are_400_naming_them_and_advisory_ones_are_accepted(client: openai.OpenAI) -> None:
    err, _ = api_error(lambda: chat(client, "Hello there", extra_body={"frobnicate": True}), 400)
    assert err["param"] == "frobnicate" and "unknown field" in err["message"]
    message = {"role": "user", "content": "Hi", "cache_hint": 1}
    err, _ = api_error(lambda: client.chat.completions.create(model=MODEL, messages=[message]), 400)  # type: ignore[list-item]
    assert err["param"] == "messages[0].cache_hint"
    err, _ = api_error(lambda: chat(client, "Hello there", response_format={"type": "json_object", "extra": 1}), 400)
    assert err["param"] == "response_format.extra"
    err, _ = api_error(lambda: chat(client, "Hello there", stream_options={"include_usage": True}), 400)
    assert err["param"] == "stream_options"
    err, _ = api_error(lambda: chat(client, "Hello there", modalities=["text", "audio"]), 400)
    assert err["param"].startswith("modalities")
    plain = chat(client, "Hello there")
    advised = chat(
        client,
        "Hello there",
        user="u-1",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        extra_body={"safety_identifier": "s", "prompt_cache_key": "p", "prediction": {"type": "content", "content": "x"}},
    )
    assert advised.choices[0].message.content == plain.choices[0].message.content != ""
    echoed = [
        {"role": "user", "content": "Hello there"},
        {**plain.choices[0].message.model_dump(), "content": "Hi"},
        {"role": "user", "content": "Again"},
    ]
    again = client.chat.completions.create(model=MODEL, messages=echoed, temperature=0, max_completion_tokens=4)  # type: ignore[arg-type]
    assert again.choices[0].message.content  # an SDK reply message sent back as it came


def test_response_shape(client: openai.OpenAI) -> None:
    reply = chat(client, "Hello there", max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    u = reply.usage
    assert u.completion_tokens == 5 and u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + 5


def test_request_id_is_echoed_and_logged_by_every_service(process_stack: Stack) -> None:
    stack, client = process_stack, process_stack.client()
    rid = f"test-rid-{time.time_ns()}"
    messages: list[Any] = [{"role": "user", "content": [text("Look:"), image(data_url(png_bytes(seed=504)))]}]
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages,
        max_completion_tokens=4, extra_headers={"X-Request-Id": rid},
    )  # fmt: skip
    assert raw.headers["x-request-id"] == rid
    assert raw.parse().choices[0].message.content is not None
    for service in (stack.decoder, stack.encoder, stack.gateway):
        deadline = time.monotonic() + 5
        while rid not in service.process.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in service.process.log_text().splitlines() if rid in line]
        assert lines, f"{service.process.role} did not log request {rid}"
    decoder_lines = [line for line in stack.decoder.process.log_text().splitlines() if rid in line]
    assert any("Generate OK" in line for line in decoder_lines)
    encoder_lines = [line for line in stack.encoder.process.log_text().splitlines() if rid in line]
    assert any("Encode OK" in line for line in encoder_lines)

    # errors carry it too, and streaming responses
    missing: list[Any] = [{"role": "user", "content": [by_ref("gw-rid-missing")]}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=MODEL, messages=missing, extra_headers={"X-Request-Id": rid + "-err"})
    assert info.value.response.headers["x-request-id"] == rid + "-err"
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=2, stream=True,
        extra_headers={"X-Request-Id": rid + "-stream"},
    ) as streamed:  # fmt: skip
        assert streamed.headers["x-request-id"] == rid + "-stream"


def test_request_id_is_generated_when_none_is_sent(process_stack: Stack) -> None:
    stack = process_stack
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    ids = []
    for _ in range(2):
        response = httpx.post(f"{stack.gateway.base_url}/chat/completions", json=body, timeout=30)
        assert response.status_code == 200
        ids.append(response.headers["x-request-id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    assert ids[0] in stack.decoder.process.log_text()


def test_stream_protocol_on_the_wire(stack: Stack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{stack.gateway.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]] == ["length"]


# --- auth and body limits ------------------------------------------------------------------

API_KEY = "sk-test-0123456789"
BODY_LIMIT = 20_000


@pytest.fixture(scope="module")
def secured(inprocess: InProcessServices, stack: Stack) -> Iterator[InProcessGateway]:
    """A second gateway in front of the session decoder, with an API key and a 20 kB body limit."""
    service = inprocess.start_gateway(decoder_target=stack.decoder.target, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    yield service
    service.stop()


def test_api_key_is_required(secured: InProcessGateway) -> None:
    url = f"{secured.base_url}/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert response.headers["x-should-retry"] == "false"

    wrong = openai.OpenAI(base_url=secured.base_url, api_key="sk-wrong", max_retries=0)
    err, _ = api_error(lambda: chat(wrong, "Hi"), 401)
    assert err["code"] == "invalid_api_key"
    err, _ = api_error(lambda: wrong.models.list(), 401)

    right = openai.OpenAI(base_url=secured.base_url, api_key=API_KEY, max_retries=0)
    assert chat(right, "Hi", max_completion_tokens=2).usage.completion_tokens >= 1
    assert [m.id for m in right.models.list().data] == [MODEL]
    assert httpx.get(f"http://127.0.0.1:{secured.port}/health", timeout=10).status_code == 200


def _body_of(size: int) -> bytes:
    """A valid chat request of exactly `size` bytes (padded with an advisory field, which is accepted and ignored)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": ""}
    base = len(json.dumps(body).encode())
    body["user"] = "x" * (size - base)
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


def test_body_over_the_limit_is_413(secured: InProcessGateway) -> None:
    url = f"{secured.base_url}/chat/completions"
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    big = _body_of(BODY_LIMIT + 1)

    announced = httpx.post(url, content=big, headers=headers, timeout=30)
    assert announced.status_code == 413
    error = announced.json()["error"]
    assert error["code"] == "body_too_large" and str(BODY_LIMIT) in error["message"] and error["type"] == "invalid_request_error"

    def chunks(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]

    chunked = httpx.post(url, content=chunks(big), headers=headers, timeout=30)
    assert chunked.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in chunked.request.headers
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"

    # exactly at the limit, announced or chunked, is served
    fits = _body_of(BODY_LIMIT)
    for content in (fits, chunks(fits)):
        response = httpx.post(url, content=content, headers=headers, timeout=60)
        assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] is not None


# --- disconnects and admission ---------------------------------------------------------------


@pytest.fixture(scope="module")
def single_slot_stack(inprocess: InProcessServices, stack: Stack) -> Iterator[Stack]:
    decoder = inprocess.start(
        "decoder", redis_url=stack.redis_url, encoder_target=stack.encoder.target, max_running_requests=1, max_waiting_requests=0
    )
    gateway = inprocess.start_gateway(decoder_target=decoder.target)
    yield Stack(stack.encoder, decoder, gateway, stack.redis_url)
    gateway.stop()
    decoder.stop()


@pytest.fixture
def single_slot(single_slot_stack: Stack) -> Stack:
    """A decoder with one running slot and no queue (on the session encoder), and its own gateway (in-process; the engine gauges show it)."""
    single_slot_stack.decoder.own_gauges()  # type: ignore[union-attr]
    return single_slot_stack


def long_stream(client: openai.OpenAI) -> Any:
    return chat(client, "Write a long story.", max_completion_tokens=4000, stream=True, extra_body={"ignore_eos": True})


def test_client_disconnect_mid_stream_frees_the_decoder_slot(single_slot: Stack) -> None:
    client = single_slot.client()
    wait_running(single_slot.decoder, 0)
    stream = long_stream(client)
    received = [next(iter(stream)) for _ in range(5)]
    assert len(received) == 5 and running(single_slot.decoder) == 1
    stream.close()
    wait_running(single_slot.decoder, 0, timeout=5)
    assert chat(client, "Hi", max_completion_tokens=3, extra_body={"ignore_eos": True}).usage.completion_tokens == 3


def test_second_concurrent_request_is_429(single_slot: Stack) -> None:
    client = single_slot.client()
    wait_running(single_slot.decoder, 0)
    stream = long_stream(client)
    try:
        next(iter(stream))
        err, headers = api_error(lambda: chat(client, "Hi"), 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        assert headers.get("x-should-retry") != "false"
        err, _ = api_error(lambda: chat(client, "Hi", stream=True), 429)
    finally:
        stream.close()
    wait_running(single_slot.decoder, 0)
    assert answer(client, "Hi", max_completion_tokens=2)


@pytest.fixture(scope="module")
def short_deadline(inprocess: InProcessServices, single_slot_stack: Stack) -> Iterator[InProcessGateway]:
    """A gateway whose requests to the decoder have a 2 s deadline."""
    service = inprocess.start_gateway(decoder_target=single_slot_stack.decoder.target, gateway_request_timeout_s=2)
    yield service
    service.stop()


def test_error_after_the_stream_started_is_an_sse_error_event(short_deadline: InProcessGateway, single_slot: Stack) -> None:
    """The deadline runs out mid-stream: a `data: {"error": ...}` event, then [DONE]; the decoder slot is freed."""
    wait_running(single_slot.decoder, 0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{short_deadline.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        events = [e for e in response.read().decode().split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == "deadline_exceeded"
    contents = [json.loads(e[len("data: ") :])["choices"][0]["delta"].get("content", "") for e in events[1:-2]]
    assert len(contents) > 5 and all(contents)
    wait_running(single_slot.decoder, 0)


# --- dependency outages --------------------------------------------------------------------


def test_redis_down_then_encoder_down_are_503(start_service: StartService, own_redis: LocalRedis) -> None:
    fragile = start_stack(start_service, own_redis.url, MMSERVE_STORE_HEALTH_INTERVAL_S="0.5")  # back to SERVING soon after
    client = fragile.client()
    assert answer(client, [text("Look:"), image(data_url(png_bytes(seed=601)))])

    own_redis.stop()
    start = time.monotonic()
    err, headers = api_error(lambda: chat(client, [text("Look:"), image(data_url(png_bytes(seed=602)))]), 503)
    assert time.monotonic() - start < 20
    # whoever notices first: a service names the store; once a store probe has run that service is NOT_SERVING,
    # and the gateway finds no decoder (or the decoder no encoder)
    message = err["message"].lower()
    plain = {"the decoder is unavailable; retry later", "the encoder is unavailable; retry later"}
    assert err["type"] == "server_error" and ("store" in message or message in plain), message
    assert "redis://" not in err["message"] and headers.get("x-should-retry") != "false"

    own_redis.start()  # same port: the services reconnect by themselves, and report SERVING at their next probe
    wait_http_ok(f"http://127.0.0.1:{fragile.gateway.port}/health", timeout=60, alive=fragile.gateway.process.alive)
    stored = chat(client, [text("Look:"), image(data_url(png_bytes(seed=603)), uuid="frag-603")])
    assert stored.choices[0].message.content

    assert fragile.encoder.stop() == 0
    err, headers = api_error(lambda: chat(client, [text("Look:"), image(data_url(png_bytes(seed=604)))]), 503)
    assert "encoder" in err["message"] and headers.get("x-should-retry") != "false"
    assert "127.0.0.1" not in err["message"] and "ipv4" not in err["message"]  # the address is logged, never sent
    assert answer(client, "Text only still works.")
    # a stored embedding needs no encoder
    assert answer(client, [text("Look:"), by_ref("frag-603")]) == stored.choices[0].message.content


def test_unknown_routes_and_methods_use_the_openai_error_shape(stack: Stack) -> None:
    base = stack.gateway.base_url
    missing = httpx.get(f"{base}/nope", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error" and "x-request-id" in missing.headers
    wrong_method = httpx.get(f"{base}/chat/completions", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["message"] == "Method Not Allowed"


def test_invalid_json_is_a_400_without_a_meaningless_param(stack: Stack) -> None:
    reply = httpx.post(
        f"{stack.gateway.base_url}/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}, timeout=10
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "invalid_json" and error["param"] is None and "JSON" in error["message"]


# --- REST precompute --------------------------------------------------------------------------


def test_rest_precompute_encode_get_delete(stack: Stack, client: openai.OpenAI) -> None:
    base = stack.gateway.base_url
    png = png_bytes(seed=701)
    body = {
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}, "uuid": "rest-701"},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=702))}},
        ]
    }
    reply = httpx.post(f"{base}/mm/encode", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert data[0]["id"] == "rest-701" and data[1]["id"].startswith("mmemb-")
    assert all(d["object"] == "mm.embedding" and d["modality"] == "image" and d["tokens"] == 6 and not d["cached"] for d in data)
    assert data[0]["expires_at"] - data[0]["created_at"] == pytest.approx(7 * 24 * 3600, abs=2)

    again = httpx.post(f"{base}/mm/encode", json=body, timeout=60).json()["data"]
    assert [d["cached"] for d in again] == [True, True]
    by_uuid = answer(client, [text("Look:"), by_ref("rest-701")])
    by_content_id = answer(client, [text("Look:"), by_ref(data[1]["id"])])
    assert by_uuid == answer(client, [text("Look:"), image(data_url(png))]) and by_content_id

    described = httpx.get(f"{base}/mm/embeddings/rest-701", timeout=30).json()
    assert described["id"] == "rest-701" and described["tokens"] == 6 and described["content_sha256"] == data[0]["content_sha256"]
    deleted = httpx.delete(f"{base}/mm/embeddings/rest-701", timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": "rest-701", "object": "mm.embedding.deleted", "deleted": True}
    assert httpx.delete(f"{base}/mm/embeddings/rest-701", timeout=30).json()["deleted"] is False
    gone = httpx.get(f"{base}/mm/embeddings/rest-701", timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    err, _ = api_error(lambda: chat(client, [text("Look:"), by_ref("rest-701")]), 404)
    assert "rest-701" in err["message"]


def test_rest_precompute_errors_name_the_part(stack: Stack) -> None:
    base = stack.gateway.base_url
    text_part = httpx.post(f"{base}/mm/encode", json={"content": [{"type": "text", "text": "hi"}]}, timeout=30)
    assert text_part.status_code == 400 and text_part.json()["error"]["param"] == "content[0]"
    bad_url = httpx.post(
        f"{base}/mm/encode",
        json={
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=703))}},
                {"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}},
            ]
        },
        timeout=30,
    )
    assert bad_url.status_code == 400 and bad_url.json()["error"]["param"] == "content[1]"
    assert "private" in bad_url.json()["error"]["message"]
    conflict = httpx.post(
        f"{base}/mm/encode",
        json={"content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=704))}, "uuid": "rest-704"}]},
        timeout=30,
    )
    assert conflict.status_code == 200
    rebound = httpx.post(
        f"{base}/mm/encode",
        json={"content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(seed=705))}, "uuid": "rest-704"}]},
        timeout=30,
    )
    assert rebound.status_code == 409 and rebound.json()["error"]["param"] == "content[0]"
    assert rebound.headers["x-should-retry"] == "false"


def test_openapi_document_describes_every_endpoint_and_extension(stack: Stack) -> None:
    doc = httpx.get(f"http://127.0.0.1:{stack.gateway.port}/openapi.json", timeout=30).json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/mm/encode", "post"),
        ("/v1/mm/embeddings/{embedding_id}", "get"),
        ("/v1/mm/embeddings/{embedding_id}", "delete"),
        ("/health", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    chat_schema = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for extension in ("media_io_kwargs", "mm_processor_kwargs", "top_k", "ignore_eos", "max_completion_tokens", "stream_options"):
        assert chat_schema[extension].get("description") or extension in ("stream_options",), extension
    assert "time_series_url" in doc["components"]["schemas"]["ChatMessage"]["properties"]["content"]["description"]
    assert {"id", "tokens", "expires_at", "cached"} <= set(doc["components"]["schemas"]["EmbeddingObject"]["properties"])
