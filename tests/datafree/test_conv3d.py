"""Data-free methods on 3-D convs (video, volumetric models): a network with real 3-D
kernels, trained on sklearn digits shown as short clips, checks that the methods act on it
and what they buy against rounding to nearest (a 3-D network with ``(1, kh, kw)`` kernels
is checked against its 2-D twin in test_twins.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeslim.datafree import (
    DataFreeResult,
    DataFreeSpec,
    analyze,
    compress_datafree,
    quantized_model,
)
from edgeslim.datafree.methods import cross_layer_equalize

FRAMES = 4


def _clips() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as clips: each 8x8 digit on a 12x12 canvas, moving one pixel right
    and one down per frame, ``(N, 1, FRAMES, 12, 12)`` scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images, dtype=torch.float32) / 16.0
    clips = torch.zeros(len(img), 1, FRAMES, 12, 12)
    for t in range(FRAMES):
        clips[:, 0, t, t : t + 8, t : t + 8] = img
    return clips, torch.tensor(d.target)


def _video_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(1, 12, 3, padding=1), nn.BatchNorm3d(12), nn.ReLU(),
        nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(12, 24, 3, padding=1), nn.BatchNorm3d(24), nn.ReLU(),
        nn.Conv3d(24, 24, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(24), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(24, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = _clips()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    net = _video_net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(12):
        for idx in train.split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval(), x[test], y[test]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_dfq_keeps_the_function_of_a_3d_network_and_beats_rounding(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    net, x, y = trained
    assert _accuracy(net, x, y) > 0.9  # the premise: a working video model
    chain = analyze(net, x[:1])
    # every pair found: through the 3-D max pool, and the last conv through the 3-D average
    # pool and flatten into the linear
    assert set(chain.pairs) == {"0", "4", "7"}
    with torch.no_grad():
        before = chain.model(x)
        notes = cross_layer_equalize(chain)
        assert all(n.startswith("equalized") for n in notes.values()), notes
        torch.testing.assert_close(chain.model(x), before, atol=1e-4, rtol=1e-4)
    spec = DataFreeSpec(low_bits=4, high_bits=4, granularity="tensor")
    dfq = compress_datafree(net, "dfq", spec, x[:1])
    assert {"0", "4", "7"} <= set(dfq.report.changed)
    rtn = compress_datafree(net, "rtn", spec, x[:1])
    with torch.no_grad():
        ref = net(x)
        err = {
            name: float((quantized_model(r)(x) - ref).pow(2).mean())
            for name, r in (("dfq", dfq), ("rtn", rtn))
        }
    assert err["dfq"] < err["rtn"], err


def _logit_error(result: DataFreeResult, net: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((quantized_model(result)(x) - net(x)).pow(2).mean())


def test_dfmpc_acts_on_a_3d_network_and_beats_rounding(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    """Measured: logits' squared error 2.03 (RTN) -> 0.19 at 3/8 bits per channel; both at
    the float model's 99.2% on this easy task, so the error is the signal."""
    net, x, y = trained
    spec = DataFreeSpec(low_bits=3, high_bits=8)
    dfmpc = compress_datafree(net, "dfmpc", spec, x[:1])
    rtn = compress_datafree(net, "rtn", spec, x[:1])
    assert dfmpc.weight_bits == rtn.weight_bits
    assert 3 in dfmpc.weight_bits.values()  # some 3-D conv at the low width
    assert dfmpc.report.changed
    assert _logit_error(dfmpc, net, x) < 0.5 * _logit_error(rtn, net, x)
    assert _accuracy(quantized_model(dfmpc), x, y) >= _accuracy(quantized_model(rtn), x, y)


@pytest.mark.parametrize("method", ["merge", "udfc"])
def test_pruning_a_3d_network_compensates_the_removed_channels(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], method: str
) -> None:
    """Measured at -10% MACs, 8 bits: naive 55.7% (logit error 29.9), merge 94.2% (3.5),
    udfc 84.9% (4.9); fp32 99.2%."""
    net, x, y = trained
    spec = DataFreeSpec(low_bits=8, high_bits=8, prune_ratio=0.1)
    naive = compress_datafree(net, "naive", spec, x[:1])
    repaired = compress_datafree(net, method, spec, x[:1])
    assert {"0", "4"} <= set(repaired.report.changed)  # 3-D convs pruned and compensated
    assert _logit_error(repaired, net, x) < 0.5 * _logit_error(naive, net, x)
    acc = {n: _accuracy(quantized_model(r), x, y) for n, r in (("n", naive), ("r", repaired))}
    assert acc["r"] > acc["n"] + 0.1, acc


def test_rows_too_long_for_covariance_rounding_are_rounded_to_nearest_and_said(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3x3x3 window over 512 channels would need a 1.5 GB covariance: such rows are
    rounded to nearest, named (here the cap is lowered below the 12 x 27 = 324 inputs of
    the second conv's rows)."""
    import edgeslim.datafree.methods as methods

    net, x, _ = trained
    spec = DataFreeSpec(low_bits=3, high_bits=8)
    before = compress_datafree(net, "dfmpc", spec, x[:1])
    low = [f for f, b in before.weight_bits.items() if b == 3]
    assert any("against its input covariance" in before.report.layers[f] for f in low)
    monkeypatch.setattr(methods, "MAX_ROW", 100)
    capped = compress_datafree(net, "dfmpc", spec, x[:1])
    long_rows = [f for f in low if net.get_submodule(f).weight[0].numel() > 100]
    assert long_rows
    for f in long_rows:
        said = capped.report.layers[f]
        assert "rounded to nearest: its rows read 324 inputs, over the 100" in said


def test_a_data_free_video_model_exports_with_its_pools_on_integers(
    trained: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    """DFQ W8A8 with edge quantizers from the BN statistics: the 3-D max pool and the 3-D
    global pool get quantizers too (before 2026-12-06 the max pool ran in float between
    dequantize and quantize nodes), every one with a range, and ONNX Runtime runs every MAC
    and both pools on integers, with the torch model's accuracy."""
    import numpy as np
    import onnx

    from edgeslim.export.qdq import export_qdq
    from edgeslim.quant.modules import ActQuant
    from edgeslim.runtime.kernels import kernel_coverage, optimized_graph
    from edgeslim.runtime.ort import ort_session

    net, x, y = trained
    result = compress_datafree(net, "dfq", DataFreeSpec(8, 8), x[:1])
    edged = quantized_model(result, 8, "statistics", edges=True).eval()
    assert all(bool(m.quantizer.calibrated) for m in edged.modules() if isinstance(m, ActQuant))
    path = export_qdq(edged, (x[:1],), tmp_path / "video.onnx")
    assert kernel_coverage(path, (x[:1],)).int8_mac_share == 1.0
    ran = onnx.load(str(optimized_graph(path, tmp_path / "ran.onnx"))).graph.node
    producer = {o: n.op_type for n in ran for o in n.output}
    ops = [n.op_type for n in ran]
    assert "QLinearGlobalAveragePool" in ops and "GlobalAveragePool" not in ops, ops
    pools = [n for n in ran if n.op_type == "MaxPool"]
    assert len(pools) == 1 and producer[pools[0].input[0]] == "QLinearConv", ops
    sess = ort_session(path)
    name = sess.get_inputs()[0].name
    got = np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(64)])
    with torch.no_grad():
        want = edged(x[:64]).argmax(1).numpy()
    agree = float((got.argmax(1) == want).mean())
    assert agree >= 0.95 and _accuracy(edged, x, y) > 0.9, agree
