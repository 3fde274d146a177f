"""Audio decoding: formats, mono downmix, resampling, caps from headers and while decoding, raw arrays."""

from __future__ import annotations

import io
import logging
import struct
from typing import Any

import av
import numpy as np
import pytest
import soundfile as sf

from mmserve.config import Settings
from mmserve.errors import InvalidArgument, MediaTooLarge
from services.encoder.media import audio
from services.encoder.media.audio import DecodedAudio, audio_from_array, decode_audio, downmix, sniff_audio_format
from services.encoder.media.budget import RequestBudget

SETTINGS = Settings()


def decode(data: bytes, *, settings: Settings = SETTINGS, target_rate: int = 16000, format: str | None = None) -> DecodedAudio:
    return decode_audio(data, settings=settings, budget=RequestBudget.from_settings(settings), target_rate=target_rate, format=format)


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum)) * rate / len(samples)


def write_sf(frames: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    out = io.BytesIO()
    sf.write(out, frames, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def wav_header(*, rate: int, channels: int, data_size: int, bits: int = 16, tag: int = 1) -> bytes:
    """A canonical 44-byte WAV header; `data_size` is whatever it should claim."""
    block_align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block_align, block_align, bits)
    riff_size = min(36 + data_size, 0xFFFFFFFF)
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_size)


def encode_pyav(fmt: str, codec: str, stereo: np.ndarray, rate: int) -> bytes:
    """Encode [2, n] float samples with PyAV (for codecs libsndfile does not write)."""
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo, dtype=np.float32), format="fltp", layout="stereo")
        frame.sample_rate = rate
        to_codec = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="stereo", rate=rate)
        for converted in to_codec.resample(frame):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


# --- downmix helper ------------------------------------------------------------------------------


def test_downmix_channels_first_and_last() -> None:
    block = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.0, -0.3, 0.0, 0.1], [0.0, 0.1, 0.0, -0.4, 0.3]], np.float32)
    expected = block.mean(axis=0)
    np.testing.assert_allclose(downmix(block, 3), expected, atol=1e-7)  # [channels, frames]
    np.testing.assert_allclose(downmix(block.T, 3), expected, atol=1e-7)  # [frames, channels]
    np.testing.assert_allclose(downmix(block, 3, layout="channels_first"), expected, atol=1e-7)
    np.testing.assert_allclose(downmix(block.T, 3, layout="channels_last"), expected, atol=1e-7)
    assert downmix(block, 3).dtype == np.float32


def test_downmix_square_block_follows_the_layout() -> None:
    # 2 channels x 2 frames: the shape cannot tell, the producer's layout does.
    column = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(downmix(column, 2, layout="channels_first"), [0.5, 0.5])
    np.testing.assert_allclose(downmix(column, 2, layout="channels_last"), [1.0, 0.0])
    with pytest.raises(ValueError):
        downmix(column, 2)


def test_downmix_refuses_a_mismatch() -> None:
    with pytest.raises(ValueError):
        downmix(np.zeros((4, 5), np.float32), 2)
    with pytest.raises(ValueError):
        downmix(np.zeros((2, 5), np.float32), 2, layout="channels_last")
    with pytest.raises(ValueError):
        downmix(np.zeros(5, np.float32), 2)
    np.testing.assert_array_equal(downmix(np.ones(5, np.float32), 1), np.ones(5))


def test_sniff_audio_format() -> None:
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x00"  # an empty ID3v2 tag
    assert sniff_audio_format(id3 + b"\xff\xfb\x90\x00") == "mp3"
    assert sniff_audio_format(id3 + b"fLaC\x00\x00\x00\x22") == "flac"
    assert sniff_audio_format(id3 * 1_000_000) == "mp3"  # a pile of tags: bounded work, no recursion
    assert sniff_audio_format(b"\xff\xf1\x50\x80") == "aac"
    assert sniff_audio_format(b"RIFF\x00\x00\x00\x00WAVE") == "wav"
    assert sniff_audio_format(b"RIFF\x00\x00\x00\x00AVI ") is None
    assert sniff_audio_format(b"OggS\x00\x02") == "ogg"
    assert sniff_audio_format(b"\x00\x00\x00\x20ftypM4A ") == "mp4"
    assert sniff_audio_format(b"#EXTM3U\n") is None


# --- formats -------------------------------------------------------------------------------------


