"""Validate a GenerateRequest into what generation needs: chat messages, media parts, sampling.

Every error names the request field it is about (`messages[1].content[2]`,
`sampling.temperature`), using OpenAI's names for chat fields so the gateway
can pass them through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmserve.common.v1 import media_pb2
from mmserve.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import InvalidArgument

ROLES = {pb.ROLE_SYSTEM: "system", pb.ROLE_USER: "user", pb.ROLE_ASSISTANT: "assistant"}
MAX_STOP_STRINGS = 4


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Conversation:
    """The chat, with each media part replaced by the family's template part, in order."""

    messages: list[dict[str, Any]]
    media: list[MediaPart] = field(default_factory=list)


def parse_conversation(request: pb.GenerateRequest, *, chat_part: Any, reserved: tuple[str, ...]) -> Conversation:
    """Turn request messages into template messages; collect media parts in prompt order."""
    if not request.messages:
        raise InvalidArgument("at least one message is required", field="messages")
    conversation = Conversation(messages=[])
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidArgument("role must be system, user or assistant", field=f"{where}.role")
        content: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            at = f"{where}.content[{j}]"
            kind = part.WhichOneof("kind")
            if kind == "text":
                for token in reserved:
                    if token in part.text:
                        raise InvalidArgument(f"text may not contain the reserved token {token}", field=at)
                content.append({"type": "text", "text": part.text})
            elif kind == "media":
                if role != "user":
                    raise InvalidArgument("media parts are only allowed in user messages", field=at)
                conversation.media.append(MediaPart(at, part.media))
                content.append(chat_part(part.media.modality, at))
            else:
                raise InvalidArgument("a content part must be text or media", field=at)
        conversation.messages.append({"role": role, "content": content})
    if conversation.messages[-1]["role"] == "assistant":
        raise InvalidArgument("the last message must not be from the assistant", field=f"messages[{len(request.messages) - 1}].role")
    return conversation


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
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(params.top_k) if params.HasField("top_k") else 0,
        seed=int(params.seed) if params.HasField("seed") else None,
        stop=stop,
        n=int(n),
        ignore_eos=params.ignore_eos,
    )
