"""Clipped-Gaussian moments against Monte Carlo, and the regression closed form vs lstsq."""

from __future__ import annotations

import math

import pytest
import torch

from edgeslim.datafree.gaussian import (
    IDENTITY,
    RELU,
    RELU6,
    Act,
    act_cov,
    act_cross,
    act_mean,
    act_second,
    act_var,
)

N = 400_000


def _pair(mu: float, s: float, mv: float, sv: float, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 2, dtype=torch.float64, generator=g)
    return mu + s * z[:, 0], mv + sv * (r * z[:, 0] + math.sqrt(1 - r * r) * z[:, 1])


CASES = [(0.3, 1.0, -0.5, 2.0, 0.7), (2.0, 1.0, 5.0, 3.0, -0.4), (-1.0, 0.5, 0.2, 0.1, 0.95)]
ACTS = [(RELU, RELU), (RELU6, RELU6), (IDENTITY, RELU), (RELU, IDENTITY), (Act(-1, 1), RELU6)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("acts", ACTS)
def test_moments_match_monte_carlo(case: tuple[float, ...], acts: tuple[Act, Act]) -> None:
    mu, s, mv, sv, r = case
    au, av = acts
    u, v = _pair(*case)
    t = torch.tensor
    tol = 0.02 * (1 + float(au(u).abs().mean()))
    assert float(act_mean(t(mu), t(s), au)) == pytest.approx(float(au(u).mean()), abs=tol)
    assert float(act_second(t(mu), t(s), au)) == pytest.approx(
        float((au(u) ** 2).mean()), abs=2 * tol
    )
    cross = act_cross(t(mu), t(s), t(mv), t(sv), t(r), au, av)
    assert float(cross) == pytest.approx(float((au(u) * av(v)).mean()), rel=0.02, abs=0.01)


def test_cross_broadcasts_over_channel_pairs() -> None:
    mu = torch.tensor([0.1, -0.3, 0.5])
    s = torch.tensor([1.0, 0.5, 2.0])
    rho = torch.full((3, 3), 0.5)
    out = act_cross(mu[:, None], s[:, None], mu[None, :], s[None, :], rho)
    assert out.shape == (3, 3)
    one = act_cross(mu[1], s[1], mu[2], s[2], torch.tensor(0.5))
    assert float(out[1, 2]) == pytest.approx(float(one), rel=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_regression_closed_form_equals_lstsq(case: tuple[float, ...]) -> None:
    """``s = Cov(a, aq) / Var(aq)``, ``b = E[a] - s E[aq]`` minimise ``E(a - s aq - b)^2``:
    the per-channel objective every compensation in :mod:`edgeslim.datafree` solves."""
    mu, s, mv, sv, r = case
    u, v = _pair(*case)
    a, aq = RELU(u), RELU(v)
    design = torch.stack([aq, torch.ones_like(aq)], 1)
    sol = torch.linalg.lstsq(design, a[:, None]).solution.flatten()
    t = torch.tensor
    slope = act_cov(t(mu), t(s), t(mv), t(sv), t(r)) / act_var(t(mv), t(sv))
    intercept = act_mean(t(mu), t(s)) - slope * act_mean(t(mv), t(sv))
    assert float(slope) == pytest.approx(float(sol[0]), abs=0.02 * (1 + abs(float(sol[0]))))
    assert float(intercept) == pytest.approx(float(sol[1]), abs=0.02 * (1 + abs(float(sol[1]))))
