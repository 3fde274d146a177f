"""A small Qwen2-style byte-level BPE tokenizer, trained offline on the shipped corpus.

Every family shares one vocabulary: a fixed block of special tokens first,
then the BPE tokens. The special block has a fixed size, so reserving a new
special token (a new family's placeholder) reuses a reserved slot and never
shifts an id; named special tokens added the usual way would be appended in
an order that does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.resources import files

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

# Fixed ids: SPECIAL_TOKENS[i] has id i. Append new tokens at the end (they take
# a reserved slot); never reorder or remove one.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # 0: pad; also the document separator
    "<|im_start|>",  # 1
    "<|im_end|>",  # 2: eos of chat turns
    "<|vision_start|>",  # 3: Qwen2.5-VL / Qwen3-VL
    "<|vision_end|>",  # 4
    "<|image_pad|>",  # 5
    "<|video_pad|>",  # 6
    "<|IMAGE|>",  # 7: Qwen2.5-Omni
    "<|VIDEO|>",  # 8
    "<|AUDIO|>",  # 9
    "<|vision_bos|>",  # 10
    "<|vision_eos|>",  # 11
    "<|audio_bos|>",  # 12
    "<|audio_eos|>",  # 13
    "<|time_series|>",  # 14: mmserve time-series adapter (any family)
    "<|ts_start|>",  # 15
    "<|ts_end|>",  # 16
    "<bos>",  # 17: Gemma 3 (its chat template starts with the bos token)
    "<start_of_turn>",  # 18
    "<end_of_turn>",  # 19: eos of Gemma 3 chat turns
    "<start_of_image>",  # 20: boi, the image placeholder of the chat template
    "<image_soft_token>",  # 21: one per image embedding token
    "<end_of_image>",  # 22: eoi
)
SPECIAL_BLOCK_SIZE = 32  # ids below this are special; unused ones are <|reserved_special_token_N|>
# Reserved tokens are named by id (id i is <|reserved_special_token_{i - FIRST_RESERVED_ID}|>), so
# naming a slot leaves every other token string on the id it always had.
FIRST_RESERVED_ID = 14
VOCAB_SIZE = 2048  # special block + 256 byte symbols + merges learned from the corpus
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
MAX_LENGTH = 32768

CORPUS = "corpus.txt"


def special_block() -> list[str]:
    """The special tokens in id order, padded with reserved tokens to `SPECIAL_BLOCK_SIZE`."""
    if len(SPECIAL_TOKENS) > SPECIAL_BLOCK_SIZE:
        raise ValueError("SPECIAL_TOKENS outgrew SPECIAL_BLOCK_SIZE")
    if len(SPECIAL_TOKENS) < FIRST_RESERVED_ID:
        raise ValueError("a special token was removed: ids would move")
    reserved = [f"<|reserved_special_token_{i - FIRST_RESERVED_ID}|>" for i in range(len(SPECIAL_TOKENS), SPECIAL_BLOCK_SIZE)]
    return [*SPECIAL_TOKENS, *reserved]


def special_token_id(token: str) -> int:
    """Id of a special token in every tiny checkpoint's vocabulary."""
    return SPECIAL_TOKENS.index(token)


def corpus_text() -> str:
    """The English (plus some multi-byte UTF-8) text the BPE is trained on."""
    return files(__package__).joinpath(CORPUS).read_text(encoding="utf-8")


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the vocabulary and merges with the exact normalizer/pre-tokenizer Qwen2Tokenizer uses.

    Training is deterministic: the trainer sorts its alphabet and breaks ties
    between equally frequent pairs by pair id.
    """
    pipeline = Qwen2Tokenizer().backend_tokenizer  # borrow Qwen2's NFC + regex split + ByteLevel
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = pipeline.normalizer
    bpe.pre_tokenizer = pipeline.pre_tokenizer
    bpe.decoder = pipeline.decoder
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=special_block(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [(left, right) for left, right in model["merges"]]
    return vocab, merges


def build_tokenizer(
    chat_template: str,
    named_tokens: Mapping[str, str] | None = None,
    *,
    eos_token: str = EOS_TOKEN,
    bos_token: str | None = None,
) -> Qwen2Tokenizer:
    """The family's tokenizer: shared vocabulary, its chat template, eos (`<|im_end|>` unless the family ends turns
    otherwise), pad `<|endoftext|>`, and a bos token for templates that render one.

    `named_tokens` (e.g. `{"audio_token": "<|AUDIO|>"}`) become tokenizer
    attributes, which some processors (Qwen2.5-Omni, Gemma 3) read.
    """
    vocab, merges = train_bpe()
    block = special_block()
    for token_id, token in enumerate(block):
        if vocab.get(token) != token_id:
            raise RuntimeError(f"special token {token} did not land on id {token_id}")
    extra: list[str] | dict[str, str] = [t for t in block if t not in (PAD_TOKEN, eos_token, bos_token)]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        # transformers annotates these narrower than it takes: (left, right) pairs and no unknown token.
        merges=merges,  # type: ignore[arg-type]
        unk_token=None,  # type: ignore[arg-type]
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=PAD_TOKEN,
        extra_special_tokens=extra,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        **dict(named_tokens or {}),
    )
    tokenizer.chat_template = chat_template
    return tokenizer
