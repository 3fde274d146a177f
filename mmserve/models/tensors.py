"""Torch tensors <-> the store's raw little-endian bytes, without pickle.

bfloat16 has no numpy type, so tensors are viewed as bytes through torch
itself: `tensor.contiguous().view(torch.uint8)` on the way out and
`torch.frombuffer` on the way in. The byte order is the machine's, which is
little-endian on every platform torch supports for serving (x86-64, arm64).
"""

from __future__ import annotations

import sys

import torch

from mmserve.api.common.v1 import tensor_pb2
from mmserve.store import RawTensor

assert sys.byteorder == "little", "mmserve stores little-endian tensors"

TORCH_TO_PROTO: dict[torch.dtype, tensor_pb2.DataType.ValueType] = {
    torch.float32: tensor_pb2.DATA_TYPE_FLOAT32,
    torch.float16: tensor_pb2.DATA_TYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DATA_TYPE_BFLOAT16,
    torch.float64: tensor_pb2.DATA_TYPE_FLOAT64,
    torch.int64: tensor_pb2.DATA_TYPE_INT64,
    torch.int32: tensor_pb2.DATA_TYPE_INT32,
    torch.int16: tensor_pb2.DATA_TYPE_INT16,
    torch.uint8: tensor_pb2.DATA_TYPE_UINT8,
}
PROTO_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_PROTO.items()}


def to_raw(name: str, tensor: torch.Tensor) -> RawTensor:
    """Copy a tensor to CPU and expose its bytes (one copy at most)."""
    t = tensor.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return RawTensor(name=name, dtype=TORCH_TO_PROTO[t.dtype], shape=tuple(t.shape), data=data)


def from_raw(raw: RawTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor over the raw bytes (copied, so the buffer may be freed)."""
    dtype = PROTO_TO_TORCH[raw.dtype]
    if raw.nbytes == 0:
        return torch.empty(raw.shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(raw.data), dtype=dtype)
    return flat.reshape(raw.shape).to(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
