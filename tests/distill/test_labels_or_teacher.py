"""``labels_or_teacher``: the task's loss on labelled batches, KD from the teacher on
unlabelled ones (what fine-tuning on an unlabelled ``.npz`` or image folder trains on)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgeslim.distill import kd_loss, labels_or_teacher
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
