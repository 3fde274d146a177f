"""The OpenAI chat-completions request, as pydantic models (also the OpenAPI document).

No field is silently ignored: every field is declared, and is either
honoured or one of the ADVISORY fields OpenAI defines as hints (`user`,
`metadata`, `store`, ...), accepted and ignored as the README lists them; an
unknown field anywhere is a 400 naming it. Content parts are kept as plain
JSON values here and checked one by one in `translate`, so that an unknown or
malformed part gets an error naming exactly that part.

Every value must be representable downstream: integers are bounded by the
width of their protobuf field (uint32, uint64), and no string may hold a lone
UTF-16 surrogate (JSON allows `"\\ud800"`, UTF-8 and protobuf do not): one
check over the whole parsed body names the JSON path of the first such string.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

#: Largest values of the protobuf fields the integers travel in (decoder_service.proto).
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    """True if `text` holds a lone surrogate (ASCII strings, e.g. base64 payloads, are skipped in O(1))."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def _shown(key: str) -> str:
    """A key as it may appear in an error message (surrogates escaped, so the message is valid UTF-8)."""
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate_path(value: Any) -> str | None:
    """The JSON path (`messages[0].content[1].text`) of the first string or key holding a lone surrogate.

    Walks iteratively, in document order, so deeply nested bodies cannot exhaust the stack.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _has_surrogate(node):
                return path or "body"
        elif isinstance(node, dict):
            children = []
            for key, child in node.items():
                name = f"{path}.{_shown(key)}" if path else _shown(key)
                if isinstance(key, str) and _has_surrogate(key):
                    children.append((key, name))  # the key itself is the offending string
                else:
                    children.append((child, name))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend((node[i], f"{path}[{i}]") for i in reversed(range(len(node))))
    return None


class StrictText(BaseModel):
    """Refuses, before any field is validated, a body with a lone surrogate in any string (400 naming it)."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        path = lone_surrogate_path(data)
        if path is not None:
            raise PydanticCustomError(
                "lone_surrogate",
                "{param}: the string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode",
                {"param": path},
            )
        return data


