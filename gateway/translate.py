"""OpenAI chat request JSON -> DecoderService GenerateRequest.

Content parts follow docs/inputs.md section 1: text, image_url, video_url,
audio_url, input_audio, time_series_url, and client-supplied embeddings
(image_embeds, audio_embeds: see gateway/embeds.py), each optionally with a
`uuid`; a media part whose payload is null, or an object without its url
(`{}`, as vLLM's clients send), and that has a uuid is a reference to a
stored embedding. `media_io_kwargs` and `mm_processor_kwargs` are checked
against an allowlist of keys and become per-item options (the encoder clamps
them to its limits). An image's `detail` maps to a pixel budget: `low` caps
max_pixels at LOW_DETAIL_MAX_PIXELS, `high` and `auto` keep the model's default.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from gateway.embeds import PLACEMENT_KEYS, fill_embeds
from gateway.errors import RequestFieldError
from gateway.schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, EncodeRequest, ResponseFormat, SamplingRequest
from mmserve.api.common.v1 import media_pb2
from mmserve.api.decoder.v1 import decoder_service_pb2 as pb
from mmserve.errors import InvalidArgument
from mmserve.mediainput import CONTENT_ID_PREFIX
from mmserve.modality import BY_PROTO, MODALITIES, audio_format

log = logging.getLogger("mmserve.gateway")

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
TOOL_MODES = {"none": pb.ToolChoice.MODE_NONE, "auto": pb.ToolChoice.MODE_AUTO, "required": pb.ToolChoice.MODE_REQUIRED}
#: part type -> (modality, the key holding its payload)
MEDIA_PARTS = {
    "image_url": media_pb2.MODALITY_IMAGE,
    "video_url": media_pb2.MODALITY_VIDEO,
    "audio_url": media_pb2.MODALITY_AUDIO,
    "input_audio": media_pb2.MODALITY_AUDIO,
    "time_series_url": media_pb2.MODALITY_TIME_SERIES,
    "image_embeds": media_pb2.MODALITY_IMAGE,
    "audio_embeds": media_pb2.MODALITY_AUDIO,
}
SUPPORTED_PARTS = ("text", *MEDIA_PARTS)
#: The key of a part's payload object that holds the media itself (absent: a reference, given a uuid).
PAYLOAD_KEY = {"input_audio": "data", "image_embeds": "data", "audio_embeds": "data"}
DETAILS = ("low", "high", "auto")
#: `detail: "low"`: at most 256 tokens of 28x28 pixels (Qwen2.5-VL/Omni; ~196 of 32x32 for Qwen3-VL).
LOW_DETAIL_MAX_PIXELS = 256 * 28 * 28
#: Allowed keys of media_io_kwargs / mm_processor_kwargs, per modality name.
MEDIA_IO_KEYS = {m.name: m.media_io_keys for m in MODALITIES}
PROCESSOR_KEYS = {m.name: m.processor_keys for m in MODALITIES}


def _check_kwargs(value: dict[str, dict[str, Any]] | None, allowed: dict[str, frozenset[str]], name: str) -> dict[str, dict[str, Any]]:
    if not value:
        return {}
    for modality, options in value.items():
        if modality not in allowed:
            raise InvalidArgument(f"unknown modality {modality!r}; use one of: {', '.join(allowed)}", field=f"{name}.{modality}")
        if not isinstance(options, dict):
            raise InvalidArgument("must be an object", field=f"{name}.{modality}")
        for key in options:
            if key not in allowed[modality]:
                keys = ", ".join(sorted(allowed[modality])) or "none"
                raise InvalidArgument(f"unknown option {key!r} (allowed: {keys})", field=f"{name}.{modality}.{key}")
    return value


def _color(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and len(value) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in value):
        return "#{:02x}{:02x}{:02x}".format(*value)
    raise InvalidArgument('must be "#RRGGBB" or [r, g, b]', field=field)


def _number(value: Any, field: str, kind: type) -> Any:
    """`value` as an int or float; wrong types and numbers no float can hold (10**400) are a 400."""
    wanted = f"must be a{'n integer' if kind is int else ' number'}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(wanted, field=field)
    if kind is int and isinstance(value, int):
        return value
    try:
        number = float(value)
    except OverflowError:
        raise InvalidArgument("is too large", field=field) from None
    if kind is int and not number.is_integer():
        raise InvalidArgument(wanted, field=field)
    return kind(number)


def _set(opts: Any, key: str, value: Any, field: str) -> None:
    """Set one option; a value the wire type cannot hold (e.g. num_frames beyond int32) is a 400, not a 500."""
    try:
        setattr(opts, key, value)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{key} is out of range", field=field) from None


def item_options(item: media_pb2.MediaInput, io_kwargs: dict[str, dict[str, Any]], proc_kwargs: dict[str, dict[str, Any]]) -> None:
    """Set the request-level options of the item's modality on the item (none apply to a client embedding)."""
    if item.source.WhichOneof("kind") == "embeds":
        return
    name = BY_PROTO[item.modality].field
    io, proc = io_kwargs.get(name, {}), proc_kwargs.get(name, {})
    opts: media_pb2.ImageOptions | media_pb2.VideoOptions
    if item.modality == media_pb2.MODALITY_IMAGE:
        opts = item.image
        if "rgba_background_color" in io:
            opts.rgba_background_color = _color(io["rgba_background_color"], "media_io_kwargs.image.rgba_background_color")
    elif item.modality == media_pb2.MODALITY_VIDEO:
        opts = item.video
        if "fps" in io:
            _set(opts, "fps", _number(io["fps"], "media_io_kwargs.video.fps", float), "media_io_kwargs.video.fps")
        if "num_frames" in io:
            field = "media_io_kwargs.video.num_frames"
            _set(opts, "num_frames", _number(io["num_frames"], field, int), field)
    else:
        return
    for key in ("min_pixels", "max_pixels"):
        if key in proc:
            field = f"mm_processor_kwargs.{name}.{key}"
            _set(opts, key, _number(proc[key], field, int), field)
    if not opts.ListFields():
        item.ClearField(name)


