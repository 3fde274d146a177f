"""The prefix cache's blocks, in process: keys, matching, the KV budget it is given, LRU eviction, exact copies."""

from __future__ import annotations

import torch

from services.decoder.engine.builtin.kv import KVShape, SequenceKV
from services.decoder.engine.builtin.prefix import PrefixCache, block_keys, media_token_key

SHAPE = KVShape(layers=2, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
BLOCK = 4


def filled(tokens: int, seed: int) -> SequenceKV:
    seq = SequenceKV(SHAPE, tokens + 8)
    gen = torch.Generator().manual_seed(seed)
    seq.keys.copy_(torch.randn(seq.keys.shape, generator=gen))
    seq.values.copy_(torch.randn(seq.values.shape, generator=gen))
    seq.length = tokens
    return seq


def test_keys_chain_and_media_items_are_keyed_by_content() -> None:
    cat, dog = media_token_key("sha-cat|opts"), media_token_key("sha-dog|opts")
    assert cat < 0 and dog < 0 and cat != dog
    a = block_keys([1, 2, 3, 4, cat, cat, cat, cat, 9, 9], BLOCK)
    b = block_keys([1, 2, 3, 4, cat, cat, cat, cat, 7], BLOCK)
    c = block_keys([1, 2, 3, 4, dog, dog, dog, dog, 9, 9], BLOCK)
    assert len(a) == 2 and a == b  # only full blocks; same tokens and same item, same keys
    assert c[0] == a[0] and c[1] != a[1]  # another image behind the same pad ids differs from there on
    assert block_keys([5, 2, 3, 4, cat, cat, cat, cat], BLOCK)[1] != a[1]  # a key depends on everything before it
    alice, bob = (block_keys([1, 2, 3, 4, cat, cat, cat, cat], BLOCK, salt=t) for t in ("alice", "bob"))
    assert not {*alice} & {*bob} and not {*alice} & {*a}  # tenants never share a block


def test_a_hit_is_copied_exactly_and_always_leaves_a_token_to_compute() -> None:
    cache = PrefixCache(BLOCK)
    keys = block_keys(list(range(12)), BLOCK)
    source = filled(12, seed=1)
    cache.insert(keys, source, room=100)
    assert cache.tokens == 12
    assert cache.match(keys, prompt_tokens=12) == 11  # the last token is computed again for its logits
    assert cache.match([*keys[:2], b"other"], prompt_tokens=20) == 8
    target = SequenceKV(SHAPE, 20)
    cache.load(keys, 11, target)
    assert target.length == 11
    assert torch.equal(target.keys[:, :, :, :11], source.keys[:, :, :, :11])
    assert torch.equal(target.values[:, :, :, :11], source.values[:, :, :, :11])


def test_insert_stays_within_room_and_evicts_least_recently_used_children_first() -> None:
    cache = PrefixCache(BLOCK)
    old = block_keys(list(range(8)), BLOCK)
    cache.insert(old, filled(8, seed=2), room=8)
    assert cache.tokens == 8
    new = block_keys(list(range(100, 112)), BLOCK)
    cache.insert(new, filled(12, seed=3), room=4)  # 4 free: the old prompt's blocks give way, leaf first
    assert cache.tokens == 12
    assert cache.match(new, 13) == 12 and cache.match(old, 9) == 0
    assert cache.evict(4) == 4
    assert cache.match(new, 13) == 8  # the deepest block went first: what is left is still a reachable prefix
