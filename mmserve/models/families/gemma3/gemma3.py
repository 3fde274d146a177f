"""Gemma 3 (image + text): `Gemma3ForConditionalGeneration`, a SigLIP tower + projector in front of the Gemma 3 LM.

Encoder half: the checkpoint's own image processor (a fixed square resize, no
pan-and-scan), then `get_image_features`: the vision tower and the
multimodal projector, whose output is `mm_tokens_per_image` tokens already in
the LLM's hidden space. Nothing but the source size is placed: every image
fills the same number of tokens at consecutive 1-D positions.

Decoder half: the chat template renders one `<start_of_image>` per image,
which is expanded exactly as Gemma3Processor does (its `full_image_sequence`:
"\\n\\n" boi, the soft token per embedding token, eoi "\\n\\n"). Token
embeddings are the model's scaled ones (x sqrt(hidden)); image embeddings
are spliced in unscaled, as the reference does. Each image's tokens attend to
each other in both directions during prefill (`PrefillInputs.attention_groups`,
transformers' own block ids); sliding-window layers are the attention
function's business (each layer says its window).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from google.protobuf.message import Message
from PIL import Image

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.decoded import MediaOptions
from mmserve.errors import FailedPrecondition, InvalidArgument
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
    from transformers import Gemma3ForConditionalGeneration

IMAGE = media_pb2.MODALITY_IMAGE
#: Attention-mask inputs the engine's attention function replaces: transformers need not build them.
ENGINE_MASKS = {"full_attention": None, "sliding_attention": None}


class Gemma3(Family):
    """See the module docstring."""

    name = "gemma3"
    model_class: ClassVar[str] = "Gemma3ForConditionalGeneration"
    model: Gemma3ForConditionalGeneration | None
    base_modalities = frozenset({IMAGE})
    vllm_refused_why: ClassVar[dict[str, str]] = {
        "image": "vLLM 0.32's Gemma 3 takes images only as pixels for its own tower (it refuses image_embeds)"
    }

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        import transformers
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        if part == "prompt":  # processor and config only: another engine runs the LLM
            config, resolved, generation = prompt_part_config(path, dtype)
            return cls(None, processor, config, dtype=resolved, generation_config=generation)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype).to(device).eval()
        if part == "encoder":  # the encoder never runs the LLM: free its weights
            model.model.language_model = None
            model.lm_head = None
        elif part == "decoder":  # the decoder never runs the tower
            model.model.vision_tower = None
            model.model.multi_modal_projector = None
        return cls(model, processor, model.config)

    @property
    def _loaded(self) -> Gemma3ForConditionalGeneration:
        """The model, for the parts that run it (the prompt part has none)."""
        if self.model is None:
            raise FailedPrecondition(f"{self.name}: this part of the model does not run it", field="model")
        return self.model

    # --- encoder half ------------------------------------------------------------------
    def media_handlers(self) -> dict[int, MediaHandler]:
        """Images, with no options: the processor resizes every image to one square, so no pixel bound changes the result."""
        return {
            IMAGE: MediaHandler(
                taking(Image.Image, self._prepare_image), self._encode_images, client_placement=self._client_image_placement
            )
        }

    def _prepare_image(self, media: Image.Image, options: MediaOptions) -> PreparedItem:
        # Pan-and-scan (extra crops with their own text) is off, as in the checkpoints' processor defaults.
        batch = self.processor.image_processor(images=[media], do_pan_and_scan=False, return_tensors="pt")
        placement = embedding_pb2.ImagePlacement(source_size=[media.width, media.height])
        return PreparedItem(IMAGE, {"pixel_values": batch["pixel_values"]}, placement)

    @torch.inference_mode()
    def _encode_images(self, batch: list[PreparedItem]) -> list[EncodedItem]:
        pixels = torch.cat([p.inputs["pixel_values"] for p in batch]).to(self.device)
        features = self._loaded.model.get_image_features(pixels).pooler_output  # [batch, tokens, hidden]
        return [EncodedItem([to_raw("embeddings", features[i])], int(features.shape[1]), item.placement) for i, item in enumerate(batch)]

    @property
    def tokens_per_image(self) -> int:
        return int(self.config.mm_tokens_per_image)

    def _client_image_placement(self, embeds: media_pb2.EmbeddingInput, tokens: int) -> Message:
        """Exactly `mm_tokens_per_image` tokens (the projector's output), nothing else to place."""
        if tokens != self.tokens_per_image:
            raise InvalidArgument(
                f"a {self.name} image embedding has {self.tokens_per_image} tokens, these have {tokens}", field="source.embeds"
            )
        return embedding_pb2.ImagePlacement()

    def warmup(self) -> None:
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        self.encode(IMAGE, [self.prepare(IMAGE, image, {})])

    # --- decoder half --------------------------------------------------------------------
    def media_chat_part(self, modality: int) -> dict[str, str]:
        return {"type": "image"}

    def media_placeholder_token(self, modality: int) -> str:
        """`<start_of_image>`: what the template writes for an image, before the processor expands it."""
        return str(self.processor.boi_token)

    @property
    def _image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def media_reserved_strings(self) -> tuple[str, ...]:
        tokenizer = self.tokenizer
        return (tokenizer.boi_token, tokenizer.image_token, tokenizer.eoi_token)

    def _expand(self, text: str, media: list[StoredEmbedding]) -> str:
        """Each image's `<start_of_image>` becomes the processor's full image sequence (one source: the processor);
        a time series' placeholder is repeated to its token count."""
        out: list[str] = []
        pos = 0
        for stored in media:
            modality, count = stored.descriptor.modality, int(stored.descriptor.token_count)
            token = self.placeholder_token(modality)
            if modality == IMAGE and count != int(self.processor.image_seq_length):
                raise InvalidArgument(
                    f"a stored image has {count} tokens; this model takes {self.processor.image_seq_length}", field="messages"
                )
            found = text.find(token, pos)
            if found < 0:
                raise InvalidArgument("the chat template dropped a media placeholder", field="messages")
            out += [text[pos:found], self.processor.full_image_sequence if modality == IMAGE else token * count]
            pos = found + len(token)
        out.append(text[pos:])
        return "".join(out)

    def _spliced_id(self, modality: int) -> int:
        """The token id whose embeddings an item of `modality` replaces (an image: its soft tokens, not `<start_of_image>`)."""
        if modality == IMAGE:
            return self._image_token_id
        return self.token_id(self.placeholder_token(modality))

    def prompt_token_ids(self, prompt: ChatPrompt, media: list[StoredEmbedding], *, expand: bool = True) -> list[int]:
        """The template renders `<bos>` itself, so a chat prompt is tokenized without special tokens; a raw prompt gets them."""
        text = self.render(prompt)
        if expand:
            text = self._expand(text, media)
        return list(self.tokenizer([text], add_special_tokens=prompt.text is not None)["input_ids"][0])

    def prefill_inputs(self, prompt: ChatPrompt, media: list[StoredEmbedding]) -> PrefillInputs:
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        ids, embeds, by_modality, masks = self.prompt_embeds(prompt, media)
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
        # Images attend to themselves both ways; a time series stays causal, like text.
        groups = get_block_sequence_ids_for_mask(masks[IMAGE].long(), device=ids.device)[0] if IMAGE in by_modality else None
        return PrefillInputs(ids, embeds, positions, 0, attention_groups=groups)

    def prompt_embeds(
        self, prompt: ChatPrompt, media: list[StoredEmbedding]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[StoredEmbedding]], dict[int, torch.Tensor]]:
        ids = torch.tensor([self.prompt_token_ids(prompt, media)], device=self.device)
        embeds = self.embed_tokens(ids)  # text scaled by sqrt(hidden); the spliced media are not
        by_modality: dict[int, list[StoredEmbedding]] = {}
        for stored in media:
            by_modality.setdefault(int(stored.descriptor.modality), []).append(stored)
        masks: dict[int, torch.Tensor] = {int(IMAGE): ids == self._image_token_id}
        for modality, items in by_modality.items():
            mask = masks[modality] = ids == self._spliced_id(modality)
            feats = torch.cat([from_raw(m.tensor("embeddings"), self.device) for m in items]).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise InvalidArgument("media placeholders do not match the stored embeddings", field="messages")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), feats)
        return ids, embeds, by_modality, masks

    def decode_positions(self, positions: list[int]) -> torch.Tensor:
        return torch.tensor(positions, dtype=torch.long, device=self.device).view(-1, 1)

    def placeholder_token_ids(self) -> frozenset[int]:
        return frozenset(self._spliced_id(m) for m in self.modalities)

    def language_model_kwargs(self) -> dict[str, Any]:
        """The engine's attention builds the masks (blocks, windows): transformers need not."""
        return {"attention_mask": dict(ENGINE_MASKS)}

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The scaled token embeddings; an image token outside the vocabulary embeds as id 0, as the reference does."""
        if self._image_token_id >= int(self.text_config.vocab_size):
            ids = ids.masked_fill(ids == self._image_token_id, 0)
        return super().embed_tokens(ids)
