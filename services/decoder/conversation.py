"""Validate a GenerateRequest into what generation needs: chat messages, media parts, sampling.

Every error names the request field it is about (`messages[1].content[2]`,
`sampling.temperature`), using OpenAI's names for chat fields so the gateway
can pass them through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import InvalidArgument

ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool"}
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


@dataclass
class MediaPart:
    """A media part of the conversation and where it sits in the request."""

    field: str  # e.g. "messages[0].content[1]"
    item: media_pb2.MediaInput


@dataclass
class SamplingConfig:
    """Validated sampling parameters with defaults applied."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    n: int
    ignore_eos: bool
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    min_p: float = 0.0
    guidance: Guidance | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any logits processor runs (else the logits go straight to the sampler)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.guidance
        )


@dataclass(frozen=True)
class Guidance:
    """A format the output must follow: any JSON object, or a JSON Schema (as JSON text)."""

    json_object: bool = False
    json_schema: str | None = None


@dataclass
class Conversation:
    """The chat, with each media part replaced by the family's template part, in order."""

    messages: list[dict[str, Any]]
    media: list[MediaPart] = field(default_factory=list)


def parse_conversation(request: pb.GenerateRequest, *, chat_part: Any, reserved: tuple[str, ...]) -> Conversation:
    """Turn request messages into template messages; collect media parts in prompt order."""
    if request.HasField("prompt"):
        if request.messages:
            raise InvalidArgument("give messages or a prompt, not both", field="prompt")
        _check_reserved(request.prompt, reserved, "prompt")
        return Conversation(messages=[])
    if not request.messages:
        raise InvalidArgument("at least one message is required", field="messages")
    conversation = Conversation(messages=[])
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidArgument("role must be system, user, assistant or tool", field=f"{where}.role")
        content: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            at = f"{where}.content[{j}]"
            kind = part.WhichOneof("kind")
            if kind == "text":
                _check_reserved(part.text, reserved, at)
                content.append({"type": "text", "text": part.text})
            elif kind == "media":
                if role != "user":
                    raise InvalidArgument("media parts are only allowed in user messages", field=at)
                conversation.media.append(MediaPart(at, part.media))
                content.append(chat_part(part.media.modality, at))
            else:
                raise InvalidArgument("a content part must be text or media", field=at)
        conversation.messages.append(_template_message(message, role, content, where))
    if conversation.messages[-1]["role"] == "assistant":
        raise InvalidArgument("the last message must not be from the assistant", field=f"messages[{len(request.messages) - 1}].role")
    return conversation


def _check_reserved(text: str, reserved: tuple[str, ...], field: str) -> None:
    for token in reserved:
        if token in text:
            raise InvalidArgument(f"text may not contain the reserved token {token}", field=field)


def _template_message(message: pb.ChatMessage, role: str, content: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """One chat-template message; tool calls and tool results as Hugging Face templates take them."""
    if message.tool_calls and role != "assistant":
        raise InvalidArgument("only assistant messages carry tool_calls", field=f"{where}.tool_calls")
    if role == "tool":
        if not message.tool_call_id:
            raise InvalidArgument("a tool message needs the tool_call_id it answers", field=f"{where}.tool_call_id")
        text = "".join(part["text"] for part in content)
        return {"role": "tool", "content": text, "tool_call_id": message.tool_call_id}
    out: dict[str, Any] = {"role": role, "content": content}
    if message.tool_calls:
        out["content"] = "".join(part.get("text", "") for part in content)
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in message.tool_calls
        ]
    return out


def parse_sampling(params: pb.SamplingParams) -> SamplingConfig:
    """Defaults per the OpenAI API (temperature 1, top_p 1, n 1); ranges checked."""
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not 0.0 <= temperature <= 2.0:
        raise InvalidArgument("temperature must be between 0 and 2", field="sampling.temperature")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]", field="sampling.top_p")
    max_tokens = params.max_tokens if params.HasField("max_tokens") else None
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1", field="sampling.max_tokens")
    n = params.n if params.HasField("n") else 1
    if not 1 <= n <= 16:
        raise InvalidArgument("n must be between 1 and 16", field="sampling.n")
    stop = list(params.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings", field="sampling.stop")
    if any(not s for s in stop):
        raise InvalidArgument("stop strings must not be empty", field="sampling.stop")
    return SamplingConfig(
        **_logit_controls(params),
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(params.top_k) if params.HasField("top_k") else 0,
        seed=int(params.seed) if params.HasField("seed") else None,
        stop=stop,
        n=int(n),
        ignore_eos=params.ignore_eos,
    )


def _in_range(
    params: pb.SamplingParams, name: Literal["presence_penalty", "frequency_penalty", "min_p"], low: float, high: float, default: float
) -> float:
    value = getattr(params, name) if params.HasField(name) else default
    if not low <= value <= high:
        raise InvalidArgument(f"{name} must be between {low:g} and {high:g}", field=f"sampling.{name}")
    return float(value)


def _logit_controls(params: pb.SamplingParams) -> dict[str, Any]:
    """Logprobs, penalties, logit bias, min_tokens/min_p and guidance, range-checked (token ids are checked by the engine)."""
    if params.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", field="sampling.top_logprobs")
    if params.top_logprobs and not params.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs to be true", field="sampling.top_logprobs")
    repetition = params.repetition_penalty if params.HasField("repetition_penalty") else 1.0
    if not 0.0 < repetition <= 2.0:
        raise InvalidArgument("repetition_penalty must be in (0, 2]", field="sampling.repetition_penalty")
    for token, bias in params.logit_bias.items():
        if not -100.0 <= bias <= 100.0:
            raise InvalidArgument(f"the bias of token {token} must be between -100 and 100", field="sampling.logit_bias")
    guidance = None
    kind = params.guidance.WhichOneof("kind")
    if kind == "json_object":
        guidance = Guidance(json_object=True)
    elif kind == "json_schema":
        guidance = Guidance(json_schema=params.guidance.json_schema)
    return {
        "logprobs": params.logprobs,
        "top_logprobs": int(params.top_logprobs),
        "presence_penalty": _in_range(params, "presence_penalty", -2.0, 2.0, 0.0),
        "frequency_penalty": _in_range(params, "frequency_penalty", -2.0, 2.0, 0.0),
        "repetition_penalty": float(repetition),
        "logit_bias": {int(k): float(v) for k, v in params.logit_bias.items()},
        "min_tokens": int(params.min_tokens),
        "min_p": _in_range(params, "min_p", 0.0, 1.0, 0.0),
        "guidance": guidance,
    }


def check_token_ids(config: SamplingConfig, vocab_size: int) -> None:
    """logit_bias may only name tokens of the model's vocabulary."""
    unknown = sorted(t for t in config.logit_bias if not 0 <= t < vocab_size)
    if unknown:
        raise InvalidArgument(
            f"logit_bias names token ids outside the vocabulary (0..{vocab_size - 1}): {unknown[:5]}", field="sampling.logit_bias"
        )
