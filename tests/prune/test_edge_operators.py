"""Structured pruning on the operators real edge models use: PReLU, squeeze-excite gates,
recurrent layers (LSTM, GRU and their cells).

Every pruned model must run, keep its output shape, and cost exactly what an independent
count of its new shapes says (:func:`expected_macs`, written here from the layer formulas,
not from ``edgeslim.graph.layers``) and what the cost model reports.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.cost.analytic import cost_report
from edgeslim.errors import PruneError
from edgeslim.graph import analyze
from edgeslim.prune import load_pruned, prune_, prune_groups, save_pruned
from edgeslim.prune.planner import MacModel, PruneWarning, measure_plan
from edgeslim.zoo.edge import mobilenetv3_small, prelu_cnn

GATES = {nn.LSTM: 4, nn.LSTMCell: 4, nn.GRU: 3, nn.GRUCell: 3}


def expected_macs(model: nn.Module, *args: Any) -> int:
    """MACs from each layer's own shapes: conv ``out * cin/groups * k``, linear
    ``out * in``, recurrent ``steps * G * H * (I + H)`` (steps = batch x time) per layer
    and direction (a later layer reads ``I = directions * H``)."""
    total = 0

    def hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        nonlocal total
        o = out[0] if isinstance(out, tuple) else out
        if isinstance(m, nn.modules.conv._ConvNd):
            total += o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.Linear):
            total += o.numel() * m.in_features
        elif type(m) in GATES:
            steps = inp[0].numel() // m.input_size
            sides = 2 if getattr(m, "bidirectional", False) else 1
            reads = [m.input_size] + [sides * m.hidden_size] * (getattr(m, "num_layers", 1) - 1)
            for n_in in reads:  # every layer, in each direction
                total += sides * steps * GATES[type(m)] * m.hidden_size * (n_in + m.hidden_size)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return total


# --- tiny models -------------------------------------------------------------------------


class SeqNet(nn.Module):
    """Conv1d features -> a recurrent layer with no state passed (internal) -> linear."""

    def __init__(self, kind: type[nn.Module], batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.conv = nn.Conv1d(8, 32, 3, padding=1)
        self.rnn = kind(32, 48, batch_first=batch_first)
        self.fc = nn.Linear(48, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = torch.relu(self.conv(x))  # (batch, 32, time)
        seq = seq.transpose(1, 2) if self.batch_first else seq.permute(2, 0, 1)
        out, _ = self.rnn(seq)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


class CellNet(nn.Module):
    """A streaming step: conv + BN features, mean over time, one cell step from a zero state
    built inside forward from ``self.cell.hidden_size`` (so it follows pruning)."""

    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 32, 5, padding=2)
        self.bn = nn.BatchNorm1d(32)
        self.cell = kind(32, 40)
        self.fc = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.relu(self.bn(self.conv(x))).mean(dim=2)
        h = feats.new_zeros(feats.shape[0], self.cell.hidden_size)
        if isinstance(self.cell, nn.LSTMCell):
            c = feats.new_zeros(feats.shape[0], self.cell.hidden_size)
            h, c = self.cell(feats, (h, c))
        else:
            h = self.cell(feats, h)
        return self.fc(h)


class StatefulLstm(nn.Module):
    """The caller passes ``(h0, c0)`` and gets ``(h_n, c_n)`` back (a streaming interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.fc = nn.Linear(24, 6)

    def forward(
        self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, (h, c) = self.rnn(torch.relu(self.conv(x)).transpose(1, 2), (h0, c0))
        return self.fc(out[:, -1]), h, c


class StatefulCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.cell = nn.GRUCell(16, 24)
        self.fc = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(torch.relu(self.conv(x)).mean(dim=2), h)
        return self.fc(h), h


class DeepLstm(nn.Module):
    def __init__(self, layers: int = 2, bidirectional: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, 24, layers, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(24 * (2 if bidirectional else 1), 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.fc(out[:, -1])


class LiteralState(nn.Module):
    """A state sized with a literal 40, which no trace can tell from ``hidden_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv1d(8, 16, 3, padding=1)
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.cell = nn.GRUCell(32, 40)
        self.fc = nn.Linear(40, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = torch.relu(self.conv(torch.relu(self.conv0(x)))).mean(dim=2)
        return self.fc(self.cell(feats, feats.new_zeros(feats.shape[0], 40)))


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1)
        self.act_a = nn.PReLU(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.act_b = nn.PReLU()  # one shared slope: nothing to slice
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act_b(self.b(self.act_a(self.a(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


class SENet(nn.Module):
    """conv -> SE (conv gate, hardsigmoid) and SE written with linears + view -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 24, 3, padding=1)
        self.fc1 = nn.Conv2d(24, 8, 1)
        self.fc2 = nn.Conv2d(8, 24, 1)
        self.mid = nn.Conv2d(24, 32, 3, padding=1)
        self.lin1 = nn.Linear(32, 8)
        self.lin2 = nn.Linear(8, 32)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.stem(x))
        gate = nn.functional.hardsigmoid(
            self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1))))
        )
        x = self.mid(x * gate)
        b, c = x.shape[0], x.shape[1]
        s = torch.sigmoid(self.lin2(torch.relu(self.lin1(x.mean((2, 3))))))
        x = s.view(b, c, 1, 1) * x
        return self.head(x).mean((2, 3))


