"""The correctness bar: the split path (encode -> Redis -> decode) equals the monolithic model.

Through the official OpenAI SDK against running services, greedy output for
text-only, one-image and two-image prompts (and a multi-turn chat) must equal
`model.generate(**processor(...), do_sample=False)` of the same checkpoint,
text for text; through the decoder's gRPC API, token id for token id.
Streaming and non-streaming must give the same text.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from tests.conftest import Stack
from tests.support import Reference, data_url, png_bytes

MAX_TOKENS = 24
IMAGES = [png_bytes(96, 64, seed=101), png_bytes(128, 84, seed=102)]


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process: nothing in this module needs a service process."""
    return inprocess_stack


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Reference:
    return Reference(tiny_checkpoint)


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


CASES = {
    "text-only": (
        [{"role": "user", "content": "Tell me about the sea."}],
        [{"role": "user", "content": "Tell me about the sea."}],
        [],
    ),
    "one-image": (
        [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image_part(IMAGES[0])]}],
        [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image"}]}],
        IMAGES[:1],
    ),
    "two-images": (
        [
            {
                "role": "user",
                "content": [
                    image_part(IMAGES[0]),
                    {"type": "text", "text": "versus"},
                    image_part(IMAGES[1]),
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "versus"},
                    {"type": "image"},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        IMAGES,
    ),
    "multi-turn": (
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": [image_part(IMAGES[1]), {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": "A noisy square."},
            {"role": "user", "content": "Which colour dominates?"},
        ],
        [
            {"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A noisy square."}]},
            {"role": "user", "content": [{"type": "text", "text": "Which colour dominates?"}]},
        ],
        IMAGES[1:],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdk_greedy_output_equals_monolithic_generate(stack: Stack, reference: Reference, case: str) -> None:
    messages, ref_conversation, images = CASES[case]
    want_ids, want_text = reference.generate(ref_conversation, images, MAX_TOKENS)
    assert len(set(want_ids)) > 5, "degenerate reference output: the test could not fail"
    client = stack.client()
    reply = client.chat.completions.create(model="mmserve-tiny-random", messages=messages, temperature=0, max_completion_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == want_text
    assert reply.choices[0].finish_reason == ("length" if len(want_ids) == MAX_TOKENS else "stop")
    assert reply.usage.completion_tokens == len(want_ids) + (len(want_ids) < MAX_TOKENS)

    stream = client.chat.completions.create(
        model="mmserve-tiny-random",
        messages=messages,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reply.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def _grpc_conversation(images: list[bytes]) -> pb.GenerateRequest:
    content = [pb.ContentPart(text="Compare:")]
    for png in images:
        content.append(
            pb.ContentPart(media=media_pb2.MediaInput(modality=media_pb2.MODALITY_IMAGE, source=media_pb2.MediaSource(data=png)))
        )
    return pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=content)],
        sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
    )


def test_grpc_token_ids_equal_monolithic_generate(stack: Stack, reference: Reference) -> None:
    want_ids, want_text = reference.generate(
        [{"role": "user", "content": [{"type": "text", "text": "Compare:"}, {"type": "image"}, {"type": "image"}]}], IMAGES, MAX_TOKENS
    )
    with grpc.insecure_channel(stack.decoder.target) as channel:
        responses = list(pb_grpc.DecoderServiceStub(channel).Generate(_grpc_conversation(IMAGES)))
    ids = [t for r in responses for t in r.token_ids]
    assert ids[: len(want_ids)] == want_ids and len(ids) == MAX_TOKENS
    assert "".join(r.text for r in responses) == want_text
    assert responses[-1].usage.prompt_tokens > 2 * 6  # placeholders of both images are counted


def test_concurrent_requests_each_get_their_own_answer(stack: Stack, reference: Reference) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Story number {i}: once upon a time" for i in range(4)]
    wants = [reference.generate([{"role": "user", "content": p}], [], MAX_TOKENS)[1] for p in prompts]
    client = stack.client()

    def ask(prompt: str) -> str:
        reply = client.chat.completions.create(
            model="mmserve-tiny-random", messages=[{"role": "user", "content": prompt}], temperature=0, max_completion_tokens=MAX_TOKENS
        )
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == wants
