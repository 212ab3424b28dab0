"""PyTorch checkpoints (``torch.save``, ``.pt``/``.pth``): read with ``weights_only=True``,
through the usual training-script nesting and DataParallel's ``module.`` prefix; a pickled
model object, a truncated file or an unrecognised layout is refused, the model untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.checkpoint import load_state, save_state
from edgeslim.errors import CheckpointError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "layout", ["plain", "state_dict", "model", "model_state_dict", "dataparallel", "legacy"]
)
def test_a_torch_state_dict_loads_in_every_usual_layout(tmp_path: Path, layout: str) -> None:
    src = _model(1)
    state = src.state_dict()
    obj: object = state
    if layout in ("state_dict", "model", "model_state_dict"):
        obj = {layout: state, "epoch": 7, "best_acc": 0.9}
    elif layout == "dataparallel":
        obj = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "w.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=layout != "legacy")
    dst = _model(2)
    assert not _same(src, dst)
    load_state(dst, path)
    assert _same(src, dst)


def test_a_pickled_model_object_is_refused_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "whole.pth"
    torch.save(_model(1), path)  # the whole module: unpickling it would import and run code
    dst = _model(2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"holds more than tensors.*state_dict"):
        load_state(dst, path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_a_truncated_or_unrecognised_torch_file_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "w.pth"
    torch.save(_model(1).state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        load_state(_model(2), cut)
    odd = tmp_path / "odd.pth"
    torch.save({"encoder": {"w": 1}, "epoch": 3}, odd)
    with pytest.raises(CheckpointError, match=r"top level: \['encoder', 'epoch'\]"):
        load_state(_model(2), odd)
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 3).state_dict(), other)  # another model's weights
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_state(_model(2), other)


def test_constants_fx_stored_while_tracing_are_not_weights(tmp_path: Path) -> None:
    """fx numbers the tensors a forward builds (``torch.tensor(x.size(-1))``) by how many
    traces the model saw: the saved file held ``_tensor_constant0`` where the model
    rebuilt on load had ``_tensor_constant1``, and the load was refused."""
    import torch.fx as fx

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) / torch.tensor(2.0)

    first = fx.symbolic_trace(Scaled())
    path = tmp_path / "m.safetensors"
    save_state(first, path)
    again = Scaled()
    again._tensor_constant0 = torch.tensor(0.0)  # taken: the next trace's constant is 1
    second = fx.symbolic_trace(again)
    assert "_tensor_constant1" in second.state_dict()
    load_state(second, path)
    x = torch.randn(3, 4)
    torch.testing.assert_close(second(x), first(x))
    with pytest.raises(CheckpointError):  # a weight that does not fit is still refused
        load_state(fx.symbolic_trace(nn.Sequential(nn.Linear(4, 5))), path)


def test_a_torchscript_archive_is_named_as_one_not_called_corrupt(tmp_path: Path) -> None:
    """torch.jit.save writes a zip that weights_only refuses: it read as 'more than tensors,
    or corrupt', with no word on how to get the weights out of it."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_model(1)), str(path))
    dst = _model(2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"TorchScript archive.*torch\.jit\.load"):
        load_state(dst, path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
