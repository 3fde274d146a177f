"""What every model family provides to the encoder and decoder services."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from google.protobuf.message import Message

from mmserve.common.v1 import media_pb2
from mmserve.errors import InvalidArgument
from mmserve.store import RawTensor

MODALITY_NAMES = {
    media_pb2.MODALITY_IMAGE: "image",
    media_pb2.MODALITY_VIDEO: "video",
    media_pb2.MODALITY_AUDIO: "audio",
    media_pb2.MODALITY_TIME_SERIES: "time_series",
}


@dataclass
class PreparedItem:
    """One media item turned into model inputs, ready to be batched into a tower."""

    modality: int
    inputs: dict[str, torch.Tensor]
    placement: Message  # the modality's *Placement message, filled as far as preprocessing knows
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodedItem:
    """A tower's output for one item: what gets stored."""

    tensors: list[RawTensor]
    token_count: int
    placement: Message


class Family(ABC):
    """A model family: loads its checkpoint and knows both halves of the split."""

    #: `config.model_type` of checkpoints of this family.
    name: ClassVar[str]
    #: Media this family's model accepts (media_pb2.Modality values).
    modalities: ClassVar[frozenset[int]]

    def __init__(self, model: torch.nn.Module, processor: Any, config: Any) -> None:
        self.model = model
        self.processor = processor
        self.config = config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def check_modality(self, modality: int, field: str) -> None:
        """A modality the loaded model cannot take is a clear 400."""
        if modality not in self.modalities:
            accepted = ", ".join(sorted(MODALITY_NAMES[m] for m in self.modalities))
            name = MODALITY_NAMES.get(modality, str(modality))
            raise InvalidArgument(
                f"this model ({self.name}) does not accept {name} input; it accepts: {accepted}", field=field
            )

    # --- loading -------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, path: str, *, dtype: torch.dtype | str, device: str, part: str) -> Family:
        """Load the checkpoint; `part` is "encoder" (towers only) or "decoder" (the LLM)."""

    # --- encoder half ----------------------------------------------------------
    @abstractmethod
    def effective_options(self, item: media_pb2.MediaInput) -> dict[str, Any]:
        """The processing options that will really be used (defaults filled, clamped)."""

    @abstractmethod
    def prepare(self, modality: int, media: Any, options: dict[str, Any]) -> PreparedItem:
        """Preprocess decoded media into tower inputs (CPU, no model)."""

    @abstractmethod
    def encode(self, modality: int, batch: list[PreparedItem]) -> list[EncodedItem]:
        """Run the modality tower on a batch; one result per item, in order."""

    @abstractmethod
    def warmup(self) -> None:
        """Run every tower once so the first request does not pay for lazy init."""
