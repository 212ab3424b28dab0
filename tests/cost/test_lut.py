from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from edgeslim.cost.lut import (
    FP32,
    INT8,
    WONLY,
    LatencyTable,
    Residual,
    _kernel_model,
    layer_key,
    layer_times,
    runs_int8,
)
from edgeslim.graph import layer_table
from edgeslim.graph.layers import LayerInfo
from edgeslim.runtime.ort import ort_session


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.conv1d = nn.Conv1d(8, 4, 5, padding=2)
        self.lstm = nn.LSTM(4, 6, batch_first=True)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.conv(x).relu())
        seq = self.conv1d(y.flatten(2))  # (N, 4, L)
        out, _ = self.lstm(seq.transpose(1, 2))
        return self.fc(out[:, -1])


@pytest.fixture
def model() -> tuple[nn.Module, dict]:
    m = Mixed().eval()
    return m, layer_table(m, torch.randn(1, 3, 12, 12))


@pytest.mark.parametrize("precision", [FP32, INT8, WONLY])
def test_kernel_models_run_the_layer_shape(model: tuple[nn.Module, dict], precision: str) -> None:
    """Each timed kernel is the layer at its real shape: same output shape as torch (int8
    convs channels-last, as ONNX Runtime runs them inside a model)."""
    m, rows = model
    for fqn in ("conv", "dw", "conv1d", "fc"):
        key = layer_key(m.get_submodule(fqn), rows[fqn], precision)
        assert key is not None
        data, feeds = _kernel_model(key)
        (y,) = ort_session(data).run(None, feeds)
        want = tuple(rows[fqn].out_shape)
        if precision == INT8 and key.kind == "conv":  # ORT's channels-last int8 kernel
            want = (want[0], *want[2:], want[1])
        assert tuple(y.shape) == want, fqn
        assert y.dtype == (np.uint8 if precision == INT8 else np.float32)


@pytest.mark.parametrize("precision", [FP32, INT8, WONLY])
def test_3d_convs_are_modelled_at_their_shape(precision: str) -> None:
    """A video model's Conv3d layers are table entries (ONNX Runtime runs a QDQ Conv3d as
    a channels-last ``QLinearConv`` inside a model, as it does 2-D ones), not residual."""
    video = nn.Sequential(
        nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)), nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1, groups=8), nn.Conv3d(8, 12, (3, 1, 1), padding=(1, 0, 0)),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(12, 4),
    ).eval()  # fmt: skip
    rows = layer_table(video, torch.randn(1, 3, 4, 16, 16))
    for fqn in ("0", "2", "3"):
        key = layer_key(video.get_submodule(fqn), rows[fqn], precision)
        assert key is not None and len(key.kernel) == 3
        (y,) = ort_session(_kernel_model(key)[0]).run(None, _kernel_model(key)[1])
        want = tuple(rows[fqn].out_shape)
        if precision == INT8:
            want = (want[0], *want[2:], want[1])
        assert tuple(y.shape) == want, fqn


def test_the_many_copy_model_runs_the_same_kernel_on_one_input(
    model: tuple[nn.Module, dict],
) -> None:
    """The differential timing's second model: COPIES identical outputs of one input."""
    from edgeslim.cost.lut import COPIES

    m, rows = model
    key = layer_key(m.get_submodule("conv"), rows["conv"], INT8)
    assert key is not None
    (one,) = ort_session(_kernel_model(key)[0]).run(None, _kernel_model(key)[1])
    data, feeds = _kernel_model(key, COPIES)
    outs = ort_session(data).run(None, feeds)
    assert len(outs) == COPIES and all(np.array_equal(o, one) for o in outs)


def test_unmodelled_layers_are_named_and_int8_follows_the_bits(
    model: tuple[nn.Module, dict], tmp_path
) -> None:
    m, rows = model
    table = LatencyTable(repeats=3, cache_dir=tmp_path)
    w = {"conv": 8, "dw": 4, "conv1d": 8, "fc": 8}
    a = {"conv": 8, "dw": 8, "conv1d": None, "fc": 8}
    lt = layer_times(table, m, rows, w, a)
    assert lt.unmodelled == ("lstm",)
    assert set(lt.layers) == {"conv", "dw", "conv1d", "fc"}
    # conv1d is weight-only (float kernel), the 4-bit dw runs as int8
    assert lt.int8_macs == rows["conv"].macs + rows["dw"].macs + rows["fc"].macs
    assert lt.macs == sum(r.macs for r in rows.values() if r.macs)
    assert runs_int8(4, 8) and not runs_int8(8, None) and not runs_int8(None, 8)
    assert not runs_int8(16, 8)


