"""Voxtral (`VoxtralForConditionalGeneration`): a Whisper-style audio encoder + projector + a Llama LM; audio and text.

Mistral's checkpoints carry a Tekken tokenizer (`tekken.json`), read through
transformers' `MistralCommonBackend`: mistral_common renders the chat (there
is no Jinja template) and counts each clip's audio tokens. Both halves reuse
that code, so the ids and features are the processor's own:

Encoder half: the clip (resampled to 16 kHz by the decoder of `media/`) is
padded as mistral_common pads it (to whole 30 s chunks), turned into log-mel
features by the checkpoint's WhisperFeatureExtractor with the processor's
settings, split into chunks of 3000 frames, and run through the audio tower
and projector (`get_audio_features`): 375 embeddings per chunk, in the LLM's
hidden space. The `AudioPlacement` records the chunks (`chunk_feature_lengths`)
and the clip's length; the token count alone places the item (1-D positions).

Decoder half: the conversation is encoded by mistral_common with a stand-in
clip per audio part; each clip becomes `[BEGIN_AUDIO]` + a run of `[AUDIO]`,
and each run is then set to the stored item's token count (mistral_common
counts tokens from the clip's length only, so this is the ids the processor
makes from the real clip). Text never encodes to a control token in Tekken,
so a user's text cannot forge a placeholder. Positions are plain 1-D. What
mistral_common refuses (before tokenizer v13: a system prompt together with
audio) is a 400 naming `messages`, as the processor refuses it too.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, cast

import numpy as np
import soundfile as sf
import torch

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.decoded import DecodedAudio
from mmserve.errors import InvalidArgument
from mmserve.modality import ModalityValue
from mmserve.models.families.base import (
    ChatPrompt,
    EncodedItem,
    Family,
    MediaHandler,
    PrefillInputs,
    PreparedItem,
    prompt_part_config,
    taking,
)
from mmserve.models.tensors import from_raw, to_raw
from mmserve.store import StoredEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig

AUDIO = media_pb2.MODALITY_AUDIO
BEGIN_AUDIO = "[BEGIN_AUDIO]"


def _stand_in_clip() -> str:
    """A one-sample silent WAV (base64): any clip encodes to one `[BEGIN_AUDIO]` + `[AUDIO]` run, whatever its length."""
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


#: The chat part standing for one audio item until the stored token count replaces its run.
STAND_IN = {"type": "audio", "base64": _stand_in_clip()}


class Voxtral(Family):
    """See the module docstring."""

    name = "voxtral"
    base_modalities: ClassVar[frozenset[ModalityValue]] = frozenset({AUDIO})
    vllm_refused_why: ClassVar[dict[str, str]] = {
        "audio": "vLLM 0.32's Voxtral takes audio only as a clip for its own tower (it has no audio_embeds input)"
    }
    #: The transformers model, reached by attribute (towers, LM, projector), which torch's Module typing cannot follow.
    model: Any

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        from transformers import AutoProcessor, VoxtralForConditionalGeneration

        processor = AutoProcessor.from_pretrained(path)
        if part == "prompt":  # processor and config only: for an engine that runs the LLM itself
            config, resolved, generation = prompt_part_config(path, dtype)
            return cls(None, processor, config, dtype=resolved, generation_config=generation)
        model_class: Any = VoxtralForConditionalGeneration  # its from_pretrained is typed for a model, not a path
        model = model_class.from_pretrained(path, dtype=dtype).to(device).eval()
        if part == "encoder":  # the encoder never runs the LLM: free its weights
            model.model.language_model = None
            model.lm_head = None
        elif part == "decoder":  # the decoder never runs the tower: embeddings come from the store
            model.model.audio_tower = None
            model.model.multi_modal_projector = None
        return cls(model, processor, model.config)

    @property
    def max_context(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 32768))

    # --- encoder half ------------------------------------------------------------------
    @property
    def _audio_encoder(self) -> Any:
        """mistral_common's AudioEncoder of the checkpoint's tokenizer: its padding and token count are the reference."""
        return self.tokenizer.tokenizer.instruct_tokenizer.audio_encoder

    @cached_property
    def _audio_kwargs(self) -> dict[str, Any]:
        """The processor's feature-extraction settings (chunk padding, frames per chunk), as its chat path merges them."""
        return dict(self.processor._merge_kwargs()["audio_kwargs"])

    @property
    def sampling_rate(self) -> int:
        return int(self._audio_encoder.audio_config.sampling_rate)

    def media_handlers(self) -> dict[int, MediaHandler]:
        audio = MediaHandler(
            taking(DecodedAudio, lambda media, options: self._prepare_audio(np.asarray(media.samples, dtype=np.float32))),
            self._encode_audio,
            options=lambda item: {"target_rate": self.sampling_rate},
            client_placement=self._client_audio_placement,
        )
        return {AUDIO: audio}

    def _prepare_audio(self, samples: np.ndarray) -> PreparedItem:
        """Mono samples at `sampling_rate` -> the tower's input chunks and the item's placement."""
        padded = self._audio_encoder.pad(samples, self.sampling_rate)
        kwargs = dict(self._audio_kwargs)
        chunk_frames = int(kwargs.pop("max_source_positions"))
        # The processor's own chunking: mel features of the padded clip, cut into [chunks, mels, chunk_frames].
        features = self.processor._retrieve_input_features([padded], chunk_frames, **kwargs)
        chunks = int(features.shape[0])
        placement = embedding_pb2.AudioPlacement(
            feature_length=chunks * chunk_frames,
            num_samples=int(samples.shape[0]),
            sampling_rate=self.sampling_rate,
            chunk_feature_lengths=[chunk_frames] * chunks,
        )
        return PreparedItem(AUDIO, {"input_features": features}, placement)

    @torch.inference_mode()
    def _encode_audio(self, batch: list[PreparedItem]) -> list[EncodedItem]:
        out = []
        for item in batch:  # one item per tower call, as the reference runs one clip: the same floats
            features = item.inputs["input_features"].to(self.device, self.dtype)
            hidden = self.model.get_audio_features(features).pooler_output
            out.append(EncodedItem([to_raw("embeddings", hidden)], int(hidden.shape[0]), item.placement))
        return out

    @property
    def _frames_per_token(self) -> int:
        """Mel frames per audio token: the tower halves the frames, the projector stacks intermediate/hidden of them."""
        audio = self.config.audio_config
        return 2 * int(audio.intermediate_size) // int(audio.hidden_size)

    def _client_audio_placement(self, embeds: media_pb2.EmbeddingInput, tokens: int) -> embedding_pb2.AudioPlacement:
        """`audio_feature_length` is whole chunks of mel frames, and the tower makes `tokens` tokens of them."""
        where = "source.embeds.audio_feature_length"
        chunk = int(self._audio_kwargs["max_source_positions"])
        length = int(embeds.audio_feature_length)
        if length <= 0 or length % chunk:
            raise InvalidArgument(
                f"audio_feature_length must be a positive multiple of {chunk} mel frames (30 s chunks), got {length}", field=where
            )
        expected = length // self._frames_per_token
        if expected != tokens:
            raise InvalidArgument(f"audio_feature_length {length} makes {expected} tokens, the embeddings have {tokens}", field=where)
        return embedding_pb2.AudioPlacement(
            feature_length=length, sampling_rate=self.sampling_rate, chunk_feature_lengths=[chunk] * (length // chunk)
        )

    def warmup(self) -> None:
        self.encode(AUDIO, [self._prepare_audio(np.zeros(self.sampling_rate, dtype=np.float32))])

    # --- decoder half --------------------------------------------------------------------
    def media_chat_part(self, modality: int) -> dict[str, str]:
        if modality != AUDIO:
            raise InvalidArgument("unsupported modality", field="modality")
        return dict(STAND_IN)

    def media_placeholder_token(self, modality: int) -> str:
        """`[AUDIO]`, the token each of a clip's embeddings replaces (mistral_common writes the runs itself)."""
        return str(self.tokenizer.convert_ids_to_tokens(self.audio_token_id))

    def media_reserved_strings(self) -> tuple[str, ...]:
        return ()  # Tekken encodes text as text: "[AUDIO]" in a message is plain characters, never the control token

    def token_bytes(self, token_id: int) -> bytes | None:
        """Tekken's own bytes of a token (control tokens as their names): its token strings are lossy for partial UTF-8."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        tekken = self.tokenizer.tokenizer.instruct_tokenizer.tokenizer
        piece: bytes = tekken.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        return piece

    @cached_property
    def audio_token_id(self) -> int:
        return int(self.config.audio_token_id)

    @cached_property
    def _begin_audio_id(self) -> int:
        return self.token_id(BEGIN_AUDIO)

    def prompt_token_ids(self, prompt: ChatPrompt, media: list[StoredEmbedding], *, expand: bool = True) -> list[int]:
        """mistral_common's ids for the conversation, each audio run set to its item's token count (or one token)."""
        if prompt.text is not None:
            return list(self.tokenizer([prompt.text])["input_ids"][0])
        from mistral_common.exceptions import MistralCommonException

        tools: list[dict[Any, Any] | Callable[..., Any]] | None = list(prompt.tools) if prompt.tools is not None else None
        try:
            rendered = self.tokenizer.apply_chat_template(prompt.messages, tools=tools, tokenize=True, return_dict=False)
        except (MistralCommonException, ValueError) as exc:  # mistral_common's request rules, e.g. no system prompt with audio
            raise InvalidArgument(f"this model's chat format refuses the conversation: {exc}", field="messages") from exc
        assert isinstance(rendered, list), type(rendered)  # token ids: tokenize=True, return_dict=False
        ids = cast("list[int]", rendered)
        out: list[int] = []
        items = iter(media)
        i = 0
        while i < len(ids):
            out.append(ids[i])
            if ids[i] == self._begin_audio_id:
                stored = next(items, None)
                if stored is None:
                    raise InvalidArgument("media placeholders do not match the stored embeddings", field="messages")
                while i + 1 < len(ids) and ids[i + 1] == self.audio_token_id:
                    i += 1
                out.extend([self.audio_token_id] * (int(stored.descriptor.token_count) if expand else 1))
            i += 1
        if next(items, None) is not None:
            raise InvalidArgument("the chat encoding dropped a media placeholder", field="messages")
        return out

    def prompt_embeds(
        self, prompt: ChatPrompt, media: list[StoredEmbedding]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[StoredEmbedding]], dict[int, torch.Tensor]]:
        ids = torch.tensor([self.prompt_token_ids(prompt, media)], device=self.device)
        embeds = self.embed_tokens(ids)
        by_modality: dict[int, list[StoredEmbedding]] = defaultdict(list)
        masks: dict[int, torch.Tensor] = {}
        if media:
            by_modality[AUDIO] = list(media)
            mask = ids == self.audio_token_id
            feats = torch.cat([from_raw(m.tensor("embeddings"), self.device) for m in media]).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise InvalidArgument("media placeholders do not match the stored embeddings", field="messages")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats)
            masks[AUDIO] = mask
        return ids, embeds, by_modality, masks

    def prefill_inputs(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> PrefillInputs:
        ids, embeds, _, _ = self.prompt_embeds(prompt, media)
        positions = torch.arange(ids.shape[1], device=self.device).view(1, -1)
        return PrefillInputs(ids, embeds, positions, 0)

    def decode_positions(self, positions: list[int]) -> torch.Tensor:
        return torch.tensor(positions, dtype=torch.long, device=self.device).view(-1, 1)

    def placeholder_token_ids(self) -> frozenset[int]:
        return frozenset({self.audio_token_id})

    @property
    def text_config(self) -> PretrainedConfig:
        text: PretrainedConfig = self.config.text_config
        return text
