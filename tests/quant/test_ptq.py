"""ptq calibrates from plain iterables of input batches, several inputs included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.quant import w8a8
from edgeslim.quant.modules import ActQuant
from edgeslim.quant.ptq import ptq


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(4, 16), nn.Linear(3, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.a(x) + self.b(z)))


def inputs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), 5.0 * torch.randn(n, 3, generator=g)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_a_two_input_model_calibrates_from_an_iterable_of_tuples(bias_correction: bool) -> None:
    model = TwoInputs().eval()
    batches = [inputs(32, seed) for seed in range(4)]
    q = ptq(model, w8a8(), iter(batches), bias_correction=bias_correction)  # read once
    acts = [m for m in q.modules() if isinstance(m, ActQuant)]
    assert len(acts) >= 2
    test = inputs(256, 9)

    def error(quantized: nn.Module) -> float:
        with torch.no_grad():
            ref = model(*test)
            return float((quantized(*test) - ref).abs().mean() / ref.abs().mean())

    assert error(q) < 0.03
    # the second input's range comes from its own batches: calibrate it too small and it clips
    assert error(ptq(model, w8a8(), [(x, z / 5) for x, z in batches])) > 0.2
    # (inputs, target) pairs are read as inputs; the target is ignored
    paired = ptq(model, w8a8(), [(b, torch.zeros(32)) for b in batches])
    with torch.no_grad():
        torch.testing.assert_close(paired(*test), ptq(model, w8a8(), batches)(*test))
