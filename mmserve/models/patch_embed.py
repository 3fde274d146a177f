"""Patch embeddings as one matmul: a convolution whose kernel equals its stride is a linear map of each patch.

Vision towers cut the image into non-overlapping patches with such a
convolution (Qwen's Conv3d over 2 x 14 x 14 x 3, SigLIP's Conv2d over 14 x 14 x 3).
On the CPU, torch's Conv3d takes ~3.3 ms for the 1024 patches of a 448 x 448
image on the tiny checkpoint, where the same product as one GEMM takes 0.75 ms;
vLLM makes the same substitution. The result differs from the convolution only
by float rounding (the sum over each patch runs in another order).
"""

from __future__ import annotations

import torch
from torch import nn


class PatchLinear(nn.Module):
    """Stands in for a patch convolution: same input and output shapes, one matmul."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.spatial = len(conv.kernel_size)
        self.kernel_size = conv.kernel_size
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *kernel) patches, as the tower's patch embedding reshapes them, or a whole (N, C, *grid*kernel) image."""
        n, c, *dims = x.shape
        grid = [d // k for d, k in zip(dims, self.kernel_size, strict=True)]
        if any(g != 1 for g in grid):  # a whole image: cut it into patches first (SigLIP)
            x = x[(slice(None), slice(None), *(slice(0, g * k) for g, k in zip(grid, self.kernel_size, strict=True)))]
            shape = [n, c]
            for g, k in zip(grid, self.kernel_size, strict=True):
                shape += [g, k]
            x = x.reshape(shape)
            order = [0, *range(2, 2 + 2 * self.spatial, 2), 1, *range(3, 3 + 2 * self.spatial, 2)]
            patches = x.permute(order).reshape(-1, self.weight.shape[1])
            out = nn.functional.linear(patches, self.weight, self.bias)
            return out.reshape(n, *grid, self.out_channels).permute(0, self.spatial + 1, *range(1, self.spatial + 1))
        out = nn.functional.linear(x.reshape(n, -1), self.weight, self.bias)
        return out.reshape(n, self.out_channels, *([1] * self.spatial))


def patch_convs_as_linear(model: nn.Module) -> int:
    """Replace every patch convolution (kernel == stride, no padding, dilation or groups) in `model`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d | nn.Conv3d) and _is_patch_conv(child):
                setattr(parent, name, PatchLinear(child))
                replaced += 1
    return replaced


def _is_patch_conv(conv: nn.Conv2d | nn.Conv3d) -> bool:
    return (
        tuple(conv.kernel_size) == tuple(conv.stride)
        and (conv.padding == "valid" or all(p == 0 for p in conv.padding))
        and all(d == 1 for d in conv.dilation)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )
