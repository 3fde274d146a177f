"""Prefix cache: KV of earlier prompts, reused by prompts that start the same way.

Prompts are cut into blocks of `block_size` tokens; a block's key chains the
previous block's key with its own token keys, where a media placeholder token
is keyed by the item it stands for (its content and options, not the shared
pad id), as SGLang does. So "the same image, asked again" matches as far as the
image and the text around it are the same, and two different images behind the
same pad ids never match. Blocks are copies (a request writes its own buffer),
counted in the engine's KV budget, evicted least recently used.

A hit may end inside a media item whose tokens attend to each other both ways
(`PrefillInputs.attention_groups`, Gemma 3's images): the cached KV of the
item's first tokens then depends on its later tokens too, which the block keys
do not cover. It is still exact: those later tokens are the same item (the
keys name it by content and options, so the same count and embeddings
follow), the item was prefilled in one forward when it was cached (the
scheduler never splits a block), and the resumed forward takes the rest of the
item whole and lets it see the cached part (`kv.prefill_mask`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from services.decoder.engine.builtin.kv import SequenceKV

MEDIA_KEY_BASE = -(1 << 62)  # token keys below this stand for media items, never a real token id


def media_token_key(identity: str) -> int:
    """A token key for every placeholder of one media item (negative: disjoint from token ids)."""
    digest = hashlib.blake2b(identity.encode(), digest_size=7).digest()
    return MEDIA_KEY_BASE - int.from_bytes(digest, "little")


def block_keys(token_keys: list[int], block_size: int, salt: str = "") -> list[bytes]:
    """Chained keys of every full block; the chain starts from `salt` (the tenant), so tenants never share blocks.

    A shared block would show in `cached_prompt_tokens` (and in time to first token) that another tenant
    sent the same media and text moments ago.
    """
    raw = np.asarray(token_keys, dtype=np.int64).tobytes()
    width = 8 * block_size
    keys: list[bytes] = []
    prev = hashlib.blake2b(salt.encode(), digest_size=16).digest() if salt else b""
    for start in range(0, len(token_keys) - block_size + 1, block_size):
        prev = hashlib.blake2b(prev + raw[8 * start : 8 * start + width], digest_size=16).digest()
        keys.append(prev)
    return keys


@dataclass
class _Block:
    keys: torch.Tensor  # [layers, kv_heads, block, head_dim]
    values: torch.Tensor


class PrefixCache:
    """Block key -> KV copy, LRU. Thread-confined to the scheduler."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def match(self, keys: list[bytes], prompt_tokens: int) -> int:
        """How many leading prompt tokens are cached (leaving at least one to compute the next-token logits)."""
        matched = 0
        for key in keys:
            if key not in self._blocks:
                break
            matched += 1
        return max(min(matched * self.block_size, prompt_tokens - 1), 0)

    def load(self, keys: list[bytes], tokens: int, into: SequenceKV) -> None:
        """Copy the first `tokens` cached tokens into a sequence's buffer; refresh their blocks' recency."""
        used = -(-tokens // self.block_size)
        for i, key in enumerate(keys[:used]):
            block = self._blocks[key]
            start = i * self.block_size
            n = min(self.block_size, tokens - start)
            into.keys[:, 0, :, start : start + n] = block.keys[:, :, :n]
            into.values[:, 0, :, start : start + n] = block.values[:, :, :n]
        into.length = tokens
        for key in reversed(keys[:used]):  # parents end up most recent: evicted after their children
            self._blocks.move_to_end(key)

    def insert(self, keys: list[bytes], source: SequenceKV, room: int) -> None:
        """Keep the full blocks of a just-prefilled prompt, within `room` free tokens of the KV budget.

        Older blocks give way to newer ones (LRU); never more than `room` plus what was evicted.
        """
        full = keys[: source.length // self.block_size]
        new = [i for i, key in enumerate(full) if key not in self._blocks]
        needed = len(new) * self.block_size - room
        if needed > 0:
            room += self.evict(needed, keep=set(full))
        for i in new:
            if room < self.block_size:
                break
            start, end = i * self.block_size, (i + 1) * self.block_size
            self._blocks[full[i]] = _Block(source.keys[:, 0, :, start:end].clone(), source.values[:, 0, :, start:end].clone())
            room -= self.block_size
        for key in reversed(full):  # parents end up most recent: evicted after their children
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def blocks_for(self, keys: list[bytes], tokens: int) -> set[bytes]:
        """The keys of the blocks holding the first `tokens` tokens."""
        return set(keys[: -(-tokens // self.block_size)])

    def evict(self, tokens: int, keep: set[bytes] | frozenset[bytes] = frozenset()) -> int:
        """Drop least recently used blocks (except `keep`) until `tokens` are freed or none is left; tokens freed."""
        freed = 0
        for key in list(self._blocks):
            if freed >= tokens:
                break
            if key not in keep:
                del self._blocks[key]
                freed += self.block_size
        return freed

    def clear(self) -> None:
        self._blocks.clear()
