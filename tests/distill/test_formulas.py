"""The distillation formulas, checked against their definitions and invariances."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeslim.distill import (
    AttentionConfig,
    DCCDConfig,
    DistillConfigError,
    DistillLoss,
    FeatureConfig,
    KDConfig,
    attention_distance,
    attention_map,
    channel_contrastive,
    config_from_dict,
    config_to_dict,
    dynamic_difference,
    kd_loss,
    soft_kl,
)


def test_soft_kl_is_t_squared_kl_of_softened_outputs() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    p_t = F.softmax(t / 3, 1)
    manual = 9 * (p_t * (p_t.log() - F.log_softmax(s / 3, 1))).sum(1).mean()
    torch.testing.assert_close(soft_kl(s, t, 3.0), manual)
    assert soft_kl(t, t, 3.0).abs() < 1e-6


def test_kd_config_in_a_distill_loss_is_kd_loss() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    out = torch.randn(5, 3)
    a = DistillLoss(teacher, None, [KDConfig(alpha=0.3, temperature=2.0)])
    b = kd_loss(teacher, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(a(out, y, (x,)), b(out, y, (x,)))
    with torch.no_grad():
        t = teacher(x)
    torch.testing.assert_close(a(out, None, (x,)), soft_kl(out, t, 2.0))  # unlabelled: soft
    assert set(a.last) == {"kd"}
    a(out, y, (x,))
    assert set(a.last) == {"hard", "kd"}


def test_attention_map_definition_and_invariances() -> None:
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 5)
    q = f.pow(2).mean(1).flatten(1)
    torch.testing.assert_close(attention_map(f), q / q.norm(dim=1, keepdim=True))
    # scale and channel duplication leave the map unchanged: channel counts may differ
    assert attention_distance(3 * f, torch.cat([f, f], 1)) < 1e-10
    # a teacher map at twice the resolution (nearest upsampling) pools back exactly
    up = F.interpolate(f, scale_factor=2.0, mode="nearest")
    assert attention_distance(f, up) < 1e-10
    g = torch.randn(2, 3, 4, 5)
    assert attention_distance(f, g) > 1e-3
    with pytest.raises(DistillConfigError, match="positions"):
        attention_map(torch.randn(2, 3))


def test_channel_contrast_prefers_the_same_channel() -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 8, 5, 5)
    same = channel_contrastive(t, t, temperature=0.1)
    shuffled = channel_contrastive(t, t[:, torch.randperm(8)], temperature=0.1)
    noisy = channel_contrastive(t + 0.5 * torch.randn_like(t), t, temperature=0.1)
    assert same < noisy < shuffled
    assert same < 0.05 and shuffled > 1.0
    assert channel_contrastive(t, t, temperature=1.0) > same  # a softer temperature
    # (N, C) features: each channel is its column over the batch
    v = torch.randn(16, 8)
    assert channel_contrastive(v, v, 0.1) < channel_contrastive(v, v[:, torch.randperm(8)], 0.1)


def test_dynamic_difference_ignores_what_both_views_share() -> None:
    torch.manual_seed(0)
    t1, t2 = torch.randn(4, 10), torch.randn(4, 10)
    shift = torch.randn(1, 10)  # a student offset by a constant makes the same differences
    assert dynamic_difference(t1 + shift, t2 + shift, t1, t2) < 1e-12
    assert dynamic_difference(t1, t1, t1, t2) > 0.1  # a student blind to the change


def test_configs_are_frozen_data_that_round_trip() -> None:
    configs = [
        KDConfig(alpha=0.9, temperature=2.0),
        FeatureConfig(taps=("layer1", ("layer2.0.conv1", "layer2.0.conv2")), weight=0.5),
        AttentionConfig(taps=["layer3"], p=1.0),  # type: ignore[arg-type]
        DCCDConfig(taps=("layer3",), view="noise", noise=0.2),
    ]
    for cfg in configs:
        data = json.loads(json.dumps(config_to_dict(cfg)))
        assert config_from_dict(data) == cfg
        with pytest.raises(AttributeError):
            cfg.kind = "x"  # type: ignore[misc]
    assert configs[2].taps == ("layer3",)  # a list becomes a tuple
    assert configs[1].taps[1] == ("layer2.0.conv1", "layer2.0.conv2")
    with pytest.raises(DistillConfigError, match="alpha"):
        KDConfig(alpha=1.5)
    with pytest.raises(DistillConfigError, match="at least one tap"):
        FeatureConfig()
    with pytest.raises(DistillConfigError, match="list of FQNs"):
        FeatureConfig(taps="layer1")  # type: ignore[arg-type]
    with pytest.raises(DistillConfigError, match="unknown distillation loss kind"):
        config_from_dict({"kind": "crd"})
