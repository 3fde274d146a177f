"""Load one numeric time series into a z-scored float32 [T, C] array.

Rules (docs/inputs.md section 3):

* Formats: `.npy` (numpy, never with pickle), `.csv` (numeric; one optional
  header row; columns are channels), `.wav` / `.flac` (soundfile; each
  channel is a series, samples as libsndfile's floats, full scale = 1). The
  format is sniffed from the bytes (npy magic, RIFF/WAVE, fLaC); bytes
  without a binary signature are read as CSV text. An explicit `format`
  (TimeSeriesOptions.format) must agree with the bytes; the MIME type /
  extension hint is only used when the bytes do not say (text).
* Layout is [T, C], always: a 1-D series is [T, 1]; a 2-D array is [T, C]
  and is never transposed by guessing from its shape.
* Refused: rank > 2, NaN/Inf (naming the first bad sample and channel; no
  filling, since no adapter here says how), more than
  `time_series_max_samples` samples (`MediaTooLarge`), more than 64
  channels, an empty series, a missing or non-positive `sampling_rate`
  (wav/flac default to the file's own rate).
* `.npy` headers are parsed with `numpy.lib.format` first, so shape and
  dtype are checked (and a header lying about its size is caught) before
  numpy allocates anything; object dtypes (pickles) are refused, and the
  array is then loaded with `allow_pickle=False`.
* Z-score per channel over time: `(x - mean) / (std + 1e-8)` with the
  population std, computed in float64; `raw_mean` / `raw_std` keep the
  statistics so a model adapter can undo it. A constant channel becomes 0.

Whether the series is long enough for one token depends on the model's
patching and is checked by the family, from `num_samples`.
"""

from __future__ import annotations

import csv
import io
import logging
import math

import numpy as np
import soundfile as sf

from mmserve.config import Settings
from mmserve.decoded import DecodedSeries
from mmserve.errors import InvalidArgument, MediaTooLarge

logger = logging.getLogger(__name__)

TIME_SERIES_FORMATS: tuple[str, ...] = ("npy", "csv", "wav", "flac")
MAX_CHANNELS = 64
EPS = 1e-8
_NPY_MAGIC = b"\x93NUMPY"
_NUMERIC_KINDS = frozenset("biuf")  # bool, signed, unsigned, float
_MIME_FORMATS = {
    "npy": "npy",
    "application/x-npy": "npy",
    "application/npy": "npy",
    "application/x-numpy": "npy",
    "csv": "csv",
    "text/csv": "csv",
    "application/csv": "csv",
    "text/plain": "csv",
    "wav": "wav",
    "wave": "wav",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/vnd.wave": "wav",
    "flac": "flac",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
}
_RATE_FIELD = "time_series.sampling_rate"
_FORMAT_FIELD = "time_series.format"


def sniff_series_format(data: bytes) -> str | None:
    """npy, wav or flac from the magic bytes; None for anything else (maybe CSV text)."""
    if data[:6] == _NPY_MAGIC:
        return "npy"
    if data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    return None


def load_time_series(
    data: bytes,
    *,
    settings: Settings,
    sampling_rate: float | None,
    format: str | None,  # the contract's name (TimeSeriesOptions.format)
    mime: str | None,
    field: str = "source",
) -> DecodedSeries:
    """Parse, check and z-score an encoded series; CPU-bound, run it in a worker thread."""
    rate = _check_rate(sampling_rate)
    fmt = _resolve_format(data, format, mime, field)
    if fmt in ("wav", "flac"):
        values, file_rate = _load_audio(data, fmt, settings, field)
        return _finish(values, rate if rate is not None else float(file_rate), settings=settings, field=field, fmt=fmt)
    if rate is None:
        raise InvalidArgument("is required (Hz, > 0)", field=_RATE_FIELD)
    if fmt == "npy":
        return _finish(_load_npy(data, settings, field), rate, settings=settings, field=field, fmt=fmt)
    values, rows = _load_csv(data, settings, field)
    return _finish(values, rate, settings=settings, field=field, fmt=fmt, rows=rows)


