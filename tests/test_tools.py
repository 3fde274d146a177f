"""Tool calling through the real stack: the official SDK and LangChain against a Qwen3-VL tiny model.

The random-weight model cannot choose to call a tool, so `required` and a
named tool_choice (enforced by a grammar) are what make it call one; every
call it returns must name a defined tool and carry arguments that validate
against that tool's schema. `auto` is tested by the parser directly (any
split of the model's text gives the same calls), and end to end by what it
must not do. Models whose real chat template has no tool section refuse tools.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from mmserve.localredis import LocalRedis
from mmserve.models.families.base import HERMES_TOOL_CALLS
from services.decoder.tools import ToolCallParser
from tests.conftest import Stack, start_inprocess_stack
from tests.inprocess import InProcessServices
from tests.test_gateway import MODEL, api_error

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["offset"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def stack(inprocess_stack: Stack) -> Stack:
    """The session's stack in the test process: nothing in this module needs a service process."""
    return inprocess_stack


@pytest.fixture(scope="module")
def qwen3(inprocess: InProcessServices) -> Iterator[Stack]:
    with LocalRedis() as server:
        stack = start_inprocess_stack(inprocess, server.url, model="tiny:qwen3_vl-tiny")
        yield stack
        stack.stop()


@pytest.fixture(scope="module")
def client(qwen3: Stack) -> openai.OpenAI:
    return qwen3.client()


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_completion_tokens", 120)
    return client.chat.completions.create(model=MODEL, **kwargs)


def valid_call(name: str, arguments: dict[str, Any]) -> bool:
    if name == "get_weather":
        return (
            set(arguments) == {"city", "unit"}
            and isinstance(arguments["city"], str)
            and len(arguments["city"]) <= 12
            and arguments["unit"] in ("C", "F")
        )
    if name == "get_time":
        return set(arguments) == {"offset"} and isinstance(arguments["offset"], int) and -12 <= arguments["offset"] <= 14
    return False


# --- required and named calls, whole and streamed --------------------------------------------


def test_required_returns_a_valid_call(client: openai.OpenAI) -> None:
    reply = create(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert valid_call(call.function.name, json.loads(call.function.arguments)), call


def test_named_choice_calls_that_function(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    reply = create(client, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time" and valid_call("get_time", json.loads(call.function.arguments))


def test_streamed_call_equals_the_whole_one(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}
    whole = create(client, **kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in create(client, stream=True, **kwargs):
        for delta_call in chunk.choices[0].delta.tool_calls or ():
            entry = calls.setdefault(delta_call.index, {"name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"name": whole.function.name, "arguments": whole.function.arguments}}


def test_parallel_calls_are_each_valid(client: openai.OpenAI) -> None:
    reply = create(client, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=5, max_completion_tokens=200)
    calls = reply.choices[0].message.tool_calls
    assert calls, reply.choices[0]
    assert all(valid_call(c.function.name, json.loads(c.function.arguments)) for c in calls)
    assert len({c.id for c in calls}) == len(calls)


def test_n_choices_each_call(client: openai.OpenAI) -> None:
    reply = create(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=9, n=3)
    for choice in reply.choices:
        [call] = choice.message.tool_calls
        assert valid_call(call.function.name, json.loads(call.function.arguments))


# --- auto, none, history ---------------------------------------------------------------------


def test_auto_and_none(client: openai.OpenAI) -> None:
    plain = create(client, max_completion_tokens=16)
    auto = create(client, tools=[WEATHER], max_completion_tokens=16)
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens  # the template showed the tool
    assert auto.choices[0].finish_reason != "tool_calls" or auto.choices[0].message.tool_calls
    none = create(client, tools=[WEATHER], tool_choice="none", max_completion_tokens=16)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens and not none.choices[0].message.tool_calls
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_tool_results_continue_the_conversation(client: openai.OpenAI) -> None:
    first = create(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    reply = create(client, messages=history, tools=[WEATHER], max_completion_tokens=8)
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert reply.choices[0].message.content is not None


# --- refusals ---------------------------------------------------------------------------------


def test_tool_errors_name_the_field(client: openai.OpenAI, stack: Stack) -> None:
    err, _ = api_error(lambda: create(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), 400)
    assert err["param"] == "tool_choice" and "nope" in err["message"]
    err, _ = api_error(lambda: create(client, tool_choice="required"), 400)
    assert err["param"] == "tool_choice"
    err, _ = api_error(lambda: create(client, tools=[WEATHER], messages=[*ASK, {"role": "tool", "content": "x"}]), 400)
    assert err["param"] == "messages[1]" and "tool_call_id" in err["message"]
    bad = {"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}
    err, _ = api_error(lambda: create(client, tools=[bad]), 400)
    assert err["param"] == "tools[0].function.name"
    # Qwen2.5-VL's real chat template has no tool section: the model cannot be offered tools
    err, _ = api_error(lambda: create(stack.client(), tools=[WEATHER]), 400)
    assert err["param"] == "tools" and "tool" in err["message"]


# --- the parser, in process ------------------------------------------------------------------------


def test_parser_gives_the_same_calls_for_any_split() -> None:
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"offset": 1}}\n</tool_call>'
    for cut in range(1, len(text)):
        parser = ToolCallParser(HERMES_TOOL_CALLS)
        content, calls = parser.feed(text[:cut])
        more_content, more_calls = parser.feed(text[cut:])
        tail, last = parser.finish()
        assert content + more_content + tail == "Let me check.", cut
        assert [(c.name, json.loads(c.arguments)) for c in calls + more_calls + last] == [
            ("get_weather", {"city": "Paris", "unit": "C"}),
            ("get_time", {"offset": 1}),
        ], cut


def test_parser_keeps_text_that_is_not_a_call() -> None:
    parser = ToolCallParser(HERMES_TOOL_CALLS)
    content, calls = parser.feed("a <tool_call>not json</tool_call> b <tool")
    tail, last = parser.finish()
    assert content + tail == "a <tool_call>not json</tool_call> b <tool" and not calls and not last


# --- LangChain ---------------------------------------------------------------------------------


def test_langchain_bind_tools_and_structured_output(qwen3: Stack) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=10)
        age: int = Field(ge=0, le=150)

    llm = ChatOpenAI(base_url=qwen3.gateway.base_url, api_key="unused", model=MODEL, temperature=0, max_tokens=120, max_retries=0)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert message.tool_calls  # LangChain leaves parallel calls on: one or more, each valid
    assert all(c["name"] == "get_weather" and valid_call("get_weather", c["args"]) for c in message.tool_calls)
    for method in ("function_calling", "json_schema"):
        person = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(person, Person), method
    schema = {"title": "Pet", "type": "object", "properties": {"kind": {"type": "string", "enum": ["cat", "dog"]}}, "required": ["kind"]}
    # json_mode allows any object: a random model's strings may never end, so ask what this one answers briefly
    pet = llm.with_structured_output(schema, method="json_mode").invoke("Give me a JSON object.")
    assert isinstance(pet, dict)
