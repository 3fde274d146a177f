"""The media modalities, one table for every service: what each is called, its proto value, its options field, its limits.

Every rule that differs by modality reads it from here (docs/inputs.md, "Limits"):
the gateway's allowed `media_io_kwargs`/`mm_processor_kwargs` keys, the
encoder's options check and fetch deadlines, and the per-request item limits
that the encoder and the decoder both enforce. No heavy imports.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from mmserve.api.common.v1 import media_pb2
from mmserve.errors import InvalidArgument

if TYPE_CHECKING:
    from mmserve.config import Settings

#: Audio containers a client may name (`input_audio.format`, `AudioOptions.format`); the bytes decide the codec.
AUDIO_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg")


def audio_format(value: object, field: str) -> str:
    """A client's audio format label, normalised (`" WAV"` -> `"wav"`); anything else is a 400 naming `field`."""
    name = value.strip().lower() if isinstance(value, str) else ""
    if name not in AUDIO_FORMATS:
        raise InvalidArgument(f"must be one of {', '.join(AUDIO_FORMATS)}", field=field)
    return name


#: A media_pb2.Modality value: an int at run time, its own type to mypy (the type the generated messages take).
ModalityValue: TypeAlias = media_pb2.Modality.ValueType
#: A modality's field name in MediaInput's `options` oneof and the descriptor's `placement` oneof.
ModalityField: TypeAlias = Literal["image", "video", "audio", "time_series"]


@dataclass(frozen=True)
class Modality:
    """One kind of media and the settings and fields that belong to it."""

    name: str  # "image": metric labels, messages, settings' names, kwargs keys
    proto: ModalityValue
    field: ModalityField  # its per-modality message fields: MediaInput's `options` oneof, the descriptor's placement
    limit_setting: str  # Settings field: items allowed per request
    media_io_keys: frozenset[str] = frozenset()  # allowed `media_io_kwargs.<name>` keys
    processor_keys: frozenset[str] = frozenset()  # allowed `mm_processor_kwargs.<name>` keys

    def max_per_request(self, settings: Settings) -> int:
        return int(getattr(settings, self.limit_setting))

    def fetch_timeout_s(self, settings: Settings) -> float:
        """Total deadline to fetch one item of this modality."""
        return float(getattr(settings, f"fetch_timeout_{self.name}_s"))


IMAGE = Modality(
    "image", media_pb2.MODALITY_IMAGE, "image", "max_images_per_request",
    media_io_keys=frozenset({"rgba_background_color"}), processor_keys=frozenset({"min_pixels", "max_pixels"}),
)  # fmt: skip
VIDEO = Modality(
    "video", media_pb2.MODALITY_VIDEO, "video", "max_videos_per_request",
    media_io_keys=frozenset({"fps", "num_frames"}), processor_keys=frozenset({"min_pixels", "max_pixels"}),
)  # fmt: skip
AUDIO = Modality("audio", media_pb2.MODALITY_AUDIO, "audio", "max_audios_per_request")
TIME_SERIES = Modality("time_series", media_pb2.MODALITY_TIME_SERIES, "time_series", "max_time_series_per_request")

MODALITIES: tuple[Modality, ...] = (IMAGE, VIDEO, AUDIO, TIME_SERIES)
BY_PROTO: dict[int, Modality] = {m.proto: m for m in MODALITIES}
BY_NAME: dict[str, Modality] = {m.name: m for m in MODALITIES}


def name_of(proto: int) -> str:
    """The modality's name, or "unknown" for a value this build does not know (e.g. unset)."""
    known = BY_PROTO.get(proto)
    return known.name if known else "unknown"


def check_item_limits(modalities: Iterable[int], settings: Settings, field: str) -> None:
    """Refuse a request with more items of one modality than allowed: the one check both services run."""
    tally = Counter(modalities)
    for modality in MODALITIES:
        count, limit = tally[modality.proto], modality.max_per_request(settings)
        if count > limit:
            raise InvalidArgument(f"too many {modality.name} items: {count} (limit {limit} per request)", field=field)
