"""Tensors as the store keeps them: a dtype, a shape and raw little-endian bytes.

The store never needs to compute on tensors, only to move and check them, so
it keeps them as bytes (no torch, no numpy): that keeps the gateway and any
non-Python client free of array libraries, and bfloat16 (which numpy lacks)
needs no special case. `data` may be a memoryview so that a read from Redis
can be split into tensors without copying.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmserve.api.common.v1 import tensor_pb2
from mmserve.errors import InvalidArgument


@dataclass(frozen=True)
class DTypeInfo:
    """What the store needs to know about an element type."""

    name: str
    itemsize: int


# The one table of element types: proto enum value -> name and size in bytes.
DTYPES: dict[int, DTypeInfo] = {
    tensor_pb2.DATA_TYPE_FLOAT32: DTypeInfo("float32", 4),
    tensor_pb2.DATA_TYPE_FLOAT16: DTypeInfo("float16", 2),
    tensor_pb2.DATA_TYPE_BFLOAT16: DTypeInfo("bfloat16", 2),
    tensor_pb2.DATA_TYPE_FLOAT64: DTypeInfo("float64", 8),
    tensor_pb2.DATA_TYPE_INT64: DTypeInfo("int64", 8),
    tensor_pb2.DATA_TYPE_INT32: DTypeInfo("int32", 4),
    tensor_pb2.DATA_TYPE_INT16: DTypeInfo("int16", 2),
    tensor_pb2.DATA_TYPE_UINT8: DTypeInfo("uint8", 1),
}


def dtype_info(dtype: int, *, field: str = "dtype") -> DTypeInfo:
    """Look a dtype up; unknown or UNSPECIFIED is the caller's error."""
    info = DTYPES.get(dtype)
    if info is None:
        raise InvalidArgument(f"unsupported tensor dtype {dtype}", field=field)
    return info


def itemsize(dtype: int) -> int:
    """Bytes per element of `dtype`."""
    return dtype_info(dtype).itemsize


def dtype_name(dtype: int) -> str:
    """Short human-readable name (float32, bfloat16, ...) for logs and the meta hash."""
    return dtype_info(dtype).name


def tensor_nbytes(dtype: int, shape: Sequence[int]) -> int:
    """Bytes of a dense tensor of `shape` and `dtype` (prod(shape) * itemsize)."""
    return math.prod(shape) * itemsize(dtype)


@dataclass(frozen=True, repr=False)
class RawTensor:
    """One named tensor as raw row-major little-endian bytes, checked on construction."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        info = dtype_info(self.dtype)
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"tensor {self.name!r}: negative dimension in shape {list(shape)}", field="shape")
        data = self.data
        if isinstance(data, bytearray):
            data = memoryview(data)
        if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
            # Byte-addressed view, so len() counts bytes (redis-py and slicing rely on it).
            if not data.c_contiguous:
                raise InvalidArgument(f"tensor {self.name!r}: data must be C-contiguous", field="data")
            data = data.cast("B")
        elif not isinstance(data, (bytes, memoryview)):
            raise InvalidArgument(f"tensor {self.name!r}: data must be bytes or memoryview", field="data")
        expected = math.prod(shape) * info.itemsize
        if len(data) != expected:
            raise InvalidArgument(
                f"tensor {self.name!r}: data has {len(data)} bytes, shape {list(shape)} of {info.name} needs {expected}",
                field="data",
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "data", data)

    def __repr__(self) -> str:  # never dump megabytes of data into a log line
        name, dtype = self.name, dtype_name(self.dtype)
        return f"RawTensor(name={name!r}, dtype={dtype}, shape={self.shape}, nbytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        """Size of `data` in bytes."""
        return len(self.data)

    def info(self) -> tensor_pb2.TensorInfo:
        """Shape and type without the data, as listed in an EmbeddingDescriptor."""
        return tensor_pb2.TensorInfo(name=self.name, dtype=self.dtype, shape=self.shape)  # type: ignore[arg-type]

    def to_proto(self) -> tensor_pb2.NamedTensor:
        """As a NamedTensor message (copies the bytes once: protobuf owns its buffers)."""
        data = self.data if isinstance(self.data, bytes) else bytes(self.data)
        tensor = tensor_pb2.Tensor(dtype=self.dtype, shape=self.shape, data=data)  # type: ignore[arg-type]
        return tensor_pb2.NamedTensor(name=self.name, tensor=tensor)

    @classmethod
    def from_proto(cls, message: tensor_pb2.NamedTensor) -> RawTensor:
        """From a NamedTensor message, validated like any other RawTensor."""
        t = message.tensor
        return cls(name=message.name, dtype=t.dtype, shape=tuple(t.shape), data=t.data)

    @classmethod
    def from_info(cls, info: tensor_pb2.TensorInfo, data: bytes | memoryview) -> RawTensor:
        """Rebuild a tensor from its TensorInfo and its slice of an embedding's bytes."""
        return cls(name=info.name, dtype=info.dtype, shape=tuple(info.shape), data=data)
