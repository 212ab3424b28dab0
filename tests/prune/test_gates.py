"""Learned gates are checked by what they mean: a gate at 0 *is* removing that channel.

Gates at exactly 0 must give the output of the model pruned by surgery (residual groups and
depthwise groups included), all-on gates must leave the model untouched, the expected MACs
of binary gates must be the real MACs after surgery, and a short ``train_gates`` run must
return a smaller, ordinary model that meets its MACs budget, with no hook left behind.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.data import TensorBatches
from edgeslim.errors import PruneError
from edgeslim.graph import CouplingGroup, analyze, example_input, layer_table, total_macs, trace
from edgeslim.prune import group_key, prune_groups
from edgeslim.prune.gates import GateSet, attach_gates, train_gates
from edgeslim.train.loop import TrainConfig
from edgeslim.zoo import load_zoo_model

EX = (example_input((1, 1, 28, 28)),)


@pytest.fixture(scope="module")
def batch(fmnist_test_small):  # type: ignore[no-untyped-def]
    return fmnist_test_small.images[:16]


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _switch_off(gates: GateSet, off: dict[str, list[int]]) -> dict[CouplingGroup, list[int]]:
    """Latent -1 for ``off[group key]``; returns the matching ``{group: kept}``."""
    keep: dict[CouplingGroup, list[int]] = {}
    with torch.no_grad():
        for g, lat in zip(gates.groups, gates.latent, strict=True):
            drop = off.get(group_key(g), [])
            lat[drop] = -1.0
            keep[g] = [i for i in range(g.size) if i not in drop]
    return keep


def _random_half(gates: GateSet, seed: int = 0) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        group_key(g): sorted(torch.randperm(g.size, generator=gen)[: g.size // 2].tolist())
        for g in gates.groups
    }


@pytest.mark.parametrize(
    ("name", "mode"), [("resnet20", "hard"), ("mobilenetv2-small", "hard"), ("resnet20", "soft")]
)
def test_gate_at_zero_is_surgery(name: str, mode: str, batch: torch.Tensor) -> None:
    model = load_zoo_model(name)
    gates = attach_gates(model, EX, mode=mode)  # type: ignore[arg-type]
    gates.set_progress(1.0)  # binary forward in both modes
    real = _half_off_is_surgery(model, gates, batch)
    assert round(float(gates.expected_macs().detach())) == real


def _half_off_is_surgery(model: nn.Module, gates: GateSet, batch: torch.Tensor) -> int:
    """Half the gates of every group at 0 compute what surgery removing those channels
    computes, and the gates count its MACs exactly; returns them."""
    keep = _switch_off(gates, _random_half(gates))
    with torch.no_grad():
        gated = model(batch)
    gates.remove()
    pruned = prune_groups(copy.deepcopy(model), keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch), gated, atol=1e-4, rtol=1e-4)
    real = total_macs(layer_table(pruned, *EX))
    assert gates.macs_of(keep) == real
    return real


def test_single_channels_of_residual_and_depthwise_groups(batch: torch.Tensor) -> None:
    """One channel off in a residual group (resnet20 stem + layer1 adds) and in an
    expansion group read through a depthwise conv with BN and ReLU6 (mobilenetv2)."""
    cases = {"resnet20": {"conv1": [3]}, "mobilenetv2-small": {"features.3.conv.0.0": [7]}}
    for name, off in cases.items():
        model = load_zoo_model(name)
        graph = analyze(model, *EX)
        (group,) = [g for g in graph.groups if g.producers and group_key(g) in off]
        roles = {m.role for m in group.members}
        assert ("depthwise" in roles) if name != "resnet20" else len(group.producers) > 1
        with attach_gates(model, EX, groups=[group]) as gates:
            keep = _switch_off(gates, off)
            with torch.no_grad():
                gated = model(batch)
        pruned = prune_groups(copy.deepcopy(model), keep)
        with torch.no_grad():
            torch.testing.assert_close(pruned(batch), gated, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(model(batch), gated, atol=1e-4)  # the gate did matter


def test_all_on_gates_leave_the_model_unchanged(batch: torch.Tensor) -> None:
    model = load_zoo_model("resnet20")
    with torch.no_grad():
        ref = model(batch)
    keys = set(model.state_dict())
    gates = attach_gates(model, EX)
    with torch.no_grad():
        for p in (0.0, 0.5, 1.0):
            gates.set_progress(p)
            assert torch.equal(model(batch), ref)  # hard mode: exactly 1 at every progress
    soft = attach_gates(copy.deepcopy(model), EX, mode="soft")
    with torch.no_grad():  # σ(k0) ≈ 0.993 per consumer: scaled logits, same predictions
        assert torch.equal(soft.model(batch).argmax(1), ref.argmax(1))
        soft.set_progress(1.0)
        assert torch.equal(soft.model(batch), ref)
    assert set(model.state_dict()) == keys
    gates.remove()
    assert _hooks(model) == 0


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_gradients_reach_every_latent_gate(mode: str, batch: torch.Tensor) -> None:
    """Also the gates already off: pruned channels can come back (ABP's recoverability)."""
    model = load_zoo_model("resnet20").train()
    gates = attach_gates(model, EX, k0=1.0, mode=mode)  # type: ignore[arg-type]
    _switch_off(gates, _random_half(gates))
    gates.set_progress(0.2)
    loss = nn.functional.cross_entropy(model(batch), torch.arange(16) % 10)
    (loss + gates.macs_penalty(0.9)).backward()
    for g, lat in zip(gates.groups, gates.latent, strict=True):
        assert lat.grad is not None, group_key(g)
        assert bool((lat.grad != 0).all()), group_key(g)


def test_kept_tops_up_to_the_budget_and_never_empties_a_group() -> None:
    model = load_zoo_model("resnet20")
    gates = attach_gates(model, EX)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lat in gates.latent:
            lat.copy_(torch.rand(lat.shape, generator=gen) + 0.1)  # all on, distinct
        gates.latent[0][:] = -1.0  # a whole group off: keeps its best channel
    keep = gates.kept()
    assert len(keep[gates.groups[0]]) == 1
    target = gates.total_macs // 2
    keep = gates.kept(target)
    assert gates.macs_of(keep) <= target
    assert all(len(v) >= 1 for v in keep.values())
    rest = list(zip(gates.groups[1:], gates.latent[1:], strict=True))
    low = min(float(lat.detach().min()) for _, lat in rest)  # the lowest latent went first
    assert all(float(lat.detach()[keep[g]].min()) > low for g, lat in rest)
    with pytest.raises(PruneError, match="cannot reach"):
        gates.kept(1000)


def test_kept_brings_back_the_best_switched_off_channels_into_the_band() -> None:
    """Gates that switched off far more than the budget asks (a tiny model, a short run)
    get their highest-latent channels back until the MACs are within the floor, never past
    the ceiling; without a floor, the gates' structure is kept as trained."""
    model = load_zoo_model("resnet20")
    gates = attach_gates(model, EX)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lat in gates.latent:
            lat.copy_(torch.rand(lat.shape, generator=gen) - 0.7)  # about 70% off
    as_trained = gates.macs_of(gates.kept())
    total = gates.total_macs
    target, floor, ceiling = int(0.7 * total), int(0.68 * total), int(0.72 * total)
    assert as_trained < floor  # the gates overshot the -30% budget
    assert gates.macs_of(gates.kept(target)) == as_trained
    keep = gates.kept(target, floor, ceiling)
    assert floor <= gates.macs_of(keep) <= ceiling
    for g, lat in zip(gates.groups, gates.latent, strict=True):
        on = lat.detach() > 0
        assert bool(on[keep[g]].sum() == on.sum()), "an on-gate channel was dropped"
    # the highest switched-off gate comes back first (one channel is far narrower than the
    # 4-point band, so it always fits)
    best = max(
        ((float(lat.detach()[i]), g, i) for g, lat in zip(gates.groups, gates.latent, strict=True)
         for i in range(len(lat)) if float(lat.detach()[i]) <= 0),
        key=lambda t: t[0],
    )  # fmt: skip
    assert best[2] in keep[best[1]]


def test_train_gates_meets_the_budget(fmnist_test_small) -> None:  # type: ignore[no-untyped-def]
    model = load_zoo_model("resnet20")
    teacher = load_zoo_model("resnet20")
    before = total_macs(layer_table(model, *EX))
    config = TrainConfig(epochs=1, batch_size=128, lr=0.01)
    data = fmnist_test_small
    train = TensorBatches(data.images, data.labels, 128, shuffle=True)
    pruned, plan, history = train_gates(
        model, EX, train, config, macs_reduction=0.5, teacher=teacher
    )
    assert pruned is model and _hooks(model) == 0 and _hooks(teacher) == 0
    after = total_macs(layer_table(pruned, *EX))
    assert after <= 0.52 * before
    assert history[-1]["macs_reduction"] == pytest.approx(1 - after / before)
    assert 0 < history[-1]["gates_on"] <= 1
    assert plan.keep and all(len(v) >= 1 for v in plan.keep.values())
    trace(pruned)
    with torch.no_grad():
        assert pruned(fmnist_test_small.images[:4]).shape == (4, 10)


def test_refuses_groups_it_cannot_gate() -> None:
    model = load_zoo_model("resnet20")
    fixed = [g for g in analyze(model, *EX).groups if not g.prunable]
    with pytest.raises(PruneError, match="cannot gate"):
        attach_gates(model, EX, groups=fixed[:1])
    with pytest.raises(PruneError, match="macs_reduction"):
        train_gates(model, EX, None, TrainConfig(), macs_reduction=1.0)  # type: ignore[arg-type]
    assert _hooks(model) == 0


@pytest.mark.parametrize(("seed", "reduction"), [(0, 0.5), (1, 0.7), (2, 0.85), (3, 0.9)])
def test_rounded_widths_meet_the_budget_and_keep_the_highest_gates(
    seed: int, reduction: float
) -> None:
    model = load_zoo_model("mobilenetv2-small")
    with attach_gates(model, EX, round_to=8) as gates:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lat in gates.latent:
                lat.copy_(torch.randn(lat.shape, generator=gen) + 3.0)  # all on: budget binds
        # At -85/90% the budget leaves groups below 8 channels: raised to 8, paid elsewhere.
        target = round((1 - reduction) * gates.total_macs)
        keep = gates.kept(target)
        assert gates.macs_of(keep) <= target
        assert gates.macs_of(keep) > target - 0.1 * gates.total_macs  # rounding up filled it
        for g, lat in zip(gates.groups, gates.latent, strict=True):
            n = len(keep[g])
            assert n % 8 == 0 or n == g.size, (group_key(g), n, g.size)
            kept_min = float(lat.detach()[keep[g]].min())
            dropped = [i for i in range(g.size) if i not in keep[g]]
            if dropped:
                assert kept_min >= float(lat.detach()[dropped].max())


class _TinyUNet(nn.Module):
    """An encoder-decoder whose decoder upsamples with a transposed conv (weight
    ``(in, out, k, k)``, the other way round from a conv's) and concatenates a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        return self.out(self.dec(torch.cat([self.up(self.mid(a)), a], 1)))


def test_gates_of_a_transposed_conv_are_surgery(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _TinyUNet().eval()
    gates = attach_gates(model, EX)
    assert any(m.fqn == "up" for g in gates.groups for m in g.members)
    gates.set_progress(1.0)
    _half_off_is_surgery(model, gates, batch)


class _GroupNormNet(nn.Module):
    """Convs under GroupNorms (2 channels per group): gated and pruned in whole groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.GroupNorm(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def test_gates_of_groupnorm_groups_are_surgery(batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _GroupNormNet().eval()
    gates = attach_gates(model, EX)
    assert {(g.size, g.unit) for g in gates.groups} == {(4, 2), (8, 2)}
    gates.set_progress(1.0)
    _half_off_is_surgery(model, gates, batch)


def test_an_unreachable_target_is_refused_before_training() -> None:
    """Heads are not gated: most of a transformer's MACs are out of the gates' reach. The
    run must say so before any training step, leave no hook and no changed weight."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), nn.Flatten(),
        nn.Linear(8 * 32, 4),
    ).eval()  # fmt: skip
    x = torch.randn(16, 8, 32)
    before = copy.deepcopy(model.state_dict())
    data = TensorBatches(x, torch.zeros(16, dtype=torch.long), batch_size=8)
    with pytest.raises(PruneError, match=r"cannot remove 90%.*not gated.*method: rank"):
        train_gates(model, (x[:1],), data, TrainConfig(epochs=1), macs_reduction=0.9)
    assert _hooks(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_without_gateable_groups_is_told_why() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.GroupNorm(1, 8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4)
    )
    model(EX[0])
    with pytest.raises(PruneError, match=r"no prunable channel group to gate.*GroupNorm"):
        attach_gates(model.eval(), EX)


def test_a_recurrent_model_is_told_which_layer_keeps_its_groups_ungated() -> None:
    """A Linear -> GRU -> Linear classifier: its two channel groups span the GRU, which
    gates do not scale; the refusal named only the output head."""

    class GruClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.gru, self.fc = nn.Linear(12, 32), nn.GRU(32, 32), nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.gru(torch.relu(self.proj(x)))
            return self.fc(out[-1])

    with pytest.raises(PruneError, match=r"group 'gru' \(32 channels\): it spans 'gru' \(GRU\)"):
        attach_gates(GruClassifier().eval(), (torch.randn(16, 1, 12),))


class MasksPerSampleInTraining(nn.Module):
    """wav2vec2's SpecAugment: in training mode, a mask drawn per sample in Python (a loop
    over the batch), which no batch-free graph can hold."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if self.training:
            h = h * torch.stack([torch.ones(h.shape[1:]) for _ in range(h.shape[0])])
        return self.fc(h.mean((2, 3)))


def test_gates_on_a_model_with_training_only_python_code(fmnist_test_small) -> None:  # type: ignore[no-untyped-def]
    """The plan was traced with the model still in training mode: the per-sample loop
    stopped the trace after the gates had trained."""
    model = MasksPerSampleInTraining()
    data = fmnist_test_small
    train = TensorBatches(data.images[:256], data.labels[:256], 64, shuffle=True)
    pruned, plan, _ = train_gates(
        model, (data.images[:1],), train, TrainConfig(epochs=1, lr=0.01), macs_reduction=0.3
    )
    assert plan.keep and not pruned.training
    assert pruned(data.images[:4]).shape == (4, 10)


class _NarrowThenWide(nn.Module):
    """A 16-channel group (stem) before a 64-channel one (body)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 64, 3, padding=1)
        self.head = nn.Conv2d(64, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x))))).mean((2, 3))


def test_a_group_no_wider_than_round_to_stays_whole() -> None:
    """A 16-channel group at ``round_to=16`` has one allowed width, 16 (on
    mobilenetv2-imagenet gates cut one to 13, and the 112x112 expansion conv reading it
    took 0.74 ms in this machine's latency table against 0.41 ms whole). Its lowest gates
    must not narrow it; the budget is met on the wide group, in steps of 16; and
    ``attach_gates`` does not gate it at all."""
    torch.manual_seed(0)
    model, x = _NarrowThenWide().eval(), torch.randn(1, 3, 16, 16)
    graph = analyze(model, x)
    groups = [g for g in graph.prunable_groups if g.kind == "channel"]
    assert sorted(g.size for g in groups) == [16, 64]
    macs = {f: r.macs for f, r in graph.layers.items()}
    with GateSet(model, groups, macs, round_to=16) as gates:
        with torch.no_grad():
            for g, lat in zip(gates.groups, gates.latent, strict=True):
                lat.copy_(torch.linspace(0.1, 0.2, g.size) if g.size == 16 else
                          torch.linspace(1.0, 2.0, g.size))  # fmt: skip
        target = round(0.7 * gates.total_macs)
        keep = gates.kept(target)
        assert gates.macs_of(keep) <= target
        widths = {g.size: len(keep[g]) for g in gates.groups}
        assert widths[16] == 16 and widths[64] % 16 == 0 and widths[64] < 64
    with attach_gates(model, (x,), round_to=16) as gated:
        assert [g.size for g in gated.groups] == [64]
    with attach_gates(model, (x,), round_to=8) as gated:
        assert sorted(g.size for g in gated.groups) == [16, 64]
    with pytest.raises(
        PruneError, match=r"Not gated: .*\(16 channels\): no wider than round_to=64"
    ):
        attach_gates(model, (x,), round_to=64)


class _FourWidths(nn.Module):
    """Channel groups of 8, 16, 24 and 64 channels (a residual pair shares the 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 24, 3, padding=1)
        self.d = nn.Conv2d(24, 24, 3, padding=1)
        self.e = nn.Conv2d(24, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = torch.relu(self.c(x))
        x = x + torch.relu(self.d(x))
        return self.head(torch.relu(self.e(x)).mean((2, 3)))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    reduction=st.floats(0.05, 0.6),
    round_to=st.sampled_from([1, 4, 8, 16]),
    on_share=st.floats(0.2, 1.0),
)
def test_kept_widths_are_multiples_of_round_to_or_whole(
    seed: int, reduction: float, round_to: int, on_share: float
) -> None:
    """Whatever the gates say and whatever the budget, a kept width is a multiple of
    ``round_to`` or the group's whole width, the MACs meet the budget, and every group
    keeps a channel."""
    torch.manual_seed(0)
    model, x = _FourWidths().eval(), torch.randn(1, 3, 8, 8)
    graph = analyze(model, x)
    groups = [g for g in graph.prunable_groups if g.kind == "channel"]
    macs = {f: r.macs for f, r in graph.layers.items()}
    gen = torch.Generator().manual_seed(seed)
    with GateSet(model, groups, macs, round_to=round_to) as gates:
        with torch.no_grad():
            for lat in gates.latent:  # a share of the gates on, the rest off
                lat.copy_(torch.rand(lat.shape, generator=gen) - (1.0 - on_share))
        target = round((1 - reduction) * gates.total_macs)
        try:
            keep = gates.kept(target)
        except PruneError as exc:  # only when the budget is below every group's narrowest
            assert gates.macs_at_narrowest() > target, exc
            return
        assert gates.macs_of(keep) <= target
        for g in gates.groups:
            n = len(keep[g])
            assert n >= 1 and (n % round_to == 0 or n == g.size), (g.size, n, round_to)
