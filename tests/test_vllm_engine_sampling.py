"""The sampling controls and structured outputs on the vLLM engine, through the gateway (official SDK), beside the built-in engine.

The same stack as tests/test_vllm_engine.py, the very same processes when it
runs first (tests/vllm_pairs.py). Each control is asserted by what it does
to the tokens; greedy logprobs are compared with the built-in engine's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import TINY
from tests.test_sampling_controls import EOS, PERSON, PROMPT, valid_person
from tests.vllm_pairs import Pair, PairPool

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def pair(vllm_pairs: PairPool) -> Pair:
    """The pair tests/test_vllm_engine.py ran on, still running when this module follows it."""
    return vllm_pairs.get(TINY)


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_completion_tokens", 8)
    kwargs.setdefault("messages", PROMPT)
    return client.chat.completions.create(model="", **kwargs)


def test_greedy_logprobs_have_the_shape_and_the_builtin_engines_values(pair: Pair) -> None:
    kwargs: dict[str, Any] = {"logprobs": True, "top_logprobs": 5, "extra_body": {"ignore_eos": True}}
    theirs = complete(pair.vllm_client, **kwargs)
    content = theirs.choices[0].logprobs.content
    assert len(content) == theirs.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == theirs.choices[0].message.content
    ours = complete(pair.builtin_client, **kwargs).choices[0].logprobs.content
    assert [e.token for e in content] == [e.token for e in ours]
    for mine, other in zip(ours, content, strict=True):
        assert other.logprob == pytest.approx(mine.logprob, abs=1e-3)
        assert [t.token for t in other.top_logprobs] == [t.token for t in mine.top_logprobs]
        assert [t.logprob for t in other.top_logprobs] == pytest.approx([t.logprob for t in mine.top_logprobs], abs=1e-3)


def test_streamed_logprobs_on_vllm_equal_the_whole_ones(pair: Pair) -> None:
    whole = complete(pair.vllm_client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = []
    for chunk in complete(pair.vllm_client, logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]
    assert complete(pair.vllm_client).choices[0].logprobs is None


def test_logit_bias_forces_and_bans_a_token_on_vllm(pair: Pair) -> None:
    forced = complete(pair.vllm_client, max_completion_tokens=4, logit_bias={"300": 100}, logprobs=True, extra_body={"ignore_eos": True})
    assert [t.token for t in forced.choices[0].logprobs.content] == [" and"] * 4  # id 300 is " and" in the tiny vocabulary
    assert forced.choices[0].message.content == " and" * 4
    # processed logprobs: the biased distribution it was sampled from (raw logprobs would be those before the bias)
    assert all(t.logprob == pytest.approx(0.0, abs=1e-3) for t in forced.choices[0].logprobs.content)
    banned = complete(pair.vllm_client, max_completion_tokens=4, logit_bias={"300": -100}, logprobs=True, extra_body={"ignore_eos": True})
    assert " and" not in [t.token for t in banned.choices[0].logprobs.content]


def test_min_tokens_holds_off_end_of_sequence_on_vllm(pair: Pair) -> None:
    at_once = complete(pair.vllm_client, logit_bias={str(EOS): 100})
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    later = complete(pair.vllm_client, logit_bias={str(EOS): 100}, extra_body={"min_tokens": 3})
    assert later.usage.completion_tokens == 4 and later.choices[0].finish_reason == "stop"


def test_penalties_and_min_p_on_vllm_give_the_builtin_engines_tokens(pair: Pair) -> None:
    """Greedy with presence/frequency/repetition penalties: the same processors in the same order, so the same tokens."""
    kwargs: dict[str, Any] = {
        "max_completion_tokens": 12, "frequency_penalty": 1.5, "presence_penalty": 1.0,
        "extra_body": {"ignore_eos": True, "repetition_penalty": 1.5},
    }  # fmt: skip
    theirs = complete(pair.vllm_client, **kwargs).choices[0].message.content
    assert theirs == complete(pair.builtin_client, **kwargs).choices[0].message.content
    assert theirs != complete(pair.vllm_client, max_completion_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    sampled = complete(pair.vllm_client, temperature=1.0, seed=7, extra_body={"min_p": 1.0}).choices[0].message.content
    assert sampled == complete(pair.vllm_client).choices[0].message.content  # min_p=1 keeps only the top token


def test_json_schema_output_validates_on_vllm(pair: Pair) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = complete(pair.vllm_client, response_format=fmt, max_completion_tokens=60)
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert valid_person(json.loads(reply.choices[0].message.content))
    for choice in complete(pair.vllm_client, response_format=fmt, max_completion_tokens=60, temperature=1.0, seed=3, n=2).choices:
        assert valid_person(json.loads(choice.message.content)), choice.message.content


GRAMMARS = """
import json
from mmserve.models.families.base import HERMES_TOOL_CALLS
from services.decoder.conversation import Guidance
from services.decoder.engine.vllm.engine import structured_outputs
from services.decoder.guidance import grammar_for
from services.decoder.tools import ToolSpec, tool_grammar
from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
from vllm.v1.structured_output.request import get_structured_output_key

schema = json.loads(%r)
tool = ToolSpec([], "required", True, {"lookup": schema, "other": {"type": "object"}})
for grammar in (grammar_for(Guidance(json_schema=json.dumps(schema))), grammar_for(Guidance(json_object=True)), tool_grammar(tool, HERMES_TOOL_CALLS)):
    assert serialize_guidance_grammar(*get_structured_output_key(structured_outputs(grammar))) == grammar, grammar
print("same grammars")
"""


def test_vllms_guidance_backend_builds_our_grammars_byte_for_byte(vllm_env: Path) -> None:
    """A response_format schema (as json=) and a required tool call's Lark grammar (as grammar=): vLLM's guidance
    backend serializes each to exactly the grammar the built-in engine enforces."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [str(vllm_env / "bin" / "python"), "-c", GRAMMARS % json.dumps(PERSON)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "same grammars" in done.stdout, done.stderr[-3000:]
