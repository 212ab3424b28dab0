"""Recurrent twins: float parity with torch (quantization off), W8A8 close to fp32, FQNs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from edgeslim.quant import QuantConfig, QuantSpec, quant_layers, quantize_
from edgeslim.quant.config import w8a8
from edgeslim.quant.modules import ActQuant, QuantMixin
from edgeslim.quant.ptq import ptq
from edgeslim.quant.recurrent import (
    KEEP_GRU_RNN_FLOAT,
    RECURRENT_TO_QUANT,
    UNROLLED_SLOWDOWN,
    QuantLSTMCell,
    QuantRNN,
)

FLOAT_ATOL = 1e-5  # quantization off: the twin computes torch's layer
MAX_REL_L2 = 0.05  # W8A8, calibrated ranges, random inputs


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _float_mode(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (QuantMixin, ActQuant)):
            m.mode = "float"


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple[Any, ...]]]] = {
    "lstm_cell": (
        lambda: nn.LSTMCell(6, 8),
        lambda b: (torch.randn(b, 6), (torch.randn(b, 8), torch.randn(b, 8))),
    ),
    "lstm_cell_no_state": (lambda: nn.LSTMCell(6, 8), lambda b: (torch.randn(b, 6),)),
    "lstm_cell_unbatched": (lambda: nn.LSTMCell(6, 8), lambda b: (torch.randn(6),)),
    "gru_cell": (lambda: nn.GRUCell(6, 8), lambda b: (torch.randn(b, 6), torch.randn(b, 8))),
    "gru_cell_no_bias": (
        lambda: nn.GRUCell(6, 8, bias=False),
        lambda b: (torch.randn(b, 6), torch.randn(b, 8)),
    ),
    "rnn_cell_relu": (
        lambda: nn.RNNCell(6, 8, nonlinearity="relu"),
        lambda b: (torch.randn(b, 6),),
    ),
    "lstm": (
        lambda: nn.LSTM(6, 8, batch_first=True),
        lambda b: (torch.randn(b, 5, 6), (torch.randn(1, b, 8), torch.randn(1, b, 8))),
    ),
    "lstm_2layer_bidir": (
        lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True),
        lambda b: (torch.randn(5, b, 6),),
    ),
    "lstm_unbatched": (lambda: nn.LSTM(6, 8), lambda b: (torch.randn(5, 6),)),
    "gru": (
        lambda: nn.GRU(6, 8, batch_first=True),
        lambda b: (torch.randn(b, 5, 6), torch.randn(1, b, 8)),
    ),
    "gru_2layer_bidir": (
        lambda: nn.GRU(6, 8, num_layers=2, bidirectional=True, bias=False),
        lambda b: (torch.randn(5, b, 6),),
    ),
    "rnn_tanh": (lambda: nn.RNN(6, 8, num_layers=2), lambda b: (torch.randn(5, b, 6),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_twin_with_quantization_off_matches_torch(name: str) -> None:
    torch.manual_seed(0)
    make, inputs = CASES[name]
    layer = make().eval()
    twin = RECURRENT_TO_QUANT[type(layer)].from_float(layer, w8a8())
    _float_mode(twin)
    args = inputs(3)
    with torch.no_grad():
        want, got = _flat(layer(*args)), _flat(twin(*args))
    assert [w.shape for w in want] == [g.shape for g in got]
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=FLOAT_ATOL)


class Holder(nn.Module):
    """The recurrent layer as a child (``quantize_`` swaps children, not the root)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> Any:
        return self.layer(x)


class Holder2(Holder):
    def forward(self, x: torch.Tensor, h: torch.Tensor) -> Any:  # type: ignore[override]
        return self.layer(x, h)


class Holder3(Holder):
    """An LSTM state as two flat inputs, as a traced model and its batches need."""

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Any:  # type: ignore[override]
        return self.layer(x, (h, c))


def _forced(model: Holder) -> Holder:
    """A copy of ``model`` whose GRU/RNN is already its twin: default PTQ keeps them float
    (:data:`KEEP_GRU_RNN_FLOAT`), and ``ptq`` calibrates a twin it finds in place."""
    model = copy.deepcopy(model)
    if type(model.layer) in (nn.GRU, nn.RNN):
        model.layer = QuantRNN.from_float(model.layer, w8a8())
    return model