def _is_reference_payload(payload: Any, kind: str) -> bool:
    """A payload that names no media: null, or an object without its url/data (`{}`)."""
    return payload is None or (isinstance(payload, dict) and payload.get(PAYLOAD_KEY.get(kind, "url")) is None)


def _reference(item: media_pb2.MediaInput, kind: str, uuid: str | None, field: str) -> media_pb2.MediaInput:
    """A part that refers to a stored embedding by its uuid (or content id)."""
    if not uuid:
        key = PAYLOAD_KEY.get(kind, "url")
        raise InvalidArgument(f"{kind} has no {key}: give a payload, or a uuid to use a stored embedding", field=field)
    if uuid.startswith(CONTENT_ID_PREFIX):
        item.source.embedding_id = uuid  # a content id returned by an earlier encode
    else:
        item.uuid = uuid
    return item


def _input_audio(item: media_pb2.MediaInput, payload: Any, field: str) -> None:
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), str):
        raise InvalidArgument('input_audio must be {"data": "<base64>", "format": "wav"}', field=field)
    fmt = audio_format(payload.get("format"), f"{field}.input_audio.format")
    item.source.url = f"data:audio/{fmt};base64,{payload['data']}"
    item.audio.format = fmt


def _url_payload(item: media_pb2.MediaInput, payload: Any, kind: str, field: str) -> None:
    url = payload if isinstance(payload, str) else payload.get("url") if isinstance(payload, dict) else None
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"{kind}.url must be a non-empty string", field=field)
    item.source.url = url
    if kind == "time_series_url":
        rate = payload.get("sampling_rate") if isinstance(payload, dict) else None
        if rate is None:
            raise InvalidArgument("time_series_url.sampling_rate (Hz) is required", field=field)
        where = f"{field}.time_series_url.sampling_rate"  # param: the part; the message names the key
        rate = _number(rate, where, float)
        if rate <= 0:
            raise InvalidArgument("must be > 0", field=where)
        _set(item.time_series, "sampling_rate", rate, where)


def _check_detail(payload: Any, field: str) -> str | None:
    """The image part's `detail`, if given: one of DETAILS, else a 400 naming `...image_url.detail`."""
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if detail is not None and (not isinstance(detail, str) or detail not in DETAILS):
        raise RequestFieldError(f"detail must be one of {', '.join(DETAILS)}", field=f"{field}.image_url.detail")
    return detail