def test_wav_int16_stereo_is_the_mean_of_the_channels() -> None:
    left = sine(440, 16000, 0.5)
    right = np.full_like(left, 0.25)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)
    result = decode(write_sf(pcm, 16000, "WAV", "PCM_16"), target_rate=16000)
    assert (result.channels, result.source_rate, result.sample_rate, result.format) == (2, 16000, 16000, "wav")
    assert result.duration_s == 0.5
    assert result.samples.dtype == np.float32
    np.testing.assert_allclose(result.samples, (pcm[:, 0].astype(np.float64) + pcm[:, 1]) / 2 / 32768, atol=1e-6)


def test_wav_axis_comes_from_the_declared_channel_count() -> None:
    # 3 channels x 3 frames: a square block. Each frame is (0.6, 0.3, 0.0) -> mono 0.3, not (0.6, 0.3, 0.0).
    frames = np.tile(np.array([0.6, 0.3, 0.0], np.float32), (3, 1))
    result = decode(write_sf(frames, 16000, "WAV", "FLOAT"), target_rate=16000)
    np.testing.assert_allclose(result.samples, [0.3, 0.3, 0.3], atol=1e-6)


def test_flac_is_lossless() -> None:
    stereo = np.stack([sine(300, 16000, 0.25), sine(700, 16000, 0.25, 0.2)], axis=1)
    pcm = np.round(stereo * 32767).astype(np.int16)
    result = decode(write_sf(pcm, 16000, "FLAC", "PCM_16"), format="flac")
    assert result.format == "flac"
    np.testing.assert_allclose(result.samples, pcm.astype(np.float64).mean(axis=1) / 32768, atol=1e-6)


@pytest.mark.parametrize(("subtype", "rate"), [("VORBIS", 44100), ("OPUS", 48000)])
def test_ogg_vorbis_and_opus(subtype: str, rate: int) -> None:
    tone = sine(1000, rate)
    result = decode(write_sf(np.stack([tone, tone], axis=1), rate, "OGG", subtype), format="ogg")
    assert (result.format, result.source_rate, result.channels) == ("ogg", rate, 2)
    assert abs(peak_hz(result.samples, 16000) - 1000) <= 2
    assert abs(len(result.samples) - 16000) < 400
    rms = float(np.sqrt(np.mean(result.samples[2000:-2000] ** 2)))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.05


def test_mp3_goes_through_pyav(monkeypatch: pytest.MonkeyPatch) -> None:
    tone = sine(1000, 44100)
    data = encode_pyav("mp3", "libmp3lame", np.stack([tone, tone * 0.5]), 44100)
    assert sniff_audio_format(data) == "mp3"
    monkeypatch.setattr(audio, "_try_soundfile", lambda *a, **k: pytest.fail("mp3 must not go to libsndfile"))
    result = decode(data, format="mp3")
    assert (result.format, result.source_rate, result.channels) == ("mp3", 44100, 2)
    assert abs(peak_hz(result.samples, 16000) - 1000) <= 2
    assert abs(len(result.samples) - 16000) < 1200  # codec delay/padding
    # mean of (0.5, 0.25) amplitude: 0.375
    assert 0.33 < float(np.abs(result.samples).max()) < 0.42


def test_m4a_aac_goes_through_pyav() -> None:
    tone = sine(500, 44100)
    result = decode(encode_pyav("ipod", "aac", np.stack([tone, tone]), 44100))
    assert result.format == "mp4"
    assert abs(peak_hz(result.samples, 16000) - 500) <= 2


def test_resampling_keeps_the_frequency() -> None:
    tone = sine(1000, 44100, 1.0)
    result = decode(write_sf(tone, 44100, "WAV", "FLOAT"), target_rate=16000)
    assert result.sample_rate == 16000 and result.source_rate == 44100
    assert abs(len(result.samples) - 16000) <= 16
    assert abs(peak_hz(result.samples, 16000) - 1000) <= 1
    # amplitude survives (away from the filter's edges)
    assert abs(float(np.abs(result.samples[1000:-1000]).max()) - 0.5) < 0.02
    # and a tone above the new Nyquist frequency is filtered out instead of aliasing
    high = decode(write_sf(sine(10000, 44100), 44100, "WAV", "FLOAT"), target_rate=16000)
    assert float(np.abs(high.samples[1000:-1000]).max()) < 0.05


def test_output_is_clipped_to_unit_range() -> None:
    square = np.where(np.arange(44100) % 100 < 50, 32767, -32768).astype(np.int16)  # full scale: resampling overshoots
    result = decode(write_sf(square, 44100, "WAV", "PCM_16"), target_rate=16000)
    assert result.samples.dtype == np.float32
    assert float(result.samples.max()) <= 1.0 and float(result.samples.min()) >= -1.0
    assert float(result.samples.max()) > 0.99


