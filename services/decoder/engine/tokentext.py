"""Token id -> (text, UTF-8 bytes), as logprobs report them.

Byte-level BPE vocabularies (Qwen, GPT-2 style) store each byte as a printable
character; a token's bytes are those characters mapped back. Added tokens
(`<|im_end|>`) are their own text. A family whose tokenizer knows its tokens'
bytes (Tekken) says them itself (`Family.token_bytes`). A token that is not whole UTF-8 characters
(half of a multibyte character) is shown as `bytes:\\xNN...`, as OpenAI does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class TokenText:
    """Cached text and bytes of the tokens of one tokenizer."""

    def __init__(self, tokenizer: Any, token_bytes: Callable[[int], bytes | None] = lambda _: None) -> None:
        """`token_bytes`: a token's bytes where the tokenizer itself knows them (`Family.token_bytes`), else None."""
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes

    @functools.cached_property
    def added(self) -> dict[int, str]:
        return {i: t.content for i, t in self.tokenizer.added_tokens_decoder.items()}

    @functools.lru_cache(maxsize=65536)  # noqa: B019  # one instance per served model, for the process's life
    def of(self, token_id: int) -> tuple[str, bytes]:
        known = self.token_bytes(token_id)
        if known is not None:
            raw = known
        elif token_id in self.added:
            raw = self.added[token_id].encode()
        else:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            if all(c in BYTE_OF_CHAR for c in piece):
                raw = bytes(BYTE_OF_CHAR[c] for c in piece)
            else:  # not byte-level (e.g. SentencePiece): the decoded text is the best we have
                raw = self.tokenizer.decode([token_id]).encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw
