"""Time series for any family: the adapter in a checkpoint's `time_series/` folder.

Encoder side: the adapter turns a z-scored [T, C] series into
[tokens, llm_hidden] embeddings. Decoder side: a time-series part is rendered
as plain text `<start><placeholder><end>` (every chat template renders text
verbatim, so no template needs to know about time series), the placeholder is
repeated to the stored token count, and the embeddings are spliced there.
Positions are those of text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmserve.api.common.v1 import embedding_pb2, media_pb2
from mmserve.decoded import DecodedSeries
from mmserve.errors import FailedPrecondition, InvalidArgument
from mmserve.models.families.base import EncodedItem, MediaHandler, PreparedItem, taking
from mmserve.models.tensors import to_raw
from mmserve.models.time_series_adapter import TimeSeriesAdapter, TimeSeriesAdapterConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SUBFOLDER = "time_series"


@dataclass
class TimeSeriesSupport:
    """A loaded adapter and the ids of its tokens in the LLM's tokenizer."""

    adapter: TimeSeriesAdapter
    placeholder_id: int

    @property
    def config(self) -> TimeSeriesAdapterConfig:
        return self.adapter.config

    @property
    def tokens(self) -> tuple[str, str, str]:
        c = self.config
        return c.start_token, c.placeholder_token, c.end_token

    @classmethod
    def load(
        cls, path: str | Path, tokenizer: PreTrainedTokenizerBase, llm_hidden: int, *, dtype: torch.dtype, device: str
    ) -> TimeSeriesSupport | None:
        """The adapter of a checkpoint folder, or None when it has none."""
        folder = Path(path) / SUBFOLDER
        if not (folder / "config.json").exists():
            return None
        # transformers wraps `.to` in a decorator whose typing does not bind `self`.
        adapter = TimeSeriesAdapter.from_pretrained(folder, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
        if adapter.config.out_hidden_size != llm_hidden:
            raise FailedPrecondition(
                f"time-series adapter outputs {adapter.config.out_hidden_size} features, the LLM takes {llm_hidden}", field="model"
            )
        ids = []
        for token in (adapter.config.start_token, adapter.config.placeholder_token, adapter.config.end_token):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise FailedPrecondition(
                    f"the tokenizer has no single token for {token!r} (the time-series adapter needs it)", field="model"
                )
            ids.append(encoded[0])
        return cls(adapter, ids[1])

    # --- encoder half ----------------------------------------------------------------
    def handler(self) -> MediaHandler:
        """The time-series row of a family's handler table (no options; no client embeddings)."""
        return MediaHandler(taking(DecodedSeries, lambda series, options: self.prepare(series)), self.encode)

    def prepare(self, series: DecodedSeries) -> PreparedItem:
        """`series` is a DecodedSeries (z-scored values [T, C] and its sampling rate)."""
        rate = float(series.sampling_rate)
        tokens = self.config.num_tokens(series.num_samples, series.num_channels, rate)
        length = self.config.patch_length(rate)
        if tokens <= 0:
            raise InvalidArgument(
                f"series too short for one token: {series.num_samples} samples, at {rate:g} Hz one patch needs {length}",
                field="source",
            )
        try:
            self.config.check_input(series.num_samples, series.num_channels, rate)
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="source") from None
        placement = embedding_pb2.TimeSeriesPlacement(
            num_samples=series.num_samples, num_channels=series.num_channels, sampling_rate=rate, patch_length=length
        )
        values = torch.from_numpy(series.values)
        return PreparedItem(media_pb2.MODALITY_TIME_SERIES, {"values": values}, placement, {"sampling_rate": rate})

    @torch.inference_mode()
    def encode(self, batch: list[PreparedItem]) -> list[EncodedItem]:
        out = []
        device, dtype = next(self.adapter.parameters()).device, next(self.adapter.parameters()).dtype
        for item in batch:
            embeds = self.adapter(item.inputs["values"].to(device, dtype), item.extra["sampling_rate"])
            out.append(EncodedItem([to_raw("embeddings", embeds)], int(embeds.shape[0]), item.placement))
        return out