class Closed(BaseModel):
    """A request object whose unknown fields are a 400 naming them (never silently ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


#: Fields OpenAI defines as advisory (hints, bookkeeping): accepted and ignored, as the README lists them.
ADVISORY = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prediction")


class StreamOptions(Closed):
    include_usage: bool = Field(False, description="Send one extra chunk with the usage before [DONE].")


class JsonSchemaFormat(Closed):
    name: str = Field(..., description="Name of the format (as OpenAI requires; not used for decoding).")
    description: str | None = Field(
        None, description="What the format is for (passed on to nothing: the schema alone constrains decoding)."
    )
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the output must satisfy.")
    strict: bool | None = Field(None, description="Accepted; the schema is always enforced exactly (constrained decoding).")


class ResponseFormat(Closed):
    """Structured outputs: free text, any JSON object, or JSON following a schema (enforced by masking tokens)."""

    type: Literal["text", "json_object", "json_schema"] = Field(
        ..., description="text (free), json_object (any JSON object) or json_schema."
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="Required when type is json_schema.")


class FunctionDef(Closed):
    name: str = Field(..., description="The function's name (letters, digits, _ and -, at most 64).")
    description: str | None = Field(None, description="What it does, shown to the model.")
    parameters: dict[str, Any] | None = Field(None, description="Its arguments as a JSON Schema object.")
    strict: bool | None = Field(None, description="Accepted; a required or named call always follows the schema exactly.")


class ToolDef(Closed):
    type: Literal["function"] = Field(..., description="Always function.")
    function: FunctionDef = Field(..., description="The function.")


class FunctionName(Closed):
    name: str = Field(..., description="A function among the tools.")


class NamedToolChoice(Closed):
    """Force a call of this function."""

    type: Literal["function"] = Field(..., description="Always function.")
    function: FunctionName = Field(..., description="The function to call.")


class CalledFunction(Closed):
    name: str = Field(..., description="The function called.")
    arguments: str = Field(..., description="The arguments, a JSON object as text.")


class ToolCallIn(Closed):
    """A call the assistant made in an earlier turn."""

    id: str = Field(..., description="The call's id, which the tool message answering it repeats.")
    type: Literal["function"] = Field("function", description="Always function.")
    function: CalledFunction = Field(..., description="The function and its arguments.")


class ChatMessage(Closed):
    """One message of the conversation."""

    role: str = Field(..., description="system, developer, user, assistant or tool.")
    content: str | list[Any] | None = Field(
        None,
        description=(
            "A string, or a list of parts: text, image_url, video_url, audio_url, input_audio, time_series_url, "
            "image_embeds, audio_embeds. Each part is an object with a string `type`. A media part whose payload is null "
            "or an object without `url` (`{}`), with a `uuid`, refers to an embedding stored earlier. "
            "Client-supplied embeddings (never pickle): "
            '`{"type": "image_embeds", "image_embeds": "<base64 safetensors with tensor image_embeds [tokens, hidden] '
            '(+ deepstack.<k> for Qwen3-VL)>", "image_grid_thw": [1, h, w]}`, or the tensor raw as '
            '`"image_embeds": {"data": "<base64 little-endian>", "dtype": "float32|float16|bfloat16|float64", '
            '"shape": [tokens, hidden]}` (Qwen3-VL: plus `"deepstack": [<raw tensor>, ...]`); '
            '`{"type": "audio_embeds", "audio_embeds": ..., "audio_feature_length": <mel frames>}` (Qwen2.5-Omni). '
            "Checked against the model (hidden size, tokens vs image_grid_thw / audio_feature_length, dtype, finite "
            "values): a 400 naming the field otherwise, e.g. `messages[0].content[1].image_embeds.shape`."
        ),
    )
    tool_calls: list[ToolCallIn] | None = Field(None, description="Assistant messages: the tools it called.")
    tool_call_id: str | None = Field(None, description="Tool messages: the call this is the result of.")
    name: str | None = Field(None, description="Accepted and ignored: the chat templates here have no speaker names.")
    refusal: str | None = Field(None, description="Accepted and ignored (an earlier reply's refusal, sent back as it came).")
    annotations: list[Any] | None = Field(None, description="Accepted and ignored (an earlier reply's annotations).")
    audio: None = Field(None, description="Must be null: this server returns no audio.")
    function_call: None = Field(None, description="Must be null: the deprecated functions API is not supported; use tool_calls.")


class SamplingRequest(StrictText):
    """The fields chat and legacy completions share: model, sampling, stopping, streaming, penalties, extensions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Model id from /v1/models (optional: the served model).")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature in [0, 2]; 0 is greedy (default 1).")
    top_p: float | None = Field(
        None, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this mass (default 1)."
    )
    top_k: int | None = Field(None, ge=0, le=UINT32_MAX, description="mmserve extension: keep the k most likely tokens (0 = all).")
    seed: int | None = Field(None, ge=0, le=UINT64_MAX, description="Same seed and inputs give the same completion.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion (excluded from it).")
    n: int | None = Field(None, ge=1, le=16, description="Number of choices (default 1).")
    stream: bool = Field(False, description="Send the completion as server-sent events, then `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (with stream).")
    ignore_eos: bool = Field(False, description="mmserve extension: keep generating past end-of-sequence.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Penalize tokens already in the completion.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Penalize tokens by how often they are in the completion.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    repetition_penalty: float | None = Field(
        None, gt=0, le=2, description="mmserve/vLLM extension: divide logits of prompt and completion tokens (1 = off)."
    )
    min_tokens: int | None = Field(
        None, ge=0, le=UINT32_MAX, description="mmserve/vLLM extension: no end-of-sequence before this many tokens."
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="mmserve/vLLM extension: drop tokens below min_p x the top token's probability."
    )


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions body, with mmserve's extensions as extra top-level fields."""

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far, oldest first.")
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="Completion tokens at most (wins over max_tokens).")
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX, description="Deprecated alias of max_completion_tokens.")
    logprobs: bool | None = Field(None, description="Return each token's log probability (of the distribution it was sampled from).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Most likely alternatives per token (needs logprobs).")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema (structured outputs).")
    tools: list[ToolDef] | None = Field(None, description="Functions the model may call (rendered by the model's chat template).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description="none (no tools shown), auto (default with tools), required, or a named function; required and named are enforced by a grammar.",
    )
    parallel_tool_calls: bool | None = Field(None, description="Whether several calls may come in one turn (default true).")
    modalities: list[Literal["text"]] | None = Field(None, description='Output modalities: only ["text"].')
    user: str | None = Field(None, description="Advisory: accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Advisory: accepted and ignored.")
    store: bool | None = Field(None, description="Advisory: accepted and ignored (nothing is stored for later retrieval).")
    service_tier: str | None = Field(None, description="Advisory: accepted and ignored (one tier).")
    safety_identifier: str | None = Field(None, description="Advisory: accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Advisory: accepted and ignored (the prefix cache needs no key).")
    prediction: dict[str, Any] | None = Field(None, description="Advisory: accepted and ignored (a latency hint).")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description='mmserve extension: media loading options per modality, e.g. {"video": {"num_frames": 16, "fps": 2}}.'
    )
    mm_processor_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description='mmserve extension: processor options per modality, e.g. {"image": {"max_pixels": 401408}}.'
    )


