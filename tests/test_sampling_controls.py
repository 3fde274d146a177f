"""OpenAI sampling controls and structured outputs through the real stack (official SDK), plus the processors' arithmetic.

logprobs/top_logprobs (streamed and not), logit_bias, presence/frequency and
repetition penalties, min_tokens, min_p, and response_format json_object /
json_schema: each asserted by what it does to the tokens, not by status.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import torch

from services.decoder.conversation import SamplingConfig
from services.decoder.engine.builtin.logits import LogitsProcessors
from tests.conftest import Stack
from tests.test_gateway import MODEL, api_error

EOS = 2  # <|im_end|> of the tiny tokenizer
PROMPT = [{"role": "user", "content": "Tell me a story about a cat"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process: nothing in this module needs a service process."""
    return inprocess_stack


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.client()


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_completion_tokens", 24)
    kwargs.setdefault("messages", PROMPT)
    return client.chat.completions.create(model=MODEL, **kwargs)


def token_ids(client: openai.OpenAI, **kwargs: Any) -> list[str]:
    """The completion's tokens (as logprobs report them)."""
    reply = complete(client, logprobs=True, **kwargs)
    return [t.token for t in reply.choices[0].logprobs.content]


def valid_person(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"name", "age", "tags"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 10
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and isinstance(value["tags"], list)
        and len(value["tags"]) <= 3
        and all(t in "abc" for t in value["tags"])
    )


# --- logprobs ---------------------------------------------------------------------------


def test_logprobs_shape_and_greedy_token_is_the_top_one(client: openai.OpenAI) -> None:
    reply = complete(client, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 24
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or entry.token.startswith("bytes:")
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == choice.message.content


def test_streamed_logprobs_equal_the_whole_ones(client: openai.OpenAI) -> None:
    whole = complete(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in complete(client, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    assert complete(client).choices[0].logprobs is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        ({"logit_bias": {"abc": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
def test_out_of_range_controls_are_400_naming_the_field(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    err, _ = api_error(lambda: complete(client, extra_body=extra), 400)
    assert err["param"] == param, err


# --- logit bias, penalties, min_tokens, min_p --------------------------------------------------


def test_logit_bias_bans_and_forces_tokens(client: openai.OpenAI) -> None:
    first = complete(client, logprobs=True, max_completion_tokens=1)
    first_token = first.choices[0].logprobs.content[0]
    ranked = complete(client, logprobs=True, top_logprobs=20, max_completion_tokens=1).choices[0].logprobs.content[0].top_logprobs
    assert ranked[0].token == first_token.token
    forced = complete(client, max_completion_tokens=6, logit_bias={"300": 100}, extra_body={"ignore_eos": True}, logprobs=True)
    tokens = [t.token for t in forced.choices[0].logprobs.content]
    assert len(set(tokens)) == 1 and tokens[0] == " and", tokens  # id 300 is " and" in the tiny vocabulary
    banned = complete(client, max_completion_tokens=6, logit_bias={"300": -100}, extra_body={"ignore_eos": True}, logprobs=True)
    assert " and" not in [t.token for t in banned.choices[0].logprobs.content]


def test_frequency_and_presence_penalties_make_fewer_repeats(client: openai.OpenAI) -> None:
    plain = token_ids(client, max_completion_tokens=48, extra_body={"ignore_eos": True})
    assert len(set(plain)) < len(plain), "the greedy tiny model repeats itself; the test needs that"
    penalized = token_ids(client, max_completion_tokens=48, frequency_penalty=2, presence_penalty=2, extra_body={"ignore_eos": True})
    assert len(set(penalized)) > len(set(plain))
    repeated = token_ids(client, max_completion_tokens=48, extra_body={"ignore_eos": True, "repetition_penalty": 2.0})
    assert repeated != plain and len(set(repeated)) >= len(set(plain))


def test_min_tokens_holds_off_end_of_sequence(client: openai.OpenAI) -> None:
    at_once = complete(client, logit_bias={str(EOS): 100})
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    later = complete(client, logit_bias={str(EOS): 100}, extra_body={"min_tokens": 5})
    assert later.usage.completion_tokens == 6 and later.choices[0].finish_reason == "stop"


def test_min_p_one_keeps_only_the_top_token(client: openai.OpenAI) -> None:
    greedy = complete(client).choices[0].message.content
    sampled = complete(client, temperature=1.0, seed=7, extra_body={"min_p": 1.0}).choices[0].message.content
    assert sampled == greedy


# --- structured outputs ------------------------------------------------------------------------


def test_json_schema_output_validates_in_full_and_streamed(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = complete(client, response_format=fmt, max_completion_tokens=120)
    assert reply.choices[0].finish_reason == "stop"
    assert valid_person(json.loads(reply.choices[0].message.content))
    text = "".join(
        c.choices[0].delta.content or "" for c in complete(client, response_format=fmt, max_completion_tokens=120, stream=True) if c.choices
    )
    assert valid_person(json.loads(text))
    for choice in complete(client, response_format=fmt, max_completion_tokens=120, temperature=1.0, seed=3, n=3).choices:
        assert valid_person(json.loads(choice.message.content)), choice.message.content


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    reply = complete(client, response_format={"type": "json_object"}, max_completion_tokens=200)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_unsupported_schema_feature_is_400_naming_it(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {"required": ["a"]}}}}
    err, _ = api_error(lambda: complete(client, response_format=fmt), 400)
    assert err["param"] == "response_format" and "not" in err["message"], err


# --- the processors' arithmetic (in-process) ----------------------------------------------------------


def config(**kwargs: Any) -> SamplingConfig:
    base: dict[str, Any] = {
        "max_tokens": 8,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "seed": 0,
        "stop": [],
        "n": 2,
        "ignore_eos": False,
    }
    return SamplingConfig(**{**base, **kwargs})


def processors(cfg: SamplingConfig, prompt: list[int] | None = None) -> LogitsProcessors:
    return LogitsProcessors(
        cfg, vocab_size=6, eos=frozenset({5}), prompt_ids=prompt or [], grammar=None, tokenizer=None, device=torch.device("cpu")
    )


def test_penalties_arithmetic_per_choice() -> None:
    proc = processors(config(presence_penalty=0.5, frequency_penalty=0.25))
    proc.accept([0, 1], [3, 1])
    proc.accept([0], [3])
    logits = torch.zeros(2, 6)
    out = proc(logits, [0, 1])
    assert out[0].tolist() == [0, 0, 0, -(0.5 + 2 * 0.25), 0, 0]
    assert out[1].tolist() == [0, -(0.5 + 0.25), 0, 0, 0, 0]
    assert logits.abs().sum() == 0  # the batch's logits are not modified


def test_repetition_bias_and_min_tokens_arithmetic() -> None:
    proc = processors(config(repetition_penalty=2.0, logit_bias={4: 1.5}, min_tokens=1, n=1), prompt=[0, 1])
    out = proc(torch.tensor([[2.0, -2.0, 2.0, 0.0, 0.0, 9.0]]), [0])
    assert out[0].tolist() == [1.0, -4.0, 2.0, 0.0, 1.5, float("-inf")]
    proc.accept([0], [2])
    out = proc(torch.tensor([[2.0, -2.0, 2.0, 0.0, 0.0, 9.0]]), [0])
    assert out[0].tolist() == [1.0, -4.0, 1.0, 0.0, 1.5, 9.0]
