"""The time-series adapter: a small encoder that turns a multichannel series into LLM input embeddings.

No `transformers` LLM takes time series, so mmserve ships this adapter. It is
attachable to ANY supported LLM: its output lives in the LLM's hidden space
(`out_hidden_size`) and is spliced at the LLM's time-series placeholder tokens,
exactly like image embeddings are spliced at image pads.

Checkpoint layout
-----------------
The adapter lives in a subfolder `time_series/` of the LLM checkpoint::

    <llm checkpoint>/
        config.json, model.safetensors, tokenizer.json, ...   (the LLM, untouched)
        time_series/
            config.json         model_type "mmserve_time_series" (TimeSeriesAdapterConfig)
            model.safetensors   the weights below

so any LLM checkpoint gets time series by adding that folder. Its three
tokens (`placeholder_token`, `start_token`, `end_token`; defaults
`<|time_series|>`, `<|ts_start|>`, `<|ts_end|>`) must each exist in the LLM's
tokenizer as ONE token (a special token), and `out_hidden_size` must equal the
LLM's text hidden size. A prompt carries one series as
`<|ts_start|>` + `<|time_series|>` * num_tokens + `<|ts_end|>`; the adapter's
output rows replace the placeholders in order. For M-RoPE LLMs the adapter
tokens take ordinary text positions (one position per token).

Load it with `TimeSeriesAdapter.from_pretrained(path / "time_series")`, or
with `AutoModel.from_pretrained(...)` once this module is imported (importing
it registers the model type with AutoConfig / AutoModel).

Model (what a real checkpoint must contain)
-------------------------------------------
Input: `values` float [T, C] (T samples of C channels, already z-scored per
channel by the loader) and `sampling_rate` in Hz (> 0).

1. Patch length: `L = clamp(round(sampling_rate * patch_seconds), min_patch_length,
   max_patch_length)` samples, so one patch covers about `patch_seconds` whatever
   the rate. `N = ceil(T / L)` patches per channel; a series with T < L has no
   full patch and is refused (`num_tokens` returns 0 for it).
2. Zero-pad T to N*L; cut into patches [C, N, L]; resample every patch to
   `patch_size` points with `torch.nn.functional.interpolate(mode="linear",
   align_corners=True)`.
3. Embedding: `patch_embed` Linear(patch_size -> hidden) + `channel_embed`
   Embedding(max_channels, hidden)[c] + `position_embed` Embedding(max_patches,
   hidden)[n] + `rate_embed` Linear(1 -> hidden)(log(sampling_rate)) (so the model
   knows the time scale).
4. `encoder`: torch `nn.TransformerEncoder` of `num_hidden_layers`
   `nn.TransformerEncoderLayer(hidden_size, num_attention_heads, intermediate_size,
   dropout=0, activation="gelu", batch_first=True, norm_first=True,
   layer_norm_eps)` over all C*N tokens at once (channels attend to each other),
   then `norm` LayerNorm(hidden_size).
5. Merge: per channel, zero-pad N to a multiple of `merge_size` and concatenate
   `merge_size` consecutive patch states -> [C, ceil(N/merge_size), merge_size*hidden].
6. `projector`: Linear(merge_size*hidden -> out_hidden_size), GELU,
   Linear(out_hidden_size -> out_hidden_size).

Output: [C * ceil(N / merge_size), out_hidden_size], channel-major (all tokens
of channel 0, then channel 1, ...). Deterministic; no dropout at inference.
C > max_channels or N > max_patches raise ValueError (the service maps that to
400).

Weight names (model.safetensors): `patch_embed.{weight,bias}`,
`channel_embed.weight`, `position_embed.weight`, `rate_embed.{weight,bias}`,
`encoder.layers.<i>.{self_attn.in_proj_weight, self_attn.in_proj_bias,
self_attn.out_proj.weight, self_attn.out_proj.bias, linear1.*, linear2.*,
norm1.*, norm2.*}`, `norm.{weight,bias}`, `projector.0.{weight,bias}`,
`projector.2.{weight,bias}`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

MODEL_TYPE = "mmserve_time_series"
SUBFOLDER = "time_series"


class TimeSeriesAdapterConfig(PreTrainedConfig):
    """Sizes and patching rules of the time-series adapter (see the module docstring)."""

    model_type = MODEL_TYPE

    patch_seconds: float = 1.0
    min_patch_length: int = 4
    max_patch_length: int = 4096
    patch_size: int = 32
    max_channels: int = 16
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    merge_size: int = 2
    out_hidden_size: int = 1024
    max_patches: int = 4096
    placeholder_token: str = "<|time_series|>"
    start_token: str = "<|ts_start|>"
    end_token: str = "<|ts_end|>"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs: object) -> None:
        super().__post_init__(**kwargs)
        if not (self.patch_seconds > 0 and math.isfinite(self.patch_seconds)):
            raise ValueError(f"patch_seconds must be a positive number, got {self.patch_seconds}")
        if not 1 <= self.min_patch_length <= self.max_patch_length:
            raise ValueError("need 1 <= min_patch_length <= max_patch_length")
        for name in ("patch_size", "max_channels", "hidden_size", "num_hidden_layers", "merge_size", "max_patches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.patch_size < 2:
            raise ValueError("patch_size must be >= 2 (linear resampling with aligned corners)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if len({self.placeholder_token, self.start_token, self.end_token}) != 3:
            raise ValueError("placeholder, start and end tokens must differ")

    # --- token arithmetic (needs no weights: the decoder uses it to size prompts) ---
    def patch_length(self, sampling_rate: float) -> int:
        """Samples per patch at `sampling_rate` Hz: round(rate * patch_seconds), clamped to [min, max]."""
        rate = _check_rate(sampling_rate)
        return int(min(max(round(rate * self.patch_seconds), self.min_patch_length), self.max_patch_length))

    @staticmethod
    def num_patches(num_samples: int, patch_length: int) -> int:
        """ceil(T / L): patches per channel (the last one zero-padded)."""
        return -(-int(num_samples) // int(patch_length))

    def num_tokens(self, num_samples: int, num_channels: int, sampling_rate: float) -> int:
        """LLM tokens for a [num_samples, num_channels] series: C * ceil(N / merge_size); 0 when T < L."""
        length = self.patch_length(sampling_rate)
        if num_samples < length or num_channels < 1:
            return 0
        patches = self.num_patches(num_samples, length)
        return int(num_channels) * -(-patches // self.merge_size)

    def check_input(self, num_samples: int, num_channels: int, sampling_rate: float) -> None:
        """Raise ValueError (-> HTTP 400) for a series this adapter cannot encode."""
        length = self.patch_length(sampling_rate)
        if num_channels < 1:
            raise ValueError("a time series needs at least one channel")
        if num_channels > self.max_channels:
            raise ValueError(f"time series has {num_channels} channels; this model takes at most {self.max_channels}")
        if num_samples < length:
            raise ValueError(
                f"time series has {num_samples} samples, fewer than one patch ({length} samples at "
                f"{sampling_rate:g} Hz, {self.patch_seconds:g} s per patch)"
            )
        patches = self.num_patches(num_samples, length)
        if patches > self.max_patches:
            raise ValueError(
                f"time series needs {patches} patches per channel; this model takes at most {self.max_patches} "
                f"({self.max_patches * length} samples at {sampling_rate:g} Hz)"
            )


def _check_rate(sampling_rate: float) -> float:
    rate = float(sampling_rate)
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"sampling_rate must be a positive finite number of Hz, got {sampling_rate!r}")
    return rate


class TimeSeriesAdapterPreTrainedModel(PreTrainedModel):
    config: TimeSeriesAdapterConfig
    config_class = TimeSeriesAdapterConfig
    base_model_prefix = "time_series"
    main_input_name = "values"
    _no_split_modules = ["TransformerEncoderLayer"]  # noqa: RUF012 - the base class declares it per instance

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=std)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class TimeSeriesAdapter(TimeSeriesAdapterPreTrainedModel):
    """values [T, C] + sampling rate -> [C * ceil(N / merge_size), out_hidden_size] LLM input embeddings."""

    def __init__(self, config: TimeSeriesAdapterConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.patch_embed = nn.Linear(config.patch_size, hidden)
        self.channel_embed = nn.Embedding(config.max_channels, hidden)
        self.position_embed = nn.Embedding(config.max_patches, hidden)
        self.rate_embed = nn.Linear(1, hidden)
        layer = nn.TransformerEncoderLayer(
            d_model=hidden,
            nhead=config.num_attention_heads,
            dim_feedforward=config.intermediate_size,
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.projector = nn.Sequential(
            nn.Linear(config.merge_size * hidden, config.out_hidden_size),
            nn.GELU(),
            nn.Linear(config.out_hidden_size, config.out_hidden_size),
        )
        self.post_init()

    # Convenience pass-throughs to the config's token arithmetic.
    def patch_length(self, sampling_rate: float) -> int:
        return self.config.patch_length(sampling_rate)

    def num_tokens(self, num_samples: int, num_channels: int, sampling_rate: float) -> int:
        return self.config.num_tokens(num_samples, num_channels, sampling_rate)

    def patchify(self, values: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """[T, C] -> [C, N, patch_size]: zero-pad to whole patches of L samples, resample each to patch_size."""
        if values.ndim != 2:
            raise ValueError(f"values must be [num_samples, num_channels], got shape {tuple(values.shape)}")
        num_samples, num_channels = values.shape
        self.config.check_input(num_samples, num_channels, sampling_rate)
        length = self.config.patch_length(sampling_rate)
        patches = self.config.num_patches(num_samples, length)
        padded = nn.functional.pad(values.transpose(0, 1), (0, patches * length - num_samples))  # [C, N*L]
        windows = padded.reshape(num_channels * patches, 1, length)
        resampled = nn.functional.interpolate(windows, size=self.config.patch_size, mode="linear", align_corners=True)
        return resampled.reshape(num_channels, patches, self.config.patch_size)

    def forward(self, values: torch.Tensor, sampling_rate: float) -> torch.Tensor:
        """Embeddings for one series, channel-major: [C * ceil(N / merge_size), out_hidden_size]."""
        rate = _check_rate(sampling_rate)
        dtype = self.patch_embed.weight.dtype
        device = self.patch_embed.weight.device
        patches = self.patchify(values.to(device=device, dtype=dtype), rate)  # [C, N, P]
        num_channels, num_patches, _ = patches.shape
        channel_ids = torch.arange(num_channels, device=device)
        position_ids = torch.arange(num_patches, device=device)
        log_rate = torch.tensor([[math.log(rate)]], device=device, dtype=dtype)
        hidden = (
            self.patch_embed(patches)
            + self.channel_embed(channel_ids)[:, None, :]
            + self.position_embed(position_ids)[None, :, :]
            + self.rate_embed(log_rate)  # [1, H], broadcast over every patch
        )
        states = self.encoder(hidden.reshape(1, num_channels * num_patches, -1))
        states = self.norm(states).reshape(num_channels, num_patches, -1)
        merge = self.config.merge_size
        states = nn.functional.pad(states, (0, 0, 0, -num_patches % merge))  # zero patches at each channel's end
        merged = states.reshape(num_channels, -1, merge * states.shape[-1])  # [C, ceil(N/m), m*H]
        return self.projector(merged).reshape(-1, self.config.out_hidden_size)


AutoConfig.register(MODEL_TYPE, TimeSeriesAdapterConfig, exist_ok=True)
AutoModel.register(TimeSeriesAdapterConfig, TimeSeriesAdapter, exist_ok=True)

__all__ = ["MODEL_TYPE", "SUBFOLDER", "TimeSeriesAdapter", "TimeSeriesAdapterConfig"]
