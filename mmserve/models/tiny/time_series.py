"""The time-series adapter every tiny checkpoint carries in its `time_series/` subfolder.

Any LLM checkpoint gets time series by adding that folder (see
`mmserve.models.time_series_adapter`); the tiny ones get a random-weight
adapter sized by `spec.time_series` whose output width is the LLM's hidden
size, and the shared tokenizer already holds its three tokens at fixed ids.
"""

from __future__ import annotations

from pathlib import Path

from mmserve.models.time_series_adapter import SUBFOLDER, TimeSeriesAdapter, TimeSeriesAdapterConfig
from mmserve.models.tiny.random_weights import random_model
from mmserve.models.tiny.registry import CheckpointSpec, TowerSize
from mmserve.models.tiny.tokenizer import SPECIAL_TOKENS

# Used when a spec names no time-series size: small next to any LLM here.
DEFAULT_SIZE = TowerSize(hidden=64, layers=2, heads=4, intermediate=128)
# The adapter's weights get their own stream, so resizing it never changes the LLM's bytes.
SEED_OFFSET = 1


def adapter_config(spec: CheckpointSpec, llm_hidden_size: int) -> TimeSeriesAdapterConfig:
    """The adapter config for `spec`: its tower size, output width = the LLM's hidden size."""
    size = spec.time_series or DEFAULT_SIZE
    config = TimeSeriesAdapterConfig(
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        out_hidden_size=llm_hidden_size,
        initializer_range=spec.initializer_range,
        dtype="float32",
    )
    for token in (config.placeholder_token, config.start_token, config.end_token):
        if token not in SPECIAL_TOKENS:
            raise RuntimeError(f"time-series token {token} is not a special token of the shared tokenizer")
    return config


def attach_time_series_adapter(spec: CheckpointSpec, out_dir: Path, llm_hidden_size: int) -> None:
    """Write a random-weight adapter into `out_dir/time_series/` (config.json + model.safetensors)."""
    config = adapter_config(spec, llm_hidden_size)
    model = random_model(TimeSeriesAdapter, config, seed=spec.seed + SEED_OFFSET)
    model.save_pretrained(Path(out_dir) / SUBFOLDER)