def _flat_inputs(args: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(_flat(list(args)))


@pytest.mark.parametrize(
    "name", ["lstm_cell", "gru_cell", "lstm", "lstm_2layer_bidir", "gru", "gru_2layer_bidir"]
)
def test_w8a8_is_close_to_fp32(name: str) -> None:
    torch.manual_seed(0)
    make, inputs = CASES[name]
    arity = len(_flat_inputs(inputs(1)))
    model = {1: Holder, 2: Holder2, 3: Holder3}[arity](make()).eval()
    q = ptq(_forced(model), w8a8(), [_flat_inputs(inputs(32)) for _ in range(2)])
    assert {"layer.ih", "layer.hh"} <= set(quant_layers(q)) or isinstance(q.layer, QuantRNN)
    assert isinstance(q, torch.fx.GraphModule)  # traced: activations on graph edges
    args = _flat_inputs(inputs(16))
    with torch.no_grad():
        for w, g in zip(_flat(model(*args)), _flat(q(*args)), strict=True):
            err = float((g - w).norm() / w.norm())
            assert err < MAX_REL_L2, f"{name}: relative L2 error {err:.4f}"


def test_float_names_read_through_and_fqns_are_documented() -> None:
    model = Holder(nn.LSTM(4, 5, num_layers=2, bidirectional=True))
    weight = model.layer.weight_hh_l1_reverse.detach().clone()
    quantize_(model, QuantConfig(QuantSpec(bits=8)))
    twin = model.layer
    assert isinstance(twin, QuantRNN)
    torch.testing.assert_close(twin.weight_hh_l1_reverse, weight)
    assert twin.weight_hh_l1_reverse is twin.hh_l1_reverse.weight
    names = {n for n, _ in model.named_parameters()}
    assert {"layer.ih_l0.weight", "layer.hh_l1_reverse.bias"} <= names
    assert set(quant_layers(model)) >= {"layer", "layer.ih_l0", "layer.hh_l1_reverse"}
    cell = Holder(nn.LSTMCell(3, 4))
    quantize_(cell, QuantConfig(QuantSpec(bits=8)))
    assert isinstance(cell.layer, QuantLSTMCell) and cell.layer.bias_ih is cell.layer.ih.bias


def test_lstm_with_projection_stays_float_with_a_reason() -> None:
    model = Holder(nn.LSTM(4, 6, proj_size=3))
    with pytest.warns(UserWarning, match=r"layer \(LSTM\): LSTM with proj_size > 0"):
        quantize_(model, QuantConfig(QuantSpec(bits=8)))
    assert type(model.layer) is nn.LSTM


@pytest.mark.parametrize("make", [lambda: nn.GRU(4, 6), lambda: nn.RNN(4, 6)], ids=["gru", "rnn"])
def test_gru_and_rnn_stay_float_by_default_and_say_why(make: Callable[[], nn.Module]) -> None:
    assert KEEP_GRU_RNN_FLOAT
    layer = make()
    kind = type(layer).__name__
    model = Holder(layer)
    msg = (
        rf"layer \({kind}\): ONNX Runtime has no integer {kind} kernel; the unrolled int8 "
        rf"form measured {UNROLLED_SLOWDOWN[kind]:.1f}x slower than its fused float {kind}"
    )
    with pytest.warns(UserWarning, match=msg):
        quantize_(model, QuantConfig(QuantSpec(bits=8)))
    assert type(model.layer) is type(layer)
    assert QuantRNN.why_not(layer, selected=True) is None  # a select entry can force it
    assert QuantRNN.why_not(nn.LSTM(4, 6)) is None  # LSTM: DynamicQuantizeLSTM, quantized


def test_lstm_export_mode_runs_torch_lstm_on_the_int8_grid() -> None:
    """Export mode (what the ONNX file holds): torch's LSTM on the dequantized weights, with
    float x/h (ONNX Runtime quantizes them per call): close to the quant-mode simulation."""
    torch.manual_seed(0)
    make, inputs = CASES["lstm_2layer_bidir"]
    model = Holder(make()).eval()
    q = ptq(model, w8a8(), [_flat_inputs(inputs(32)) for _ in range(2)])
    twin = q.layer
    assert isinstance(twin, QuantRNN) and twin.fused_export()
    args = _flat_inputs(inputs(16))
    with torch.no_grad():
        sim = _flat(q(*args))
        for m in q.modules():
            if isinstance(m, (QuantMixin, ActQuant)):
                m.mode = "export"
        exported = _flat(q(*args))
        fp32 = _flat(model(*args))
    for s, e, f in zip(sim, exported, fp32, strict=True):
        assert float((e - s).norm() / s.norm()) < MAX_REL_L2
        assert float((e - f).norm() / f.norm()) < MAX_REL_L2
