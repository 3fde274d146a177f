"""The built-in engine's own attention masks equal transformers' for the same model, and chunks keep blocks whole.

`rows_attention` replaces the masks a model would build (kv.py); what it
builds must be transformers' own rule: causal OR same bidirectional block
(`blockwise_overlay`, Gemma 3's images), AND inside the sliding window
(`sliding_window_overlay`), at any offset of a chunk after cached tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import and_masks, blockwise_overlay, causal_mask_function, or_masks, sliding_window_overlay

from services.decoder.engine.builtin.kv import prefill_mask
from services.decoder.engine.builtin.scheduler import chunk_end

#: 3 text tokens, a 4-token image, 2 text, a 3-token image, 2 text.
GROUPS = torch.tensor([-1, -1, -1, 0, 0, 0, 0, -1, -1, 1, 1, 1, -1, -1])


def reference(q_len: int, kv_len: int, window: int | None, groups: torch.Tensor | None) -> torch.Tensor:
    """The mask from transformers' mask functions, position by position."""
    rule = causal_mask_function
    if groups is not None:
        rule = or_masks(rule, blockwise_overlay(groups[None]))
    if window is not None:
        rule = and_masks(rule, sliding_window_overlay(window))
    t = torch.tensor
    rows = [[bool(rule(t(0), t(0), t(q), t(kv))) for kv in range(kv_len)] for q in range(kv_len - q_len, kv_len)]
    return torch.tensor(rows)


@pytest.mark.parametrize("window", [None, 3, 5, 100])
@pytest.mark.parametrize("groups", [None, GROUPS])
@pytest.mark.parametrize(("start", "end"), [(0, 14), (0, 7), (3, 14), (7, 12), (5, 9), (13, 14)])
def test_prefill_mask_is_transformers_mask(window: int | None, groups: torch.Tensor | None, start: int, end: int) -> None:
    want = reference(end - start, end, window, groups)
    got = prefill_mask(end - start, end, torch.device("cpu"), window=window, groups=groups)
    if got is None:  # SDPA's causal flag: only when that is the whole rule
        assert start == 0 and torch.equal(want, torch.ones(end, end, dtype=torch.bool).tril())
    else:
        assert torch.equal(got[0, 0], want)


def test_chunk_ends_never_split_a_block() -> None:
    assert chunk_end(None, 0, 5) == 5
    assert chunk_end(GROUPS, 0, 3) == 3  # before the image
    assert chunk_end(GROUPS, 0, 5) == 3  # inside: back to its start
    assert chunk_end(GROUPS, 0, 7) == 7  # right after it
    assert chunk_end(GROUPS, 3, 5) == 7  # a chunk starting at the image takes it whole
    assert chunk_end(GROUPS, 5, 6) == 7  # and so does one resuming inside it (a prefix-cache hit)
    assert chunk_end(GROUPS, 7, 10) == 9
    assert chunk_end(GROUPS, 0, 14) == 14
