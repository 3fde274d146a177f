"""oneDNN linear layers for the CPU engine: rows that do not depend on the batch, and faster small-batch GEMMs.

Measured here (torch 2.14.1, AVX-512): MKL's float32 GEMM gives a row a
result that depends on how many rows are multiplied with it (M = 1 takes a
matrix-vector path; M = 2, 8, 16 each another blocking), so a request decoded
beside others got slightly different logits than alone; and it is slow at
decode batch sizes (1024 x 2560 at M = 16: 1.4 ms). oneDNN's matmul with a
pre-reordered weight (the kernel torch's own CPU compiler uses) gives every
row the same result for any M from 2 to 64 (M = 1 is run as two equal rows
for that reason) at full float32 precision, and takes 0.48 ms for the same
product. So every linear layer of the language model runs through it on CPU:
a request's tokens are then the same whatever else is in the batch.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("mmserve.decoder.engine")

#: Batch size the weight layout is tuned for (decode batches).
_LAYOUT_BATCH = 16


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class OneDnnLinear(nn.Module):
    """`nn.Linear` computed by oneDNN from a reordered copy of its weight (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _LAYOUT_BATCH)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        single = rows.shape[0] == 1
        if single:  # M = 1 would take another kernel than the M >= 2 a batch takes
            rows = torch.cat([rows, rows])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        if single:
            out = out[:1]
        return out.reshape(*lead, self.out_features)


def use_onednn_linears(model: nn.Module, min_weights: int) -> int:
    """Swap every `nn.Linear` below `model` with at least `min_weights` weights for a OneDnnLinear; how many were swapped.

    Smaller layers stay on MKL: oneDNN's ~20 us per call would exceed their whole product (the tiny test models).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.numel() >= min_weights:
                setattr(parent, name, OneDnnLinear(child))
                swapped += 1
    return swapped