# --- refusals ------------------------------------------------------------------------------------


def test_zero_length_audio_is_invalid() -> None:
    for data in (write_sf(np.zeros((0, 1), np.int16), 16000, "WAV", "PCM_16"), wav_header(rate=16000, channels=1, data_size=0), b""):
        with pytest.raises(InvalidArgument) as info:
            decode(data)
        assert not isinstance(info.value, MediaTooLarge)
        assert info.value.field == "source"


def test_ten_hour_wav_header_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    ten_hours = 16000 * 2 * 36000
    data = wav_header(rate=16000, channels=1, data_size=ten_hours) + bytes(2000)
    assert len(data) == 44 + 2000
    monkeypatch.setattr(audio, "_try_soundfile", lambda *a, **k: pytest.fail("decoded a refused header"))
    with pytest.raises(MediaTooLarge) as info:
        decode(data)
    assert info.value.field == "source"
    assert info.value.metadata["setting"] == "audio_max_duration_s"


def test_flac_claiming_ten_hours_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(write_sf(np.zeros(1600, np.int16), 16000, "FLAC", "PCM_16"))
    fields = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate(20) channels(3) bits(5) total samples(36)
    data[18:26] = ((fields >> 36 << 36) | 16000 * 36000).to_bytes(8, "big")
    monkeypatch.setattr(audio._Sink, "add", lambda *a: pytest.fail("decoded a refused header"))
    with pytest.raises(MediaTooLarge) as info:
        decode(bytes(data))
    assert info.value.metadata["setting"] == "audio_max_duration_s"


def test_streamed_wav_with_unknown_length_decodes() -> None:
    data = wav_header(rate=16000, channels=1, data_size=0xFFFFFFFF) + np.full(1600, 8192, np.int16).tobytes()
    result = decode(data)
    assert len(result.samples) == 1600
    np.testing.assert_allclose(result.samples, 0.25)


@pytest.mark.parametrize("rate", [1, 999, 10_000_000])
def test_forged_sample_rate_is_refused(rate: int) -> None:
    data = wav_header(rate=rate, channels=1, data_size=2000) + bytes(2000)
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert not isinstance(info.value, MediaTooLarge)
    assert "sample rate" in info.value.message


def test_forged_channel_count_is_refused() -> None:
    data = wav_header(rate=16000, channels=1000, data_size=2000 * 1000) + bytes(4000)
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert "channels" in info.value.message


def test_a_wrong_format_label_is_decoded_by_the_bytes(caplog: pytest.LogCaptureFixture) -> None:
    wav = write_sf(sine(440, 16000, 0.1), 16000, "WAV", "PCM_16")
    want = decode(wav, format="wav")
    assert want.format == "wav"
    for claimed in ("mp3", "flac", "ogg"):
        with caplog.at_level(logging.INFO, logger="services.encoder.media.audio"):
            got = decode(wav, format=claimed)
        assert got.format == "wav" and np.array_equal(got.samples, want.samples)
        assert f"labelled {claimed} is wav" in caplog.text
    with pytest.raises(InvalidArgument) as info:
        decode(wav, format="aac")  # not a label the contract knows
    assert info.value.field == "audio.format"
    with pytest.raises(InvalidArgument) as info:
        decode(b"not audio at all" * 8, format="wav")  # no supported container
    assert info.value.field == "audio.format" and "not a recognised audio format" in info.value.message


def test_decoded_size_cap() -> None:
    stereo = np.zeros((16000, 2), np.int16)  # 1 s stereo: 16000 * 2 * 4 = 128000 bytes as float32
    data = write_sf(stereo, 16000, "WAV", "PCM_16")
    assert len(decode(data, settings=Settings(audio_max_decoded_bytes=128000)).samples) == 16000
    with pytest.raises(MediaTooLarge) as info:
        decode(data, settings=Settings(audio_max_decoded_bytes=127999))
    assert info.value.metadata["setting"] == "audio_max_decoded_bytes"


