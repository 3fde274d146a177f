"""Seeded random initialisation, so the same spec always gives byte-identical weights."""

from __future__ import annotations

from typing import TypeVar

import torch
from transformers import PreTrainedConfig, PreTrainedModel

ModelT = TypeVar("ModelT", bound=PreTrainedModel)


def random_model(model_cls: type[ModelT], config: PreTrainedConfig, seed: int) -> ModelT:
    """Build `model_cls(config)` in fp32 from `seed`, leaving the caller's RNG state untouched.

    The init only draws from torch's CPU generator; forking it keeps a service
    or test that builds a checkpoint from having its own random stream shifted.
    """
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            model = model_cls(config)
        finally:
            torch.set_default_dtype(previous_dtype)
    return model.eval()