def apply_detail(item: media_pb2.MediaInput, payload: Any, field: str) -> None:
    """OpenAI's image `detail`: "low" caps the pixel budget at LOW_DETAIL_MAX_PIXELS; "high"/"auto" keep the default."""
    if _check_detail(payload, field) == "low":
        current = item.image.max_pixels if item.image.HasField("max_pixels") else LOW_DETAIL_MAX_PIXELS
        item.image.max_pixels = min(current, LOW_DETAIL_MAX_PIXELS)


def media_part(
    part: dict[str, Any],
    kind: str,
    field: str,
    io_kwargs: dict[str, dict[str, Any]] | None = None,
    proc_kwargs: dict[str, dict[str, Any]] | None = None,
) -> media_pb2.MediaInput:
    """One media content part -> MediaInput (payload or reference, uuid, per-request and per-part options)."""
    uuid = part.get("uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise InvalidArgument("uuid must be a string", field=field)
    item = media_pb2.MediaInput(modality=MEDIA_PARTS[kind])
    payload = part.get(kind)
    if _is_reference_payload(payload, kind):
        if kind == "image_url":
            _check_detail(payload, field)  # a stored embedding keeps the budget it was encoded with
        return _reference(item, kind, uuid, field)
    if uuid:
        item.uuid = uuid
    if kind in PLACEMENT_KEYS:  # a client-supplied embedding: no media options apply
        fill_embeds(part, kind, field, item)
        return item
    if kind == "input_audio":
        _input_audio(item, payload, field)
    else:
        _url_payload(item, payload, kind, field)
    item_options(item, io_kwargs or {}, proc_kwargs or {})
    if kind == "image_url":
        apply_detail(item, payload, field)
    return item


def _part_kind(part: Any, field: str) -> str:
    """A content part's `type`; a part that is not an object, or a type that is not a string, is a 400."""
    if not isinstance(part, dict):
        raise RequestFieldError("a content part must be an object with a string `type`", field=field)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise RequestFieldError(f"type must be a string, not {_json_type(kind)}", field=f"{field}.type")
    return kind


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), "a value of another type")


def to_generate_request(body: ChatCompletionRequest) -> pb.GenerateRequest:
    """Validate and translate; errors name the offending field in OpenAI's terms."""
    io_kwargs = _check_kwargs(body.media_io_kwargs, MEDIA_IO_KEYS, "media_io_kwargs")
    proc_kwargs = _check_kwargs(body.mm_processor_kwargs, PROCESSOR_KEYS, "mm_processor_kwargs")
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options needs stream to be true", field="stream_options")
    request = pb.GenerateRequest(model=body.model or "", whole_choices=not body.stream)
    for i, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidArgument(
                f"role {message.role!r} is not supported (use system, developer, user, assistant or tool)", field=f"messages[{i}]"
            )
        out = request.messages.add(role=role, tool_call_id=message.tool_call_id or "")
        for call in message.tool_calls or ():
            out.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
        content = message.content
        if content is None:
            continue
        if isinstance(content, str):
            out.content.add(text=content)
            continue
        for j, part in enumerate(content):
            field = f"messages[{i}].content[{j}]"
            kind = _part_kind(part, field)
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidArgument("text must be a string", field=field)
                out.content.add(text=part["text"])
            elif kind in MEDIA_PARTS:
                out.content.add(media=media_part(part, kind, field, io_kwargs, proc_kwargs))
            else:
                raise InvalidArgument(f"unknown content part type {kind!r}; supported: {', '.join(SUPPORTED_PARTS)}", field=field)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.top_logprobs and not body.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs to be true", field="top_logprobs")
    fill_sampling(body, request.sampling, max_tokens=max_tokens, logprobs=bool(body.logprobs), top_logprobs=body.top_logprobs or 0)
    guidance(body.response_format, request.sampling)
    tool_fields(body, request)
    return request