SEQ = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
IMG = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _seeded(factory: Any, *args: Any) -> nn.Module:
    torch.manual_seed(0)
    return factory(*args).eval()


def _prune_and_check(model: nn.Module, args: tuple[torch.Tensor, ...], target: float) -> float:
    """``prune_`` to ``target``; the pruned model runs at batch 2 and costs what it should."""
    before = cost_report(model, *args).macs
    assert before == expected_macs(model, *args)
    batch2 = tuple(torch.cat([a, a]) for a in args)
    shape = model(*batch2).shape
    _, plan = prune_(model, args, "l1", macs_reduction=target)
    assert plan.keep, "nothing was pruned"
    after = cost_report(model, *args).macs
    assert after == expected_macs(model, *args)  # the cost model counts the new shapes
    assert model(*batch2).shape == shape
    return 1.0 - after / before


# --- the reference models at -30% MACs ---------------------------------------------------


@pytest.fixture(scope="module")
def mobilenetv3_pruned() -> tuple[nn.Module, nn.Module, float]:
    """``(original, pruned to -30% MACs, achieved reduction)``, shared: one prune_ run."""
    original = _seeded(mobilenetv3_small)
    model = copy.deepcopy(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruneWarning)  # no SE block is left whole any more
        reduction = _prune_and_check(model, (IMG,), 0.3)
    return original, model, reduction


@pytest.mark.parametrize(
    ("factory", "args"),
    [
        (prelu_cnn, (IMG,)),
        (lambda: SeqNet(nn.LSTM), (SEQ,)),
        (lambda: CellNet(nn.LSTMCell), (SEQ,)),
    ],
    ids=["prelu_cnn", "lstm", "lstm_cell"],
)
def test_prune_30_percent_lands_on_target(factory: Any, args: tuple[torch.Tensor, ...]) -> None:
    model = _seeded(factory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruneWarning)  # nothing left whole for lack of support
        reduction = _prune_and_check(model, args, 0.3)
    assert abs(reduction - 0.3) <= 0.02, reduction


def test_mobilenetv3_prunes_30_percent(
    mobilenetv3_pruned: tuple[nn.Module, nn.Module, float],
) -> None:
    reduction = mobilenetv3_pruned[2]
    assert abs(reduction - 0.3) <= 0.02, reduction


# --- one test per operator ---------------------------------------------------------------


def test_prelu_slopes_are_sliced_with_their_channels(tmp_path: Path) -> None:
    model = _seeded(PReLUNet)
    graph = analyze(model, IMG)
    group = next(g for g in graph.groups if g.producers == ["a"])
    assert group.prunable and ("act_a", "channelwise") in {(m.fqn, m.role) for m in group.members}
    assert not any(m.fqn == "act_b" for g in graph.groups for m in g.members)
    reference = copy.deepcopy(model)
    _prune_and_check(model, (IMG,), 0.3)
    assert model.act_a.num_parameters == model.act_a.weight.numel() == model.a.out_channels < 16
    assert model.act_b.weight.numel() == 1
    # the plan replays on a fresh model and the saved weights load into it
    _, plan = prune_(reference, (IMG,), "l1", macs_reduction=0.3)
    save_pruned(reference, plan, tmp_path / "p")
    fresh = load_pruned(_seeded(PReLUNet), tmp_path / "p", (IMG,))
    assert torch.equal(fresh(IMG), reference(IMG))


