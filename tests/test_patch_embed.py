"""Patch convolutions as matmuls (mmserve/models/patch_embed.py): same shapes, same values up to float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmserve.models.patch_embed import PatchLinear, patch_convs_as_linear


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv3d(3, 64, (2, 14, 14), (2, 14, 14), bias=False), (1024, 3, 2, 14, 14)),  # Qwen: patches already cut
        (nn.Conv2d(3, 32, 14, 14, padding="valid"), (2, 3, 56, 70)),  # SigLIP: a whole image, a 4 x 5 grid
        (nn.Conv2d(3, 32, 14, 14), (1, 3, 60, 58)),  # sides not a multiple of the patch: the convolution drops the rest
    ],
)
def test_same_output_as_the_convolution(conv: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        want, got = conv(x), PatchLinear(conv)(x)  # type: ignore[arg-type]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, torch.zeros_like(got))


def test_only_patch_convolutions_are_replaced() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 4, 4),  # a patch convolution
        nn.Conv2d(8, 8, 3, 1, padding=1),  # overlapping windows: a real convolution
        nn.Conv1d(8, 8, 2, 2),  # 1-d (audio): left alone
    )
    assert patch_convs_as_linear(model) == 1
    assert isinstance(model[0], PatchLinear) and isinstance(model[1], nn.Conv2d) and isinstance(model[2], nn.Conv1d)
