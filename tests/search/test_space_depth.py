"""Depth in the search space: residual branches kept (1) or removed (0) per policy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeslim.export.qdq import export_qdq
from edgeslim.runtime.kernels import optimized_graph
from edgeslim.runtime.ort import ort_session
from edgeslim.search import Evaluator, Policy, SearchError, SearchSpace
from edgeslim.search.space import DEPTH_PREFIX
from edgeslim.task import Task
from edgeslim.train.loop import TrainConfig, evaluate


def _without_branch(space: SearchSpace, w_bits: int = 8) -> tuple[Policy, Policy]:
    kept = space.uniform(w_bits, 8, 1.0)
    (group,) = [g for g in space.groups if g.key.startswith(DEPTH_PREFIX)]
    return kept, kept.replace(keep={group.key: 0.0})


def test_removing_the_branch_cuts_costs_and_exports_to_int8(
    digits_model: nn.Module, digits_task: Task, tmp_path: Path
) -> None:
    # 7-bit weights: computed exactly by x86 int8 kernels without VNNI too
    space = SearchSpace.build(digits_model, digits_task, w_bits=(4, 7), keep=(1.0,), depth=True)
    assert [b.name for b in space.branches] == ["bn3"]  # conv2 -> bn2 -> conv3 -> bn3
    kept, removed = _without_branch(space, 7)
    full, cut = space.costs(kept), space.costs(removed)
    conv_macs = sum(lc.macs for lc in space.layers if lc.fqn in ("conv2", "conv3"))
    assert full.macs - cut.macs == conv_macs
    assert cut.size < full.size
    model = space.apply(removed)
    x = digits_task.example_inputs[0]
    path = export_qdq(model, (x,), tmp_path / "cut.onnx")
    whole = export_qdq(space.apply(kept), (x,), tmp_path / "whole.onnx")
    ops, ops_whole = (
        Counter(n.op_type for n in onnx.load(str(p)).graph.node) for p in (path, whole)
    )
    assert ops["Conv"] == ops_whole["Conv"] - 2  # conv2 and conv3 gone from the file
    fused = Counter(
        n.op_type for n in onnx.load(str(optimized_graph(path, tmp_path / "o"))).graph.node
    )
    assert fused["QLinearAdd"] == 1 and "Add" not in fused  # shortcut + constant, on integers
    sess = ort_session(path)
    batch = torch.cat([inputs[0] for inputs in digits_task.calibration_batches(64)])[:8]
    got = sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_a_chosen_policy_is_returned_fine_tuned_as_it_was_scored(
    digits_model: nn.Module, digits_task: Task
) -> None:
    space = SearchSpace.build(digits_model, digits_task, w_bits=(8,), keep=(1.0,), depth=True)
    _, removed = _without_branch(space)
    cfg = TrainConfig(epochs=2, lr=0.005, batch_size=64, seed=0, channels_last=False)
    ev = Evaluator(space, finetune=cfg, finetune_limit=512)
    result = ev.evaluate(removed)
    tuned = ev.prepare(removed)
    val = digits_task.validation
    assert val is not None
    assert evaluate(tuned, val) == pytest.approx(result.metric, abs=1e-6)
    assert evaluate(tuned, val) > evaluate(space.apply(removed), val)


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def test_depth_on_a_model_without_residual_branches_is_refused(digits_task: Task) -> None:
    with pytest.raises(SearchError, match="no removable residual branch"):
        SearchSpace.build(_Chain().eval(), digits_task, keep=(1.0,), depth=True)


def test_a_cut_policy_is_fine_tuned_in_float_first_then_quantized(
    digits_model: nn.Module, digits_task: Task, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgeslim.quant.modules import ActQuant

    space = SearchSpace.build(digits_model, digits_task, w_bits=(4, 8), keep=(1.0,), depth=True)
    kept, removed = _without_branch(space)
    cfg = TrainConfig(epochs=1, lr=0.005, batch_size=64, seed=0, channels_last=False)
    ev = Evaluator(space, finetune=cfg, finetune_limit=128)
    passes: list[bool] = []  # per fine-tuning pass: was the model quantized?
    real = Evaluator._finetune

    def spy(self: Evaluator, model: nn.Module) -> None:
        passes.append(any(isinstance(m, ActQuant) for m in model.modules()))
        real(self, model)

    monkeypatch.setattr(Evaluator, "_finetune", spy)
    ev.prepare(removed)
    assert passes == [False, True]  # BatchNorm live for the cut, then the QAT pass
    passes.clear()
    ev.prepare(kept.replace(w_bits={"conv2": 4}))
    assert passes == [True]  # bits only: the QAT pass alone
