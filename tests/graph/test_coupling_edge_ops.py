"""Coupling through the operators of edge models: activations, PReLU, squeeze-excite gates,
moved channel axes (transpose, indexing) and recurrent layers."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from coupling_check import check_group
from torch import nn
from torch.nn import functional as F

from edgeslim.graph import analyze

X = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))


class ActNet(nn.Module):
    """conv a -> activation -> conv b: a's channels must pass the activation untouched."""

    def __init__(self, act: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = act
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


ACTIVATIONS: dict[str, nn.Module | Callable[[torch.Tensor], torch.Tensor]] = {
    "Hardswish": nn.Hardswish(),
    "Hardsigmoid": nn.Hardsigmoid(),
    "SiLU": nn.SiLU(),
    "GELU": nn.GELU(),
    "ReLU6": nn.ReLU6(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "Sigmoid": nn.Sigmoid(),
    "Tanh": nn.Tanh(),
    "Mish": nn.Mish(),
    "PReLU(1)": nn.PReLU(),
    "F.hardswish": F.hardswish,
    "F.hardsigmoid": F.hardsigmoid,
    "F.silu": F.silu,
    "F.gelu": F.gelu,
    "F.relu6": F.relu6,
    "F.leaky_relu": F.leaky_relu,
    "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh,
    "F.sigmoid": F.sigmoid,
    "F.tanh": F.tanh,
    "Tensor.sigmoid": lambda t: t.sigmoid(),
    "Tensor.tanh": lambda t: t.tanh(),
    "F.prelu(1)": lambda t: F.prelu(t, torch.tensor([0.25])),
}


def _passes_channels(op: nn.Module | Callable[[torch.Tensor], torch.Tensor]) -> None:
    model = ActNet(op).eval()
    group = next(g for g in analyze(model, X).groups if "a" in g.producers)
    assert group.prunable, group.reason
    assert group.consumers == ["b"]
    check_group(model, group, (X,))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_passes_channels_through(name: str) -> None:
    _passes_channels(ACTIVATIONS[name])


class PReLUChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8 * 12 * 12, 16)
        self.act_fc = nn.PReLU(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act_fc(self.fc(torch.flatten(self.act(self.a(x)), 1))))


def test_prelu_slopes_are_group_members_and_the_group_is_complete() -> None:
    model = PReLUChain().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 0.5)  # distinct slopes, so a missing slice would leak
    graph = analyze(model, X)
    for producer, prelu in (("a", "act"), ("fc", "act_fc")):
        group = next(g for g in graph.groups if producer in g.producers)
        assert (prelu, "channelwise") in {(m.fqn, m.role) for m in group.members}
        check_group(model, group, (X,))


class FunctionalPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.slope = nn.Parameter(torch.full((8,), 0.25))
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.prelu(self.a(x), self.slope))


def test_functional_prelu_with_per_channel_slopes_is_left_whole_naming_it() -> None:
    group = next(g for g in analyze(FunctionalPReLU(), X).groups if "a" in g.producers)
    assert not group.prunable
    assert "prelu" in group.reason and "nn.PReLU" in group.reason


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.b = nn.Conv2d(16, 8, 1)
        self.lin1 = nn.Linear(8, 4)
        self.lin2 = nn.Linear(4, 8)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        x = self.b(x)
        s = torch.sigmoid(self.lin2(F.relu(self.lin1(x.mean((2, 3))))))
        return self.c(s[:, :, None, None] * x)


def test_squeeze_excite_gates_couple_with_the_gated_channels() -> None:
    model = SqueezeExcite().eval()
    graph = analyze(model, X)
    block = next(g for g in graph.groups if "a" in g.producers)
    assert block.prunable and set(block.producers) == {"a", "fc2"}
    assert set(block.consumers) == {"fc1", "b"}
    linear_gate = next(g for g in graph.groups if "b" in g.producers)
    assert linear_gate.prunable and set(linear_gate.producers) == {"b", "lin2"}
    squeeze = next(g for g in graph.groups if "fc1" in g.producers)
    assert squeeze.prunable and squeeze.consumers == ["fc2"]  # its own group
    for group in graph.prunable_groups:
        check_group(model, group, (X,))


class PerChannelScale(nn.Module):
    """A learned (1, C, 1, 1) scale edgeslim does not slice: the channels stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * self.scale)


def test_broadcast_with_an_unsliceable_operand_fixes_the_channels() -> None:
    group = next(g for g in analyze(PerChannelScale(), X).groups if "a" in g.producers)
    assert not group.prunable and "broadcast" in group.reason


class Sequence1d(nn.Module):
    """(batch, C, T) -> transpose -> a linear over the features of every step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.conv(x).transpose(1, 2)  # (batch, T, 8)
        return self.fc(seq[:, 1:]).reshape(-1, 5)


