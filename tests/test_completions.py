"""POST /v1/completions (OpenAI's legacy completions) through the real stack, with the official `openai` SDK.

The prompt is used as is (no chat template); a list of prompts gives
len(prompts) x n choices numbered prompt x n + i, each the completion of its
prompt alone; streaming gives the same text; logprobs have the legacy shape;
what mmserve does not do (echo, suffix, best_of > n, token-id prompts) and
prompts over the context are 400s naming the field. Also: the gateway's
OpenAPI document declares its real errors (400 for validation, never 422's
validation schema) and every field of /v1/completions.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.test_gateway import MODEL, api_error, running, wait_running

PROMPT = "The quick brown fox"
PROMPTS = ["Once upon a time", "def fibonacci(n):", "1, 2, 3,"]


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process: nothing in this module needs a service process."""
    return inprocess_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


def complete(client: openai.OpenAI, prompt: Any = PROMPT, **kwargs: Any) -> Any:
    """A greedy completion of 12 tokens that does not stop at end-of-sequence, unless told otherwise."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("extra_body", {"ignore_eos": True})
    return client.completions.create(model=MODEL, prompt=prompt, **kwargs)


def streamed(client: openai.OpenAI, prompt: Any = PROMPT, **kwargs: Any) -> tuple[dict[int, str], list[Any]]:
    """Text per choice index of a streamed completion, and all its chunks."""
    chunks = list(complete(client, prompt, stream=True, **kwargs))
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts, chunks


# --- the basics -----------------------------------------------------------------------------


def test_greedy_completion_is_repeatable_and_has_the_legacy_shape(client: openai.OpenAI) -> None:
    first, second = complete(client), complete(client)
    assert first.object == "text_completion" and first.id.startswith("cmpl-") and first.model == MODEL
    assert len(first.choices) == 1
    choice = first.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert choice.text and choice.text == second.choices[0].text
    assert first.usage.completion_tokens == 12
    assert first.usage.total_tokens == first.usage.prompt_tokens + 12


def test_the_prompt_is_used_as_is_without_the_chat_template(client: openai.OpenAI) -> None:
    raw = complete(client, PROMPT)
    templated = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=1)
    assert 0 < raw.usage.prompt_tokens < templated.usage.prompt_tokens  # no system prompt, no role markers
    longer = complete(client, PROMPT + " jumps over the lazy dog")
    assert longer.usage.prompt_tokens > raw.usage.prompt_tokens


def test_max_tokens_defaults_to_16_as_in_openai(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 16 and reply.choices[0].finish_reason == "length"


def test_max_tokens_and_stop(client: openai.OpenAI) -> None:
    short = complete(client, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    whole = complete(client, max_tokens=24).choices[0].text
    assert whole.startswith(short.choices[0].text)
    stop = next(whole[k : k + 2] for k in range(len(whole) // 2, len(whole) - 1) if whole[k : k + 2].strip())
    stopped = complete(client, max_tokens=24, stop=[stop]).choices[0]
    assert stopped.text == whole[: whole.index(stop)], (whole, stop)
    assert stopped.finish_reason == "stop"


# --- several prompts, n ----------------------------------------------------------------------


def test_a_list_of_prompts_gives_each_prompts_own_completion_in_order(client: openai.OpenAI) -> None:
    alone = [complete(client, p).choices[0].text for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS), "the prompts give the same text: the test could not fail"
    together = complete(client, PROMPTS)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone
    singles = [complete(client, p).usage for p in PROMPTS]
    assert together.usage.prompt_tokens == sum(u.prompt_tokens for u in singles)
    assert together.usage.completion_tokens == 12 * len(PROMPTS)


def test_a_list_of_prompts_with_n_numbers_choices_prompt_times_n_plus_i(client: openai.OpenAI) -> None:
    sampled = {"temperature": 1.0, "seed": 1234, "n": 2}
    alone = [[c.text for c in sorted(complete(client, p, **sampled).choices, key=lambda c: c.index)] for p in PROMPTS[:2]]
    assert alone[0][0] != alone[0][1], "n choices are equal: the test could not tell them apart"
    together = complete(client, PROMPTS[:2], **sampled)
    assert sorted(c.index for c in together.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in together.choices}
    assert [[by_index[k * 2 + i] for i in range(2)] for k in range(2)] == alone
    assert together.usage.completion_tokens == 4 * 12


# --- streaming -------------------------------------------------------------------------------


def test_streamed_text_equals_the_whole_text(client: openai.OpenAI) -> None:
    whole = complete(client, PROMPTS)
    texts, chunks = streamed(client, PROMPTS, stream_options={"include_usage": True})
    assert texts == {c.index: c.text for c in whole.choices}
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("cmpl-")
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_without_include_usage_has_no_usage(client: openai.OpenAI) -> None:
    texts, chunks = streamed(client)
    assert texts == {0: complete(client).choices[0].text}
    assert all(c.usage is None and c.choices for c in chunks)


def test_disconnect_mid_stream_cancels_every_prompts_generation(stack: Stack, client: openai.OpenAI) -> None:
    wait_running(stack.decoder, 0)
    stream = complete(client, PROMPTS[:2], max_tokens=4000, stream=True)
    received = [next(iter(stream)) for _ in range(6)]
    assert len(received) == 6 and running(stack.decoder) == 2
    stream.close()
    wait_running(stack.decoder, 0, timeout=5)


# --- logprobs --------------------------------------------------------------------------------


def test_logprobs_have_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = complete(client, logprobs=3)
    choice = reply.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == reply.usage.completion_tokens
    assert all(isinstance(t, str) for t in lp.tokens)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) == 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the token is the most likely one
        assert token in top
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] < len(choice.text)
    assert choice.text == complete(client).choices[0].text  # asking for logprobs does not change the text


def test_logprobs_zero_gives_token_logprobs_without_alternatives(client: openai.OpenAI) -> None:
    lp = complete(client, logprobs=0, max_tokens=4).choices[0].logprobs
    assert len(lp.tokens) == 4 and lp.top_logprobs == [{}] * 4 and all(x <= 0 for x in lp.token_logprobs)


def test_streamed_logprobs_equal_the_whole_ones(client: openai.OpenAI) -> None:
    whole = complete(client, logprobs=2).choices[0].logprobs
    _, chunks = streamed(client, logprobs=2)
    parts = [ch.logprobs for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.tokens]
    assert [t for p in parts for t in p.tokens] == whole.tokens
    assert [x for p in parts for x in p.token_logprobs] == pytest.approx(whole.token_logprobs)
    assert [o for p in parts for o in p.text_offset] == whole.text_offset


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"echo": True}, "echo", "echo is not supported"),
        ({"suffix": "the end"}, "suffix", "suffix is not supported"),
        ({"best_of": 3}, "best_of", "best_of is not supported"),
        ({"best_of": 3, "n": 2}, "best_of", "best_of = n (2)"),
        ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ],
)
def test_what_mmserve_does_not_do_is_a_400_naming_the_field(client: openai.OpenAI, kwargs: dict[str, Any], param: str, words: str) -> None:
    err, headers = api_error(lambda: complete(client, **kwargs), 400)
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error" and headers["x-should-retry"] == "false"


def test_best_of_equal_to_n_and_echo_false_are_accepted(client: openai.OpenAI) -> None:
    reply = complete(client, best_of=2, n=2, echo=False, suffix=None)
    assert len(reply.choices) == 2


@pytest.mark.parametrize(("prompt", "param"), [([1, 2, 3], "prompt"), ([[1, 2], [3]], "prompt"), ([], "prompt"), (["a", ""], "prompt[1]")])
def test_token_id_and_empty_prompts_are_400s_naming_prompt(client: openai.OpenAI, prompt: Any, param: str) -> None:
    err, _ = api_error(lambda: complete(client, prompt), 400)
    assert err["param"] == param, err


def test_a_prompt_over_the_context_is_a_400_naming_prompt(client: openai.OpenAI) -> None:
    context = client.models.list().data[0].max_model_len
    digits = "7" * (context + 8)  # one token per digit: few characters, but more tokens than the context
    err, _ = api_error(lambda: complete(client, digits), 400)
    assert err["param"] == "prompt" and f"context is {context} tokens" in err["message"], err
    huge = "word " * (context * 40)  # refused by counting characters, before tokenization
    err, _ = api_error(lambda: complete(client, huge), 400)
    assert err["param"] == "prompt" and "too long" in err["message"], err
    err, _ = api_error(lambda: complete(client, [PROMPT, digits]), 400)
    assert err["param"] == "prompt[1]", err


def test_max_tokens_past_the_context_is_a_400_naming_max_tokens(client: openai.OpenAI) -> None:
    context = client.models.list().data[0].max_model_len
    err, _ = api_error(lambda: complete(client, max_tokens=context + 1), 400)
    assert err["param"] == "max_tokens" and "exceeds this model's context" in err["message"], err


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    err, _ = api_error(lambda: client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2), 404)
    assert err["param"] == "model", err


# --- OpenAPI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(stack: Stack) -> dict[str, Any]:
    reply = httpx.get(stack.gateway.base_url.removesuffix("/v1") + "/openapi.json", timeout=10)
    assert reply.status_code == 200
    return reply.json()  # type: ignore[no-any-return]


def test_openapi_never_documents_a_validation_422(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    for path, operations in openapi["paths"].items():
        for method, op in operations.items():
            bad = op["responses"].get("422")
            if bad is not None:  # only the real one: remote media that could not be fetched
                assert "fetched" in bad["description"], (method, path)
                assert bad["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")


def test_openapi_documents_the_errors_each_route_returns(openapi: dict[str, Any]) -> None:
    posts = {path: ops["post"] for path, ops in openapi["paths"].items() if "post" in ops}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/mm/encode"} <= set(posts)
    for path, op in posts.items():
        for status in ("400", "401", "413", "503", "default"):
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), (path, status)
    assert {"404", "429", "499", "504"} <= set(posts["/v1/completions"]["responses"])
    assert "422" not in posts["/v1/completions"]["responses"]
    error = openapi["components"]["schemas"]["ErrorDetail"]["properties"]
    assert set(error) == {"message", "type", "param", "code"}


def test_openapi_documents_every_field_of_completions(openapi: dict[str, Any]) -> None:
    op = openapi["paths"]["/v1/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    fields = openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]]["properties"]
    expected = {
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
        "logprobs", "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty", "logit_bias",
        "top_k", "min_p", "min_tokens", "repetition_penalty", "ignore_eos", "user",
    }  # fmt: skip
    assert expected <= set(fields)
    assert all(field.get("description") for field in fields.values()), [k for k, v in fields.items() if not v.get("description")]
    assert fields["max_tokens"]["default"] == 16 and fields["logprobs"]["anyOf"][0]["maximum"] == 5
    ok = op["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/CompletionResponse") and "text/event-stream" in ok
    for name, schema in openapi["components"]["schemas"].items():
        undocumented = [k for k, v in schema.get("properties", {}).items() if not v.get("description")]
        assert not undocumented, (name, undocumented)