def test_prelu_cnn_zoo_plan_round_trip(tmp_path: Path) -> None:
    model = _seeded(prelu_cnn)
    _, plan = prune_(model, (IMG,), "l1", macs_reduction=0.3)
    assert any(k.startswith("features") for k in plan.keep)
    assert "features.1" in plan.signature  # a PReLU's slopes are part of the signature
    save_pruned(model, plan, tmp_path / "prelu")
    fresh = load_pruned(_seeded(prelu_cnn), tmp_path / "prelu", (IMG,))
    assert torch.equal(fresh(IMG), model(IMG))


def test_squeeze_excite_gate_is_coupled_with_its_input() -> None:
    model = _seeded(SENet)
    graph = analyze(model, IMG)
    stem = next(g for g in graph.groups if "stem" in g.producers)
    assert stem.prunable and {"stem", "fc2"} <= set(stem.producers)
    assert {"fc1", "mid"} <= set(stem.consumers)
    mid = next(g for g in graph.groups if "mid" in g.producers)
    assert mid.prunable and {"mid", "lin2"} <= set(mid.producers)
    _prune_and_check(model, (IMG,), 0.3)
    assert model.fc2.out_channels == model.stem.out_channels == model.fc1.in_channels
    assert model.lin2.out_features == model.mid.out_channels == model.head.in_channels


def test_mobilenetv3_se_gate_follows_the_block_and_squeeze_prunes_alone(
    mobilenetv3_pruned: tuple[nn.Module, nn.Module, float],
) -> None:
    original, model, _ = mobilenetv3_pruned
    widths = {n: m.out_channels for n, m in original.named_modules() if n.endswith(".fc2")}
    shrunk = 0
    for name, block in model.named_modules():
        if type(block).__name__ != "InvertedResidualSE":
            continue
        layers = list(block.block)
        se = next((m for m in layers if type(m).__name__ == "SqueezeExcitation"), None)
        if se is None:
            continue
        depthwise = layers[-3][0]
        assert se.fc2.out_channels == se.fc1.in_channels == depthwise.out_channels
        assert layers[-1][0].in_channels == depthwise.out_channels
        shrunk += se.fc2.out_channels < widths[f"{name}.block.{layers.index(se)}.fc2"]
    assert shrunk >= 3  # the SE blocks' channels are prunable now, not fixed
    # the squeeze width (fc1 out) is its own group: prune it alone, nothing else changes
    fresh = copy.deepcopy(original)
    _, plan = prune_(fresh, (IMG,), "l1", ratio={"features.4.block.2.fc1": 0.5})
    assert list(plan.keep) == ["features.4.block.2.fc1"]
    se = fresh.features[4].block[2]
    assert (se.fc1.out_channels, se.fc2.in_channels, se.fc2.out_channels) == (12, 12, 96)
    assert fresh(torch.cat([IMG, IMG])).shape == (2, 10)
    assert cost_report(fresh, IMG).macs == expected_macs(fresh, IMG)


@pytest.mark.parametrize(
    ("kind", "batch_first"),
    [(nn.LSTM, True), (nn.LSTM, False), (nn.GRU, True), (nn.GRU, False)],
    ids=["lstm-bf", "lstm-tf", "gru-bf", "gru-tf"],
)
def test_recurrent_layer_inputs_and_hidden_units_prune(kind: Any, batch_first: bool) -> None:
    model = _seeded(SeqNet, kind, batch_first)
    graph = analyze(model, SEQ)
    by_key = {g.producers[0]: g for g in graph.prunable_groups}
    assert set(by_key["conv"].consumers) == {"rnn"}
    assert by_key["rnn"].size == 48 and by_key["rnn"].consumers == ["fc"]
    _prune_and_check(model, (SEQ,), 0.3)
    rnn = model.rnn
    gates = GATES[kind]
    assert rnn.input_size == model.conv.out_channels and rnn.hidden_size == model.fc.in_features
    assert rnn.weight_ih_l0.shape == (gates * rnn.hidden_size, rnn.input_size)
    assert rnn.weight_hh_l0.shape == (gates * rnn.hidden_size, rnn.hidden_size)
    assert rnn.bias_ih_l0.shape == rnn.bias_hh_l0.shape == (gates * rnn.hidden_size,)


@pytest.mark.parametrize("kind", [nn.LSTMCell, nn.GRUCell])
def test_recurrent_cell_with_state_built_in_forward_prunes(kind: Any) -> None:
    model = _seeded(CellNet, kind)
    graph = analyze(model, SEQ)
    cell = next(g for g in graph.groups if "cell" in g.producers)
    assert cell.prunable and cell.consumers == ["fc"]
    _prune_and_check(model, (SEQ,), 0.3)
    assert model.cell.hidden_size < 40 and model.cell.input_size < 32
    hidden = model.cell.hidden_size
    assert model.cell.weight_hh.shape == (GATES[kind] * hidden, hidden)
    assert model.cell.weight_ih.shape == (GATES[kind] * hidden, model.conv.out_channels)


