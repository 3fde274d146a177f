"""Structured outputs: a request's format -> an llguidance grammar, checked against the tokenizer before any work.

llguidance rather than xgrammar: it is one Rust wheel with no torch or CUDA
build of its own (the project pins torch), computes a token mask on the CPU
in microseconds without a per-schema compile step, names the JSON Schema
feature it does not support (which becomes the 400), takes Lark grammars that
embed JSON schemas (the tool-call formats), and is what vLLM's `guidance`
backend runs, so both engines constrain output the same way.

Output is compact JSON (no free whitespace between tokens): a model cannot
wander off into endless blanks, which matters for the random-weight demo
models and costs a real model nothing.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf

from mmserve.errors import InvalidArgument
from services.decoder.conversation import Guidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

FIELD = "sampling.guidance"
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
ANY_OBJECT = {"type": "object"}


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """The llguidance view of a Hugging Face tokenizer (built once per tokenizer: it walks the vocabulary)."""
    return llguidance.hf.from_tokenizer(tokenizer)


def grammar_for(guidance: Guidance) -> str:
    """The llguidance grammar of a format; a schema that is not JSON is a 400."""
    if guidance.json_object:
        schema: Any = ANY_OBJECT
    else:
        assert guidance.json_schema is not None
        try:
            schema = json.loads(guidance.json_schema)
        except ValueError as exc:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {exc}", field=FIELD) from None
        if not isinstance(schema, dict | bool):
            raise InvalidArgument("the JSON schema must be an object", field=FIELD)
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)


def checked_grammar(grammar: str, tokenizer: Any, *, field: str = FIELD) -> str:
    """The grammar, if llguidance can enforce it with this tokenizer; else a 400 naming what it cannot do."""
    try:
        lltokenizer = grammar_tokenizer(tokenizer)
    except ValueError as exc:  # llguidance reads fast (Rust) Hugging Face tokenizers only, not e.g. Mistral's Tekken
        raise InvalidArgument(f"this model's tokenizer cannot enforce a format here: {exc}", field=field) from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
    if failed:
        raise InvalidArgument(f"unsupported format: {'; '.join(messages) or 'the grammar is invalid'}", field=field)
    return grammar
