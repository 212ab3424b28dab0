"""kd_loss: Hinton distillation on the first output, labelled or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.train.distill import kd_loss


class Counting(nn.Module):
    """A two-input teacher that counts calls of every copy of it and returns (logits, extra)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        type(self).calls += 1
        assert not self.training and not torch.is_grad_enabled()
        return self.fc(torch.cat([a, b], 1)), a


def test_kd_without_labels_is_the_soft_term_and_with_labels_the_mix() -> None:
    teacher = Counting().eval()
    inputs = (torch.randn(8, 4), torch.randn(8, 2))
    student = torch.randn(8, 5, requires_grad=True)
    with torch.no_grad():
        t_logits = teacher(*inputs)[0]
    T, alpha = 3.0, 0.7
    soft = T**2 * F.kl_div(
        F.log_softmax(student / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean"
    )
    loss = kd_loss(teacher, alpha=alpha, temperature=T)
    unlabelled = loss((student, torch.zeros(1)), None, inputs)  # a tuple: first output is used
    torch.testing.assert_close(unlabelled, soft)
    unlabelled.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    y = torch.randint(0, 5, (8,))
    torch.testing.assert_close(
        loss(student, y, inputs), alpha * soft + (1 - alpha) * F.cross_entropy(student, y)
    )
    hard = kd_loss(teacher, alpha, T, hard_loss=lambda out, target: out.sum() * 0)
    torch.testing.assert_close(hard(student, y, inputs), alpha * soft)


def test_the_teacher_is_a_frozen_copy_run_once_per_batch() -> None:
    teacher = Counting().train()
    loss = kd_loss(teacher)
    before = Counting.calls
    student = torch.randn(2, 5, requires_grad=True)
    loss(student, torch.tensor([0, 1]), (torch.randn(2, 4), torch.randn(2, 2))).backward()
    assert Counting.calls == before + 1  # the copy ran once, in eval mode without grad
    assert teacher.training and all(
        p.grad is None and p.requires_grad for p in teacher.parameters()
    )
