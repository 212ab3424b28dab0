"""Speed-only rewrites of exported graphs compute exactly what torch computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.export.onnx import export_onnx
from edgeslim.runtime.ort import ort_session


class _Prelu(nn.Module):
    def __init__(self, slopes: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, len(slopes), 3, padding=1)
        self.act = nn.PReLU(len(slopes))
        self.fc = nn.Linear(len(slopes), 4)
        self.act2 = nn.PReLU()
        with torch.no_grad():
            self.act.weight.copy_(slopes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.fc(self.act(self.conv(x)).mean(dim=(2, 3))))


@pytest.mark.parametrize(
    ("slopes", "op"),
    [
        (torch.tensor([0.0, 0.25, 1.0, -0.5]), "Max"),  # every slope <= 1
        (torch.tensor([1.0, 1.5, 3.0, 2.0]), "Min"),  # every slope >= 1
        (torch.tensor([0.1, 2.0, -1.0, 1.0]), "Where"),  # mixed
    ],
)
def test_prelu_becomes_max_min_or_where_and_stays_exact(
    slopes: torch.Tensor, op: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = _Prelu(slopes).eval()
    x = torch.randn(8, 3, 10, 10)
    path = export_onnx(model, (x[:1],), tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "PRelu" not in ops and op in ops
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
