"""The vLLM engine on the other families: Qwen3-VL (deepstack, timestamped video) and the Qwen2.5-Omni thinker.

Each family gets its own pair of decoders (one per engine) on its tiny
checkpoint, one family at a time; greedy tokens must be equal across engines
for every modality vLLM takes as embeddings, and the rest must be refused by
name.
"""

from __future__ import annotations

import grpc
import pytest

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from tests.test_batching import media
from tests.test_vllm_engine import CASES, complete
from tests.vllm_pairs import Pair, PairPool

pytestmark = pytest.mark.vllm

#: the checkpoints, and the cases vLLM serves for both (text is covered on Qwen2.5-VL)
FAMILIES = ("qwen3_vl-tiny", "qwen2_5_omni-tiny")
SERVED = ("image", "two-images", "video", "time-series")


# One pair of decoders per checkpoint for the whole module: every test names its checkpoint in a
# parametrize of its own, which pytest caches by value and groups by; a (checkpoint, case) tuple
# would make each tuple a new fixture instance (a new pair: ~90 s each).
@pytest.fixture(scope="module")
def family_pair(request: pytest.FixtureRequest, vllm_pairs: PairPool) -> Pair:
    return vllm_pairs.get(request.param)


@pytest.mark.parametrize("case", SERVED)
@pytest.mark.parametrize("family_pair", FAMILIES, indirect=True)
def test_vllm_engine_gives_the_builtin_engines_tokens_for_the_family(family_pair: Pair, case: str) -> None:
    ours = complete(family_pair.builtin_client, CASES[case], stream=True)
    theirs = complete(family_pair.vllm_client, CASES[case], stream=True)
    assert theirs[1] == ours[1] == 16
    assert theirs[0] == ours[0] and ours[0]


@pytest.mark.parametrize("family_pair", ["qwen2_5_omni-tiny"], indirect=True)
def test_omni_audio_is_refused_by_name_with_the_vllm_engine(family_pair: Pair) -> None:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(media=media("audio")), pb.ContentPart(text="Who speaks?")])],
        sampling=pb.SamplingParams(temperature=0, max_tokens=4),
    )
    with grpc.insecure_channel(family_pair.vllm.target) as channel, pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.DecoderServiceStub(channel).Generate(request, timeout=60))
    details = caught.value.details() or ""
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio" in details and "vllm engine" in details and "mel features" in details


@pytest.mark.parametrize("family_pair", ["qwen3_vl-tiny"], indirect=True)
def test_required_tool_call_on_vllm_equals_the_builtin_engines(family_pair: Pair) -> None:
    """Tools go through the same template, grammar and parser on both engines: the same valid call, greedy."""
    import json

    from tests.test_tools import ASK, WEATHER, valid_call

    def call(client: object) -> tuple[str, str, str | None]:
        reply = client.chat.completions.create(  # type: ignore[attr-defined]
            model="mmserve-tiny-random", messages=ASK, tools=[WEATHER], tool_choice="required",
            parallel_tool_calls=False, temperature=0, max_completion_tokens=80,
        )  # fmt: skip
        [made] = reply.choices[0].message.tool_calls
        return made.function.name, made.function.arguments, reply.choices[0].finish_reason

    ours, theirs = call(family_pair.builtin_client), call(family_pair.vllm_client)
    assert theirs == ours and ours[2] == "tool_calls"
    assert valid_call(ours[0], json.loads(ours[1]))
