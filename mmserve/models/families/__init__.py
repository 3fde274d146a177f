"""Model families, chosen from the checkpoint's `config.model_type`.

A family is one class with two halves sharing one definition of the model:
the encoder half (preprocess -> modality tower -> embedding + placement) and
the decoder half (placeholder expansion, position ids, embedding splice).
"""

from __future__ import annotations

from mmserve.models.families.base import EncodedItem, Family, PrefillInputs, PreparedItem
from mmserve.models.families.qwen2_5_vl import Qwen2_5_VL

FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Qwen2_5_VL,)}

__all__ = ["FAMILIES", "EncodedItem", "Family", "PrefillInputs", "PreparedItem"]
