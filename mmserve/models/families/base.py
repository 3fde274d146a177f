"""What every model family provides to the encoder and decoder services.

The encoder half is a table of modality handlers (`MediaHandler`: options,
preprocessing, tower, client-embedding placement), one row per modality the
family takes, so a family says what it does per modality in one place and the
services never branch on a family. The base class adds what any family can
take through it: the time-series adapter a checkpoint carries
(`time_series/`) is one more row, and `chat_part`, `placeholder_token` and
`reserved_strings` route time series to it and the rest to the family's own
`*_media` methods, so a family folder implements only its own media.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from google.protobuf.message import Message

from mmserve.api.common.v1 import media_pb2
from mmserve.decoded import DecodedMedia, MediaOptions
from mmserve.errors import FailedPrecondition, InvalidArgument
from mmserve.modality import ModalityValue, name_of
from mmserve.store import RawTensor, StoredEmbedding

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

    from mmserve.models.families.time_series import TimeSeriesSupport

TIME_SERIES = media_pb2.MODALITY_TIME_SERIES
#: Named tensors (or a list of them): a family's extra keyword arguments to its LLM's prefill forward (Qwen3-VL:
#: deepstack features, a tensor per layer, and their positions; sliced with the prompt by `slice_extra`), and a
#: modality's entry of vLLM's `multi_modal_data` (`vllm_mm_data`).
TensorKwargs = dict[str, torch.Tensor | list[torch.Tensor]]


@dataclass
class ChatPrompt:
    """What the decoder renders: template messages and the tools offered, or a raw completion prompt (no template)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # OpenAI tool objects, for templates with a tool section
    text: str | None = None  # /v1/completions: the prompt exactly as given


@dataclass(frozen=True)
class ToolCallFormat:
    """How a family's models write a tool call: `open` + a {"name", "arguments"} JSON object + `close`."""

    open: str
    close: str


#: Hermes-style calls, as Qwen 2.5/3 models write them.
HERMES_TOOL_CALLS = ToolCallFormat("<tool_call>\n", "\n</tool_call>")


@dataclass
class PreparedItem:
    """One media item turned into model inputs, ready to be batched into a tower."""

    modality: int
    inputs: dict[str, torch.Tensor]
    placement: Message  # the modality's *Placement message, filled as far as preprocessing knows
    extra: dict[str, float] = field(default_factory=dict)  # a tower's scalar arguments (time series: sampling_rate)


@dataclass
class PrefillInputs:
    """Everything the LLM's first forward pass needs, built from the prompt and stored embeddings."""

    input_ids: torch.Tensor  # [1, L]
    inputs_embeds: torch.Tensor  # [1, L, hidden]
    position_ids: torch.Tensor  # family-specific layout, e.g. [3, 1, L] for M-RoPE
    rope_delta: int  # decode position = tokens so far + rope_delta
    extra: TensorKwargs = field(default_factory=dict)  # e.g. deepstack features for the prefill only
    #: [L]: per prompt token, the block of tokens it attends to in both directions during prefill (Gemma 3's images,
    #: transformers' `block_sequence_ids`); -1 or None: causal only. Engines must not split a block across forwards.
    attention_groups: torch.Tensor | None = None


@dataclass
class EncodedItem:
    """A tower's output for one item: what gets stored."""

    tensors: list[RawTensor]
    token_count: int
    placement: Message


def no_options(item: media_pb2.MediaInput) -> MediaOptions:
    """A modality whose preprocessing takes no per-item option."""
    return {}


@dataclass(frozen=True)
class MediaHandler:
    """One modality of a family's encoder half.

    `options` gives the processing options an item will really get (defaults
    filled, clamped; they are part of its content id); `prepare` turns decoded
    media into tower inputs (CPU, no model); `encode` runs the tower on a batch,
    one result per item in order. A modality that takes client-supplied
    embeddings names the tensors they must carry (`client_tensors`, "embeddings"
    first) and checks their placement (`client_placement(embeds, tokens)`,
    errors naming fields under source.embeds).
    """

    prepare: Callable[[DecodedMedia, MediaOptions], PreparedItem]
    encode: Callable[[list[PreparedItem]], list[EncodedItem]]
    options: Callable[[media_pb2.MediaInput], MediaOptions] = no_options
    client_tensors: tuple[str, ...] = ("embeddings",)
    client_placement: Callable[[media_pb2.EmbeddingInput, int], Message] | None = None


M = TypeVar("M")


