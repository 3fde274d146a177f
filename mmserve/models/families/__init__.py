"""Model families, chosen from the checkpoint's `config.model_type`.

A family is one class with two halves sharing one definition of the model:
the encoder half (a table of modality handlers: preprocess -> modality tower ->
embedding + placement) and
the decoder half (placeholder expansion, position ids, embedding splice).
Any family also takes time series when its checkpoint carries the
time-series adapter (`time_series/`). Families are found through the
`mmserve.families` entry-point group (`registry`), so a family can also come
from another installed package.
"""

from __future__ import annotations

from mmserve.models.families.base import ChatPrompt, EncodedItem, Family, MediaHandler, PrefillInputs, PreparedItem, TensorKwargs
from mmserve.models.families.registry import families, family_for

__all__ = [
    "ChatPrompt", "EncodedItem", "Family", "MediaHandler", "PrefillInputs", "PreparedItem", "TensorKwargs", "families", "family_for",
]  # fmt: skip