def series_from_array(
    values: np.ndarray,
    sampling_rate: float | None,
    *,
    settings: Settings,
    field: str = "source.array",
) -> DecodedSeries:
    """The gRPC raw `array` form: [T] or [T, C] numbers at `sampling_rate`."""
    rate = _check_rate(sampling_rate)
    if rate is None:
        raise InvalidArgument("is required (Hz, > 0)", field=_RATE_FIELD)
    _check_dtype(values.dtype, field)
    return _finish(values, rate, settings=settings, field=field, fmt="array")


# --- internals -------------------------------------------------------------------------------


def _check_rate(sampling_rate: float | None) -> float | None:
    if sampling_rate is None:
        return None
    ok = isinstance(sampling_rate, int | float) and not isinstance(sampling_rate, bool)
    if not ok or not math.isfinite(sampling_rate) or sampling_rate <= 0:
        raise InvalidArgument("must be a finite number of Hz > 0", field=_RATE_FIELD)
    return float(sampling_rate)


def _resolve_format(data: bytes, format: str | None, mime: str | None, field: str) -> str:
    """The bytes decide; an explicit format must agree; the mime hint only names text."""
    claimed: str | None = None
    if format is not None:
        claimed = format.strip().lower().lstrip(".") if isinstance(format, str) else ""
        if claimed not in TIME_SERIES_FORMATS:
            raise InvalidArgument(f"must be one of {', '.join(TIME_SERIES_FORMATS)}", field=_FORMAT_FIELD)
    sniffed = sniff_series_format(data)
    if sniffed is not None:
        if claimed is not None and claimed != sniffed:
            raise InvalidArgument(f"the data is a .{sniffed} file, not .{claimed}", field=_FORMAT_FIELD)
        return sniffed
    if claimed is None and mime:
        claimed = _MIME_FORMATS.get(mime.split(";", 1)[0].strip().lower().lstrip("."))
    if claimed not in (None, "csv"):
        where = _FORMAT_FIELD if format is not None else field
        raise InvalidArgument(f"the data is not a .{claimed} file", field=where)
    return "csv"


def _check_dtype(dtype: np.dtype, field: str) -> None:
    if dtype.hasobject:
        raise InvalidArgument("object arrays (pickled data) are not accepted", field=field)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidArgument(f"values must be numbers (bool, int or float), not {dtype}", field=field)


def _check_shape(shape: tuple[int, ...], settings: Settings, field: str) -> None:
    """Rank, channels and length, from a shape alone (before the values exist)."""
    if len(shape) not in (1, 2):
        raise InvalidArgument(f"wrong rank: a time series is [T] or [T, C], got {len(shape)} dimensions", field=field)
    samples, channels = shape[0], (shape[1] if len(shape) == 2 else 1)
    if samples == 0 or channels == 0:
        raise InvalidArgument("the time series is empty", field=field)
    if channels > MAX_CHANNELS:
        hint = " (the layout is [T, C]: time first)" if samples <= MAX_CHANNELS else ""
        raise InvalidArgument(f"has {channels} channels, more than {MAX_CHANNELS}{hint}", field=field)
    if samples > settings.time_series_max_samples:
        raise _too_long(settings, field)


def _too_long(settings: Settings, field: str) -> MediaTooLarge:
    limit = settings.time_series_max_samples
    return MediaTooLarge(
        f"the time series has more than the allowed {limit} samples",
        field=field,
        metadata={"limit": str(limit), "setting": "time_series_max_samples"},
    )


