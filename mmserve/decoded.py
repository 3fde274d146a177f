"""Decoded media: what the encoder's decoders hand to a family's `prepare`.

Shared code, because both sides of that hand-off need the types: the
encoder's decoders (`services/encoder/media/`) build them from untrusted
bytes, a family (`mmserve/models/families/`) preprocesses them for its towers.
An image is a PIL image (RGB, alpha already composited).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, TypedDict

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames of one video and the timing a model needs to place them."""

    frames: np.ndarray  # uint8 [N, H, W, 3], RGB, in time order
    timestamps: list[float]  # seconds (from the first frame) of each returned frame
    sample_times: list[float]  # the sample grid t_i the frames were picked for
    sampled_fps: float  # N / duration_s: the rate of the sample grid
    duration_s: float
    source_fps: float  # frames in the source / duration_s

    @property
    def num_frames(self) -> int:
        """How many frames were sampled."""
        return int(self.frames.shape[0])


@dataclass(frozen=True)
class DecodedAudio:
    """Mono samples ready for a model's feature extractor, and where they came from."""

    samples: np.ndarray  # float32 [n], mono, in [-1, 1], at sample_rate
    sample_rate: int  # the target rate asked for
    source_rate: int  # the rate of the file (or array)
    channels: int  # channels of the source, before the downmix
    duration_s: float  # source frames / source_rate
    format: str  # "wav", "flac", "ogg", "mp3", "aac", "mp4", "matroska", "array", or libsndfile's name


@dataclass(frozen=True)
class DecodedSeries:
    """A normalised series and what a model adapter needs to know about it."""

    values: np.ndarray  # float32 [T, C], z-scored per channel
    raw_mean: np.ndarray  # float64 [C], per-channel mean before z-scoring
    raw_std: np.ndarray  # float64 [C], per-channel population std before z-scoring
    num_samples: int  # T
    num_channels: int  # C
    sampling_rate: float  # Hz
    format: str  # npy, csv, wav, flac or array


#: Any decoded item, by modality: image, video, audio, time series.
DecodedMedia: TypeAlias = Image.Image | DecodedVideo | DecodedAudio | DecodedSeries


class MediaOptions(TypedDict, total=False):
    """An item's processing options as the encoder really applies them (defaults filled, clamped): the loading
    options (services/encoder/media/decode.py, `media_options`) and the family's (`MediaHandler.options`).
    Their canonical JSON is part of the item's content id, so every option that changes the output is here."""

    background: str  # image: the colour transparent pixels are composited on, "#rrggbb"
    fps: float | None  # video: frames sampled per second (None: `num_frames` decides)
    num_frames: int | None  # video: frames sampled in all (None: `fps` decides)
    frames_fps: float  # video given as frames (or a frame-list URL): their rate
    format: str  # audio or time series: the container/format the client named
    sampling_rate: float  # raw audio arrays and time series: their rate in Hz
    target_rate: int  # audio: the model's rate, resampled to
    min_pixels: int  # Qwen images and videos: the resize bounds
    max_pixels: int
    client_embeddings: bool  # a client-supplied embedding: kept apart from anything encoded here
