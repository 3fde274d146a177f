"""The vLLM engine through the real stack: the same tokens as the built-in engine, fed from the store.

One encoder and one Redis serve two decoders of the same checkpoint, one per
engine (the vLLM one in its own environment, built here by
scripts/build-vllm-env when missing), each behind its own gateway
(tests/vllm_pairs.py). Every request goes to both; greedy outputs must be
equal token for token.
"""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from mmserve.api.encoder.v1 import encoder_service_pb2 as enc_pb
from tests.conftest import TINY
from tests.support import data_url, encoder_stub, image_item, png_bytes, scrape
from tests.test_equivalence_modalities import SERIES, b64, mp4_bytes
from tests.test_stack_up import children, launch_up, wait_up
from tests.vllm_pairs import Pair, PairPool

pytestmark = pytest.mark.vllm

ENCODE_OK = 'mmserve_requests_total{outcome="OK",rpc="Encode",service="encoder"}'
RUNNING = "mmserve_num_requests_running"
IMAGE, IMAGE2 = data_url(png_bytes(128, 96, 3)), data_url(png_bytes(64, 64, 4))
SERIES_PART = {
    "type": "time_series_url",
    "time_series_url": {"url": f"data:application/octet-stream;base64,{b64(SERIES)}", "sampling_rate": 100},
}


@pytest.fixture(scope="module")
def pair(vllm_pairs: PairPool) -> Pair:
    """The session's pair on the default tiny checkpoint (tests/test_vllm_engine_sampling.py uses it too)."""
    return vllm_pairs.get(TINY)


def user(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


CASES = {
    "text": user({"type": "text", "text": "Tell me a story about a cat."}),
    "image": user(image(IMAGE), {"type": "text", "text": "What is this?"}),
    "two-images": user(image(IMAGE), image(IMAGE2), {"type": "text", "text": "Compare them."}),
    "time-series": user(SERIES_PART, {"type": "text", "text": "Describe the trend."}),
    "video": user({"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{base64.b64encode(mp4_bytes()).decode()}"}},
                  {"type": "text", "text": "What happens?"}),
}  # fmt: skip


def complete(client: openai.OpenAI, messages: list[dict[str, Any]], stream: bool, tokens: int = 16) -> tuple[str, int, int]:
    """(text, completion tokens, cached prompt tokens) of one greedy request."""
    kwargs: dict[str, Any] = {"model": "", "messages": messages, "temperature": 0, "max_tokens": tokens, "extra_body": {"ignore_eos": True}}
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        details = reply.usage.prompt_tokens_details
        return reply.choices[0].message.content or "", reply.usage.completion_tokens, (details.cached_tokens if details else 0) or 0
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    return text, usage.completion_tokens, (usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0) or 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_vllm_engine_gives_the_builtin_engines_tokens(pair: Pair, case: str, stream: bool) -> None:
    ours = complete(pair.builtin_client, CASES[case], stream)
    theirs = complete(pair.vllm_client, CASES[case], stream)
    assert theirs[1] == ours[1] == 16
    assert theirs[0] == ours[0] and ours[0]


def test_a_stored_image_by_uuid_needs_no_encoder_call_and_hits_vllms_prefix_cache(pair: Pair) -> None:
    with encoder_stub(pair.encoder.target) as stub:
        stub.Encode(enc_pb.EncodeRequest(items=[image_item(png_bytes(448, 448, 11), uuid="vllm-stored")]))  # 256 tokens: whole KV blocks
    messages = user({"type": "image_url", "image_url": None, "uuid": "vllm-stored"}, {"type": "text", "text": "Describe it."})
    before = scrape(pair.encoder.metrics_url).get(ENCODE_OK, 0.0)
    first = complete(pair.vllm_client, messages, stream=False)
    again = complete(pair.vllm_client, messages, stream=True)
    assert scrape(pair.encoder.metrics_url).get(ENCODE_OK, 0.0) == before  # the decoder read the store only
    assert first[0] == again[0] == complete(pair.builtin_client, messages, stream=False)[0]
    assert again[2] > 0  # vLLM's prefix cache: the item's content id is its multi_modal_uuid


def test_cancel_mid_stream_frees_vllms_slot(pair: Pair) -> None:
    stream = pair.vllm_client.chat.completions.create(
        model="", messages=CASES["text"], max_tokens=3000, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _ in zip(range(3), stream, strict=False):
        pass
    assert scrape(pair.vllm.metrics_url)[RUNNING] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while scrape(pair.vllm.metrics_url)[RUNNING] != 0:
        assert time.monotonic() < deadline, "vLLM still runs the cancelled request"
        time.sleep(0.1)


def test_a_time_series_beside_other_media_is_refused_by_name_with_the_vllm_engine(pair: Pair) -> None:
    """A time series goes to vLLM as the whole prompt's embeddings (the "time-series" case), which vLLM takes only alone."""
    with pytest.raises(openai.BadRequestError) as caught:
        complete(pair.vllm_client, user(SERIES_PART, image(IMAGE), {"type": "text", "text": "Both?"}), stream=False)
    error = caught.value.body if isinstance(caught.value.body, dict) else {}
    assert "time series cannot share a request with image" in error.get("message", "") and "vllm engine" in error.get("message", "")
    assert error.get("param") == "messages", error


def test_mmserve_up_with_the_vllm_engine_serves_the_same_tokens(pair: Pair, vllm_env: Path) -> None:
    """`mmserve up --engine vllm`: the decoder runs from the vLLM environment, on the checkpoint the encoder uses."""
    with launch_up("--engine", "vllm", "--vllm-venv", str(vllm_env), MMSERVE_MODEL=f"tiny:{TINY}", MMSERVE_VLLM_CPU_KV_CACHE_GIB="1") as up:
        wait_up(up, timeout=900)
        decoder = next(cmd for cmd in children(up.proc.pid).values() if cmd.endswith("decoder"))
        assert decoder.startswith(str(vllm_env / "bin"))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{up.ports['gateway']}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["mmserve-tiny-random"]
        assert complete(client, CASES["image"], stream=True)[:2] == complete(pair.builtin_client, CASES["image"], stream=True)[:2]
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0, up.output()[-4000:]