@pytest.mark.parametrize(
    "factory",
    [lambda: SeqNet(nn.LSTM), lambda: SeqNet(nn.GRU, False), lambda: CellNet(nn.LSTMCell)],
    ids=["lstm", "gru", "lstm_cell"],
)
def test_silent_hidden_units_are_removed_without_changing_the_output(factory: Any) -> None:
    """Gate-strided slicing is right: a hidden unit whose rows are all zero stays 0 from a
    zero state (LSTM: c = 0.5 c + 0.5 tanh(0); GRU: h = 0.5 h), so removing it (and the
    conv channels whose filters are zero) must leave the output unchanged."""
    model = _seeded(factory)
    graph = analyze(model, SEQ)
    hidden = next(g for g in graph.prunable_groups if g.producers[0] in ("rnn", "cell"))
    feats = next(g for g in graph.prunable_groups if g.producers[0] == "conv")
    rnn = model.get_submodule(hidden.producers[0])
    gates, size = GATES[type(rnn)], rnn.hidden_size
    dead_units, dead_feats = [1, 7, size - 1], [0, 5]
    suffix = "_l0" if isinstance(rnn, nn.RNNBase) else ""
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            t = getattr(rnn, name + suffix)
            for g in range(gates):
                t[[g * size + i for i in dead_units]] = 0
        model.conv.weight[dead_feats] = 0
        model.conv.bias[dead_feats] = 0
    before = model(SEQ)
    keep = {
        hidden: [i for i in range(hidden.size) if i not in dead_units],
        feats: [i for i in range(feats.size) if i not in dead_feats],
    }
    prune_groups(model, keep)
    torch.testing.assert_close(model(SEQ), before, atol=1e-5, rtol=1e-5)
    assert rnn.hidden_size == size - 3


@pytest.mark.parametrize(
    "factory", [lambda: SeqNet(nn.GRU), lambda: CellNet(nn.LSTMCell)], ids=["gru", "lstm_cell"]
)
def test_mac_model_of_recurrent_layers_is_exact(factory: Any) -> None:
    model = _seeded(factory)
    graph = analyze(model, SEQ)
    groups = graph.prunable_groups
    macs = MacModel(model, graph, groups)
    rng = random.Random(0)
    for _ in range(4):
        removed = [rng.randint(0, g.size - 1) for g in groups]
        keep = {g: list(range(g.size - r)) for g, r in zip(groups, removed, strict=True) if r}
        assert macs.macs(removed) == measure_plan(model, (SEQ,), keep).macs


def test_recurrent_plan_round_trip(tmp_path: Path) -> None:
    model = _seeded(SeqNet, nn.LSTM)
    _, plan = prune_(model, (SEQ,), "l1", macs_reduction=0.3)
    assert "rnn" in plan.keep
    save_pruned(model, plan, tmp_path / "lstm")
    fresh = load_pruned(_seeded(SeqNet, nn.LSTM), tmp_path / "lstm", (SEQ,))
    assert torch.equal(fresh(SEQ), model(SEQ))


@pytest.mark.parametrize(
    ("factory", "args", "module"),
    [
        (StatefulLstm, (SEQ, torch.zeros(1, 1, 24), torch.zeros(1, 1, 24)), "rnn"),
        (StatefulCell, (SEQ, torch.zeros(1, 24)), "cell"),
    ],
    ids=["lstm", "gru_cell"],
)
def test_state_passed_by_the_caller_fixes_the_hidden_units_and_says_so(
    factory: Any, args: tuple[torch.Tensor, ...], module: str
) -> None:
    model = _seeded(factory)
    group = next(g for g in analyze(model, *args).groups if module in g.producers)
    assert not group.prunable and "interface" in group.reason and module in group.reason
    with pytest.warns(PruneWarning, match=f"{module} .*hidden units of `{module}`"):
        _, plan = prune_(model, args, "l1", macs_reduction=0.1)
    assert module not in plan.keep and "conv" in plan.keep  # its input features still prune
    hidden = model.get_submodule(module).hidden_size
    assert hidden == 24 and model(*args)[0].shape == (1, 6)
    with pytest.raises(PruneError, match="not prunable"):
        prune_groups(model, {group: [0, 1]})


DEEP = [(2, False), (1, True), (2, True)]
DEEP_IDS = ["2-layer", "bidirectional", "2-layer-bidirectional"]


