"""The OpenAI chat-completions request, as pydantic models (also the OpenAPI document).

Unknown top-level fields are accepted (and logged by the app), as OpenAI
clients send fields a server may not know. Content parts are kept as plain
dicts here and checked one by one in `translate`, so that an unknown or
malformed part gets an error naming exactly that part.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send one extra chunk with the usage before [DONE].")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(..., description="system, developer, user or assistant.")
    content: str | list[dict[str, Any]] | None = Field(
        None,
        description=(
            "A string, or a list of parts: text, image_url, video_url, audio_url, input_audio, time_series_url, "
            "image_embeds, audio_embeds. A media part with a null payload and a `uuid` refers to an embedding stored earlier. "
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


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions body, with mmserve's extensions as extra top-level fields."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Model id from /v1/models (optional: the served model).")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Completion tokens at most (wins over max_tokens).")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="mmserve extension: keep the k most likely tokens (0 = all).")
    seed: int | None = Field(None, ge=0, description="Same seed and inputs give the same completion.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion (excluded from it).")
    n: int | None = Field(None, ge=1, le=16, description="Number of choices.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="mmserve extension: keep generating past end-of-sequence.")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description='mmserve extension: media loading options per modality, e.g. {"video": {"num_frames": 16, "fps": 2}}.'
    )
    mm_processor_kwargs: dict[str, dict[str, Any]] | None = Field(
        None, description='mmserve extension: processor options per modality, e.g. {"image": {"max_pixels": 401408}}.'
    )


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    random_weights: bool = Field(False, description="True for the built-in tiny demo model: its output is noise.")
    family: str | None = None
    modalities: list[str] = Field(default_factory=list)
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class EncodeRequest(BaseModel):
    """POST /v1/mm/encode body: media parts to embed and store for later requests."""

    model_config = ConfigDict(extra="allow")

    content: list[dict[str, Any]] = Field(
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
    object: Literal["mm.embedding"] = "mm.embedding"
    modality: str
    tokens: int = Field(..., description="LLM positions the embedding fills in a prompt.")
    model: str
    cached: bool | None = Field(None, description="True if it was already stored (nothing was encoded); encode only.")
    created_at: int = Field(..., description="Unix time it was stored.")
    expires_at: int | None = Field(None, description="Unix time it expires; null if it does not.")
    content_sha256: str


class EncodeResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]


class DeletedEmbedding(BaseModel):
    id: str
    object: Literal["mm.embedding.deleted"] = "mm.embedding.deleted"
    deleted: bool