#: Prompts one legacy completions request may hold (each is its own Generate call, run concurrently).
MAX_PROMPTS = 32


class CompletionRequest(SamplingRequest):
    """POST /v1/completions body (OpenAI's legacy completions): prompts used as they are, without a chat template."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ...,
        description=(
            f"A prompt, or a list of up to {MAX_PROMPTS} prompts (one set of n choices each; choice index = "
            "prompt index x n + i). Used exactly as given: no chat template. Token-id prompts (a list of integers, "
            "or of such lists) are refused with a 400."
        ),
    )
    max_tokens: int | None = Field(16, ge=1, le=UINT32_MAX, description="Completion tokens at most, per choice (default 16).")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description=(
            "Return the log probability of each token (of the distribution it was sampled from) and this many most "
            "likely alternatives per position, 0-5."
        ),
    )
    echo: bool | None = Field(None, description="Not supported: true is a 400 (the prompt is never echoed).")
    best_of: int | None = Field(None, ge=1, description="Not supported beyond n: a value other than n is a 400.")
    suffix: str | None = Field(None, description="Not supported: a non-empty suffix is a 400 (no insertion mode).")
    user: str | None = Field(None, description="Accepted and ignored (OpenAI defines it as advisory).")


class ErrorDetail(BaseModel):
    message: str = Field(..., description="What went wrong, for a person.")
    type: str = Field(..., description="invalid_request_error, authentication_error, not_found_error, rate_limit_error, server_error, ...")
    param: str | None = Field(None, description="The request field at fault, as a JSON path (`prompt`, `messages[0].content[1]`).")
    code: str | None = Field(None, description="A machine-readable reason (`invalid_request`, `model_not_found`, ...).")


class ErrorResponse(BaseModel):
    """Every error the gateway returns, in OpenAI's shape."""

    error: ErrorDetail = Field(..., description="What went wrong.")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Prompt tokens, over all prompts.")
    completion_tokens: int = Field(..., description="Generated tokens, over all choices.")
    total_tokens: int = Field(..., description="prompt_tokens + completion_tokens.")
    prompt_tokens_details: dict[str, int] | None = Field(None, description="`cached_tokens`: prompt tokens served from the prefix cache.")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(..., description="The generated tokens' texts.")
    token_logprobs: list[float] = Field(..., description="Each token's log probability.")
    top_logprobs: list[dict[str, float]] = Field(..., description="Per position, the `logprobs` most likely tokens -> log probability.")
    text_offset: list[int] = Field(..., description="Each token's character offset in `text`.")


