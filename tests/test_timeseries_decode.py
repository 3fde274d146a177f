"""Time series loading: npy/csv/wav/flac round trips, z-scoring, layout, refusals, raw arrays."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile as sf

from mmserve.config import Settings
from mmserve.errors import InvalidArgument, MediaTooLarge
from services.encoder.media.timeseries import DecodedSeries, load_time_series, series_from_array

SETTINGS = Settings()


def load(
    data: bytes,
    *,
    rate: float | None = 100.0,
    format: str | None = None,
    mime: str | None = None,
    settings: Settings = SETTINGS,
) -> DecodedSeries:
    return load_time_series(data, settings=settings, sampling_rate=rate, format=format, mime=mime)


def npy(array: np.ndarray, **kwargs: bool) -> bytes:
    out = io.BytesIO()
    np.save(out, array, **kwargs)
    return out.getvalue()


def zscore(x: np.ndarray) -> np.ndarray:
    """The reference: per channel over time, population std, eps 1e-8."""
    x = x.astype(np.float64).reshape(x.shape[0], -1)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)


def assert_series(result: DecodedSeries, raw: np.ndarray) -> None:
    raw2d = raw.astype(np.float64).reshape(raw.shape[0], -1)
    assert result.values.dtype == np.float32
    assert result.values.shape == raw2d.shape
    assert (result.num_samples, result.num_channels) == raw2d.shape
    np.testing.assert_allclose(result.values, zscore(raw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.raw_mean, raw2d.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.raw_std, raw2d.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result.values.mean(axis=0), 0.0, atol=1e-5)
    varying = raw2d.std(axis=0) > 0
    np.testing.assert_allclose(result.values.std(axis=0)[varying], 1.0, atol=1e-4)


RNG = np.random.default_rng(7)
SERIES = (RNG.normal(size=(200, 3)) * [1.0, 10.0, 0.01] + [0.0, 5.0, -3.0]).astype(np.float32)


# --- npy -----------------------------------------------------------------------------------------


def test_npy_round_trip() -> None:
    result = load(npy(SERIES), rate=50.0)
    assert_series(result, SERIES)
    assert (result.sampling_rate, result.format) == (50.0, "npy")


def test_npy_one_dimensional_is_one_channel_and_ints_work() -> None:
    raw = np.arange(-50, 50, dtype=np.int16) ** 2
    result = load(npy(raw))
    assert result.values.shape == (100, 1)
    assert_series(result, raw)


def test_npy_fortran_order_is_read_correctly() -> None:
    assert_series(load(npy(np.asfortranarray(SERIES))), SERIES)


def test_npy_2d_is_time_first_never_transposed() -> None:
    wide = RNG.normal(size=(3, 50))  # looks like [C, T], but [T, C] is the contract
    result = load(npy(wide))
    assert (result.num_samples, result.num_channels) == (3, 50)
    assert_series(result, wide)


def test_pickled_object_npy_is_refused() -> None:
    data = npy(np.array([1.0, "x", None], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgument) as info:
        load(data)
    assert "pickle" in info.value.message
    assert info.value.field == "source"


def test_a_bare_pickle_is_refused() -> None:
    data = pickle.dumps(np.zeros(10))
    with pytest.raises(InvalidArgument):
        load(data)
    with pytest.raises(InvalidArgument) as info:
        load(data, format="npy")
    assert info.value.field == "time_series.format"


def npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def test_npy_header_is_checked_before_allocating() -> None:
    with pytest.raises(MediaTooLarge) as info:  # claims 10^12 samples, carries 80 bytes: no 8 TB allocation
        load(npy_header((10**12,)) + bytes(80))
    assert info.value.metadata["setting"] == "time_series_max_samples"
    with pytest.raises(InvalidArgument) as info:  # a header that does not match its payload
        load(npy_header((100, 2)) + bytes(80))
    assert "does not match" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        load(b"\x93NUMPY\x01\x00" + b"\xff\x00garbage")
    assert "header" in info.value.message


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((10, 2, 2)), "wrong rank"),
        (np.float64(3.0), "wrong rank"),
        (np.zeros((10, 65)), "65 channels"),
        (np.zeros((0, 3)), "empty"),
        (np.zeros(10, np.complex64), "numbers"),
        (np.array(["1", "2"]), "numbers"),
    ],
)
def test_npy_refusals(array: np.ndarray, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load(npy(array))
    assert words in info.value.message
    assert not isinstance(info.value, MediaTooLarge)


@pytest.mark.parametrize(("bad", "kind"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_are_refused_naming_the_first(bad: float, kind: str) -> None:
    raw = SERIES.copy()
    raw[17, 2] = bad
    raw[40, 0] = np.nan
    with pytest.raises(InvalidArgument) as info:
        load(npy(raw))
    assert "sample 17, channel 2" in info.value.message
    assert kind in info.value.message


def test_constant_channel_becomes_zero() -> None:
    raw = np.stack([np.full(20, 7.0), np.arange(20.0)], axis=1)
    result = load(npy(raw))
    np.testing.assert_array_equal(result.values[:, 0], 0.0)
    assert result.raw_std[0] == 0.0 and result.raw_mean[0] == 7.0
    assert_series(result, raw)


# --- csv -----------------------------------------------------------------------------------------


def csv_text(array: np.ndarray, header: str | None = None, sep: str = ",") -> bytes:
    lines = [header] if header else []
    lines += [sep.join(repr(float(v)) for v in row) for row in array.reshape(array.shape[0], -1)]
    return ("\n".join(lines) + "\n").encode()


def test_csv_round_trip() -> None:
    result = load(csv_text(SERIES), rate=20.0)
    assert result.format == "csv" and result.sampling_rate == 20.0
    assert_series(result, SERIES.astype(np.float64))


def test_csv_with_header_tabs_bom_and_blank_lines() -> None:
    body = csv_text(SERIES[:10], header="temp\tpressure\thumidity", sep="\t").replace(b"\n", b"\n\n", 2)
    result = load(b"\xef\xbb\xbf" + body)
    assert result.num_samples == 10
    assert_series(result, SERIES[:10].astype(np.float64))


def test_csv_single_column() -> None:
    result = load(b"value\n1\n2\n3\n4\n")
    np.testing.assert_allclose(result.values[:, 0], zscore(np.array([1.0, 2, 3, 4]))[:, 0], rtol=1e-6)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (b"a,b\n1,2\n3,abc\n", "row 3, column 2: 'abc'"),
        (b"1,2\n3,\n", "row 2, column 2"),
        (b"1,abc\n3,4\n", "row 1, column 2"),  # a mixed first row is data, not a header
        (b"1,2\n3,4,5\n", "row 2 has 3 columns"),
        (b"a,b\n", "empty"),
        (b"", "empty"),
    ],
)
def test_csv_refusals(text: bytes, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        load(text)
    assert words in info.value.message
    assert info.value.field == "source"


def test_csv_nan_names_the_row() -> None:
    with pytest.raises(InvalidArgument) as info:
        load(b"x,y\n1,2\n3,nan\n")
    assert "sample 1, channel 1 (row 3 of the file) is NaN" in info.value.message


def test_csv_too_many_columns() -> None:
    with pytest.raises(InvalidArgument) as info:
        load((",".join(["1"] * 65) + "\n").encode())
    assert "65 columns" in info.value.message


# --- wav / flac ----------------------------------------------------------------------------------


def test_wav_channels_are_series_and_rate_defaults_to_the_file() -> None:
    raw = np.stack([np.sin(np.arange(300) / 7), np.linspace(-0.5, 0.5, 300)], axis=1)
    out = io.BytesIO()
    sf.write(out, raw, 250, format="WAV", subtype="DOUBLE")
    result = load(out.getvalue(), rate=None)
    assert (result.format, result.sampling_rate, result.num_channels) == ("wav", 250.0, 2)
    assert_series(result, raw)
    assert load(out.getvalue(), rate=100.0).sampling_rate == 100.0  # an explicit rate wins


def test_flac_round_trip() -> None:
    pcm = (np.arange(400) % 37 * 500 - 9000).astype(np.int16).reshape(200, 2)
    out = io.BytesIO()
    sf.write(out, pcm, 1000, format="FLAC", subtype="PCM_16")
    result = load(out.getvalue(), rate=None)
    assert (result.format, result.sampling_rate) == ("flac", 1000.0)
    assert_series(result, pcm / 32768.0)


# --- limits and hints ----------------------------------------------------------------------------


def test_length_cap_for_every_format() -> None:
    settings = Settings(time_series_max_samples=10)
    assert SETTINGS.time_series_max_samples == 240_000
    raw = np.arange(11.0)
    wav = io.BytesIO()
    sf.write(wav, raw / 20, 100, format="WAV", subtype="FLOAT")
    for data in (npy(raw), csv_text(raw), wav.getvalue()):
        with pytest.raises(MediaTooLarge) as info:
            load(data, settings=settings)
        assert info.value.metadata["setting"] == "time_series_max_samples"
    assert load(npy(raw[:10]), settings=settings).num_samples == 10
    assert load(csv_text(raw[:10]), settings=settings).num_samples == 10


@pytest.mark.parametrize("rate", [None, 0.0, -5.0, float("nan"), float("inf")])
def test_sampling_rate_is_required_and_positive(rate: float | None) -> None:
    for data in (npy(SERIES), csv_text(SERIES)):
        with pytest.raises(InvalidArgument) as info:
            load(data, rate=rate)
        assert info.value.field == "time_series.sampling_rate"
    with pytest.raises(InvalidArgument) as info:
        series_from_array(SERIES, rate, settings=SETTINGS)
    assert info.value.field == "time_series.sampling_rate"


def test_format_hint_must_agree_with_the_bytes() -> None:
    with pytest.raises(InvalidArgument) as info:
        load(npy(SERIES), format="csv")
    assert info.value.field == "time_series.format"
    with pytest.raises(InvalidArgument) as info:
        load(csv_text(SERIES), format="wav")
    assert info.value.field == "time_series.format"
    with pytest.raises(InvalidArgument) as info:
        load(npy(SERIES), format="xlsx")
    assert info.value.field == "time_series.format"
    assert load(npy(SERIES), format="npy").format == "npy"
    assert load(csv_text(SERIES), format="csv").format == "csv"


def test_mime_hint() -> None:
    assert load(npy(SERIES), mime="text/csv").format == "npy"  # the bytes win
    assert load(csv_text(SERIES), mime="text/csv; charset=utf-8").format == "csv"
    with pytest.raises(InvalidArgument) as info:
        load(csv_text(SERIES), mime="application/x-npy")
    assert info.value.field == "source"


def test_binary_garbage_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        load(np.random.default_rng(3).bytes(500))
    assert info.value.field == "source"


# --- raw arrays ----------------------------------------------------------------------------------


def test_series_from_array() -> None:
    result = series_from_array(SERIES, 10.0, settings=SETTINGS)
    assert result.format == "array" and result.sampling_rate == 10.0
    assert_series(result, SERIES)
    one = series_from_array(np.arange(5, dtype=np.int64), 1.0, settings=SETTINGS)
    assert one.values.shape == (5, 1)


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.zeros((4, 4, 4)), "wrong rank"),
        (np.array([1, None], dtype=object), "pickle"),
        (np.zeros(4, np.complex128), "numbers"),
        (np.array([[1.0, 2.0], [np.inf, 0.0]]), "sample 1, channel 0"),
        (np.zeros((0,)), "empty"),
    ],
)
def test_series_from_array_refusals(array: np.ndarray, words: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        series_from_array(array, 10.0, settings=SETTINGS)
    assert words in info.value.message
    assert info.value.field == "source.array"


def test_series_from_array_length_cap() -> None:
    with pytest.raises(MediaTooLarge):
        series_from_array(np.zeros(11), 1.0, settings=Settings(time_series_max_samples=10))
