"""Admission before work, cancellation everywhere, and the KV budget, on the real stack.

- A prompt that can never fit the context is a 400 naming `messages`, decided
  by counting characters before any tokenization: a 30 MB message is refused
  without the decoder's memory moving or a token being counted.
- A client that abandons a non-streamed request cancels it: abandoned long
  requests do not hold up a short one.
- A gRPC deadline takes the request out of the batch within a step.
- A request whose worst case exceeds the whole KV budget is a 400; requests
  that fit only one at a time are served one after another, never over budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.api.decoder.v1 import decoder_service_pb2_grpc as pb_grpc
from mmserve.localredis import LocalRedis
from tests.conftest import RunningService, Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.support import scrape

LONG = 4000


def rss_bytes(service: RunningService) -> int:
    """Resident memory of a service process (from /proc)."""
    pid = service.process.proc.pid  # type: ignore[union-attr]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def running(stack: Stack) -> float:
    return scrape(stack.decoder.metrics_url)["mmserve_num_requests_running"]


def wait_idle(stack: Stack, timeout: float = 10.0) -> float:
    """Seconds until the decoder has nothing running (fails after `timeout`)."""
    start = time.monotonic()
    while running(stack) != 0:
        assert time.monotonic() - start < timeout, "requests stayed in the decoder's batch"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_30_mb_message_is_refused_before_any_work(stack: Stack) -> None:
    client = stack.client()
    client.chat.completions.create(model="", messages=[{"role": "user", "content": "warm"}], max_completion_tokens=2)
    before = rss_bytes(stack.decoder)
    prompt_tokens = scrape(stack.decoder.metrics_url)["mmserve_prompt_tokens_total"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "a" * (30 << 20)}], max_completion_tokens=2)
    error = caught.value.response.json()["error"]
    assert error["param"] == "messages" and "too long" in error["message"]
    assert rss_bytes(stack.decoder) - before < 8 << 20  # the message never reached the decoder
    assert scrape(stack.decoder.metrics_url)["mmserve_prompt_tokens_total"] == prompt_tokens  # nothing was tokenized


def test_the_decoder_refuses_an_impossible_prompt_by_counting(stack: Stack) -> None:
    """Direct gRPC clients get the same guard (the gateway is just one client)."""
    with grpc.insecure_channel(stack.decoder.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.DecoderServiceStub(channel)
        card = stub.ListModels(pb.ListModelsRequest()).models[0]
        assert card.max_prompt_chars > card.max_model_len
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="b" * (card.max_prompt_chars + 1))])],
            sampling=pb.SamplingParams(max_tokens=2),
        )
        before = scrape(stack.decoder.metrics_url)["mmserve_prompt_tokens_total"]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "too long" in (caught.value.details() or "")
        assert scrape(stack.decoder.metrics_url)["mmserve_prompt_tokens_total"] == before  # refused before tokenizing


def test_prompt_over_the_context_after_tokenization_is_a_400_naming_messages(stack: Stack) -> None:
    with grpc.insecure_channel(stack.decoder.target) as channel:
        card = pb_grpc.DecoderServiceStub(channel).ListModels(pb.ListModelsRequest()).models[0]
    text = "x y " * card.max_model_len  # fewer characters than the guard's bound, more tokens than the context
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().chat.completions.create(model="", messages=[{"role": "user", "content": text}], max_completion_tokens=2)
    error = caught.value.response.json()["error"]
    assert error["param"] == "messages" and "context" in error["message"]


def test_abandoned_non_streaming_requests_are_cancelled(stack: Stack) -> None:
    def abandon() -> None:
        body = {"model": "", "messages": [{"role": "user", "content": "Go on forever."}], "max_completion_tokens": LONG, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(stack.gateway.base_url + "/chat/completions", json=body, timeout=httpx.Timeout(10.0, read=1.5))

    before = scrape(stack.decoder.metrics_url)["mmserve_batch_size_sum"]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: abandon(), range(6)))
    wait_idle(stack, timeout=10.0)
    decoded = scrape(stack.decoder.metrics_url)["mmserve_batch_size_sum"] - before  # tokens decoded, all rows
    assert decoded < 6 * LONG / 2, "abandoned requests kept generating"
    reply = stack.client().chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4)
    assert reply.choices[0].message.content is not None


def test_a_deadline_takes_the_request_out_of_the_batch(stack: Stack) -> None:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role=pb.ROLE_USER, content=[pb.ContentPart(text="Go on.")])],
        sampling=pb.SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True),
    )
    with grpc.insecure_channel(stack.decoder.target) as channel, pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.DecoderServiceStub(channel).Generate(request, timeout=1.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(stack, timeout=3.0) < 3.0


@pytest.fixture(scope="module")
def small_kv_stack(inprocess: InProcessServices, module_redis: LocalRedis) -> Iterator[Stack]:
    """A decoder whose KV budget holds 300 tokens (in-process; the engine gauges show it)."""
    stack = start_inprocess_stack(inprocess, module_redis.url, kv_cache_tokens=300)
    stack.decoder.own_gauges()  # type: ignore[union-attr]
    yield stack
    stack.stop()


def test_kv_budget_bounds_admission(small_kv_stack: Stack) -> None:
    client = small_kv_stack.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=400)
    error = caught.value.response.json()["error"]
    assert "KV cache" in error["message"] and error["param"] == "max_completion_tokens"

    def ask(i: int) -> tuple[int, str]:
        reply = client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": f"Story {i}"}],
            temperature=0,
            max_completion_tokens=150,
            extra_body={"ignore_eos": True},
        )
        return reply.usage.completion_tokens, reply.choices[0].message.content or ""

    alone = ask(0)
    before = scrape(small_kv_stack.decoder.metrics_url)
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(ask, [0, 0, 0]))  # each needs > half the budget: served one at a time
    assert together == [alone] * 3
    metrics = scrape(small_kv_stack.decoder.metrics_url)
    assert metrics['mmserve_kv_cache_tokens{state="total"}'] == 300
    assert metrics['mmserve_kv_cache_tokens{state="used"}'] <= 300
    single = metrics['mmserve_batch_size_bucket{le="1.0"}'] - before['mmserve_batch_size_bucket{le="1.0"}']
    assert single == metrics["mmserve_batch_size_count"] - before["mmserve_batch_size_count"] > 0  # never two at once