class CompletionChoice(BaseModel):
    text: str = Field(..., description="The completion (streams: the text since the previous chunk); stop strings excluded.")
    index: int = Field(..., description="prompt index x n + choice number.")
    logprobs: CompletionLogprobs | None = Field(None, description="With `logprobs`: this text's tokens; null otherwise.")
    finish_reason: Literal["stop", "length"] | None = Field(None, description="Null on streamed chunks before the last one of a choice.")


class CompletionResponse(BaseModel):
    """A completion (`object: text_completion`); streamed chunks have the same shape, one piece of text each."""

    id: str = Field(..., description="`cmpl-<hex>`, the same in every chunk of a stream.")
    object: Literal["text_completion"] = Field("text_completion", description="Always `text_completion`, streamed or not.")
    created: int = Field(..., description="Unix time of the request.")
    model: str = Field(..., description="The model that made it.")
    choices: list[CompletionChoice] = Field(..., description="len(prompts) x n choices (streams: one piece each).")
    usage: Usage | None = Field(None, description="Streams: only with stream_options.include_usage, in a last chunk with no choices.")


class ModelObject(BaseModel):
    id: str = Field(..., description="The id to pass as `model`.")
    object: Literal["model"] = Field("model", description="Always `model`.")
    created: int = Field(..., description="Unix time the decoder loaded it.")
    owned_by: str = Field(..., description="Always `mmserve`.")
    random_weights: bool = Field(False, description="True for the built-in tiny demo model: its output is noise.")
    family: str | None = Field(None, description="Model family (qwen2_5_vl, qwen3_vl, qwen2_5_omni, ...).")
    modalities: list[str] = Field(default_factory=list, description="Media it takes: image, video, audio, time_series.")
    max_model_len: int | None = Field(None, description="Context length in tokens (prompt + completion).")


class ModelList(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[ModelObject] = Field(..., description="The served model(s).")


class EncodeRequest(StrictText):
    """POST /v1/mm/encode body: media parts to embed and store for later requests."""

    model_config = ConfigDict(extra="forbid")

    content: list[Any] = Field(
        ...,
        min_length=1,
        description=(
            "Media parts, with the same shapes as chat content parts (image_url, video_url, audio_url, input_audio, "
            "time_series_url, and client-supplied image_embeds / audio_embeds, stored as they are after the same "
            "checks), each optionally with a `uuid` to name the stored embedding."
        ),
    )
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="As in chat completions.")
    mm_processor_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="As in chat completions.")


class EmbeddingObject(BaseModel):
    """A stored embedding: refer to it in chat as a media part with a null payload and `uuid` = `id`."""

    id: str = Field(..., description="The client uuid, or the content id `mmemb-<hex>`.")
    object: Literal["mm.embedding"] = Field("mm.embedding", description="Always `mm.embedding`.")
    modality: str = Field(..., description="image, video, audio or time_series.")
    tokens: int = Field(..., description="LLM positions the embedding fills in a prompt.")
    model: str = Field(..., description="The model that made it (as served).")
    cached: bool | None = Field(None, description="True if it was already stored (nothing was encoded); encode only.")
    created_at: int = Field(..., description="Unix time it was stored.")
    expires_at: int | None = Field(None, description="Unix time it expires; null if it does not.")
    content_sha256: str = Field(..., description="SHA-256 of the media content it was made from.")


class EncodeResponse(BaseModel):
    object: Literal["list"] = Field("list", description="Always `list`.")
    data: list[EmbeddingObject] = Field(..., description="One per content part, in request order.")


class DeletedEmbedding(BaseModel):
    id: str = Field(..., description="The id asked for.")
    object: Literal["mm.embedding.deleted"] = Field("mm.embedding.deleted", description="Always `mm.embedding.deleted`.")
    deleted: bool = Field(..., description="False if nothing was stored under it.")