def tool_fields(body: ChatCompletionRequest, request: pb.GenerateRequest) -> None:
    """tools, tool_choice and parallel_tool_calls (the decoder checks them against the model)."""
    for tool in body.tools or ():
        function = tool.function
        parameters = json.dumps(function.parameters) if function.parameters is not None else ""
        request.tools.add(name=function.name, description=function.description or "", parameters=parameters)
    choice = body.tool_choice
    if isinstance(choice, str):
        request.tool_choice.mode = TOOL_MODES[choice]
    elif choice is not None:
        request.tool_choice.function = choice.function.name
    if body.parallel_tool_calls is not None:
        request.parallel_tool_calls = body.parallel_tool_calls


def fill_sampling(body: SamplingRequest, sampling: pb.SamplingParams, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> None:
    """The sampling fields chat and legacy completions share onto SamplingParams (each API names its own max tokens and logprobs)."""
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    for name in ("temperature", "top_p", "top_k", "seed", "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        value = getattr(body, name)
        if value is not None:
            setattr(sampling, name, value)
    if body.stop is not None:
        sampling.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    sampling.ignore_eos = body.ignore_eos
    sampling.logprobs = logprobs
    sampling.top_logprobs = top_logprobs
    sampling.min_tokens = body.min_tokens or 0
    for key, bias in (body.logit_bias or {}).items():
        if not key.strip().isdigit() or int(key) >= 1 << 31:
            raise InvalidArgument(f"logit_bias keys must be token ids, got {key!r}", field="logit_bias")
        if not -100 <= bias <= 100:
            raise InvalidArgument(f"the bias of token {key} must be between -100 and 100", field="logit_bias")
        sampling.logit_bias[int(key)] = bias


def guidance(fmt: ResponseFormat | None, sampling: pb.SamplingParams) -> None:
    """response_format onto SamplingParams.guidance (chat only: legacy completions have no response_format)."""
    if fmt is None or fmt.type == "text":
        return
    if fmt.type == "json_object":
        sampling.guidance.json_object = True
        return
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidArgument("json_schema.schema is required for type json_schema", field="response_format.json_schema")
    sampling.guidance.json_schema = json.dumps(fmt.json_schema.schema_)


def completion_prompts(body: CompletionRequest) -> list[str]:
    """The prompts of a legacy completions request; what mmserve cannot honour is a 400 naming the field."""
    if body.echo:
        raise InvalidArgument("echo is not supported (the prompt is never returned); leave it false", field="echo")
    if body.suffix:
        raise InvalidArgument("suffix is not supported (no insertion mode)", field="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidArgument(f"best_of is not supported beyond n: give best_of = n ({body.n or 1}) or leave it out", field="best_of")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise InvalidArgument("at least one prompt is required", field="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidArgument(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", field="prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InvalidArgument("token-id prompts are not supported: send the prompt as text", field="prompt")
        if not prompt:
            raise RequestFieldError("a prompt must not be empty", field="prompt" if isinstance(body.prompt, str) else f"prompt[{i}]")
    return prompts  # type: ignore[return-value]


def to_completion_request(body: CompletionRequest, prompt: str) -> pb.GenerateRequest:
    """One prompt of a legacy completions request as a GenerateRequest (used as is: no chat template)."""
    request = pb.GenerateRequest(model=body.model or "", prompt=prompt, whole_choices=not body.stream)
    logprobs = body.logprobs is not None
    fill_sampling(body, request.sampling, max_tokens=body.max_tokens, logprobs=logprobs, top_logprobs=body.logprobs or 0)
    return request


def to_encode_items(body: EncodeRequest) -> list[media_pb2.MediaInput]:
    """Media parts of a precompute request -> MediaInput items (fields named `content[i]`)."""
    io_kwargs = _check_kwargs(body.media_io_kwargs, MEDIA_IO_KEYS, "media_io_kwargs")
    proc_kwargs = _check_kwargs(body.mm_processor_kwargs, PROCESSOR_KEYS, "mm_processor_kwargs")
    items = []
    for i, part in enumerate(body.content):
        field = f"content[{i}]"
        kind = _part_kind(part, field)
        if kind not in MEDIA_PARTS:
            raise InvalidArgument(f"only media parts can be encoded; supported: {', '.join(MEDIA_PARTS)}", field=field)
        items.append(media_part(part, kind, field, io_kwargs, proc_kwargs))
    return items
