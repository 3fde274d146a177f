"""A small Tekken tokenizer file (`tekken.json`), the format Mistral's models ship and mistral_common reads.

Mistral checkpoints carry no Hugging Face tokenizer: `tekken.json` holds a
tiktoken-style byte-level BPE (ranks over byte strings), the special tokens by
rank, the pre-tokenizer pattern and, for audio models, the audio front end
that decides how many `[AUDIO]` tokens a clip becomes. transformers reads it
through `MistralCommonBackend`. The BPE ranks here are the merges of the
shared tiny vocabulary (`tokenizer.train_bpe`), so every tiny checkpoint
learns from one corpus; the special tokens sit on the ranks the real Voxtral
file gives them (the Voxtral processor hard-codes `[AUDIO]` = 24).
"""

from __future__ import annotations

import base64
import json
from functools import cache
from pathlib import Path

from mmserve.models.tiny.tokenizer import train_bpe

FILE_NAME = "tekken.json"
#: Ids below this are special (the real files' size; the unnamed ones are `<SPECIAL_n>` fillers).
NUM_SPECIAL_TOKENS = 1000
#: Named special tokens by rank, as in the real Voxtral `tekken.json` (v7: system prompts in their own block).
SPECIAL_TOKENS: dict[int, str] = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    14: "[PREFIX]",
    15: "[MIDDLE]",
    16: "[SUFFIX]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]",
    20: "[ARGS]",
    21: "[CALL_ID]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    34: "[TRANSCRIBE]",
}
BOS_ID, EOS_ID, PAD_ID = 1, 2, 11
AUDIO_ID = 24  # [AUDIO]
VERSION = "v7"
#: The real files' pre-tokenizer split.
PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (the shared BPE is trained in that alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


@cache
def bpe_ranks() -> tuple[bytes, ...]:
    """The tiktoken ranks: the 256 single bytes in byte order, then each merge of the shared BPE in its order."""
    decode = _byte_decoder()
    ranks = [bytes([b]) for b in range(256)]
    seen = set(ranks)
    _, merges = train_bpe()
    for left, right in merges:
        token = bytes(decode[c] for c in left + right)
        if token not in seen:
            seen.add(token)
            ranks.append(token)
    return tuple(ranks)


def vocab_size() -> int:
    """Ids of a tiny Tekken vocabulary: the special block, then the BPE ranks."""
    return NUM_SPECIAL_TOKENS + len(bpe_ranks())


def write_tekken(out_dir: Path, audio: dict[str, object]) -> Path:
    """Write `tekken.json` into `out_dir`, with `audio` (mistral_common's AudioConfig fields) as its audio section."""
    ranks = bpe_ranks()
    special = [
        {"rank": i, "token_str": SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(max(SPECIAL_TOKENS) + 1)
    ]
    data = {
        "config": {
            "pattern": PATTERN,
            "num_vocab_tokens": len(ranks),
            "default_vocab_size": vocab_size(),
            "default_num_special_tokens": NUM_SPECIAL_TOKENS,
            "version": VERSION,
        },
        "vocab": [
            {"rank": i, "token_bytes": base64.b64encode(token).decode(), "token_str": token.decode("utf-8", "replace")}
            for i, token in enumerate(ranks)
        ],
        "special_tokens": special,
        "audio": audio,
    }
    path = out_dir / FILE_NAME
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
