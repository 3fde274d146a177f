"""KV storage for the batched engine: one preallocated buffer per sequence, attention row by row.

Why this shape: a sequence's worst case (prompt + max_tokens) is reserved when
it is admitted, so its buffer never grows and the process never holds more
than the KV budget. The linear layers of a step run batched over all rows
(that is where the FLOPs and the weight reads are); attention runs per row on
that row's own keys, through transformers' own SDPA function with exactly the
shapes a request alone would use (no padding, no mask for a decode token, the
causal flag for a fresh prefill), so batching changes nothing in attention.
The masks a model would build are replaced here: a layer's sliding window
(its `sliding_window`) limits the keys a query sees to the last `window`
(a decode token attends to exactly those keys, as transformers' sliding
cache keeps them), and a prefill's bidirectional blocks
(`PrefillInputs.attention_groups`, handed in as `GROUPS_KWARG` through the
model's keyword arguments) let a block's tokens see each other.

The model's attention layers reach this code through two transformers hooks:
the cache object passed as `past_key_values` (its `update` writes the new keys
into each row's buffer and hands back each row's keys so far) and an attention
function registered under `ATTENTION` and selected on the text config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "mmserve_rows"
#: The keyword argument carrying a prefill row's attention groups ([kv_len], by absolute position) to `rows_attention`.
GROUPS_KWARG = "mmserve_attention_groups"


@dataclass(frozen=True)
class KVShape:
    """Per-token KV geometry of a language model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, text_config: Any, dtype: torch.dtype, device: torch.device) -> KVShape:
        heads = int(text_config.num_attention_heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
        return cls(int(text_config.num_hidden_layers), kv_heads, head_dim, dtype, device)


class SequenceKV:
    """Keys and values of one sequence for every layer, `capacity` tokens preallocated."""

    def __init__(self, shape: KVShape, capacity: int) -> None:
        size = (shape.layers, 1, shape.kv_heads, capacity, shape.head_dim)
        self.keys = torch.empty(size, dtype=shape.dtype, device=shape.device)
        self.values = torch.empty(size, dtype=shape.dtype, device=shape.device)
        self.capacity = capacity
        self.length = 0  # tokens written and valid

    def copy_prefix_from(self, other: SequenceKV, tokens: int) -> None:
        """Start with the first `tokens` of another sequence (n > 1 sharing one prefill)."""
        self.keys[:, :, :, :tokens] = other.keys[:, :, :, :tokens]
        self.values[:, :, :, :tokens] = other.values[:, :, :, :tokens]
        self.length = tokens


class BatchKV:
    """`past_key_values` for one forward over `rows`, each appending `q_len` tokens at its own length."""

    def __init__(self, rows: list[SequenceKV]) -> None:
        self.rows = rows
        self.starts = [row.length for row in rows]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        q_len = key_states.shape[2]
        keys, values = [], []
        for b, (row, start) in enumerate(zip(self.rows, self.starts, strict=True)):
            end = start + q_len
            row.keys[layer_idx, 0, :, start:end] = key_states[b]
            row.values[layer_idx, 0, :, start:end] = value_states[b]
            keys.append(row.keys[layer_idx, :, :, :end])
            values.append(row.values[layer_idx, :, :, :end])
        return keys, values

    def commit(self, q_len: int) -> None:
        """The forward went through: the new tokens are valid."""
        for row, start in zip(self.rows, self.starts, strict=True):
            row.length = start + q_len

    # transformers asks these of any cache; positions are always passed explicitly.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def prefill_mask(
    q_len: int, kv_len: int, device: torch.device, *, window: int | None = None, groups: torch.Tensor | None = None
) -> torch.Tensor | None:
    """[1, 1, q, kv] bool for a prompt chunk whose query i sits at kv position kv_len - q_len + i; None: plain causal.

    As transformers' masks for the same model: (causal OR same group) AND inside the window, where the
    window keeps keys less than `window` positions back (transformers' `sliding_window_overlay`) and a group is
    a run of equal ids >= 0 (`blockwise_overlay`).
    """
    grouped = groups is not None and bool((groups[kv_len - q_len : kv_len] >= 0).any())
    windowed = window is not None and kv_len > window
    if kv_len == q_len and not grouped and not windowed:
        return None  # a fresh prompt: SDPA's causal flag
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    mask = kv_pos <= q_pos
    if grouped:
        assert groups is not None
        q_group = groups[kv_len - q_len : kv_len].to(device)[:, None]
        mask |= (q_group == groups[:kv_len].to(device)[None, :]) & (q_group >= 0)
    if window is not None and windowed:
        mask &= kv_pos > q_pos - window
    return mask[None, None]


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: list[torch.Tensor],
    value: list[torch.Tensor],
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of each row's queries over that row's keys (see the module docstring)."""
    q_len = query.shape[2]
    groups: torch.Tensor | None = kwargs.get(GROUPS_KWARG)
    outputs = []
    for b in range(query.shape[0]):
        k, v = key[b], value[b]
        mask = None
        if q_len > 1:
            mask = prefill_mask(q_len, k.shape[2], query.device, window=sliding_window, groups=groups)
        elif sliding_window is not None and k.shape[2] > sliding_window:  # a decode token: the window's keys only
            k, v = k[:, :, -sliding_window:], v[:, :, -sliding_window:]
        out, _ = sdpa_attention_forward(module, query[b : b + 1], k, v, mask, dropout=0.0, scaling=scaling)
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


AttentionInterface.register(ATTENTION, rows_attention)


def use_rows_attention(text_config: Any) -> None:
    """Route the language model's attention through `rows_attention`."""
    text_config._attn_implementation = ATTENTION
