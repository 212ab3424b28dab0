"""Hessian-trace sensitivity: the Hutchinson estimate matches the exact trace on a model
small enough to differentiate twice in full, and the predicted loss increase of rounding a
layer falls as its bits rise and tracks the measured one on the digits CNN."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.data import load_digits_split
from edgeslim.quant.modules import fake_quantized_weight
from edgeslim.search import SearchSpace
from edgeslim.search.hessian import (
    _lost_energy,
    hessian_traces,
    keep_sensitivity,
    weight_bits_sensitivity,
)
from edgeslim.task import Task


def test_hutchinson_trace_matches_the_exact_hessian_trace() -> None:
    torch.manual_seed(0)
    digits = load_digits_split("train")
    x = digits.images.flatten(1)[:128]
    model = nn.Sequential(nn.Linear(64, 10)).eval()
    est = hessian_traces(model, ["0"], [(x,)], samples=400)["0"]
    w0 = model[0].weight.detach().clone()
    ref = torch.softmax(model(x), -1).detach()

    def loss(w: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(F.linear(x, w, model[0].bias.detach()), -1)
        return (ref * (ref.log() - logp)).sum(-1).mean()

    h = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
    exact = float(torch.diagonal(h).sum()) / w0.numel()
    assert exact > 0
    assert abs(est - exact) / exact < 0.1, (est, exact)


def test_predicted_increase_falls_with_bits_and_tracks_the_measured_loss(
    digits_model: nn.Module, space: SearchSpace
) -> None:
    sens = weight_bits_sensitivity(space)
    assert set(sens) == {d.name for d in space.dims if d.kind == "w_bits"}
    for s in sens.values():
        inc = [s.loss_increase[b] for b in sorted(s.loss_increase)]
        assert all(a >= b for a, b in itertools.pairwise(inc)), s
        assert inc[0] > 0
    # measured: the KL of the model with one layer's weights at 2 bits, per layer
    batches = space.calibration_batches()[:2]
    measured, predicted = {}, {}
    for fqn, s in sens.items():
        m = copy.deepcopy(digits_model).eval()
        layer = dict(m.named_modules())[fqn]
        with torch.no_grad():
            layer.weight.copy_(
                fake_quantized_weight(layer.weight, replace(space.weight_spec, bits=2))
            )
            kl = 0.0
            for (x,) in batches:
                p = torch.softmax(digits_model(x), -1)
                kl += float((p * (p.log() - torch.log_softmax(m(x), -1))).sum(-1).mean())
        measured[fqn], predicted[fqn] = kl / len(batches), s.loss_increase[2]
    most = max(measured, key=lambda f: measured[f])
    assert predicted[most] >= sorted(predicted.values())[len(predicted) // 2], (measured, predicted)


def test_layers_without_one_weight_parameter_are_left_to_probes() -> None:
    """An LSTM's weights are several parameters: the Hessian prices only the conv and
    linear layers, and greedy probes the LSTM's coordinate instead of failing."""
    from edgeslim.search import search
    from edgeslim.task.builtin import fashion_mnist_task
    from edgeslim.zoo.edge import conv_lstm

    torch.manual_seed(0)
    model = conv_lstm().eval()
    task = fashion_mnist_task(test_limit=200, calibration=128)
    sp = SearchSpace.build(model, task, w_bits=(4, 8), keep=(1.0,), calibration=64)
    lstm = [lc.fqn for lc in sp.layers if isinstance(dict(model.named_modules())[lc.fqn], nn.LSTM)]
    assert lstm
    sens = weight_bits_sensitivity(sp)
    assert sens and not set(lstm) & set(sens)
    result = search(model, task, sp, ["size<=0.5x"], "greedy", budget=6, progress=False)
    probed = {e.policy.id for e in result.evaluations if e.probe}
    assert len(probed) == 1 + len(lstm)  # the reference and one probe per LSTM coordinate
    assert "hessian_unavailable" not in result.notes


def test_lost_energy_is_what_the_kept_inputs_and_a_constant_cannot_predict() -> None:
    """A removed input that is an affine function of a kept one costs nothing to a refitted
    layer with a bias, its offset's share to one without, all of its energy unrefitted."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4096, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4096, generator=gen, dtype=torch.float64)
    rows = torch.stack([x0, 2 * x0 + 1, x2, torch.ones_like(x0)], dim=1)
    moments = rows.T @ rows / rows.shape[0]
    removed = torch.tensor([False, True, False])
    plain = float(_lost_energy(moments, removed, bias=True, refit=False))
    assert abs(plain - float((rows[:, 1] ** 2).mean())) < 1e-9
    assert float(_lost_energy(moments, removed, bias=True, refit=True)) < 1e-6
    no_bias = float(_lost_energy(moments, removed, bias=False, refit=True))
    assert 0.5 < no_bias < plain  # the offset (1) is left, less what x0's mean explains


def test_keep_price_is_zero_whole_grows_with_the_cut_and_a_refit_never_raises_it(
    digits_model: nn.Module, digits_task: Task
) -> None:
    kw = {"w_bits": (4, 8), "keep": (0.5, 0.75, 1.0), "calibration": 128}
    refit = SearchSpace.build(digits_model, digits_task, reconstruct=True, **kw)
    plain = SearchSpace.build(digits_model, digits_task, reconstruct=False, **kw)
    with_fit, without = keep_sensitivity(refit), keep_sensitivity(plain)
    keys = {g.key for g in refit.channel_groups}
    assert set(with_fit) == set(without) == keys
    convs = {
        g.key
        for g, cg in zip(refit.channel_groups, refit.coupling_groups, strict=True)
        if all(isinstance(dict(digits_model.named_modules())[f], nn.Conv2d) for f in cg.consumers)
    }
    assert convs
    for key in keys:
        for prices in (with_fit[key], without[key]):
            assert prices[1.0] == 0.0
        for k in (0.5, 0.75):
            assert with_fit[key][k] <= without[key][k] * (1 + 1e-6) + 1e-12, key
        assert without[key][0.5] >= without[key][0.75] > 0, key
        if key in convs:  # enough rows per weight: refitted at every width
            assert with_fit[key][0.5] >= with_fit[key][0.75] * (1 - 1e-6), key
    assert any(with_fit[k][0.5] < 0.9 * without[k][0.5] for k in convs)


def test_keep_prices_rank_groups_as_their_probes_do_on_the_digits_cnn(
    space: SearchSpace,
) -> None:
    """Cutting each group alone to half (three groups: 0.40, 0.23 and 0.01 nats measured
    when written) ranks them as the prices do, with no measurement."""
    from edgeslim.search import Evaluator

    prices = keep_sensitivity(space)
    ev = Evaluator(space, max_drop=100.0)
    top = list(space.top())
    ref = ev.evaluate(space.decode(top))
    measured = {}
    for d, dim in enumerate(space.dims):
        if dim.kind == "keep":
            genes = list(top)
            genes[d] = 0
            r = ev.evaluate(space.decode(genes))
            assert r.loss is not None and ref.loss is not None
            measured[dim.name] = r.loss - ref.loss
    predicted = {k: prices[k][0.5] for k in measured}
    assert len(measured) >= 3
    assert sorted(measured, key=measured.__getitem__) == sorted(
        predicted, key=predicted.__getitem__
    )
