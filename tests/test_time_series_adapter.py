"""The time-series adapter: patching arithmetic, shapes, persistence, determinism, sensitivity to its input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from mmserve.models.time_series_adapter import (
    MODEL_TYPE,
    SUBFOLDER,
    TimeSeriesAdapter,
    TimeSeriesAdapterConfig,
)
from mmserve.models.tiny.random_weights import random_model

OUT = 48


def small_config(max_channels: int = 16, max_patches: int = 4096) -> TimeSeriesAdapterConfig:
    return TimeSeriesAdapterConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        out_hidden_size=OUT,
        max_channels=max_channels,
        max_patches=max_patches,
        initializer_range=0.3,
    )


@pytest.fixture(scope="module")
def adapter() -> TimeSeriesAdapter:
    return random_model(TimeSeriesAdapter, small_config(), seed=0)


def series(num_samples: int, num_channels: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_samples, num_channels, generator=torch.Generator().manual_seed(seed))


def encode(model: TimeSeriesAdapter, values: torch.Tensor, rate: float) -> torch.Tensor:
    with torch.inference_mode():
        return model(values, rate)


@pytest.mark.parametrize(
    ("num_samples", "num_channels", "rate", "patch_length", "tokens"),
    [
        (100, 3, 10.0, 10, 3 * 5),  # 10 patches -> 5 merged tokens per channel
        (101, 1, 10.0, 10, 6),  # 11 patches (last zero-padded) -> ceil(11/2)
        (1000, 2, 250.0, 250, 2 * 2),
        (7, 2, 1.0, 4, 2 * 1),  # 1 Hz: one second is 1 sample, clamped up to min_patch_length
        (10, 1, 2.4, 4, 2),  # round(2.4) = 2 -> clamped to 4; 3 patches -> 2 tokens
        (9000, 1, 1e6, 4096, 2),  # clamped down to max_patch_length; 3 patches
        (30, 16, 30.0, 30, 16),  # max_channels channels, one patch each
    ],
)
def test_shapes_and_token_counts(
    adapter: TimeSeriesAdapter, num_samples: int, num_channels: int, rate: float, patch_length: int, tokens: int
) -> None:
    config = adapter.config
    assert config.patch_length(rate) == patch_length
    assert config.num_patches(num_samples, patch_length) == math.ceil(num_samples / patch_length)
    assert config.num_tokens(num_samples, num_channels, rate) == adapter.num_tokens(num_samples, num_channels, rate)
    assert config.num_tokens(num_samples, num_channels, rate) == tokens
    out = encode(adapter, series(num_samples, num_channels), rate)
    assert out.shape == (tokens, OUT)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(("num_samples", "rate"), [(9, 10.0), (3, 1.0), (0, 10.0), (4095, 1e6)])
def test_series_shorter_than_one_patch_has_no_tokens_and_is_refused(adapter: TimeSeriesAdapter, num_samples: int, rate: float) -> None:
    assert adapter.config.num_tokens(num_samples, 2, rate) == 0
    with pytest.raises(ValueError, match="fewer than one patch"):
        encode(adapter, series(num_samples, 2), rate)


def test_limits_are_refused_with_value_error() -> None:
    model = random_model(TimeSeriesAdapter, small_config(max_channels=4, max_patches=8), seed=0)
    encode(model, series(80, 4), 10.0)  # exactly at both limits: fine
    with pytest.raises(ValueError, match="at most 4"):
        encode(model, series(80, 5), 10.0)
    with pytest.raises(ValueError, match="at most 8"):
        encode(model, series(81, 1), 10.0)  # 9 patches
    for bad_rate in (0.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sampling_rate"):
            encode(model, series(80, 1), bad_rate)
    with pytest.raises(ValueError, match="num_samples, num_channels"):
        encode(model, torch.zeros(80), 10.0)


def test_patchify_zero_pads_and_resamples_linearly(adapter: TimeSeriesAdapter) -> None:
    size = adapter.config.patch_size
    # L == patch_size: resampling is the identity.
    values = series(2 * size, 2)
    patches = adapter.patchify(values, float(size))
    assert patches.shape == (2, 2, size)
    assert torch.equal(patches[1, 0], values[:size, 1])
    # A linear ramp stays a ramp with the same end points after resampling.
    ramp = torch.linspace(0.0, 1.0, 100).unsqueeze(1)
    resampled = adapter.patchify(ramp, 100.0)[0, 0]
    assert torch.allclose(resampled, torch.linspace(0.0, 1.0, size), atol=1e-6)
    # The last patch is zero-padded: 15 samples at L=10 -> second patch holds 5 samples then zeros.
    padded = adapter.patchify(torch.ones(15, 1), 10.0)
    assert torch.equal(padded[0, 0], torch.ones(size))
    assert padded[0, 1, 0] == 1.0 and padded[0, 1, -1] == 0.0


def test_save_and_load_round_trip(adapter: TimeSeriesAdapter, tmp_path: Path) -> None:
    adapter.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == MODEL_TYPE
    assert (saved["out_hidden_size"], saved["merge_size"], saved["patch_size"]) == (OUT, 2, 32)
    assert (saved["placeholder_token"], saved["start_token"], saved["end_token"]) == (
        "<|time_series|>",
        "<|ts_start|>",
        "<|ts_end|>",
    )

    loaded = TimeSeriesAdapter.from_pretrained(tmp_path).eval()
    auto = AutoModel.from_pretrained(tmp_path).eval()  # registered under model_type "mmserve_time_series"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), TimeSeriesAdapterConfig)
    assert isinstance(auto, TimeSeriesAdapter)
    values = series(137, 3, seed=5)
    expected = encode(adapter, values, 20.0)
    assert torch.equal(encode(loaded, values, 20.0), expected)
    assert torch.equal(encode(auto, values, 20.0), expected)


def test_deterministic(adapter: TimeSeriesAdapter) -> None:
    values = series(250, 4, seed=3)
    first = encode(adapter, values, 25.0)
    assert torch.equal(encode(adapter, values.clone(), 25.0), first)
    twin = random_model(TimeSeriesAdapter, small_config(), seed=0)
    assert torch.equal(encode(twin, values, 25.0), first)
    other = random_model(TimeSeriesAdapter, small_config(), seed=1)
    assert not torch.equal(encode(other, values, 25.0), first)
    assert torch.equal(encode(adapter, values.double(), 25.0), first)  # any float input is cast to the weights' dtype


def test_sampling_rate_sets_patch_length_and_changes_the_output(adapter: TimeSeriesAdapter) -> None:
    config = adapter.config
    assert [config.patch_length(r) for r in (50.0, 100.0, 200.0)] == [50, 100, 200]
    assert TimeSeriesAdapterConfig(patch_seconds=0.5).patch_length(100.0) == 50
    values = series(400, 2, seed=7)
    assert encode(adapter, values, 100.0).shape == (2 * 2, OUT)  # 4 patches per channel
    assert encode(adapter, values, 50.0).shape == (2 * 4, OUT)  # 8 patches per channel
    # Same patch length (both clamp to 4 samples) but another time scale: the rate embedding still tells them apart.
    short = series(40, 2, seed=8)
    assert config.patch_length(1.0) == config.patch_length(2.0) == 4
    assert not torch.allclose(encode(adapter, short, 1.0), encode(adapter, short, 2.0))


def test_channel_and_time_order_matter(adapter: TimeSeriesAdapter) -> None:
    values = series(120, 3, seed=11)
    base = encode(adapter, values, 10.0)
    tokens_per_channel = base.shape[0] // 3

    swapped = encode(adapter, values[:, [1, 0, 2]], 10.0)
    assert not torch.allclose(swapped, base)
    # Not merely the same token rows in another order: channels carry their own embedding.
    reordered = base.reshape(3, tokens_per_channel, OUT)[[1, 0, 2]].reshape(-1, OUT)
    assert not torch.allclose(swapped, reordered)

    assert not torch.allclose(encode(adapter, values.flip(0), 10.0), base)
    nudged = values.clone()
    nudged[60, 2] += 1.0
    assert not torch.allclose(encode(adapter, nudged, 10.0), base)


def test_channels_attend_to_each_other(adapter: TimeSeriesAdapter) -> None:
    values = series(100, 2, seed=13)
    base = encode(adapter, values, 10.0)
    changed = values.clone()
    changed[:, 1] = torch.randn(100, generator=torch.Generator().manual_seed(99))
    out = encode(adapter, changed, 10.0)
    channel_0 = slice(0, base.shape[0] // 2)
    assert not torch.allclose(out[channel_0], base[channel_0])  # channel 0's tokens see channel 1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TimeSeriesAdapterConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError):
        TimeSeriesAdapterConfig(min_patch_length=10, max_patch_length=5)
    with pytest.raises(ValueError):
        TimeSeriesAdapterConfig(placeholder_token="<|x|>", start_token="<|x|>")
    assert SUBFOLDER == "time_series"