def taking(kind: type[M], prepare: Callable[[M, MediaOptions], PreparedItem]) -> Callable[[DecodedMedia, MediaOptions], PreparedItem]:
    """A handler's `prepare` for media decoded as `kind` (what the encoder's decoder makes of the modality)."""

    def checked(media: DecodedMedia, options: MediaOptions) -> PreparedItem:
        if not isinstance(media, kind):
            raise InvalidArgument(f"expected {kind.__name__} media, got {type(media).__name__}", field="modality")
        return prepare(media, options)

    return checked


class Family(ABC):
    """A model family: loads its checkpoint and knows both halves of the split."""

    #: `config.model_type` of checkpoints of this family.
    name: ClassVar[str]
    #: The checkpoint `config.model_type` values this family serves (empty: just `name`).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Media the family's own towers take (time series comes on top, with an adapter).
    base_modalities: ClassVar[frozenset[ModalityValue]] = frozenset()
    #: Media this instance's model accepts (media_pb2.Modality values).
    modalities: frozenset[ModalityValue]
    #: Why some modality is not accepted here (set by an engine that takes fewer than the family), for the 400.
    modality_note: str = ""
    #: How this family's models call tools (None: they do not).
    tool_call_format: ClassVar[ToolCallFormat | None] = None
    #: Modalities the vLLM engine takes from this family as precomputed embeddings (`vllm_mm_data`); empty: the
    #: vllm engine refuses the family. Time series reach vLLM as prompt embeddings whatever the family.
    vllm_modalities: ClassVar[frozenset[ModalityValue]] = frozenset()
    #: Why vLLM refuses the family's other modalities (name -> reason), for the 400 that names them.
    vllm_refused_why: ClassVar[dict[str, str]] = {}

    def __init__(
        self, model: torch.nn.Module | None, processor: Any, config: PretrainedConfig, *,
        dtype: torch.dtype | None = None, generation_config: GenerationConfig | None = None,
    ) -> None:  # fmt: skip
        """`model` is None for the "prompt" part (another engine runs the LLM); `dtype` then says what it runs in.

        `processor` is the checkpoint's own processor class: its media tokens and feature extractors are attributes
        of that class, which transformers' ProcessorMixin does not declare, so it stays untyped here.
        """
        self.model = model
        self.processor = processor
        self.config = config
        self._dtype = dtype
        self.generation_config = generation_config if model is None else getattr(model, "generation_config", None)
        self.input_embeddings: torch.nn.Module | None = None  # the prompt part's token embeddings, when it needs them
        self.time_series: TimeSeriesSupport | None = None
        self.modalities = self.base_modalities

    def attach_time_series(self, path: str | Path, part: str) -> None:
        """Take time series if the checkpoint at `path` carries the adapter (any family: its output is in the LLM's hidden space)."""
        from mmserve.models.families.time_series import TimeSeriesSupport
        from mmserve.models.weights import load_input_embeddings

        device = "cpu" if self.model is None else str(self.device)
        # The LLM's width: get_text_config() also finds it in a whole-model config (the prompt part's, e.g. Omni's top level).
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.text_config
        support = TimeSeriesSupport.load(Path(path), self.tokenizer, int(text.hidden_size), dtype=self.dtype, device=device)
        if support is None:
            return
        self.time_series = support
        self.modalities = self.modalities | {TIME_SERIES}
        self.__dict__.pop("handlers", None)  # the table gains the time-series row
        if part == "prompt" and self.model is None:  # another engine runs the LLM: a time-series prompt goes as embeddings
            self.input_embeddings = load_input_embeddings(Path(path), self.dtype)

    @functools.cached_property
    def device(self) -> torch.device:
        """Where the model lives (fixed once loaded; cached: every decode step asks)."""
        return next(self.model.parameters()).device if self.model is not None else torch.device("cpu")

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        if self.model is None:
            assert self._dtype is not None
            return self._dtype
        return next(self.model.parameters()).dtype

    def check_modality(self, modality: int, field: str) -> None:
        """A modality the loaded model cannot take is a clear 400."""
        if modality not in self.modalities:
            accepted = ", ".join(sorted(name_of(m) for m in self.modalities))
            name = name_of(modality)
            note = f" ({self.modality_note})" if self.modality_note else ""
            raise InvalidArgument(f"this model ({self.name}) does not accept {name} input; it accepts: {accepted}{note}", field=field)

    # --- loading -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        """Load the checkpoint; `part` is "encoder" (towers only), "decoder" (the LLM) or "full"."""

    # --- encoder half ----------------------------------------------------------
    @abstractmethod
    def media_handlers(self) -> dict[int, MediaHandler]:
        """The handlers of the family's own modalities (`base_modalities`), keyed by media_pb2.Modality value."""

    @functools.cached_property
    def handlers(self) -> dict[int, MediaHandler]:
        """Every modality this instance encodes: the family's own, plus time series when the adapter is attached."""
        table = dict(self.media_handlers())
        if self.time_series is not None:
            table[TIME_SERIES] = self.time_series.handler()
        return table

    def handler(self, modality: int) -> MediaHandler:
        found = self.handlers.get(modality)
        if found is None:
            raise InvalidArgument(f"this model ({self.name}) does not encode {name_of(modality)} input", field="modality")
        return found

    def effective_options(self, item: media_pb2.MediaInput) -> MediaOptions:
        """The processing options that will really be used (defaults filled, clamped)."""
        return self.handler(item.modality).options(item)

    def prepare(self, modality: int, media: DecodedMedia, options: MediaOptions) -> PreparedItem:
        """Preprocess decoded media into tower inputs (CPU, no model)."""
        return self.handler(modality).prepare(media, options)

    def encode(self, modality: int, batch: list[PreparedItem]) -> list[EncodedItem]:
        """Run the modality tower on a batch; one result per item, in order."""
        return self.handler(modality).encode(batch)

    def client_tensor_names(self, modality: int) -> tuple[str, ...]:
        """Tensors a client-supplied embedding of `modality` must carry ("embeddings" first); () if not accepted."""
        found = self.handlers.get(modality)
        return found.client_tensors if found is not None and found.client_placement is not None else ()

    def client_placement(self, modality: int, embeds: media_pb2.EmbeddingInput, tokens: int) -> Message:
        """The placement of a client-supplied embedding of `tokens` tokens, checked; errors name fields under source.embeds."""
        found = self.handlers.get(modality)
        if found is None or found.client_placement is None:
            raise InvalidArgument(f"this model ({self.name}) does not accept client embeddings", field="source.embeds")
        return found.client_placement(embeds, tokens)

    def family_placement(self, modality: int, placement: Message) -> Message | None:
        """The family's own placement message for an item placed as `placement` (the shared *Placement message),
        packed into EmbeddingDescriptor.family_placement; None: the family reads nothing beyond the shared one."""
        return None

    @abstractmethod
    def warmup(self) -> None:
        """Run every tower once so the first request does not pay for lazy init."""

    # --- decoder half ----------------------------------------------------------
    def chat_part(self, modality: int) -> dict[str, str]:
        """The chat-template content part standing for one media item (e.g. {"type": "image"}).

        A time series is plain text `<start><placeholder><end>`: every chat template renders text verbatim.
        """
        if modality == TIME_SERIES and self.time_series is not None:
            return {"type": "text", "text": "".join(self.time_series.tokens)}
        return self.media_chat_part(modality)

    def placeholder_token(self, modality: int) -> str:
        """The token a rendered prompt holds for one item of `modality`, before it is repeated to the item's token count."""
        if modality == TIME_SERIES and self.time_series is not None:
            return self.time_series.tokens[1]
        return self.media_placeholder_token(modality)

    def reserved_strings(self) -> tuple[str, ...]:
        """Token strings that a user's text may not contain (they would break placeholder counting)."""
        return self.media_reserved_strings() + (self.time_series.tokens if self.time_series is not None else ())

    @abstractmethod
    def media_chat_part(self, modality: int) -> dict[str, str]:
        """`chat_part` for the family's own media."""

    @abstractmethod
    def media_placeholder_token(self, modality: int) -> str:
        """`placeholder_token` for the family's own media."""

    @abstractmethod
    def media_reserved_strings(self) -> tuple[str, ...]:
        """`reserved_strings` of the family's own media tokens."""

    @abstractmethod
    def prompt_token_ids(self, prompt: ChatPrompt, media: list[StoredEmbedding], *, expand: bool = True) -> list[int]:
        """The rendered prompt as token ids, media placeholders expanded to each item's token count, or one per item (vLLM expands them itself)."""

    @abstractmethod
    def prefill_inputs(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> PrefillInputs:
        """Render the chat template, expand placeholders from stored metadata, splice embeddings, positions."""

    @abstractmethod
    def prompt_embeds(
        self, prompt: ChatPrompt, media: list[StoredEmbedding]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[StoredEmbedding]], dict[int, torch.Tensor]]:
        """The expanded prompt's ids [1, L] and embeddings [1, L, hidden] with each item's spliced in; items and masks by modality."""

    @abstractmethod
    def decode_positions(self, positions: list[int]) -> torch.Tensor:
        """Position ids for one new token per row, row i at position `positions[i]` (tokens seen + rope delta)."""

    @abstractmethod
    def placeholder_token_ids(self) -> frozenset[int]:
        """Token ids that stand for media in a prompt (their KV depends on the item, not the id)."""

    def vllm_mm_data(self, modality: int, items: list[StoredEmbedding]) -> TensorKwargs:
        """vLLM's `multi_modal_data` entry for a prompt's items of one of `vllm_modalities`, in prompt order:
        the tensors vLLM's own tower would hand its language model (plain tensors and lists, no vLLM import)."""
        raise NotImplementedError(f"{self.name} has no vLLM embedding inputs")

    def slice_extra(self, extra: TensorKwargs, ids: torch.Tensor, start: int, end: int) -> TensorKwargs:
        """The prefill extras for prompt tokens [start, end) (chunked prefill, prefix-cache hits)."""
        if extra:
            raise NotImplementedError(f"{self.name} cannot prefill in chunks with extras {sorted(extra)}")
        return extra

    @torch.inference_mode()
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, cache: object, extra: TensorKwargs) -> torch.Tensor:
        """One LLM step over `inputs_embeds` with `cache` as `past_key_values`; float32 logits of the last position, [batch, vocab].

        transformers' multimodal models all hold their LLM as `model.model.language_model` and its head as
        `model.lm_head`; a family adds keyword arguments of its own through `language_model_kwargs`.
        """
        model: Any = self.model  # reached by attribute, which torch's Module typing cannot follow
        if model is None:
            raise FailedPrecondition(f"{self.name}: this part of the model does not run the LLM", field="model")
        out = model.model.language_model(
            inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=cache, use_cache=True,
            **self.language_model_kwargs(), **extra,
        )  # fmt: skip
        logits: torch.Tensor = model.lm_head(out.last_hidden_state[:, -1]).float()
        return logits

    def language_model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of every LLM call (none by default)."""
        return {}

    def token_embeddings(self) -> torch.nn.Module:
        """The token embedding table: the model's, or the prompt part's own (read for time-series prompts)."""
        model: Any = self.model
        table = self.input_embeddings if model is None else model.get_input_embeddings()
        if not isinstance(table, torch.nn.Module):
            raise FailedPrecondition(f"{self.name}: this part of the model has no token embeddings", field="model")
        return table

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `ids` ([batch, len])."""
        out: torch.Tensor = self.token_embeddings()(ids)
        return out

    def render(self, prompt: ChatPrompt) -> str:
        """The prompt text: the chat template over the messages (and tools), or a completion prompt as is."""
        if prompt.text is not None:
            return prompt.text
        if prompt.tools is not None:
            return str(self.processor.apply_chat_template(prompt.messages, tools=prompt.tools, add_generation_prompt=True, tokenize=False))
        return str(self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False))

    @functools.cached_property
    def takes_tools(self) -> bool:
        """Whether the chat template renders tools (as vLLM decides it: the template uses a `tools` variable)."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None) or ""
        return "tools" in str(template)

    @property
    def text_config(self) -> PretrainedConfig:
        """The language model's config (the whole config for text-only checkpoints)."""
        return getattr(self.config, "text_config", self.config)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    def token_id(self, token: str) -> int:
        """The id of one token string of the tokenizer (its special tokens included)."""
        found = self.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(found, int):  # a checkpoint whose tokenizer lacks a token its family needs
            raise ValueError(f"{self.name}: the tokenizer has no id for {token!r}")
        return found

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end generation: the generation config's, else the tokenizer's."""
        eos = getattr(self.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return frozenset([eos] if isinstance(eos, int) else (eos or []))

    def token_bytes(self, token_id: int) -> bytes | None:
        """A token's bytes where the tokenizer itself knows them (None: read them from its byte-level token string)."""
        return None

    @functools.cached_property
    def longest_token_chars(self) -> int:
        """Most characters one token can stand for (a vocab entry's length bounds its decoded text: byte-level or not)."""
        return max((len(token) for token in self.tokenizer.get_vocab()), default=1)

    @property
    def max_context(self) -> int:
        text = getattr(self.config, "text_config", self.config)
        return int(getattr(text, "max_position_embeddings", 32768))


def prompt_part_config(path: str, dtype: torch.dtype | str) -> tuple[PretrainedConfig, torch.dtype, GenerationConfig | None]:
    """(config, dtype, generation config) of a checkpoint whose weights another engine loads (the "prompt" part).

    `dtype` "auto" is the checkpoint's own (its text config's, else float32); the generation config is None when the
    checkpoint has none.
    """
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    if isinstance(dtype, str):
        named = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None) or "float32"
        dtype = named if isinstance(named, torch.dtype) else getattr(torch, str(named).removeprefix("torch."))
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = None
    return config, dtype, generation
