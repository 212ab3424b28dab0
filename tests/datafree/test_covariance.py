"""Channel covariances modelled from weights and BN statistics, checked against samples."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgeslim.datafree.compensate import spatial_kernel
from edgeslim.datafree.covariance import Moments, input_moments, through_act, through_layer
from edgeslim.datafree.gaussian import RELU, RELU6, act_mean, act_var, leaky

N = 200_000


def _random_cov(c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(c, c, generator=g, dtype=torch.float64)
    return a @ a.T / c + 0.1 * torch.eye(c, dtype=torch.float64)


def _samples(m: Moments, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(m.cov)
    return m.mean + torch.randn(n, len(m.mean), generator=g, dtype=torch.float64) @ chol.T


def test_linear_maps_the_covariance_exactly() -> None:
    x = Moments(torch.linspace(-1, 1, 5, dtype=torch.float64), _random_cov(5, 0))
    lin = nn.Linear(5, 3).double()
    out = through_layer(lin, x)
    assert out is not None
    y = _samples(x) @ lin.weight.detach().T + lin.bias.detach()
    assert torch.allclose(out.mean, y.mean(0), atol=0.02)
    assert torch.allclose(out.cov, torch.cov(y.T), atol=0.03 * float(out.cov.abs().max()))


def test_a_conv_sums_over_its_window_with_the_spatial_prior() -> None:
    """One output position of a 3x3 conv over inputs whose channels have covariance ``S``
    and whose positions are correlated as the prior says (``kron(S, K)``)."""
    c, o = 3, 4
    s = _random_cov(c, 1)
    k = spatial_kernel(3, 3)
    patch = Moments(torch.zeros(c * 9, dtype=torch.float64), torch.kron(s, k))
    conv = nn.Conv2d(c, o, 3, bias=False).double()
    out = through_layer(conv, Moments(torch.zeros(c, dtype=torch.float64), s))
    assert out is not None
    y = _samples(patch) @ conv.weight.detach().reshape(o, -1).T
    assert torch.allclose(out.cov, torch.cov(y.T), atol=0.03 * float(out.cov.abs().max()))


def test_a_depthwise_conv_keeps_each_channel_pair_weighted_by_both_kernels() -> None:
    c = 3
    s = _random_cov(c, 2)
    conv = nn.Conv2d(c, c, 3, groups=c, bias=False).double()
    out = through_layer(conv, Moments(torch.zeros(c, dtype=torch.float64), s))
    assert out is not None
    patch = _samples(
        Moments(torch.zeros(c * 9, dtype=torch.float64), torch.kron(s, spatial_kernel(3, 3)))
    )
    y = (patch.reshape(-1, c, 9) * conv.weight.detach().reshape(1, c, 9)).sum(-1)
    assert torch.allclose(out.cov, torch.cov(y.T), atol=0.03 * float(out.cov.abs().max()))


def test_an_activation_has_exact_variances_and_close_weak_covariances() -> None:
    """Variances are exact; covariances are Stein's first order, close where the
    correlation is weak (0.3 here) and biased low where it is strong (not asserted)."""
    mean = torch.tensor([0.5, 1.0, -0.2], dtype=torch.float64)
    std = torch.tensor([1.0, 2.0, 1.5], dtype=torch.float64)
    corr = torch.full((3, 3), 0.3, dtype=torch.float64).fill_diagonal_(1.0)
    x = Moments(mean, corr * std[:, None] * std[None, :])
    for act in (RELU, RELU6, leaky((0.25,)), leaky((0.1, -0.2, 0.5))):  # LeakyReLU, PReLU
        out = through_act(x, act)
        y = act(_samples(x))
        emp = torch.cov(y.T)
        assert torch.allclose(out.mean, act_mean(mean, std, act))
        assert torch.allclose(torch.diagonal(out.cov), act_var(mean, std, act))
        assert torch.allclose(out.cov, emp, atol=0.08 * float(emp.diagonal().max()))


@settings(max_examples=30, deadline=None)
@given(c=st.integers(2, 8), seed=st.integers(0, 10_000), shift=st.floats(-3.0, 3.0))
def test_an_activation_keeps_the_covariance_positive_semidefinite(
    c: int, seed: int, shift: float
) -> None:
    cov = _random_cov(c, seed)
    x = Moments(torch.full((c,), shift, dtype=torch.float64), cov)
    # a PReLU's slope gain is a + (1 - a) P(z > 0): it was 1, the covariance then indefinite
    # (DF-MPC's modelled second moments blew a PReLU ResNet's outputs up to 1e5)
    for act in (RELU, RELU6, leaky((0.25,)), leaky(tuple(0.1 * k for k in range(c)))):
        out = through_act(x, act)
        assert float(torch.linalg.eigvalsh(out.cov).min()) >= -1e-9 * float(out.cov.abs().max())


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2, self.bn3):
                bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=g))
                bn.bias.copy_(0.3 * torch.randn(bn.num_features, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
        return self.fc(torch.flatten(self.pool(y + z), 1))


def test_input_moments_are_anchored_to_each_batchnorm() -> None:
    """After a BN the marginals are its statistics; the correlation comes from the weights
    (``conv3``'s output is a projection of 16 channels onto 8: strongly correlated)."""
    model = _Block().eval()
    found = input_moments(model, torch.randn(1, 3, 8, 8), ["conv2", "conv3", "fc"])
    assert set(found) == {"conv2", "conv3", "fc"}
    bn1 = model.bn1
    std1 = bn1.weight.detach().double()
    beta1 = bn1.bias.detach().double()
    assert torch.allclose(found["conv2"].mean, act_mean(beta1, std1, RELU))
    assert torch.allclose(found["conv2"].var, act_var(beta1, std1, RELU))
    cov = found["conv3"].cov
    assert cov.shape == (16, 16) and bool((cov - torch.diag(cov.diagonal())).abs().max() > 0)
    fc_in = found["fc"]  # the add of y and z: both covariances summed
    assert fc_in.cov.shape == (8, 8)
    assert float(torch.linalg.eigvalsh(fc_in.cov).min()) > -1e-9


def test_only_the_asked_layers_are_returned() -> None:
    found = input_moments(_Block().eval(), torch.randn(1, 3, 8, 8), ["conv3"])
    assert list(found) == ["conv3"]
