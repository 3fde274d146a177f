"""Client-supplied embeddings (`image_embeds` / `audio_embeds` parts, MediaSource.embeds) through the real stack.

Equivalence: the embedding the encoder stored for an image (read back with
GetEmbedding), sent as `image_embeds`, in safetensors or raw form, gives
exactly the greedy tokens of sending the image, for Qwen2.5-VL, Qwen3-VL
(deepstack) and the Qwen2.5-Omni thinker; likewise `audio_embeds` against
the audio (the Omni thinker and Voxtral). Refusals: every malformed or mismatched embedding is a 400 naming
the JSON field, and the store is left as it was. Precompute: an embedding
stored under a uuid answers by that uuid alone.
"""

from __future__ import annotations

import base64
import io
import pickle
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from mmserve.api.common.v1 import media_pb2, tensor_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as dec
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as dec_grpc
from mmserve.api.encoder.v1 import encoder_service_pb2 as enc
from mmserve.localredis import LocalRedis
from mmserve.models.tensors import from_raw
from mmserve.store import RawTensor
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import data_url, encoder_stub, png_bytes, redis_keys, rpc_error
from tests.test_equivalence_modalities import wav_bytes

MAX_TOKENS = 16
FAMILIES = {"qwen2_5_vl": "qwen2_5_vl-tiny", "qwen3_vl": "qwen3_vl-tiny", "qwen2_5_omni": "qwen2_5_omni-tiny", "voxtral": "voxtral-tiny"}
IMAGE_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen2_5_omni")
IMAGE, AUDIO = png_bytes(128, 96, seed=11), wav_bytes(seconds=1.5, seed=3)
QUESTION = {"type": "text", "text": "What is this?"}
FLOAT_NAMES = {tensor_pb2.DATA_TYPE_FLOAT32: "float32", tensor_pb2.DATA_TYPE_FLOAT16: "float16", tensor_pb2.DATA_TYPE_BFLOAT16: "bfloat16"}


@pytest.fixture(scope="module")
def stacks(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[dict[str, Stack]]:
    """One in-process stack per family, started on first use; the previous one is stopped (finite memory)."""
    started: dict[str, Stack] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> Stack:
            for other in list(self):
                self.pop(other).stop()
            self[family] = started[family] = start_inprocess_stack(inprocess, module_redis.url, model=f"tiny:{FAMILIES[family]}")
            return started[family]

    yield Lazy()
    for stack in started.values():
        stack.stop()


# --- helpers ---------------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stack.gateway.base_url}{path}", json=body, timeout=300)


def chat(stack: Stack, content: list[dict[str, Any]]) -> tuple[str, int]:
    """Greedy completion of MAX_TOKENS tokens (ignore_eos) through the OpenAI SDK: (text, prompt tokens)."""
    reply = stack.client().chat.completions.create(
        model="",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens


def grpc_tokens(stack: Stack, item: media_pb2.MediaInput) -> list[int]:
    """The generated token ids of the same prompt straight through DecoderService.Generate."""
    import grpc

    request = dec.GenerateRequest(
        messages=[dec.ChatMessage(role=dec.ROLE_USER, content=[dec.ContentPart(media=item), dec.ContentPart(text=QUESTION["text"])])],
        sampling=dec.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    with grpc.insecure_channel(stack.decoder.target) as channel:
        return [t for reply in dec_grpc.DecoderServiceStub(channel).Generate(request, timeout=300) for t in reply.token_ids]


def precompute(stack: Stack, part: dict[str, Any]) -> dict[str, Any]:
    response = post(stack, "/mm/encode", {"content": [part]})
    assert response.status_code == 200, response.text
    return response.json()["data"][0]


def stored(stack: Stack, embedding_id: str) -> tuple[Any, list[RawTensor]]:
    """The stored descriptor and tensors, as GetEmbedding returns them."""
    with encoder_stub(stack.encoder.target) as stub:
        reply = stub.GetEmbedding(enc.GetEmbeddingRequest(id=embedding_id, include_tensors=True))
    return reply.embedding, [RawTensor.from_proto(t) for t in reply.tensors]


def raw_json(t: RawTensor) -> dict[str, Any]:
    return {"data": b64(bytes(t.data)), "dtype": FLOAT_NAMES[t.dtype], "shape": list(t.shape)}


def safetensors_b64(tensors: list[RawTensor], main: str) -> str:
    named = {main if t.name == "embeddings" else t.name: from_raw(t) for t in tensors}
    return b64(safetensors.torch.save(named))


def image_embeds_parts(desc: Any, tensors: list[RawTensor]) -> dict[str, dict[str, Any]]:
    """The stored image embedding as an image_embeds part, in both forms."""
    grid = list(desc.image.grid_thw)
    raw: dict[str, Any] = {"type": "image_embeds", "image_embeds": raw_json(tensors[0]), "image_grid_thw": grid}
    if len(tensors) > 1:
        raw["deepstack"] = [raw_json(t) for t in tensors[1:]]
    packed = {"type": "image_embeds", "image_embeds": safetensors_b64(tensors, "image_embeds"), "image_grid_thw": grid}
    return {"safetensors": packed, "raw": raw}


def image_part() -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(IMAGE)}}


def stored_image(stack: Stack) -> tuple[Any, list[RawTensor]]:
    return stored(stack, precompute(stack, image_part())["id"])


def assert_informative(text: str) -> None:
    assert len(set(text)) > 5, f"degenerate output {text!r}: the comparison could not fail"


# --- equivalence -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_image_embeds_give_the_tokens_of_the_image(stacks: dict[str, Stack], family: str) -> None:
    stack = stacks[family]
    desc, tensors = stored_image(stack)
    if family == "qwen3_vl":
        assert [t.name for t in tensors] == ["embeddings", "deepstack.0", "deepstack.1"]
    want = chat(stack, [image_part(), QUESTION])
    assert_informative(want[0])
    for form, part in image_embeds_parts(desc, tensors).items():
        assert chat(stack, [part, QUESTION]) == want, form
    zeros = [RawTensor(t.name, t.dtype, t.shape, bytes(len(t.data))) for t in tensors]
    assert chat(stack, [image_embeds_parts(desc, zeros)["raw"], QUESTION])[0] != want[0]  # the tensors sent are the ones used

    # The exact token ids, over gRPC with raw NamedTensors.
    image = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=IMAGE))
    embeds = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE)
    embeds.source.embeds.tensors.extend(t.to_proto() for t in tensors)
    embeds.source.embeds.grid_thw.extend(desc.image.grid_thw)
    want_ids = grpc_tokens(stack, image)
    assert len(want_ids) == MAX_TOKENS
    assert grpc_tokens(stack, embeds) == want_ids


