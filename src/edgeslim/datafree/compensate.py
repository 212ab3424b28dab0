"""The closed-form solver every data-free method plugs into.

For a safe pair ``producer -> [BN] -> act -> consumer`` (see :mod:`.chain`), the producer's
channel k has pre-activation ``z_k ~ N(mu_k, sigma_k^2)`` (BN statistics). Rounding the
producer's weights row ``w_k -> q_k`` gives ``zq_k``; with the producer's input modelled as
independent channels of known variance ``v`` (a diagonal covariance), ``z_k`` and ``zq_j``
are jointly Gaussian with

    std(zq_j) = sigma_j |q_j|_v / |w_j|_v,  corr(z_i, zq_j) = <w_i, q_j>_v / (|w_i|_v |q_j|_v)

(``<a, b>_v``: the inner product under that input prior, positions of a channel
correlated over the kernel window, see :func:`inner_products`; v = 1 where unknown), and the
mean shift
of rounding is removed from the producer's bias first (DFQ's bias correction), so
``E[zq_j] = mu_j``. The consumer reads ``a = act(z)`` and must now read ``aq = act(zq)``.

**Objective** (per consumer output): ``E || W a + b - (W' aq_kept + b') ||^2`` where each
input channel k of the original consumer is represented by one kept channel j(k)
(itself when kept: quantization compensation, DF-MPC; the most useful kept channel when k
is pruned: UDFC). Under the Gaussian model each channel's term is a one-variable linear
regression, so the minimiser is closed form:

    s_kj = Cov(a_k, aq_j) / Var(aq_j)          (column j of W' += s_kj * W[:, k])
    b'   = b + sum_k W[:, k] E[a_k] - sum_j W'[:, j] E[aq_j]

with the moments of clipped Gaussians from :mod:`.gaussian`; a pruned k goes to the kept j
that explains most of its variance, ``Cov(a_k, aq_j)^2 / Var(aq_j)``. ``tests/datafree``
checks ``s`` and ``b'`` against ``torch.linalg.lstsq`` on samples drawn from the model.

This replaces the diagonal form in METHODS.md (``c_k = (rho g^2 <q, w> + b^2) / ...`` with a
free ``rho``): the regression needs no hyper-parameter (the input energy is fixed by the BN
variance), handles the ReLU's clipping of the BN bias exactly, and removes the mean error.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from edgeslim.datafree.chain import (
    Chain,
    Pair,
    Stats,
    group_inputs,
    input_stats,
    kernel_window,
)
from edgeslim.datafree.gaussian import act_cov, act_mean, act_var
from edgeslim.datafree.ops import (
    WeightGranularity,
    add_bias,
    channel_effect,
    columns,
    quantize_weight,
    weight_of,
    weight_shift,
)

_EPS = 1e-12


SPATIAL_CORR = 0.8  # correlation of neighbouring input pixels in the prior (see module doc)


def spatial_kernel(*window: int, corr: float | None = None) -> torch.Tensor:
    """Prior correlation of the inputs under a kernel window (``kh, kw``; ``k`` for a 1-D
    conv, ``kt, kh, kw`` for a 3-D one), flattened as the weight is: ``corr ** distance``,
    the city-block distance between two taps (so a ``(1, k)`` window is the ``(k,)`` one)."""
    corr = SPATIAL_CORR if corr is None else corr
    axes = torch.meshgrid(*(torch.arange(n) for n in window), indexing="ij")
    pos = torch.stack([a.flatten() for a in axes], 1).to(torch.float64)
    return corr ** torch.cdist(pos, pos, p=1)


def _channel_var(x: Stats | None, n_in: int) -> torch.Tensor:
    if x is None:
        return torch.ones(n_in, dtype=torch.float64)
    return x.var.to(torch.float64).clamp_min(_EPS)


def input_variance(m: nn.Module, x: Stats | None) -> torch.Tensor:
    """The input variance each weight of ``m`` multiplies, shaped like ``m.weight``."""
    w = weight_of(m)
    if w.dim() == 2:
        return _channel_var(x, w.shape[1]).reshape(1, -1).expand(w.shape)
    idx = group_inputs(m)
    if idx is not None:  # grouped (depthwise included): each row reads its group's channels
        v = _channel_var(x, int(idx.max()) + 1)[idx]
        return v.reshape(*v.shape, *[1] * (w.dim() - 2)).expand(w.shape)
    return _channel_var(x, w.shape[1]).reshape(1, -1, *[1] * (w.dim() - 2)).expand(w.shape)


def inner_products(
    m: nn.Module, a: torch.Tensor, b: torch.Tensor, x: Stats | None, full: bool = True
) -> torch.Tensor:
    """``<a_i, b_j>`` under the input prior: independent channels of variance ``x.var``
    (1 where unknown), each correlated over the kernel window by :func:`spatial_kernel`.

    ``full``: the ``(O, O)`` matrix of every pair of rows; otherwise the ``(O,)`` diagonal
    (always so for a depthwise conv, whose rows read different channels).
    """
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    if a64.dim() == 2:
        v = _channel_var(x, a64.shape[1])
        return (a64 * v) @ b64.T if full else (a64 * b64 * v).sum(1)
    o, c = a64.shape[:2]
    k = spatial_kernel(*kernel_window(a64))
    ak = torch.einsum("ocp,pq->ocq", a64.reshape(o, c, -1), k)
    bf = b64.reshape(o, c, -1)
    if c == 1 and o > 1 and getattr(m, "groups", 1) == o:  # depthwise: own channel per row
        v = _channel_var(x, o)
        return (ak * bf).sum((1, 2)) * v
    idx = group_inputs(m)
    if idx is not None:  # grouped: rows of different groups read different channels
        vg = _channel_var(x, int(idx.max()) + 1)[idx]  # (O, C / groups)
        if not full:
            return torch.einsum("icp,icp,ic->i", ak, bf, vg)
        group = idx[:, 0] // c
        same = (group[:, None] == group[None, :]).to(torch.float64)
        return torch.einsum("icp,jcp,ic->ij", ak, bf, vg) * same
    v = _channel_var(x, c)
    if full:
        return torch.einsum("icp,jcp,c->ij", ak, bf, v)
    return torch.einsum("icp,icp,c->i", ak, bf, v)


def rounded_stats(
    m: nn.Module, w: torch.Tensor, q: torch.Tensor, x: Stats | None, pre: Stats, full: bool,
    gram: torch.Tensor | None = None,
) -> tuple[Stats, torch.Tensor]:  # fmt: skip
    """Statistics of the rounded producer's pre-activations and ``corr(z_i, zq_j)``.

    The correlation is ``(O, O)`` with ``full`` (else ``(O,)``, the diagonal). ``gram``:
    the input covariance in weight-row order (:func:`~.rounding.row_gram`), where known,
    instead of the independent-channel prior.
    """
    depthwise = w.dim() >= 3 and w.shape[1] == 1 and getattr(m, "groups", 1) == w.shape[0] > 1
    if gram is not None and not depthwise:
        wf = w.reshape(w.shape[0], -1).to(torch.float64)
        qf = q.reshape(q.shape[0], -1).to(torch.float64)
        g = gram.to(torch.float64)
        nw = ((wf @ g) * wf).sum(1).clamp_min(_EPS).sqrt()
        nq = ((qf @ g) * qf).sum(1).clamp_min(_EPS).sqrt()
        cross = (wf @ g) @ qf.T if full else ((wf @ g) * qf).sum(1)
    else:
        nw = inner_products(m, w, w, x, full=False).clamp_min(_EPS).sqrt()
        nq = inner_products(m, q, q, x, full=False).clamp_min(_EPS).sqrt()
        cross = inner_products(m, w, q, x, full=full and not depthwise)
    corr = cross / (nw[:, None] * nq[None, :]) if cross.dim() == 2 else cross / (nw * nq)
    sq = pre.std * nq / nw
    return Stats(pre.mean.clone(), sq * sq), corr


@torch.no_grad()
def correct_bias(m: nn.Module, w: torch.Tensor, q: torch.Tensor, x: Stats | None) -> None:
    """DFQ's analytic bias correction: remove ``E[(q - w) x]`` from the layer's bias."""
    if x is not None:
        add_bias(m, -weight_shift(m, q - w, x.mean))


@torch.no_grad()
def compensate(
    chain: Chain, pair: Pair, w: torch.Tensor, q: torch.Tensor, x: Stats | None,
    pruned: Collection[int] = (), merge: bool = True, rescale: bool = False,
    bias: bool = True, gram: torch.Tensor | None = None, keep_variance: bool = False,
) -> Stats:  # fmt: skip
    """Rewrite ``pair.consumer`` for the producer's rounding (``w -> q``) and ``pruned``.

    Returns the statistics of the rounded producer's pre-activations. Columns of pruned
    channels are left as they are (surgery removes them); ``merge=False`` (or a depthwise
    consumer) folds a pruned channel into the bias only, through its mean.
    """
    consumer = chain.layer(pair.consumer)
    pre = chain.pre[pair.producer]
    merging = merge and not pair.depthwise and len(pruned) > 0
    qstats, corr = rounded_stats(chain.layer(pair.producer), w, q, x, pre, merging, gram)
    act, n = pair.act, w.shape[0]
    drop = torch.zeros(n, dtype=torch.bool)
    drop[list(pruned)] = True
    kept = (~drop).nonzero().flatten()
    mean_a = act_mean(pre.mean, pre.std, act)
    mean_q = act_mean(qstats.mean, qstats.std, act)
    var_q = act_var(qstats.mean, qstats.std, act)
    diag = torch.diagonal(corr) if corr.dim() == 2 else corr
    cov_self = act_cov(pre.mean, pre.std, qstats.mean, qstats.std, diag, act, act)
    coef = torch.where(var_q > _EPS, cov_self / var_q.clamp_min(_EPS), torch.zeros_like(var_q))
    if not rescale:
        coef = torch.ones_like(coef)
    if pair.depthwise:  # one filter per channel: the channels are the columns of one row
        cols = consumer.weight.detach().reshape(1, n, -1).to(torch.float64)
    else:
        cols = columns(consumer, pair.repeat).to(torch.float64)
    new = cols.clone()
    new[:, kept] = cols[:, kept] * coef[kept].reshape(1, -1, 1)
    if drop.any() and merging and corr.dim() == 2:
        gone = drop.nonzero().flatten()
        slopes = act.slopes().expand(n) if act.leaky else None  # one per channel
        cov = act_cov(
            pre.mean[gone, None], pre.std[gone, None], qstats.mean[None, kept],
            qstats.std[None, kept], corr[gone][:, kept], act, act,
            None if slopes is None else slopes[gone, None],
            None if slopes is None else slopes[None, kept],
        )  # fmt: skip
        vk = var_q[kept].clamp_min(_EPS)[None, :]
        best = (cov * cov / vk).argmax(1)
        s = cov.gather(1, best[:, None]).squeeze(1) / vk[0, best]
        for i, j, si in zip(gone.tolist(), kept[best].tolist(), s.tolist(), strict=True):
            if si > 0 or not pair.max_pool:  # max(s a) = s min(a) for s < 0
                new[:, j] += si * cols[:, i]
    old_effect = channel_effect(consumer, mean_a, pair.repeat)
    weight = consumer.weight
    weight.copy_(new.reshape(weight.shape).to(weight.dtype))
    if bias:
        mean_kept = torch.where(drop, torch.zeros_like(mean_q), mean_q)
        add_bias(consumer, old_effect - channel_effect(consumer, mean_kept, pair.repeat))
    elif drop.any() and not merging:  # nothing else carries these channels: their mean
        # (the pruned columns are unchanged, so the effect reads the same either side)
        add_bias(consumer, channel_effect(consumer, torch.where(drop, mean_a, 0.0), pair.repeat))
    if keep_variance and drop.any() and not merging and not pair.depthwise and cols.shape[1] == n:
        before = Stats(mean_a, act_var(pre.mean, pre.std, act))
        restore_variance(consumer, cols, before, Stats(mean_q, var_q), drop, pair.repeat)
    return qstats


def row_gain(
    m: nn.Module, ref: torch.Tensor, x_ref: Stats | None, new: torch.Tensor, x_new: Stats | None
) -> torch.Tensor:
    """Per row of ``m``: the factor that gives ``new`` weights reading ``x_new`` the output
    standard deviation of ``ref`` reading ``x_ref`` (1 where ``new`` has none)."""
    n_ref = inner_products(m, ref, ref, x_ref, full=False)
    n_new = inner_products(m, new, new, x_new, full=False)
    return torch.where(n_new > _EPS, (n_ref / n_new.clamp_min(_EPS)).sqrt(), torch.ones_like(n_new))


@torch.no_grad()
def restore_variance(
    m: nn.Module, old: torch.Tensor, before: Stats, after: Stats, drop: torch.Tensor,
    repeat: int = 1,
) -> None:  # fmt: skip
    """Scale each row of ``m`` (its kept columns reading inputs of statistics ``after``) to
    the output variance it had as ``old`` columns reading ``before``, keeping its mean.

    Why: the regression of :func:`compensate` is least squares, which shrinks its output
    towards the mean (a pruned channel's variance is lost, only the part a kept channel
    explains comes back). Layer after layer the loss compounds: on mobilenetv2-small at 50%
    MACs the block outputs fell to a third of their BN-described spread and every
    prediction went to one class, the biases (the kept means) outweighing the signal. The
    layers after assume the BN statistics of the original model, so each consumer is put
    back on them, as REPAIR (Jordan et al. 2022) renormalises merged networks.

    Only where nothing stands in for the pruned channels (:func:`compensate` calls it when
    they are folded through their means, not merged): a merge picks a kept channel because
    it is correlated with the pruned one, which the independent-channel prior cannot
    measure, so the original spread is unknown there. Measured with UDFC (2,000 validation
    images, W6 and W4): mobilenetv2-small 49.0 / 52.6 -> 78.1 / 79.2 at 30% MACs and
    10.5 / 10.8 -> 31.4 / 35.8 at 50%; mobilenetv3-small 79.9 / 81.5 -> 83.2 / 83.5 and
    60.0 / 51.3 -> 78.9 / 72.7; resnet20 and vgg-small (merged everywhere) unchanged.
    Restored after merges as well, vgg-small lost 2.4-5.8 points.
    """
    w = weight_of(m)
    kept = w.detach().clone()
    columns_view = kept.reshape(old.shape)
    columns_view[:, drop] = 0.0
    x_old, x_new = (s.repeat(repeat) if repeat > 1 else s for s in (before, after))
    old_w = old.reshape(w.shape).to(w.dtype)
    gain = row_gain(m, old_w, x_old, kept, x_new)
    mean_kept = torch.where(drop, torch.zeros_like(after.mean), after.mean)
    effect = channel_effect(m, mean_kept, repeat)
    w.mul_(gain.to(w.dtype).reshape(-1, *[1] * (w.dim() - 1)))
    add_bias(m, effect - channel_effect(m, mean_kept, repeat))


def quantized_input(chain: Chain, fqn: str, rounded: dict[str, Stats]) -> Stats | None:
    """Input statistics of ``fqn`` once its producer is rounded (``rounded`` by producer)."""
    pair = chain.pair_into(fqn)
    if pair is None or pair.producer not in rounded:
        return input_stats(chain, fqn)
    saved = chain.pre[pair.producer]
    chain.pre[pair.producer] = rounded[pair.producer]
    try:
        return input_stats(chain, fqn)
    finally:
        chain.pre[pair.producer] = saved


@torch.no_grad()
def match_variance(
    m: nn.Module, reference: torch.Tensor, x: Stats | None, bits: int,
    granularity: WeightGranularity = "channel",
) -> None:  # fmt: skip
    """Scale each row of ``m`` so that its rounding has the output variance of ``reference``.

    Rounding to few levels (and clamping before it) shrinks a row's output energy,
    ``|q|_v < |w|_v`` under the input prior; the loss compounds layer after layer. The gain
    ``|w|_v / |q|_v`` goes into the row's own quantization scale (free with per-channel
    scales: the rounding pattern is unchanged), so the consumer keeps its precision. The
    mean error it leaves is removed by bias correction against ``reference``. With one scale
    per layer (``granularity="tensor"``) the gain moves the row on the shared grid instead,
    so its rounding changes; the bias correction measures the rounding that results.
    """
    w = weight_of(m)
    q = quantize_weight(w, bits, granularity)
    gain = row_gain(m, reference, x, q, x)
    w.mul_(gain.to(w.dtype).reshape(-1, *[1] * (w.dim() - 1)))


def compensate_all(
    chain: Chain, bits: dict[str, int], pruned: Mapping[str, Collection[int]] | None = None,
    merge_into: Collection[str] = (), skip: Collection[str] = (), rescale: bool = False,
    bias: bool = True, reference: Mapping[str, torch.Tensor] | None = None,
    bn_only: bool = False, grams: Mapping[str, torch.Tensor] | None = None,
    keep_variance: bool = False,
) -> None:  # fmt: skip
    """One pass in graph order: bias-correct every layer's rounding, compensate every pair.

    ``pruned`` (by producer) channels are folded into kept ones where the producer is in
    ``merge_into`` and into the consumer's bias otherwise; producers in ``skip`` get bias
    correction only. ``reference`` (by layer): the weights the rounding is measured
    against where the current ones were already changed (clamped, rescaled); the BN
    statistics describe those. Layers are visited after their producer, so a consumer's
    columns are final before its own rows are rounded. ``bn_only``: no correction from
    estimated statistics (no BatchNorm): measured on prelu-cnn they guess the means badly
    enough that compensating made the rounding error worse, not better. ``grams`` (by
    layer): input covariances that model the rounded layers' statistics (see
    :func:`rounded_stats`).
    """
    pruned = pruned or {}
    reference = reference or {}
    rounded: dict[str, Stats] = {}
    for fqn in chain.order:
        m = chain.layer(fqn)
        x = quantized_input(chain, fqn, rounded)
        current = m.weight.detach().clone()
        w = reference.get(fqn, current)
        q = quantize_weight(current, bits[fqn], chain.granularity)
        if bias and not (bn_only and x is not None and x.estimated):
            correct_bias(m, w, q, x)
        pair = chain.pairs.get(fqn)
        if pair is None or fqn in skip or (bn_only and chain.pre[fqn].estimated):
            continue
        rounded[fqn] = compensate(
            chain, pair, w, q, x, pruned.get(fqn, ()), merge=fqn in merge_into,
            rescale=rescale, bias=bias, gram=(grams or {}).get(fqn), keep_variance=keep_variance,
        )  # fmt: skip
