from __future__ import annotations

import copy
from pathlib import Path

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


class OptionalArgs(nn.Module):
    """``forward(x, mask=None, scale=1.0)``: arguments users leave at their defaults."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 2.0
    ) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if mask is not None:
            y = y * mask
        return self.fc(y.mean((2, 3))) * scale


def test_defaulted_arguments_are_traced_at_their_defaults() -> None:
    model = OptionalArgs().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model)
    required = [n.name for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    assert required == ["x"]  # mask and scale are fixed (guarded), not inputs
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(x, torch.ones(1, 8, 1, 1))  # the guard: another mask is not silently ignored


def test_declared_inputs_keep_an_optional_argument_as_an_input() -> None:
    from edgeslim.graph.trace import declare_inputs

    model = OptionalArgs().eval()
    x, mask = torch.randn(2, 3, 8, 8), (torch.rand(2, 8, 1, 1) > 0.5).float()
    declare_inputs(model, 2)
    gm = trace(copy.deepcopy(model))  # the declaration travels with copies
    assert torch.equal(gm(x, mask), model(x, mask))
    assert not torch.equal(gm(x, mask), model(x))
    gm1 = trace(model, inputs=1)  # an explicit count wins
    assert torch.equal(gm1(x), model(x))


def test_onnx_export_takes_only_the_model_inputs(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from edgeslim.export import export_onnx

    model = OptionalArgs().eval()
    path = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"]  # not `scale` as a second input
    assert type(model) is OptionalArgs  # the class is back after export
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for seed in (0, 1):
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        (out,) = sess.run(None, {"input": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), atol=1e-5, rtol=1e-4)


def test_compress_a_model_with_optional_arguments(tmp_path: Path) -> None:
    import edgeslim
    from edgeslim.data import TensorBatches
    from edgeslim.task import Task

    model = OptionalArgs().eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    task = Task(example_inputs=(x[:1],), calibration=TensorBatches(x, batch_size=16))
    recipe = {"name": "w8a8", "stages": [{"kind": "quantize", "w_bits": 8, "a_bits": 8}]}
    result = edgeslim.compress(model, recipe, task, out=tmp_path / "out")
    assert result.records[-1].value > 80.0  # agreement with the float model (%)


class PositionIds(nn.Module):
    """Hugging Face style: a position-id buffer sliced to the input's length, and token
    embeddings moved to the channel axis of a 1-D conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(50, 8), nn.Embedding(12, 8)
        self.register_buffer("position_ids", torch.arange(12)[None])
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(self.position_ids[:, : ids.shape[1]])
        return self.fc(torch.relu(self.conv(h.transpose(1, 2))).mean(-1))


def test_a_buffer_sliced_by_the_input_length_traces_and_its_conv_prunes() -> None:
    model = PositionIds().eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    gm = trace(model)  # slicing the real buffer by a traced length raised TypeError
    assert torch.equal(gm(ids), model(ids))
    groups = analyze(model, ids[:1]).groups
    conv = next(g for g in groups if "conv" in g.producers)
    assert conv.prunable and conv.consumers == ["fc"]  # the embedding width reached it
    embed = next(g for g in groups if "conv" in g.consumers)
    assert not embed.prunable and "Embedding" in embed.reason


def test_a_submodule_named_like_a_graph_module_attribute_is_named_in_a_trace_error() -> None:
    """``self.meta = nn.Linear(...)``: torch.fx builds the graph but cannot attach the
    module (``GraphModule.meta`` is a dict); one TraceError saying to rename it."""

    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.meta = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.meta(x)

    with pytest.raises(TraceError, match=r"submodule\(s\) 'meta' clash.*rename"):
        trace(Tabular())