def test_qwen3_vl_needs_the_deepstack_features(stacks: dict[str, Stack]) -> None:
    stack = stacks["qwen3_vl"]
    desc, tensors = stored_image(stack)
    part = image_embeds_parts(desc, tensors)["raw"]
    del part["deepstack"]
    error = refused(stack, part, "messages[0].content[0].image_embeds")
    assert "deepstack.0" in error["message"]


@pytest.mark.parametrize("family", ["qwen2_5_omni", "voxtral"])
def test_audio_embeds_give_the_tokens_of_the_audio(stacks: dict[str, Stack], family: str) -> None:
    stack = stacks[family]
    audio = {"type": "input_audio", "input_audio": {"data": b64(AUDIO), "format": "wav"}}
    desc, tensors = stored(stack, precompute(stack, audio)["id"])
    assert desc.token_count == tensors[0].shape[0]
    want = chat(stack, [audio, QUESTION])
    assert_informative(want[0])
    length = int(desc.audio.feature_length)
    for payload in (safetensors_b64(tensors, "audio_embeds"), raw_json(tensors[0])):
        assert chat(stack, [{"type": "audio_embeds", "audio_embeds": payload, "audio_feature_length": length}, QUESTION]) == want
    wrong = {"type": "audio_embeds", "audio_embeds": raw_json(tensors[0]), "audio_feature_length": length + 40}
    refused(stack, wrong, "messages[0].content[0].audio_feature_length")


# --- precompute by uuid ------------------------------------------------------------------------------------------


def test_precompute_with_a_uuid_then_chat_by_it(stacks: dict[str, Stack]) -> None:
    stack = stacks["qwen2_5_omni"]
    desc, tensors = stored_image(stack)
    part = {**image_embeds_parts(desc, tensors)["raw"], "uuid": "client-emb-1"}
    made = precompute(stack, part)
    assert (made["id"], made["tokens"], made["modality"]) == ("client-emb-1", desc.token_count, "image")
    again_desc, again = stored(stack, "client-emb-1")
    assert [bytes(t.data) for t in again] == [bytes(t.data) for t in tensors]
    assert list(again_desc.image.grid_thw) == list(desc.image.grid_thw)

    want = chat(stack, [image_part(), QUESTION])
    assert chat(stack, [{"type": "image_embeds", "image_embeds": None, "uuid": "client-emb-1"}, QUESTION]) == want
    assert precompute(stack, part)["cached"] is True  # same tensors, same uuid: stored once

    other = {**part, "image_embeds": raw_json(RawTensor("e", tensors[0].dtype, tensors[0].shape, bytes(len(tensors[0].data))))}
    response = post(stack, "/mm/encode", {"content": [other]})
    assert response.status_code == 409, response.text  # a uuid is never silently rebound


