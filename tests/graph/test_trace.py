from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeslim.errors import TraceError
from edgeslim.graph import analyze, trace


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), DataDependent())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_untraceable_model_names_op_module_path_and_fix() -> None:
    with pytest.raises(TraceError) as err:
        trace(Outer())
    msg = str(err.value)
    assert "`body.1`" in msg and "DataDependent" in msg
    assert "if y.sum() > 0" in msg
    assert "leaf_types" in msg and "\n" not in msg


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_module_is_refused_asking_for_the_python_module(how: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 1, 8, 8)
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    with pytest.raises(TraceError, match=r"TorchScript module .* Pass the original nn.Module"):
        trace(scripted)


def test_leaf_types_keep_an_untraceable_module_whole() -> None:
    gm = trace(Outer(), leaf_types=(DataDependent,))
    assert any(n.op == "call_module" and n.target == "body.1" for n in gm.graph.nodes)
    graph_error = None
    try:
        analyze(Outer(), torch.randn(1, 1, 8, 8))
    except TraceError as exc:
        graph_error = exc
    assert graph_error is not None


def test_iterating_a_chunk_traces() -> None:
    """``for t in x.chunk(3)`` (hand-written attention) traces: the count is in the graph."""
    import torch
    from torch import nn

    from edgeslim.graph.trace import trace

    class Split(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b, c = (t * 2 for t in x.chunk(3, dim=-1))
            d, e = (t + 1 for t in torch.split(x, [4, 2], dim=-1))
            return a + b + c + d[..., :2] + e

    x = torch.randn(2, 6)
    gm = trace(Split())
    torch.testing.assert_close(gm(x), Split()(x))
