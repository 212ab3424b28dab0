"""``labels_or_teacher``: the task's loss on labelled batches, the teacher's outputs on
unlabelled ones (what fine-tuning on an unlabelled ``.npz`` or image folder trains on): KD
for class scores, ``output_match_loss`` for outputs that are values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgeslim.distill import kd_loss, labels_or_teacher, output_match_loss
from edgeslim.train.loop import cross_entropy


def test_labelled_batches_keep_the_task_loss_unlabelled_ones_distil() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(6, 4).eval()
    student = copy.deepcopy(teacher)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    loss = labels_or_teacher(cross_entropy, teacher)
    out = student(x)
    assert torch.equal(loss(out, y, (x,)), cross_entropy(out, y))
    # the student computes what the teacher does: nothing left to distil
    assert float(loss(out, None, (x,))) < 1e-6
    with torch.no_grad():
        student.weight.add_(0.5 * torch.randn_like(student.weight))
    out = student(x)
    soft = loss(out, None, (x,))
    assert float(soft) > 1e-3
    assert torch.allclose(soft, kd_loss(teacher, 1.0)(out, None, (x,)))
    soft.backward()  # it trains the student
    assert student.weight.grad is not None and float(student.weight.grad.abs().sum()) > 0


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), 100.0 * self.b(x)  # outputs of very different scales


def test_outputs_that_are_values_are_matched_each_at_its_own_scale() -> None:
    torch.manual_seed(0)
    teacher = TwoOutputs().eval()
    student = copy.deepcopy(teacher)
    x = torch.randn(16, 6)
    loss = labels_or_teacher(cross_entropy, teacher, values=True)
    assert float(loss(student(x), None, (x,))) < 1e-10
    with torch.no_grad():  # the same relative change to each output: the same share of loss
        student.a.weight.mul_(1.1)
        student.a.bias.mul_(1.1)
    one = float(output_match_loss(teacher)(student(x), None, (x,)))
    with torch.no_grad():
        student.b.weight.mul_(1.1)
        student.b.bias.mul_(1.1)
    both = float(output_match_loss(teacher)(student(x), None, (x,)))
    assert both == pytest.approx(2 * one, rel=1e-4)  # the 100x output does not dominate
    out = student(x)
    value = loss(out, None, (x,))
    value.backward()
    assert student.b.weight.grad is not None and float(student.b.weight.grad.abs().sum()) > 0


def test_kd_also_teaches_every_other_output() -> None:
    """A classifier with a regression head beside it, distilled on unlabelled batches: the
    head drifted from its teacher takes it back (KD read the first output only, so the head
    got no gradient and stayed where it was)."""
    torch.manual_seed(0)
    teacher = TwoOutputs().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.b.weight.add_(0.3 * torch.randn_like(student.b.weight))
    x = torch.randn(64, 6)
    loss = kd_loss(teacher, alpha=0.9)

    def head_error() -> float:
        with torch.no_grad():
            return float((student(x)[1] - teacher(x)[1]).pow(2).mean())

    before = head_error()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss(student(x), None, (x,)).backward()
        opt.step()
    assert head_error() < 0.1 * before
    assert set(loss.last) == {"kd", "kd_outputs"}
    # a student whose outputs differ from the teacher's: the first alone, said once
    other = kd_loss(teacher)
    with pytest.warns(UserWarning, match="student's 1 outputs do not match the teacher's 2"):
        other(student.a(x), None, (x,))
    assert set(other.last) == {"kd"}
