"""The cheap prompt-size guard, run before any tokenization, encode or store read (one rule, used by decoder and gateway).

A token of the model's vocabulary covers at most `longest_token_chars`
characters and every media item takes at least one token, so a prompt needs
at least chars / longest + media tokens. A prompt whose text is over
`max_prompt_chars` (the context times the longest token, minus one longest
token per media part) can therefore never fit, and is refused by counting alone.
"""

from __future__ import annotations

from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import InvalidArgument


def max_prompt_chars(context_tokens: int, longest_token_chars: int) -> int:
    """Text characters that could still fit `context_tokens` (one token is left for the completion)."""
    return max(0, context_tokens - 1) * max(1, longest_token_chars)


def prompt_size(request: pb.GenerateRequest) -> tuple[int, int]:
    """(text characters, media parts) of a request's messages and its completion prompt (counted alike, or a huge prompt would reach the tokenizer)."""
    chars = len(request.prompt)
    media = 0
    for message in request.messages:
        for part in message.content:
            if part.WhichOneof("kind") == "media":
                media += 1
            else:
                chars += len(part.text)
    return chars, media


def check_prompt_size(request: pb.GenerateRequest, *, max_chars: int, longest_token_chars: int) -> None:
    """400 naming `messages` (or `prompt`, for a completion prompt) when the prompt cannot fit the context whatever its tokens."""
    if max_chars <= 0:
        return
    chars, media = prompt_size(request)
    if chars + media * max(1, longest_token_chars) > max_chars:
        raise InvalidArgument(
            f"the prompt is too long for this model's context: {chars} characters of text and {media} media parts "
            f"(at most {max_chars} characters fit)",
            field=prompt_field(request),
        )


def prompt_field(request: pb.GenerateRequest) -> str:
    """The request field that holds the prompt: `prompt` (completions) or `messages` (chat)."""
    return "prompt" if request.HasField("prompt") else "messages"
