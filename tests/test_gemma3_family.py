"""The Gemma 3 family in-process, against Gemma3Processor and Gemma3ForConditionalGeneration's own rules.

The end-to-end equality with the monolithic model is in test_equivalence_modalities.py, test_batching.py and
test_prefix_cache.py; here each rule the family re-creates is checked on its own, so a difference says which:
the prompt ids (placeholder expansion), the scaled text and unscaled image embeddings, the bidirectional
blocks, the token count a stored or client embedding must have.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.errors import InvalidArgument
from mmserve.models.families import ChatPrompt
from mmserve.models.families.gemma3.gemma3 import Gemma3
from mmserve.store import StoredEmbedding
from tests.conftest import CACHE_DIR
from tests.support import png_bytes

IMAGE = media_pb2.MODALITY_IMAGE
PNGS = [png_bytes(96, 64, seed=1), png_bytes(128, 84, seed=2)]
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "versus"}, {"type": "image"}, {"type": "text", "text": "Compare."}],
    },
]


@pytest.fixture(scope="module")
def family() -> Gemma3:
    from mmserve.models.tiny import ensure_checkpoint

    loaded = Gemma3.load(str(ensure_checkpoint("gemma3-tiny", CACHE_DIR)), dtype=torch.float32, device="cpu", part="full")
    assert isinstance(loaded, Gemma3)
    return loaded


def images() -> list[Image.Image]:
    return [Image.open(io.BytesIO(p)).convert("RGB") for p in PNGS]


def stored(family: Gemma3) -> list[StoredEmbedding]:
    encoded = family.encode(IMAGE, [family.prepare(IMAGE, image, {}) for image in images()])
    return [
        StoredEmbedding(embedding_pb2.EmbeddingDescriptor(modality=IMAGE, token_count=item.token_count, image=item.placement), item.tensors)
        for item in encoded
    ]


def test_prompt_ids_and_blocks_are_the_processors(family: Gemma3) -> None:
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    text = family.processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    want = family.processor(text=[text], images=images(), return_tensors="pt")
    inputs = family.prefill_inputs(ChatPrompt(messages=CONVERSATION), stored(family))
    assert torch.equal(inputs.input_ids, want["input_ids"])
    assert inputs.attention_groups is not None
    assert torch.equal(inputs.attention_groups, get_block_sequence_ids_for_mask(want["token_type_ids"])[0])
    assert sorted(set(inputs.attention_groups.tolist())) == [-1, 0, 1]
    assert torch.equal(inputs.position_ids, torch.arange(inputs.input_ids.shape[1])[None]) and inputs.rope_delta == 0


def test_text_embeddings_are_scaled_and_image_embeddings_are_not(family: Gemma3) -> None:
    items = stored(family)
    inputs = family.prefill_inputs(ChatPrompt(messages=CONVERSATION), items)
    ids = inputs.input_ids[0]
    is_image = ids == family.config.image_token_id
    table = family._loaded.get_input_embeddings()
    raw = torch.nn.functional.embedding(ids[~is_image], table.weight)
    assert torch.equal(inputs.inputs_embeds[0, ~is_image], raw * table.embed_scale)
    with torch.inference_mode():
        features = family._loaded.model.get_image_features(
            torch.cat([family.prepare(IMAGE, image, {}).inputs["pixel_values"] for image in images()])
        ).pooler_output
    assert torch.equal(inputs.inputs_embeds[0, is_image], features.reshape(-1, features.shape[-1]))


def test_a_raw_prompt_gets_the_tokenizers_special_tokens_and_a_chat_prompt_its_templates(family: Gemma3) -> None:
    tokenizer = family.tokenizer
    assert family.prompt_token_ids(ChatPrompt(text="Once upon a time"), []) == tokenizer("Once upon a time")["input_ids"]
    chat = family.prompt_token_ids(ChatPrompt(messages=[{"role": "user", "content": "Hi"}]), [])
    assert chat[0] == tokenizer.convert_tokens_to_ids("<bos>") and chat.count(chat[0]) == 1


def test_an_embedding_of_another_token_count_is_refused(family: Gemma3) -> None:
    items = stored(family)
    items[0].descriptor.token_count = 15
    with pytest.raises(InvalidArgument, match="15 tokens"):
        family.prefill_inputs(ChatPrompt(messages=CONVERSATION), items)
    with pytest.raises(InvalidArgument, match="16 tokens, these have 15"):
        family.client_placement(IMAGE, media_pb2.EmbeddingInput(), 15)
    assert family.client_placement(IMAGE, media_pb2.EmbeddingInput(), 16) == embedding_pb2.ImagePlacement()
    assert family.client_tensor_names(IMAGE) == ("embeddings",)


def test_takes_images_only_and_reserves_its_image_tokens(family: Gemma3) -> None:
    family.check_modality(IMAGE, "messages[0]")
    with pytest.raises(InvalidArgument, match="does not accept time_series"):
        family.check_modality(media_pb2.MODALITY_TIME_SERIES, "messages[0]")
    assert family.reserved_strings() == ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    assert family.placeholder_token_ids() == frozenset({family.config.image_token_id})
    assert family.eos_token_ids == frozenset({family.tokenizer.convert_tokens_to_ids("<end_of_turn>"), 0})
    assert not family.takes_tools


def test_the_vllm_engine_refuses_gemma3_saying_why(family: Gemma3) -> None:
    """vLLM 0.32's Gemma 3 asserts against image embeddings: the refusal names the family and the reason."""
    from mmserve.config import Settings
    from mmserve.errors import FailedPrecondition
    from services.decoder.engine.vllm.engine import VllmEngine

    with pytest.raises(FailedPrecondition, match=r"gemma3 family here \(image: .*refuses image_embeds\)"):
        VllmEngine(family, "unused", Settings(model="unused"))
