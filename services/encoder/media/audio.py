"""Decode one audio item into mono float32 samples at the model's sampling rate.

Rules (docs/inputs.md section 3):

* Who decodes what: WAV, FLAC and Ogg (Vorbis, Opus) go through soundfile
  (libsndfile); MP3, AAC (ADTS, M4A/MP4), WebM/Matroska audio and any
  WAV/FLAC/Ogg that libsndfile cannot read go through PyAV (FFmpeg). Only
  formats recognised by their magic bytes reach PyAV, with an explicit
  demuxer, so FFmpeg never probes untrusted bytes into a playlist or concat
  demuxer that would open other files or URLs.
* Downmix to mono by the mean of the channels. The channel axis is decided by
  the channel count the file declares (`downmix`), never guessed from the
  shape: soundfile hands out [frames, channels] blocks, PyAV planar frames
  are [channels, frames], and a raw array is [channels, samples].
* Resample with PyAV's `av.AudioResampler` (libswresample): a well-kept
  polyphase resampler that streams block by block, so the whole signal is
  never resampled at once (scipy is not a dependency of this project).
* Caps, checked while decoding, block by block, before a block is kept:
  `audio_max_duration_s` of decoded audio and `audio_max_decoded_bytes` of
  decoded samples, counted as float32 for every channel at the source rate
  (what the decoder materialises). A WAV header that declares more than
  that is refused from the header (libsndfile silently trusts the file size
  instead), as is a FLAC/Ogg whose declared length is over the cap.
* Header sanity: a sample rate outside 1 kHz..384 kHz or more than 64
  channels is refused before anything is allocated, whatever the header says.
* If the caller names a `format` (OpenAI `input_audio.format`), it must be
  one of mmserve.modality.AUDIO_FORMATS; bytes that are another supported container (vLLM's
  example client sends Ogg labelled "wav") are decoded as what their magic
  bytes say, and the mismatch is logged at INFO. Bytes no sniffer recognises
  are refused.

`decode_audio` takes the request budget for a uniform decoder signature; the
budget only counts pixels and encoded bytes, so audio is bounded by the
per-item caps above.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from typing import Literal

import av
import numpy as np
import soundfile as sf

from mmserve.config import Settings
from mmserve.decoded import DecodedAudio
from mmserve.errors import InvalidArgument, MediaTooLarge
from mmserve.modality import audio_format
from services.encoder.media.budget import RequestBudget, human_bytes
from services.encoder.media.containers import is_iso_bmff, is_matroska

logger = logging.getLogger(__name__)

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
_BLOCK_FRAMES = 1 << 16
_PYAV_DEMUXERS = {
    "wav": "wav",
    "flac": "flac",
    "ogg": "ogg",
    "mp3": "mp3",
    "aac": "aac",
    "mp4": "mov",
    "matroska": "matroska",
}
_SOUNDFILE_KINDS = frozenset({"wav", "flac", "ogg", None})
_ACCEPTED_NAMES = "WAV, FLAC, Ogg (Vorbis/Opus), MP3, AAC/M4A, WebM"
# WAVE format tags whose data chunk holds exactly block_align bytes per frame.
_PCM_TAGS = frozenset({0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE})
_MAX_ID3_TAGS = 4
_UNKNOWN_SIZES = frozenset({0, 0xFFFFFFFF})  # streamed WAVs write these when the length is unknown

Layout = Literal["channels_first", "channels_last"]


def sniff_audio_format(data: bytes) -> str | None:
    """The audio container `data` starts with, from its magic bytes, or None.

    Returns one of wav, flac, ogg, mp3, aac (ADTS), mp4 (M4A/MP4), matroska (WebM/MKV).
    """
    start = 0
    for _ in range(_MAX_ID3_TAGS):
        # ID3v2 tags (size: 4 x 7-bit "syncsafe" bytes) usually precede MP3, sometimes FLAC or AAC.
        tag = data[start : start + 10]
        if len(tag) < 10 or tag[:3] != b"ID3":
            break
        start += 10 + ((tag[6] & 0x7F) << 21 | (tag[7] & 0x7F) << 14 | (tag[8] & 0x7F) << 7 | (tag[9] & 0x7F))
        start += 10 if tag[5] & 0x10 else 0  # footer
    head = data[start : start + 12]
    if start:
        inner = _sniff_head(head)
        return inner if inner in ("flac", "aac", "mp3") else "mp3"
    return _sniff_head(head)


def _sniff_head(head: bytes) -> str | None:
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if len(head) >= 4 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        if head[1] & 0x06 == 0:  # layer bits 00: ADTS AAC
            return "aac" if head[1] & 0xF0 == 0xF0 else None
        if (head[1] >> 3) & 3 != 1 and head[2] >> 4 != 15 and (head[2] >> 2) & 3 != 3:
            return "mp3"  # MPEG audio: valid version, bitrate and rate indexes
        return None
    if is_iso_bmff(head):
        return "mp4"
    if is_matroska(head):
        return "matroska"
    return None


def downmix(samples: np.ndarray, channels: int, *, layout: Layout | None = None) -> np.ndarray:
    """Mono float32 by the mean over the channel axis, found from the declared channel count.

    Accepts [channels, frames] and [frames, channels]. Only when both axes
    equal `channels` (a block of exactly that many frames) does the shape not
    tell, and `layout` (what the producer hands out) decides; a `layout` that
    contradicts the shape is a bug and raises ValueError.
    """
    if samples.ndim == 1:
        if channels != 1:
            raise ValueError(f"a 1-D block cannot hold {channels} channels")
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D block, got {samples.ndim}-D")
    first, last = samples.shape[0] == channels, samples.shape[1] == channels
    if first and last:
        if layout is None:
            raise ValueError("a square block needs an explicit layout")
        axis = 0 if layout == "channels_first" else 1
    elif first or last:
        axis = 0 if first else 1
        if layout is not None and (axis == 0) != (layout == "channels_first"):
            raise ValueError(f"a {samples.shape} block is not {layout} with {channels} channels")
    else:
        raise ValueError(f"no axis of a {samples.shape} block has {channels} channels")
    if channels == 1:
        return samples.reshape(-1).astype(np.float32, copy=False)
    return samples.mean(axis=axis, dtype=np.float64).astype(np.float32)


def decode_audio(
    data: bytes,
    *,
    settings: Settings,
    budget: RequestBudget,
    target_rate: int,
    format: str | None,  # the contract's name (OpenAI input_audio.format)
    field: str = "source",
) -> DecodedAudio:
    """Decode `data` to mono float32 at `target_rate`; CPU-bound, run it in a worker thread."""
    _check_target_rate(target_rate)
    kind = sniff_audio_format(data)
    if format is not None:
        _check_label(format, kind)
    if not data:
        raise InvalidArgument("audio is empty", field=field)
    if kind == "wav":
        _check_wav_header(data, settings, field)
    if kind in _SOUNDFILE_KINDS:
        result = _try_soundfile(data, kind, settings=settings, target_rate=target_rate, field=field)
        if result is not None:
            return result
    demuxer = _PYAV_DEMUXERS.get(kind or "")
    if demuxer is None:
        raise InvalidArgument(f"not a supported audio file (accepted: {_ACCEPTED_NAMES})", field=field)
    return _decode_pyav(data, kind or "", demuxer, settings=settings, target_rate=target_rate, field=field)


def audio_from_array(
    values: np.ndarray,
    sampling_rate: float,
    *,
    settings: Settings,
    target_rate: int,
    field: str = "source.array",
) -> DecodedAudio:
    """Raw PCM (gRPC `array` source): [samples] or [channels, samples], float in [-1, 1] or int16."""
    _check_target_rate(target_rate)
    rate = _array_rate(sampling_rate)
    if values.ndim not in (1, 2):
        raise InvalidArgument(f"audio must be [samples] or [channels, samples], got {values.ndim} dimensions", field=field)
    channels = 1 if values.ndim == 1 else int(values.shape[0])
    if channels > MAX_CHANNELS:
        hint = " (the layout is [channels, samples])" if values.shape[1] <= MAX_CHANNELS else ""
        raise InvalidArgument(f"audio has {channels} channels, more than {MAX_CHANNELS}{hint}", field=field)
    frames = int(values.shape[-1])
    if channels == 0 or frames == 0:
        raise InvalidArgument("audio is empty", field=field)
    sink = _Sink(source_rate=rate, channels=channels, target_rate=target_rate, settings=settings, field=field)
    if sink.room() < frames:
        raise sink.over_cap()
    if values.dtype == np.int16:
        floats = values.astype(np.float32) / 32768.0
    elif values.dtype in (np.float32, np.float64):
        if not np.isfinite(values).all():
            raise InvalidArgument("audio samples must be finite", field=field)
        if values.size and float(np.abs(values).max()) > 1.0 + 1e-6:
            raise InvalidArgument("float audio samples must lie in [-1, 1]", field=field)
        floats = values.astype(np.float32, copy=False)
    else:
        raise InvalidArgument(f"audio samples must be float32, float64 or int16, not {values.dtype}", field=field)
    mono = downmix(floats, channels, layout="channels_first")
    for start in range(0, frames, _BLOCK_FRAMES):
        sink.add(mono[start : start + _BLOCK_FRAMES])
    return sink.result(channels=channels, fmt="array")


# --- internals -------------------------------------------------------------------------------


class _Sink:
    """Mono blocks at the source rate in, mono at the target rate out; caps enforced per block."""

    def __init__(self, *, source_rate: int, channels: int, target_rate: int, settings: Settings, field: str) -> None:
        self._source_rate = source_rate
        self._target_rate = target_rate
        self._field = field
        self._settings = settings
        self._max_by_duration = math.floor(settings.audio_max_duration_s * source_rate)
        self._max_by_bytes = settings.audio_max_decoded_bytes // (4 * channels)
        self.frames = 0
        self._parts: list[np.ndarray] = []
        self._resampler = av.AudioResampler(format="fltp", layout="mono", rate=target_rate) if source_rate != target_rate else None

    def room(self) -> int:
        """Source frames that may still be decoded."""
        return min(self._max_by_duration, self._max_by_bytes) - self.frames

    def over_cap(self) -> MediaTooLarge:
        """The error for the cap that is hit first."""
        s = self._settings
        if self._max_by_duration <= self._max_by_bytes:
            return MediaTooLarge(
                f"audio is longer than the allowed {s.audio_max_duration_s:g} s",
                field=self._field,
                metadata={"limit": f"{s.audio_max_duration_s:g}", "setting": "audio_max_duration_s"},
            )
        return MediaTooLarge(
            f"audio decodes to more than the allowed {human_bytes(s.audio_max_decoded_bytes)} of samples",
            field=self._field,
            metadata={"limit": str(s.audio_max_decoded_bytes), "setting": "audio_max_decoded_bytes"},
        )

    def add(self, mono: np.ndarray) -> None:
        """Keep one block (resampled), or refuse if it takes the item over a cap."""
        if len(mono) > self.room():
            raise self.over_cap()
        self.frames += len(mono)
        if not len(mono):
            return
        if self._resampler is None:
            self._parts.append(mono)
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono, dtype=np.float32)[None, :], format="fltp", layout="mono")
        frame.sample_rate = self._source_rate
        self._parts.extend(out.to_ndarray()[0] for out in self._resampler.resample(frame))

    def result(self, *, channels: int, fmt: str) -> DecodedAudio:
        """All samples at the target rate, clipped to [-1, 1]."""
        if self._resampler is not None and self.frames:
            self._parts.extend(out.to_ndarray()[0] for out in self._resampler.resample(None))
        samples = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        if self.frames == 0 or samples.size == 0:
            raise InvalidArgument("audio is empty (no samples could be decoded)", field=self._field)
        np.clip(samples, -1.0, 1.0, out=samples)
        return DecodedAudio(
            samples=samples.astype(np.float32, copy=False),
            sample_rate=self._target_rate,
            source_rate=self._source_rate,
            channels=channels,
            duration_s=self.frames / self._source_rate,
            format=fmt,
        )


def _check_target_rate(target_rate: int) -> None:
    if isinstance(target_rate, bool) or not isinstance(target_rate, int) or not MIN_SAMPLE_RATE <= target_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"target_rate must be an int in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}], got {target_rate!r}")


def _check_label(format: str, kind: str | None) -> None:
    """The caller's format label must be a known name; bytes of another supported container win over it."""
    name = audio_format(format, "audio.format")
    if kind is None:
        raise InvalidArgument(f"the data is not {name} (it is not a recognised audio format)", field="audio.format")
    if kind != name:
        logger.info("audio labelled %s is %s: decoding it as %s", name, kind, kind)