@pytest.mark.parametrize(("layers", "bidirectional"), DEEP, ids=DEEP_IDS)
def test_deep_and_bidirectional_recurrent_layers_prune(layers: int, bidirectional: bool) -> None:
    """Every layer and direction shares ``hidden_size``: one group of hidden units, sliced
    in all of them; a bidirectional output ``[forward | backward]`` reaches the next layer
    and the classifier as the same units twice."""
    model = _seeded(DeepLstm, layers, bidirectional)
    graph = analyze(model, SEQ)
    by_key = {g.producers[0]: g for g in graph.prunable_groups}
    assert set(by_key["conv"].consumers) == {"rnn"}
    assert by_key["rnn"].size == 24 and by_key["rnn"].consumers == ["fc"] * (1 + bidirectional)
    _prune_and_check(model, (SEQ,), 0.3)
    rnn, sides = model.rnn, 2 if bidirectional else 1
    hidden = rnn.hidden_size
    assert hidden < 24 and model.fc.in_features == sides * hidden
    for layer in range(layers):
        for suffix in ("", "_reverse")[:sides]:
            reads = rnn.input_size if layer == 0 else sides * hidden
            assert getattr(rnn, f"weight_ih_l{layer}{suffix}").shape == (4 * hidden, reads)
            assert getattr(rnn, f"weight_hh_l{layer}{suffix}").shape == (4 * hidden, hidden)


@pytest.mark.parametrize(("layers", "bidirectional"), DEEP, ids=DEEP_IDS)
def test_silent_units_of_deep_recurrent_layers_are_removed_exactly(
    layers: int, bidirectional: bool
) -> None:
    """Hidden units whose gate rows are zero in every layer and direction stay 0 from a zero
    state: removing them (their rows, and the columns that read them in later layers, the
    other direction's half and the classifier) must leave the output unchanged."""
    model = _seeded(DeepLstm, layers, bidirectional)
    hidden = next(g for g in analyze(model, SEQ).prunable_groups if g.producers[0] == "rnn")
    rnn, dead = model.rnn, [0, 9, 23]
    with torch.no_grad():
        for t in rnn.parameters():
            for g in range(4):
                t[[g * 24 + i for i in dead]] = 0
    before = model(SEQ)
    prune_groups(model, {hidden: [i for i in range(24) if i not in dead]})
    torch.testing.assert_close(model(SEQ), before, atol=1e-5, rtol=1e-5)
    assert rnn.hidden_size == 21


def test_a_projected_lstm_is_left_whole_naming_it() -> None:
    torch.manual_seed(0)
    model = DeepLstm().eval()
    model.rnn = nn.LSTM(16, 24, batch_first=True, proj_size=8)
    model.fc = nn.Linear(8, 6)
    graph = analyze(model, SEQ)
    conv = next(g for g in graph.groups if "conv" in g.producers)
    assert not conv.prunable
    assert "`rnn` (LSTM)" in conv.reason and "proj_size=8" in conv.reason
    assert "skip=" in conv.reason
    forged = type(conv)(conv.id, conv.size, conv.members, prunable=True)
    with pytest.raises(PruneError, match=r"`rnn` \(LSTM\).*skip="):
        prune_groups(model, {forged: [0, 1]})


def test_hard_coded_state_width_is_a_clear_error_not_a_torch_one() -> None:
    model = _seeded(LiteralState)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(PruneError, match=r"no longer runs.*hidden_size.*skip="):
        prune_(model, (SEQ,), "l1", ratio=0.25)  # every group, the cell's hidden units too
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    _, plan = prune_(model, (SEQ,), "l1", ratio=0.25, skip=["cell"])
    assert list(plan.keep) == ["conv0"] and model(SEQ).shape == (1, 6)


@pytest.mark.parametrize("criterion", ["l2", "fpgm", "taylor", "nisp", "random"])
def test_other_criteria_score_recurrent_groups(criterion: str) -> None:
    from edgeslim.prune import get_importance

    model = _seeded(SeqNet, nn.GRU)
    graph = analyze(model, SEQ)
    if criterion == "taylor":
        imp = get_importance("taylor", batches=[((SEQ,), torch.tensor([1]))])
    else:
        imp = get_importance(criterion)
    scores = imp.scores(model, graph.groups)
    rnn = next(g for g in graph.prunable_groups if "rnn" in g.producers)
    assert scores[rnn.id].shape == (48,) and bool(scores[rnn.id].abs().sum() > 0)