# --- refusals ----------------------------------------------------------------------------------------------------


def refused(stack: Stack, part: dict[str, Any], param: str, *, path: str = "/chat/completions") -> dict[str, Any]:
    """POST the part; expect a 400 whose param is `param`, and no new key in the store."""
    before = redis_keys(stack.redis_url)
    if path == "/chat/completions":
        body: dict[str, Any] = {"messages": [{"role": "user", "content": [part, QUESTION]}], "max_completion_tokens": 4}
    else:
        body = {"content": [part]}
    response = post(stack, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert redis_keys(stack.redis_url) == before
    return error


def _with(part: dict[str, Any], **changes: Any) -> dict[str, Any]:
    tensor = {**part["image_embeds"], **changes}
    return {**part, "image_embeds": tensor}


def test_refusals_name_the_field_and_store_nothing(stacks: dict[str, Stack]) -> None:
    stack = stacks["qwen2_5_omni"]
    desc, tensors = stored_image(stack)
    main = tensors[0]
    tokens, hidden = main.shape
    part = image_embeds_parts(desc, tensors)["raw"]
    at = "messages[0].content[0]"

    wide = torch.zeros(tokens, hidden + 8)
    error = refused(stack, _with(part, data=b64(wide.numpy().tobytes()), shape=[tokens, hidden + 8]), f"{at}.image_embeds.shape")
    assert str(hidden) in error["message"]
    grid = list(desc.image.grid_thw)
    error = refused(stack, {**part, "image_grid_thw": [grid[0], grid[1], grid[2] + 2]}, f"{at}.image_grid_thw")
    assert "tokens" in error["message"]
    nan = from_raw(main).clone()
    nan[1, 2] = float("nan")
    refused(stack, _with(part, data=b64(nan.numpy().tobytes())), f"{at}.image_embeds.data")
    refused(stack, _with(part, shape=[tokens * 2, hidden]), f"{at}.image_embeds.shape")  # declares more than the bytes
    refused(stack, _with(part, dtype="float8_e4m3"), f"{at}.image_embeds.dtype")
    refused(stack, _with(part, data=part["image_embeds"]["data"][:-4] + "!!!!"), f"{at}.image_embeds.data")

    torch_saved = io.BytesIO()
    torch.save({"image_embeds": from_raw(main)}, torch_saved)
    for blob in (pickle.dumps({"image_embeds": [0.0] * 8}), torch_saved.getvalue()):
        error = refused(stack, {**part, "image_embeds": b64(blob)}, f"{at}.image_embeds")
        assert "pickle" in error["message"]
    wrong = safetensors_b64(
        [RawTensor("embeddings", main.dtype, (tokens, hidden // 2), bytes(main.data)[: len(main.data) // 2])], "image_embeds"
    )
    refused(stack, {**part, "image_embeds": wrong}, f"{at}.image_embeds")
    refused(stack, {**part, "image_embeds": safetensors_b64(tensors, "not_an_embedding")}, f"{at}.image_embeds")
    refused(stack, {**part, "deepstack": [raw_json(main)]}, f"{at}.deepstack[0]")  # Omni has no deepstack layers

    # The same through REST precompute, and gRPC clients get INVALID_ARGUMENT naming the proto field.
    refused(stack, _with(part, shape=[tokens, hidden + 8]), "content[0].image_embeds.shape", path="/mm/encode")
    item = media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE)
    item.source.embeds.tensors.append(
        RawTensor("embeddings", main.dtype, (tokens, hidden // 2), bytes(main.data)[: len(main.data) // 2]).to_proto()
    )
    item.source.embeds.grid_thw.extend(grid)
    with encoder_stub(stack.encoder.target) as stub:
        code, err = rpc_error(stub.Encode, enc.EncodeRequest(items=[item]))
    assert code.name == "INVALID_ARGUMENT" and err.field == "items[0].source.embeds.tensors[0].shape"