def _check_source(rate: int, channels: int, field: str) -> None:
    """Refuse forged or absurd headers before anything is allocated from them."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidArgument(f"audio declares a sample rate of {rate} Hz, outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz", field=field)
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"audio declares {channels} channels (1..{MAX_CHANNELS} accepted)", field=field)


def _array_rate(sampling_rate: float) -> int:
    ok = isinstance(sampling_rate, int | float) and not isinstance(sampling_rate, bool) and math.isfinite(sampling_rate)
    if not ok or sampling_rate != int(sampling_rate):
        raise InvalidArgument("must be a whole number of Hz", field="audio.sampling_rate")
    rate = int(sampling_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidArgument(f"must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz", field="audio.sampling_rate")
    return rate


def _check_wav_header(data: bytes, settings: Settings, field: str) -> None:
    """Refuse a WAV whose header declares too much audio (libsndfile would trust the file size)."""
    endian = ">" if data[:4] == b"RIFX" else "<"
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk = data[pos : pos + 4]
        (size,) = struct.unpack_from(endian + "I", data, pos + 4)
        if chunk == b"fmt " and size >= 16 and pos + 24 <= len(data):
            fmt = struct.unpack_from(endian + "HHIIHH", data, pos + 8)
        elif chunk == b"data":
            break
        pos += 8 + size + (size & 1)
    else:
        return  # no data chunk: let the decoder say what is wrong
    if fmt is None:
        return
    tag, channels, rate, _, block_align, _ = fmt
    _check_source(rate, channels, field)
    if data[:4] == b"RF64" or tag not in _PCM_TAGS or block_align == 0 or size in _UNKNOWN_SIZES:
        return  # length unknown from this header: the caps apply while decoding
    frames = size // block_align
    sink = _Sink(source_rate=rate, channels=channels, target_rate=rate, settings=settings, field=field)
    if frames > sink.room():
        raise sink.over_cap()


def _try_soundfile(data: bytes, kind: str | None, *, settings: Settings, target_rate: int, field: str) -> DecodedAudio | None:
    """Decode with libsndfile, or None if it cannot read these bytes (PyAV's turn)."""
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        logger.debug("libsndfile cannot open the audio: %r", exc)
        return None
    with handle:
        if handle.format == "MP3":
            return None  # MP3 is PyAV's
        rate, channels = int(handle.samplerate), int(handle.channels)
        _check_source(rate, channels, field)
        sink = _Sink(source_rate=rate, channels=channels, target_rate=target_rate, settings=settings, field=field)
        if _declared_frames(handle) > sink.room():  # e.g. a FLAC STREAMINFO claiming hours
            raise sink.over_cap()
        try:
            while True:
                block = handle.read(min(_BLOCK_FRAMES, sink.room() + 1), dtype="float32", always_2d=True)
                if not len(block):
                    break
                sink.add(downmix(block, channels, layout="channels_last"))
        except (sf.SoundFileError, RuntimeError) as exc:
            logger.info("audio decode failed: %r", exc)
            raise InvalidArgument("audio data is corrupt", field=field) from None
        return sink.result(channels=channels, fmt=kind or handle.format.lower())


def _declared_frames(handle: sf.SoundFile) -> int:
    """The length libsndfile reports from the header, 0 when it does not know."""
    frames = int(handle.frames)
    return frames if 0 < frames < 1 << 62 else 0


def _decode_pyav(data: bytes, kind: str, demuxer: str, *, settings: Settings, target_rate: int, field: str) -> DecodedAudio:
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except av.FFmpegError as exc:
        logger.info("audio open failed: %r", exc)
        raise InvalidArgument("audio could not be opened (corrupt or truncated)", field=field) from None
    with container:
        if not container.streams.audio:
            raise InvalidArgument("the file has no audio stream", field=field)
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        rate, channels = int(ctx.sample_rate or 0), int(ctx.layout.nb_channels if ctx.layout else 0)
        _check_source(rate, channels, field)
        sink = _Sink(source_rate=rate, channels=channels, target_rate=target_rate, settings=settings, field=field)
        # A pure format conversion to planar float at the stream's own rate and layout; it also
        # absorbs a mid-stream change of rate or layout.
        to_float = av.AudioResampler(format="fltp", layout=ctx.layout, rate=rate)
        bad = 0

        def keep(frames: list[av.AudioFrame]) -> None:
            for frame in frames:
                sink.add(downmix(frame.to_ndarray(), channels, layout="channels_first"))

        try:
            for packet in container.demux(stream):
                try:
                    decoded = ctx.decode(packet)
                except av.FFmpegError:
                    bad += 1  # a damaged packet: skip it, as players do
                    continue
                for frame in decoded:
                    keep(to_float.resample(frame))
            keep(to_float.resample(None))
        except av.FFmpegError as exc:
            logger.info("audio decode failed: %r", exc)
            raise InvalidArgument("audio data is corrupt", field=field) from None
        if bad:
            logger.info("audio: %d undecodable packets skipped", bad)
        return sink.result(channels=channels, fmt=kind)