def _load_npy(data: bytes, settings: Settings, field: str) -> np.ndarray:
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        logger.info("npy header refused: %s", exc)
        raise InvalidArgument("not a valid .npy file (unreadable header)", field=field) from None
    _check_dtype(dtype, field)
    _check_shape(shape, settings, field)
    if math.prod(shape) * dtype.itemsize != len(data) - buf.tell():
        raise InvalidArgument("the .npy data does not match its header (truncated?)", field=field)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        logger.info("npy load failed: %s", exc)
        raise InvalidArgument("not a valid .npy file", field=field) from None


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _load_csv(data: bytes, settings: Settings, field: str) -> tuple[np.ndarray, list[int]]:
    """Numeric CSV -> [T, C] and the file row (1-based) of each sample, for error messages."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidArgument(f"not a supported time series (expected {', '.join(TIME_SERIES_FORMATS)})", field=field) from None
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = next((d for d in (",", "\t", ";") if d in first_line), ",")
    limit = settings.time_series_max_samples
    rows: list[list[float]] = []
    lines: list[int] = []
    width: int | None = None
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        for row in reader:
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue  # blank line
            if width is None:
                width = len(cells)
                if width > MAX_CHANNELS:
                    raise InvalidArgument(f"has {width} columns (channels), more than {MAX_CHANNELS}", field=field)
                if all(_number(cell) is None for cell in cells):
                    continue  # the header row
            if len(cells) != width:
                raise InvalidArgument(f"row {reader.line_num} has {len(cells)} columns, expected {width}", field=field)
            values = []
            for column, cell in enumerate(cells, start=1):
                number = _number(cell)
                if number is None:
                    shown = cell if len(cell) <= 20 else cell[:20] + "..."
                    raise InvalidArgument(f"row {reader.line_num}, column {column}: {shown!r} is not a number", field=field)
                values.append(number)
            if len(rows) == limit:
                raise _too_long(settings, field)
            rows.append(values)
            lines.append(reader.line_num)
    except csv.Error as exc:
        raise InvalidArgument(f"not a readable CSV file (row {reader.line_num}: {exc})", field=field) from None
    if not rows:
        raise InvalidArgument("the time series is empty (no numeric rows)", field=field)
    return np.asarray(rows, dtype=np.float64), lines


def _load_audio(data: bytes, fmt: str, settings: Settings, field: str) -> tuple[np.ndarray, int]:
    try:
        handle = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError) as exc:
        logger.info("time series %s open failed: %r", fmt, exc)
        raise InvalidArgument(f"not a readable .{fmt} file", field=field) from None
    with handle:
        if handle.channels > MAX_CHANNELS:
            raise InvalidArgument(f"has {handle.channels} channels, more than {MAX_CHANNELS}", field=field)
        if handle.frames > settings.time_series_max_samples:  # from the header, before reading
            raise _too_long(settings, field)
        try:
            values = handle.read(dtype="float64", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as exc:
            logger.info("time series %s read failed: %r", fmt, exc)
            raise InvalidArgument(f"the .{fmt} data is corrupt", field=field) from None
        return values, int(handle.samplerate)


def _finish(
    values: np.ndarray,
    rate: float,
    *,
    settings: Settings,
    field: str,
    fmt: str,
    rows: list[int] | None = None,
) -> DecodedSeries:
    """Checks every form shares, then the per-channel z-score."""
    _check_shape(values.shape, settings, field)
    series = values.astype(np.float64, copy=False).reshape(values.shape[0], -1)
    finite = np.isfinite(series)
    if not finite.all():
        t, c = (int(i) for i in np.argwhere(~finite)[0])
        where = f" (row {rows[t]} of the file)" if rows is not None else ""
        kind = "NaN" if math.isnan(series[t, c]) else "Inf"
        raise InvalidArgument(f"value at sample {t}, channel {c}{where} is {kind}; NaN/Inf are not accepted", field=field)
    with np.errstate(over="ignore", invalid="ignore"):
        mean = series.mean(axis=0)
        std = series.std(axis=0)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise InvalidArgument("values are too large to normalise", field=field)
    normalised = ((series - mean) / (std + EPS)).astype(np.float32)
    return DecodedSeries(
        values=normalised,
        raw_mean=mean,
        raw_std=std,
        num_samples=int(series.shape[0]),
        num_channels=int(series.shape[1]),
        sampling_rate=rate,
        format=fmt,
    )