def test_weight_only_layers_are_timed_with_their_dequantize(
    model: tuple[nn.Module, dict], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A weight-only layer keeps a DequantizeLinear at run time (and loses the float
    model's pre-reordered kernel): its key is its own precision, and its timed model holds
    one dequantized int8 weight per copy (distinct, so none is merged away)."""
    from onnx import load_from_string

    from edgeslim.cost.lut import COPIES

    m, rows = model
    asked: list[str] = []
    table = LatencyTable(repeats=3, cache_dir=tmp_path)
    monkeypatch.setattr(table, "relative", lambda key: asked.append(key.precision) or 1.0)
    monkeypatch.setattr(table, "probe_ms", lambda precision: 1.0)
    w = {"conv": 8, "dw": 8, "conv1d": 4, "fc": None}
    a = {"conv": 8, "dw": None, "conv1d": None, "fc": None}
    layer_times(table, m, rows, w, a)
    assert asked == [INT8, WONLY, WONLY, FP32]  # conv, dw, conv1d, fc in graph order
    key = layer_key(m.get_submodule("conv"), rows["conv"], WONLY)
    assert key is not None
    graph = load_from_string(_kernel_model(key, COPIES)[0]).graph
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == COPIES and len({n.input[0] for n in dq}) == COPIES
    assert {i.name for i in graph.initializer} >= {n.input[0] for n in dq}


def test_cache_is_reused_across_instances(model: tuple[nn.Module, dict], tmp_path) -> None:
    m, rows = model
    first = LatencyTable(repeats=3, cache_dir=tmp_path)
    bits = dict.fromkeys(rows, 8)
    before = layer_times(first, m, rows, bits, bits)
    assert first.measured == 4
    path = first.save()
    assert path.parent == tmp_path and path.is_file()
    second = LatencyTable(repeats=3, cache_dir=tmp_path)
    again = layer_times(second, m, rows, bits, bits)
    assert second.measured == 0  # no kernel timed again; only the int8 probe, for its scale
    scale = second.probe_ms(INT8) / first.probe_ms(INT8)
    assert again.layers == pytest.approx({k: v * scale for k, v in before.layers.items()})
    path.write_text("{not json")  # a corrupt cache is measured afresh, not trusted
    third = LatencyTable(repeats=3, cache_dir=tmp_path)
    layer_times(third, m, rows, bits, bits)
    assert third.measured == 4


def test_entries_are_relative_to_a_probe_timed_with_them(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry is the kernel over its precision's probe, timed together; the same kernel's
    milliseconds follow whatever the probe measures now. The arithmetic is checked on fixed
    timings (the probe's own differential is about 10 us: beside another job, +-60% noise),
    the ordering on real ones."""
    from edgeslim.cost import lut

    big = layer_key(nn.Conv2d(16, 64, 3, padding=1), _row(16, 64, 28), INT8)
    assert big is not None
    table = LatencyTable(repeats=40, cache_dir=tmp_path)
    assert table.relative(big) > 2.0  # 16x the probe's MACs: not within noise of it
    timed: list[list[lut.LayerKey]] = []

    def fixed(keys, threads, repeats, seconds):  # type: ignore[no-untyped-def]
        # timed long enough for a stable median: KERNEL_SECONDS per kernel beside the probes
        kernels = [k for k in keys if k != lut.probe_key(k.precision)]
        assert seconds == pytest.approx(lut.KERNEL_SECONDS * len(kernels))
        timed.append(list(keys))
        return [0.3 if k == big else 0.1 for k in keys]

    monkeypatch.setattr(lut, "_differentials", fixed)
    table = LatencyTable(repeats=40, cache_dir=tmp_path / "fixed")
    assert table.relative(lut.probe_key(INT8)) == 1.0  # by definition: nothing timed
    assert timed == []
    assert table.relative(big) == pytest.approx(3.0)
    assert timed[-1] == [big, lut.probe_key(INT8)]  # the kernel and its probe, together
    assert len(timed) == 2  # two windows, which agree here
    table._probes[INT8] = 0.5
    assert table.layer_ms(big) == pytest.approx(1.5)


def test_missing_kernels_are_timed_together_in_chunks_with_their_probes(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels asked together share interleaved runs of at most KERNEL_CHUNK kernels, each
    run with the probe of every precision in it; each entry is over its own precision's
    probe; kernels already in the table are not timed again."""
    from edgeslim.cost import lut

    keys = [layer_key(nn.Conv2d(c, c, 3, padding=1), _row(c, c, 8), INT8) for c in range(1, 15)]
    floats = [layer_key(nn.Conv2d(c, 2 * c, 1), _row(c, 2 * c, 8), lut.FP32) for c in (3, 5)]
    asked = [k for k in [*keys, *floats] if k is not None]
    timed: list[list[lut.LayerKey]] = []
    probe_us = {INT8: 0.02, lut.FP32: 0.05}

    def fixed(run, threads, repeats, seconds):  # type: ignore[no-untyped-def]
        timed.append(list(run))
        return [probe_us[k.precision] if k == lut.probe_key(k.precision) else k.cin * 0.01
                for k in run]  # fmt: skip

    monkeypatch.setattr(lut, "_differentials", fixed)
    table = LatencyTable(cache_dir=tmp_path)
    assert table.measure(asked + asked[:3]) == len(asked) == 16
    runs = [r for i, r in enumerate(timed) if i % 2 == 0]  # two agreeing windows per run
    assert [len([k for k in r if k != lut.probe_key(k.precision)]) for r in runs] == [
        lut.KERNEL_CHUNK,
        16 - lut.KERNEL_CHUNK,
    ]
    for run in runs:
        kernels = [k for k in run if k != lut.probe_key(k.precision)]
        assert {k for k in run if k not in kernels} == {lut.probe_key(k.precision) for k in kernels}
    for k in asked:
        assert table.relative(k) == pytest.approx(k.cin * 0.01 / probe_us[k.precision])
    assert table.measure(asked) == 0 and len(timed) == 2 * len(runs)  # cached


def _row(cin: int, cout: int, hw: int) -> LayerInfo:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    return layer_table(conv, torch.randn(1, cin, hw, hw))[""]


_MS = st.floats(min_value=1e-4, max_value=100.0)


# a layer sum is 0 or at least a nanosecond: below that, scaling it underflows to 0.0
_SUM = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=100.0))


@given(_MS, _MS, _MS, _MS, _SUM, st.floats(0.0, 1.0))
def test_residual_keeps_the_anchors_exact_and_every_prediction_positive(
    f_meas: float, f_sum: float, i_meas: float, i_sum: float, layers: float, share: float
) -> None:
    """Whether the kernels' sum falls short of the whole model (an addend) or exceeds it
    (a scale), the two anchors predict their own measurements and no layer sum, however
    small, is predicted at or below zero."""
    r = Residual.fit((f_meas, f_sum), (i_meas, i_sum))
    assert r.predict(f_sum, 0.0) == pytest.approx(f_meas, rel=1e-9)
    assert r.predict(i_sum, 1.0) == pytest.approx(i_meas, rel=1e-9)
    assert r.predict(layers, share) >= 0.0
    if layers > 0:
        assert r.predict(layers, share) > 0.0
    # a heavier layer sum is never predicted faster
    assert r.predict(layers + 1.0, share) > r.predict(layers, share)


# an int8 share of MACs is 0 or a real fraction: a subnormal one (5e-324) times the floor
# rounds to 0 in floating point, which no policy's share can be
@given(_MS, _MS, _MS, _MS, _MS, _MS, _SUM, st.floats(0.0, 1.0, allow_subnormal=False))
def test_a_narrow_anchor_fits_a_line_through_both_int8_anchors(
    f_meas: float, f_sum: float, i_meas: float, i_sum: float, n_meas: float, n_sum: float,
    layers: float, share: float,
) -> None:  # fmt: skip
    """With the narrowest int8 policy as a third anchor, all three anchors predict their own
    measurements when the line through the int8 ones rises; predictions stay positive and
    never fall as the layer sum grows."""
    r = Residual.fit((f_meas, f_sum), (i_meas, i_sum), (n_meas, n_sum))
    assert r.predict(f_sum, 0.0) == pytest.approx(f_meas, rel=1e-9)
    assert r.predict(i_sum, 1.0) == pytest.approx(i_meas, rel=1e-9)
    line = n_sum < i_sum and n_meas < i_meas
    assert (r.floor_ms > 0) == line
    if line:
        assert r.predict(n_sum, 1.0) == pytest.approx(n_meas, rel=1e-9)
    positive = layers > 0 or (line and share > 0)
    assert r.predict(layers, share) > 0.0 if positive else r.predict(layers, share) >= 0.0
    assert r.predict(layers + 1.0, share) >= r.predict(layers, share)


def test_the_narrow_anchor_keeps_per_op_cost_that_a_scale_removed() -> None:
    """resnet20's case (benchmarks/search_resnet20, now in the git history): the int8
    kernels over-count (scale 0.66), so a scale alone predicted a half-width model far too
    fast."""
    scale_only = Residual.fit((0.62, 0.76), (0.35, 0.53))
    line = Residual.fit((0.62, 0.76), (0.35, 0.53), (0.27, 0.25))
    assert scale_only.predict(0.25, 1.0) == pytest.approx(0.35 * 0.25 / 0.53)  # 0.165 ms
    assert line.predict(0.25, 1.0) == pytest.approx(0.27)
    assert line.predict(0.40, 1.0) > scale_only.predict(0.40, 1.0)
    # a narrow anchor that is not narrower, or measured slower, changes nothing
    assert Residual.fit((0.62, 0.76), (0.35, 0.53), (0.40, 0.25)) == scale_only
    assert Residual.fit((0.62, 0.76), (0.35, 0.53), (0.30, 0.60)) == scale_only


def test_an_over_counting_sum_is_scaled_not_made_negative() -> None:
    """The case CI met: the layers sum to 0.08 ms, the model measures 0.03 ms; a policy
    whose layers sum to 0.01 ms was predicted at -0.04 ms by an additive residual."""
    r = Residual.fit((0.03, 0.08))
    assert (r.fp32_ms, r.fp32_scale) == (0.0, pytest.approx(0.375))
    assert r.predict(0.01, 0.0) == pytest.approx(0.00375)
    r = Residual.fit((0.10, 0.08))  # the common case: adds and pools beyond the layers
    assert (r.fp32_ms, r.fp32_scale) == (pytest.approx(0.02), 1.0)
    assert r.predict(0.01, 0.0) == pytest.approx(0.03)
