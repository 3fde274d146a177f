"""OneDnnLinear: a row's result does not depend on the rows beside it, and equals nn.Linear to float32 precision."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from services.decoder.engine.builtin.linear import OneDnnLinear, onednn_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(torch.device("cpu"), torch.float32), reason="no oneDNN in this torch")


@pytest.mark.parametrize("shape", [(1024, 2560), (2560, 1024), (128, 256)])
def test_rows_are_batch_invariant_and_match_nn_linear(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(*shape)
    x = torch.randn(32, shape[0])
    with torch.inference_mode():
        want = linear(x)
        fast = OneDnnLinear(linear)
        alone = torch.cat([fast(x[i : i + 1]) for i in range(32)])
        for rows in (1, 2, 3, 7, 16, 32):
            assert torch.equal(fast(x[:rows]), alone[:rows]), f"rows changed with a batch of {rows}"
        assert torch.equal(fast(x[None, :5])[0], alone[:5])  # [batch, seq, hidden] inputs too
        torch.testing.assert_close(alone, want, rtol=1e-5, atol=1e-4)


def test_only_layers_over_the_threshold_are_swapped() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(512, 512, bias=False)))
    assert use_onednn_linears(model, min_weights=1000) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[2][0], OneDnnLinear)
    x = torch.randn(3, 512)
    assert model[2][0].bias is None and model[2][0](x).shape == (3, 512)