@pytest.mark.parametrize("kind", ["wav", "mp3"])
def test_caps_are_checked_while_decoding(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    # 3 s of audio whose length the header does not give away: refused within one block of the cap.
    if kind == "wav":
        data = wav_header(rate=16000, channels=1, data_size=0xFFFFFFFF) + bytes(2 * 3 * 16000)  # streamed WAV
        monkeypatch.setattr(audio, "_declared_frames", lambda handle: 0)  # as if libsndfile did not know the length
        monkeypatch.setattr(audio, "_BLOCK_FRAMES", 4000)
        rate, block = 16000, 4000
    else:
        tone = sine(1000, 44100, 3.0)
        data = encode_pyav("mp3", "libmp3lame", np.stack([tone, tone]), 44100)
        rate, block = 44100, 1152  # one MP3 frame
    blocks: list[int] = []
    real_add = audio._Sink.add

    def counting_add(self: Any, mono: np.ndarray) -> None:
        blocks.append(len(mono))
        real_add(self, mono)

    monkeypatch.setattr(audio._Sink, "add", counting_add)
    with pytest.raises(MediaTooLarge) as info:
        decode(data, settings=Settings(audio_max_duration_s=0.5))
    assert info.value.metadata["setting"] == "audio_max_duration_s"
    assert 0.5 * rate < sum(blocks) <= 0.5 * rate + 2 * block


def test_duration_cap_is_inclusive() -> None:
    data = write_sf(np.zeros(16000, np.int16), 16000, "WAV", "PCM_16")
    assert decode(data, settings=Settings(audio_max_duration_s=1.0)).duration_s == 1.0
    with pytest.raises(MediaTooLarge):
        decode(data, settings=Settings(audio_max_duration_s=0.999))


def test_duration_cap_applies_to_pyav_formats() -> None:
    tone = sine(1000, 44100, 1.0)
    data = encode_pyav("mp3", "libmp3lame", np.stack([tone, tone]), 44100)
    with pytest.raises(MediaTooLarge) as info:
        decode(data, settings=Settings(audio_max_duration_s=0.5))
    assert info.value.metadata["setting"] == "audio_max_duration_s"


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).bytes(3000),
        b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        b"OggS" + bytes(100),
        b"\xff\xfb\x90\x00" + bytes(50),
    ],
)
def test_garbage_is_invalid(data: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode(data)
    assert info.value.field == "source"
    assert "/etc" not in str(info.value)


# --- raw arrays ----------------------------------------------------------------------------------


def from_array(values: np.ndarray, rate: float = 16000, *, settings: Settings = SETTINGS, target_rate: int = 16000) -> DecodedAudio:
    return audio_from_array(values, rate, settings=settings, target_rate=target_rate)


def test_array_channels_first_float() -> None:
    values = np.stack([sine(440, 16000, 0.1), np.full(1600, 0.5, np.float32)])
    result = from_array(values)
    assert (result.channels, result.format, result.duration_s) == (2, "array", 0.1)
    np.testing.assert_allclose(result.samples, values.mean(axis=0), atol=1e-6)


def test_array_int16_and_resampling() -> None:
    pcm = np.round(sine(1000, 48000) * 32767).astype(np.int16)
    result = from_array(pcm, 48000.0)
    assert result.source_rate == 48000 and abs(len(result.samples) - 16000) <= 16
    assert abs(peak_hz(result.samples, 16000) - 1000) <= 1
    assert abs(float(np.abs(result.samples[500:-500]).max()) - 0.5) < 0.02
    np.testing.assert_allclose(from_array(np.array([16384, -32768], np.int16)).samples, [0.5, -1.0])


@pytest.mark.parametrize("rate", [0.0, -16000.0, float("nan"), 16000.5, 999.0, 400_000.0])
def test_array_sampling_rate_checked(rate: float) -> None:
    with pytest.raises(InvalidArgument) as info:
        from_array(np.zeros(100, np.float32), rate)
    assert info.value.field == "audio.sampling_rate"


@pytest.mark.parametrize(
    ("values", "words"),
    [
        (np.zeros((1600, 2), np.float32), "[channels, samples]"),  # channels-last sent by mistake
        (np.zeros((2, 3, 4), np.float32), "dimensions"),
        (np.zeros(10, np.int32), "int32"),
        (np.array([0.0, np.nan], np.float32), "finite"),
        (np.array([0.0, 2.0], np.float32), "[-1, 1]"),
        (np.zeros(0, np.float32), "empty"),
    ],
)
def test_array_refusals(values: np.ndarray, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        from_array(values)
    assert words in info.value.message
    assert info.value.field == "source.array"


def test_array_caps() -> None:
    with pytest.raises(MediaTooLarge) as info:
        from_array(np.zeros(16001, np.float32), settings=Settings(audio_max_duration_s=1.0))
    assert info.value.metadata["setting"] == "audio_max_duration_s"
    with pytest.raises(MediaTooLarge) as info:
        from_array(np.zeros((2, 1000), np.float32), settings=Settings(audio_max_decoded_bytes=7999))
    assert info.value.metadata["setting"] == "audio_max_decoded_bytes"
