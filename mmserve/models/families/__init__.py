"""Model families, chosen from the checkpoint's `config.model_type`.

A family is one class with two halves sharing one definition of the model:
the encoder half (preprocess -> modality tower -> embedding + placement) and
the decoder half (placeholder expansion, position ids, embedding splice).
Any family also takes time series when its checkpoint carries the
time-series adapter (`time_series/`).
"""

from __future__ import annotations

from mmserve.models.families.base import ChatPrompt, EncodedItem, Family, PrefillInputs, PreparedItem
from mmserve.models.families.qwen2_5_omni import Qwen2_5_Omni
from mmserve.models.families.qwen2_5_vl import Qwen2_5_VL
from mmserve.models.families.qwen3_vl import Qwen3_VL

FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Qwen2_5_VL, Qwen3_VL, Qwen2_5_Omni)}
#: Other model_type values of the same architectures (a thinker-only Omni checkpoint).
FAMILIES["qwen2_5_omni_thinker"] = Qwen2_5_Omni

__all__ = ["FAMILIES", "ChatPrompt", "EncodedItem", "Family", "PrefillInputs", "PreparedItem"]
