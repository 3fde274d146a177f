"""Tool calling: the request's tools and choice checked, the grammar that enforces a required or named call, and
the model's calls parsed out of its text (streamed or whole).

The family says how its models write a call (`Family.tool_call_format`, Qwen: `<tool_call>` + JSON + `</tool_call>`);
its chat template renders the tools. `required` and a named function are enforced with an llguidance grammar built
from the tools' parameter schemas, so even a random-weight model returns a call that validates; `auto` lets the model
decide and parses whatever calls it writes; `none` shows it no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import llguidance

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import InvalidArgument
from mmserve.models.families import Family
from mmserve.models.families.base import ToolCallFormat
from services.decoder.guidance import JSON_DEFAULTS

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MODES = {pb.ToolChoice.MODE_NONE: "none", pb.ToolChoice.MODE_AUTO: "auto", pb.ToolChoice.MODE_REQUIRED: "required"}


@dataclass
class ToolSpec:
    """Validated tools: OpenAI-shaped for the chat template, the choice ('none', 'auto', 'required' or a name)."""

    tools: list[dict[str, Any]]
    choice: str
    parallel: bool
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parameters schema

    @property
    def shown(self) -> list[dict[str, Any]] | None:
        """The tools the template renders (none for tool_choice none)."""
        return None if self.choice == "none" else self.tools


def parse_tools(request: pb.GenerateRequest, family: Family) -> ToolSpec | None:
    """The request's tools, or None; every fault is a 400 naming the field."""
    kind = request.tool_choice.WhichOneof("kind")
    choice = request.tool_choice.function if kind == "function" else MODES.get(request.tool_choice.mode, "auto")
    if not request.tools:
        if kind == "function" or choice == "required":
            raise InvalidArgument("tool_choice needs tools", field="tool_choice")
        return None
    if family.tool_call_format is None or not family.takes_tools:
        raise InvalidArgument(f"this model's chat template ({family.name}) has no tool support", field="tools")
    tools, schemas = [], {}
    for i, tool in enumerate(request.tools):
        where = f"tools[{i}].function"
        if not NAME.match(tool.name):
            raise InvalidArgument("name must be 1-64 letters, digits, _ or -", field=f"{where}.name")
        if tool.name in schemas:
            raise InvalidArgument(f"two tools are named {tool.name!r}", field=f"{where}.name")
        try:
            params = json.loads(tool.parameters) if tool.parameters else {"type": "object", "properties": {}}
        except ValueError:
            raise InvalidArgument("parameters must be a JSON Schema object", field=f"{where}.parameters") from None
        if not isinstance(params, dict):
            raise InvalidArgument("parameters must be a JSON Schema object", field=f"{where}.parameters")
        schemas[tool.name] = params
        function: dict[str, Any] = {"name": tool.name, "parameters": params}
        if tool.description:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    if kind == "function" and choice not in schemas:
        raise InvalidArgument(f"tool_choice names {choice!r}, which is not among the tools", field="tool_choice")
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return ToolSpec(tools, choice, parallel, schemas)


def tool_grammar(spec: ToolSpec, fmt: ToolCallFormat) -> str | None:
    """A Lark grammar (llguidance) that admits only calls of the allowed tools, for `required` and a named choice."""
    if spec.choice in ("none", "auto"):
        return None
    names = [spec.choice] if spec.choice in spec.schemas else list(spec.schemas)
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": spec.schemas[name]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    schema = {"x-guidance": JSON_DEFAULTS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    start = 'start: call ("\\n" call)*' if spec.parallel else "start: call"
    return llguidance.LLMatcher.grammar_from_lark(
        f"{start}\ncall: {json.dumps(fmt.open)} %json {json.dumps(schema)} {json.dumps(fmt.close)}\n"
    )


class ToolCallParser:
    """One choice's text -> content and tool calls, as it streams: text that may begin a call is held back."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.open, self.close = fmt.open.strip(), fmt.close.strip()
        self.buffer = ""
        self.in_call = False
        self.calls = 0
        self.pre = ""  # whitespace held back before the call being read (returned if it is not a call)

    def feed(self, text: str) -> tuple[str, list[pb.ToolCall]]:
        self.buffer += text
        out: list[str] = []
        calls: list[pb.ToolCall] = []
        while True:
            if self.in_call:
                end = self.buffer.find(self.close)
                if end < 0:
                    break
                body, self.buffer, self.in_call = self.buffer[:end], self.buffer[end + len(self.close) :], False
                call = _call(body)
                if call is None:
                    out.append(f"{self.pre}{self.open}{body}{self.close}")  # not a call after all: the model's text
                else:
                    calls.append(call)
                    self.calls += 1
                continue
            start = self.buffer.find(self.open)
            if start >= 0:
                before = self._content(self.buffer[:start])
                kept = before.rstrip()  # "text\n<tool_call>": the newline is the syntax's, if a call follows
                out.append(kept)
                self.pre = before[len(kept) :]
                self.buffer, self.in_call = self.buffer[start + len(self.open) :], True
                continue
            keep = _partial_suffix(self.buffer, self.open)
            if self.calls and not self.buffer[: len(self.buffer) - keep].strip():
                keep = len(self.buffer)  # whitespace after a call may separate it from the next one
            out.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return "".join(out), calls

    def finish(self) -> tuple[str, list[pb.ToolCall]]:
        """The end of the choice: an unclosed call is parsed if it is whole JSON, else returned as text."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            self.in_call = False
            call = _call(rest)
            if call is not None:
                self.calls += 1
                return "", [call]
            rest = self.pre + self.open + rest
        return self._content(rest), []

    def _content(self, text: str) -> str:
        """Whitespace between or after calls belongs to the call syntax, not to the content."""
        return "" if self.calls and not text.strip() else text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _call(body: str) -> pb.ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return pb.ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"], arguments=json.dumps(arguments, ensure_ascii=False))