def test_channel_axis_is_followed_through_transpose_and_indexing() -> None:
    model = Sequence1d().eval()
    x = torch.randn(1, 4, 10)
    group = next(g for g in analyze(model, x).groups if "conv" in g.producers)
    assert group.prunable and group.consumers == ["fc"]
    check_group(model, group, (x,))


class Rnn(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.rnn = kind(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.conv(x).transpose(1, 2))
        return self.fc(out.reshape(-1, 6))


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layer_reads_its_input_group_and_owns_its_hidden_group(
    kind: type[nn.Module],
) -> None:
    graph = analyze(Rnn(kind), torch.randn(2, 4, 10))
    features = next(g for g in graph.groups if "conv" in g.producers)
    assert features.prunable and features.consumers == ["rnn"]
    hidden = next(g for g in graph.groups if "rnn" in g.producers)
    assert hidden.prunable and hidden.size == 6 and hidden.consumers == ["fc"]


PADS: dict[str, nn.Module | Callable[[torch.Tensor], torch.Tensor]] = {
    "ZeroPad2d": nn.ZeroPad2d((0, 1, 0, 1)),  # TF "same" before a stride-2 conv
    "ConstantPad2d(0.5)": nn.ConstantPad2d(1, 0.5),
    "ReflectionPad2d": nn.ReflectionPad2d(1),
    "ReplicationPad2d": nn.ReplicationPad2d((1, 0, 1, 0)),
    "F.pad": lambda t: F.pad(t, (0, 1, 0, 1)),
    "F.pad reflect": lambda t: F.pad(t, (1, 1, 1, 1), mode="reflect"),
}


@pytest.mark.parametrize("name", list(PADS))
def test_spatial_padding_passes_channels_through(name: str) -> None:
    _passes_channels(PADS[name])


def test_padding_the_channel_axis_is_not_passed() -> None:
    model = ActNet(lambda t: F.pad(t, (0, 0, 0, 0, 0, 2))[:, :8]).eval()  # pads channels
    group = next(g for g in analyze(model, X).groups if "a" in g.producers)
    assert not group.prunable
    assert "padding" in group.reason


class TextLine(nn.Module):
    """CRNN-style: conv features of a text line, each column's channels and heights merged
    (``(N, C, H, W) -> (N, W, C*H)``) into a per-step feature vector."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.head = head
        self.rnn = nn.LSTM(8 * 12, 6, batch_first=True)
        self.fc = nn.Linear(8 * 12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.a(x))
        n, c, h, w = f.shape
        seq = f.permute(0, 3, 1, 2).reshape(n, w, c * h)
        if self.head == "lstm":
            return self.rnn(seq)[0].mean(1)
        return self.fc(seq).mean(1)


@pytest.mark.parametrize("head", ["linear", "lstm"])
def test_channels_merged_with_the_axes_after_them_pass_in_blocks(head: str) -> None:
    model = TextLine(head).eval()
    group = next(g for g in analyze(model, X).groups if "a" in g.producers)
    assert group.prunable, group.reason
    member = next(m for m in group.members if m.role == "in")
    assert member.repeat == 12  # each channel: its block of 12 heights
    if head == "linear":
        check_group(model, group, (X,))
        return
    # the recurrent layer: prune, then compare with the original whose cut channels are 0
    from edgeslim.prune.planner import prune_

    pruned, plan = prune_(copy.deepcopy(model), (X,), "l1", ratio=0.3)
    kept = plan.keep["a"]
    assert pruned.rnn.input_size == 12 * len(kept) < 96
    zeroed = copy.deepcopy(model)
    cut = [i for i in range(8) if i not in kept]
    with torch.no_grad():
        zeroed.a.weight[cut] = 0
        zeroed.a.bias[cut] = 0
        torch.testing.assert_close(pruned(X), zeroed(X), atol=1e-5, rtol=1e-4)


def test_softmax_over_another_axis_passes_and_a_final_one_is_no_warning() -> None:
    """Softmax over positions keeps each channel apart (attention pooling over time); over
    the channels it normalises them jointly. A classifier's final log_softmax is the model
    output's boundary, not a reason to warn."""
    _passes_channels(lambda t: t * torch.softmax(t, dim=-1))  # over the width

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.log_softmax(self.fc(torch.relu(self.a(x)).mean((2, 3))), dim=1)

    groups = analyze(Head().eval(), X).groups
    fc = next(g for g in groups if "fc" in g.producers)
    assert fc.reason == "model output"
    joint = ActNet(lambda t: t * torch.softmax(t, dim=1)).eval()
    a = next(g for g in analyze(joint, X).groups if "a" in g.producers)
    assert not a.prunable and "normalised jointly by softmax" in a.reason


RESIZES: dict[str, nn.Module | Callable[[torch.Tensor], torch.Tensor]] = {
    "Upsample nearest": nn.Upsample(scale_factor=2),
    "Upsample bilinear": nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    "F.interpolate size": lambda t: F.interpolate(t, size=(17, 17), mode="bilinear"),
}


@pytest.mark.parametrize("name", list(RESIZES))
def test_upsampling_passes_channels_through(name: str) -> None:
    """A feature pyramid's or a decoder's upsampling resizes each channel alone (the conv
    before it stayed whole, 'cannot prune through')."""
    _passes_channels(RESIZES[name])


class SharedMLP(nn.Module):
    """CBAM's channel attention: one MLP applied to the average- and the max-pooled map."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(16, 4, 1), nn.ReLU(), nn.Conv2d(4, 16, 1))
        self.b = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        gate = torch.sigmoid(
            self.mlp(y.mean((2, 3), keepdim=True)) + self.mlp(y.amax((2, 3), keepdim=True))
        )
        return self.b(y * gate)


def test_a_layer_called_twice_is_one_group_and_gates_once() -> None:
    """Each call's output channels are the same weights' channels: one group (two groups
    for one layer made learned gates build a 2x too long multiplier and crash)."""
    from edgeslim.prune.gates import attach_gates

    model = SharedMLP().eval()
    groups = analyze(model, X).groups
    hidden = [g for g in groups if "mlp.0" in g.producers]
    assert len(hidden) == 1 and hidden[0].prunable and hidden[0].size == 4
    check_group(model, hidden[0], (X,))
    with attach_gates(model, (X,)) as gates:
        assert gates.attached
        assert model(X).shape == (1, 8, 12, 12)  # raised: shape [1, 4, 1, 1] of size 8


class PointNetMax(nn.Module):
    """PointNet's shared per-point convs, then the max over the points taken the usual way:
    ``torch.max(x, 2)[0]`` (a (values, indices) pair), or ``x.max(2).values``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.c1, self.c2 = nn.Conv1d(3, 16, 1), nn.Conv1d(16, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = torch.max(h, 2)[0] if self.how == "getitem" else h.max(dim=2).values
        return self.fc(h)


@pytest.mark.parametrize("how", ["getitem", "values"])
def test_a_max_over_the_points_returning_indices_passes_channels(how: str) -> None:
    """Both groups prunable (c2's was fixed: 'indexing getitem along the channel axis', the
    [0] that picks the values out of the pair), and a channel cut stays isolated."""
    model, x = PointNetMax(how).eval(), torch.randn(1, 3, 40)
    groups = [g for g in analyze(model, x).groups if g.producers in (["c1"], ["c2"])]
    assert len(groups) == 2 and all(g.prunable for g in groups), [g.reason for g in groups]
    for g in groups:
        check_group(model, g, (x,))


def test_a_max_over_the_channels_is_still_a_named_refusal() -> None:
    class ChannelMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv1d(3, 16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.max(self.c(x), 1)[0].sum(1, keepdim=True)

    group = next(g for g in analyze(ChannelMax().eval(), torch.randn(1, 3, 8)).groups
                 if g.producers == ["c"])  # fmt: skip
    assert not group.prunable and "max" in group.reason


class LinearBN(nn.Module):
    """LeViT's MLP layer: a linear, then BatchNorm1d over its tokens flattened into the batch
    and ``reshape_as`` back; ``reshape_as`` made every such layer opaque (LeViT pruned to
    19.8% of its MACs at most)."""

    def __init__(self, untracked: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.bn_up = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.down, self.bn_down = nn.Linear(16, 8), nn.BatchNorm1d(8)
        self.untracked = untracked
        for bn in (self.bn_up, self.bn_down):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        shape_of = torch.zeros(x.shape[0], x.shape[1], 16) if self.untracked else h
        h = F.hardswish(self.bn_up(h.flatten(0, 1)).reshape_as(shape_of))
        h2 = self.down(h)
        return x + self.bn_down(h2.flatten(0, 1)).reshape_as(h2)


def test_reshape_as_couples_with_the_tensor_whose_shape_it_reads() -> None:
    x = torch.randn(2, 5, 8)
    model = LinearBN().eval()
    graph = analyze(model, x[:1])
    (hidden,) = [g for g in graph.prunable_groups if g.size == 16]
    assert {m.fqn for m in hidden.members} == {"up", "bn_up", "down"}
    check_group(model, hidden, (x,))
    untracked = LinearBN(untracked=True).eval()
    fixed = analyze(untracked, x[:1])
    assert not [g for g in fixed.prunable_groups if g.size == 16]
    reasons = [g.reason for g in fixed.groups if g.size == 16]
    assert any("reshape_as" in r for r in reasons)
