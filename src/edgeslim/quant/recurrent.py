"""Quantized recurrent layers: cells (LSTMCell, GRUCell, RNNCell) and sequences (LSTM, GRU, RNN).

Every twin is built from two :class:`QuantLinear` per layer and direction, ``ih`` (input ->
gates) and ``hh`` (hidden -> gates), and the gate math written with plain slicing (``chunk``
fails the ONNX export with dynamic shapes: ``unsafe_chunk, unknown dimension size``). The
matmuls are then ordinary quantized linears: in the QDQ export each is ``DQ -> Gemm``, which
ONNX Runtime runs as an integer ``QGemm``; the gate nonlinearities stay in float. With
quantization off the twins compute what torch's layers compute (to 1e-5).

Decision for ``nn.LSTM`` (:class:`QuantRNN`), measured: the torch simulation (``quant``
mode) unrolls the sequence, one input projection over all ``batch * time`` rows and one
quantized ``hh`` matmul per step, with static calibrated QDQ on ``x`` and ``h`` and int8
weights. The *export* does not unroll: unrolled, ONNX Runtime ran one ``QGemm`` plus about 15
nodes per step and the conv-lstm zoo model measured 3.3x slower than its fp32 file (0.170 vs
0.051 ms, batch 1, 2 threads), whose ``LSTM`` is one fused kernel. In ``export`` mode the twin
runs torch's own LSTM on its dequantized int8 weights, so the exporter writes one ONNX
``LSTM`` per layer, and :func:`edgeslim.export.recurrent.quantize_lstm` rewrites it to ONNX
Runtime's ``com.microsoft.DynamicQuantizeLSTM`` with int8 ``W``/``R`` on the twin's grids
(per output channel or per tensor): one integer kernel per layer, and the sequence length
stays dynamic. conv-lstm W8A8 then measured 1.1x *faster* than fp32 (0.040 vs 0.044 ms), 99.8%
argmax agreement with fp32 on 1000 Fashion-MNIST test images, int8_mac_share 1.0. The price:
that kernel quantizes ``x`` and ``h`` per call (uint8, the range of each call), while the
simulation uses the calibrated static ranges, so torch and the file differ slightly
(relative L2 below 0.011 on the tests' random inputs; 100% argmax agreement and 0.002 on
conv-lstm's logits). Weight grids that are not uniform per tensor/channel in int8 (groups,
SmoothQuant) keep the unrolled export.

Decision for ``nn.GRU``/``nn.RNN``: ONNX Runtime has no integer GRU/RNN kernel, and the
unrolled int8 form measured slower than the fused float op (conv-lstm with its LSTM replaced
by GRU(48, 64): 0.187 vs 0.040 ms, 4.6x; RNN: 0.077 vs 0.035 ms, 2.2x), so default PTQ/QAT
leaves them float with a warning naming the layer (:meth:`QuantRNN.why_not`); a ``select``
entry naming them still forces the unrolled twin (``QGemm`` per step; sequence length fixed at
export, batch dynamic). With the GRU float and the conv int8 the file ran at fp32 speed
(0.049 vs 0.047 ms).

FQN mapping (the float names still read as attributes, ``rnn.weight_ih_l0`` works):
``cell.weight_ih -> cell.ih.weight``, ``cell.bias_hh -> cell.hh.bias``,
``rnn.weight_ih_l1_reverse -> rnn.ih_l1_reverse.weight``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from edgeslim.quant.config import QuantConfig
from edgeslim.quant.modules import ActQuant, QuantLinear, QuantMixin
from edgeslim.quant.quantizers import EPS, UniformQuantizer

KEEP_GRU_RNN_FLOAT = True
"""Default PTQ/QAT leaves ``nn.GRU``/``nn.RNN`` float (a ``select`` entry still forces them)."""
UNROLLED_SLOWDOWN = {"GRU": 4.6, "RNN": 2.2}
"""Measured ORT latency of the unrolled int8 sequence over the fused float op, batch 1, on
the conv-lstm zoo model with its LSTM(48, 64) replaced (28 steps): GRU 0.187 vs 0.040 ms,
RNN 0.077 vs 0.035 ms (ONNX Runtime 1.32, 2 threads, interleaved medians)."""

_FLOAT_NAME = re.compile(r"^(weight|bias)_(ih|hh)(.*)$")
_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def lstm_step(
    gates: torch.Tensor, c: torch.Tensor, hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update from the summed gate pre-activations (torch's order i, f, g, o)."""
    i = torch.sigmoid(gates[..., :hidden])
    f = torch.sigmoid(gates[..., hidden : 2 * hidden])
    g = torch.tanh(gates[..., 2 * hidden : 3 * hidden])
    o = torch.sigmoid(gates[..., 3 * hidden :])
    c = f * c + i * g
    return o * torch.tanh(c), c


def gru_step(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, hidden: int) -> torch.Tensor:
    """One GRU update (torch's order r, z, n; ``r`` gates ``hh``'s n-part, bias included)."""
    r = torch.sigmoid(gi[..., :hidden] + gh[..., :hidden])
    z = torch.sigmoid(gi[..., hidden : 2 * hidden] + gh[..., hidden : 2 * hidden])
    n = torch.tanh(gi[..., 2 * hidden :] + r * gh[..., 2 * hidden :])
    return (1 - z) * n + z * h


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, qconfig: QuantConfig) -> QuantLinear:
    """A :class:`QuantLinear` holding a copy of one gate matrix of a torch recurrent layer."""
    lin = nn.Linear(
        weight.shape[1], weight.shape[0], bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return QuantLinear.from_float(lin, qconfig)


def _weight_codes(lin: QuantLinear) -> tuple[Any, Any, Any] | None:
    """``(codes, scale, zero_point)`` of a linear's weight grid as int8 numpy arrays, one
    scale per output row (a per-tensor grid repeats its scale); None when the grid is not
    uniform per tensor/per channel in int8 (the fused LSTM export then does not apply)."""
    q = lin.weight_quantizer
    if not isinstance(q, UniformQuantizer) or getattr(lin, "smooth_scale", None) is not None:
        return None
    if q.scale.numel() != 1 and (
        q.spec.granularity != "channel" or q.scale.numel() != lin.out_features
    ):
        return None
    if q.qmax - q.qmin > 255:
        return None
    with torch.no_grad():
        deq = q.quantize(lin.weight.detach()).float().cpu().numpy()
    rows = deq.shape[0]
    scale = q.scale.detach().float().clamp_min(EPS).cpu().numpy().reshape(-1)
    scale = np.broadcast_to(scale, (rows,))
    zp = np.broadcast_to(np.rint(q.zero_point.detach().float().cpu().numpy().reshape(-1)), (rows,))
    shift = 128 if q.qmax > 127 else 0  # unsigned grids stored as int8: codes and zp - 128
    codes = np.rint(deq / scale[:, None]) + zp[:, None] - shift
    return codes.astype(np.int8), scale.astype(np.float32), (zp - shift).astype(np.int8)


class _FloatNames(nn.Module):
    """``weight_ih``/``bias_hh_l0``... read as attributes of the ``ih``/``hh`` linears."""

    def __getattr__(self, name: str) -> Any:
        m = _FLOAT_NAME.match(name)
        if m is not None and not name.startswith("_"):
            return getattr(super().__getattr__(m.group(2) + m.group(3)), m.group(1))
        return super().__getattr__(name)


class _QuantCell(_FloatNames):
    """Shared part of the cell twins: ``ih`` and ``hh`` quantized linears."""

    kind = "lstm"

    def __init__(self, ih: QuantLinear, hh: QuantLinear, hidden_size: int) -> None:
        super().__init__()
        self.ih = ih
        self.hh = hh
        self.input_size = ih.in_features
        self.hidden_size = hidden_size

    @classmethod
    def from_float(cls, cell: nn.RNNCellBase, qconfig: QuantConfig) -> Any:
        new = cls(
            _linear(cell.weight_ih, cell.bias_ih, qconfig),
            _linear(cell.weight_hh, cell.bias_hh, qconfig),
            cell.hidden_size,
        )
        if isinstance(cell, nn.RNNCell):
            new.kind = f"rnn_{cell.nonlinearity}"
        new.train(cell.training)
        return new

    def _zeros(self, gi: torch.Tensor) -> torch.Tensor:
        """A zero state shaped like the input's batch (fx- and ONNX-friendly: no shape ops)."""
        return torch.zeros_like(gi[..., : self.hidden_size])

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class QuantLSTMCell(_QuantCell):
    """``nn.LSTMCell`` from two quantized linears: ``(h, c) = cell(x, (h, c))``."""

    def forward(
        self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gi = self.ih(x)
        if hx is None:
            h = c = self._zeros(gi)
        else:
            h, c = hx
        return lstm_step(gi + self.hh(h), c, self.hidden_size)


class QuantGRUCell(_QuantCell):
    """``nn.GRUCell`` from two quantized linears: ``h = cell(x, h)``."""

    kind = "gru"

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        gi = self.ih(x)
        h = self._zeros(gi) if hx is None else hx
        return gru_step(gi, self.hh(h), h, self.hidden_size)


class QuantRNNCell(_QuantCell):
    """``nn.RNNCell`` (tanh or relu) from two quantized linears: ``h = cell(x, h)``."""

    kind = "rnn_tanh"

    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        gi = self.ih(x)
        h = self._zeros(gi) if hx is None else hx
        pre = gi + self.hh(h)
        return torch.relu(pre) if self.kind == "rnn_relu" else torch.tanh(pre)


class QuantRNN(QuantMixin, _FloatNames):
    """``nn.LSTM``/``nn.GRU``/``nn.RNN`` unrolled over time with quantized matmuls.

    In ``export`` mode an LSTM (see :meth:`fused_export`) instead runs torch's fused LSTM on
    its int8-grid weights and exports as ``DynamicQuantizeLSTM`` (module doc): the simulation
    quantizes ``x``/``h`` statically, ONNX Runtime's kernel per call.

    A :class:`QuantMixin` so that tracing keeps it whole (its loop runs over the input's
    length) and :func:`~edgeslim.quant.edges.quantize_edges` quantizes its input edge, letting
    the layer that produces the sequence run as an integer kernel too. ``ih_l{k}`` then
    quantizes the (reshaped) input again right before its Gemm, with a range calibrated on
    the already quantized values. No weight of its own (``weight_quantizer`` is None).
    """

    def __init__(self, rnn: nn.RNNBase, qconfig: QuantConfig) -> None:
        nn.Module.__init__(self)
        self.kind = {nn.LSTM: "lstm", nn.GRU: "gru"}.get(type(rnn), "")
        if isinstance(rnn, nn.RNN):
            self.kind = f"rnn_{rnn.nonlinearity}"
        self.input_size, self.hidden_size = rnn.input_size, rnn.hidden_size
        self.num_layers, self.bias = rnn.num_layers, rnn.bias
        self.batch_first, self.dropout = rnn.batch_first, float(rnn.dropout)
        self.bidirectional = rnn.bidirectional
        for layer in range(self.num_layers):
            for sfx in self._suffixes(layer):
                w_ih, w_hh = getattr(rnn, f"weight_ih{sfx}"), getattr(rnn, f"weight_hh{sfx}")
                b_ih = getattr(rnn, f"bias_ih{sfx}") if self.bias else None
                b_hh = getattr(rnn, f"bias_hh{sfx}") if self.bias else None
                self.add_module(f"ih{sfx}", _linear(w_ih, b_ih, qconfig))
                self.add_module(f"hh{sfx}", _linear(w_hh, b_hh, qconfig))
        self.qconfig = qconfig
        self.mode = "quant"
        self.weight_quantizer = None
        self.w_estimator = None
        self.input_quant = None if qconfig.activation is None else ActQuant(qconfig.activation)
        self.train(rnn.training)

    @classmethod
    def from_float(cls, rnn: nn.RNNBase, qconfig: QuantConfig) -> QuantRNN:
        return cls(rnn, qconfig)

    @staticmethod
    def why_not(rnn: nn.Module, selected: bool = False) -> str | None:
        """Why this layer stays float (None when it is quantized).

        ``nn.GRU``/``nn.RNN`` stay float unless ``selected`` (a ``select`` entry names them
        with a config): ONNX Runtime has no integer kernel for them, and their unrolled int8
        form runs slower than its own fused float op (see :data:`UNROLLED_SLOWDOWN`).
        """
        if getattr(rnn, "proj_size", 0):
            return "LSTM with proj_size > 0 has no quantized twin"
        kind = type(rnn).__name__
        if KEEP_GRU_RNN_FLOAT and kind in UNROLLED_SLOWDOWN and not selected:
            return (
                f"ONNX Runtime has no integer {kind} kernel; the unrolled int8 form measured "
                f"{UNROLLED_SLOWDOWN[kind]:.1f}x slower than its fused float {kind} (batch 1, "
                f"ONNX Runtime 1.32, 2 threads), so it stays float by default. Quantize it "
                f"anyway with a select entry naming it (recipe: `select: {{<fqn>: ...}}`)"
            )
        return None

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: 2 if self.bidirectional else 1]

    def to_float(self) -> nn.RNNBase:
        """The torch layer with these weights (unquantized), for structure views."""
        kinds: dict[str, Any] = {"lstm": nn.LSTM, "gru": nn.GRU}
        extra = {} if self.kind in kinds else {"nonlinearity": self.kind.removeprefix("rnn_")}
        rnn: nn.RNNBase = kinds.get(self.kind, nn.RNN)(
            self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout,
            bidirectional=self.bidirectional, **extra,
        )  # fmt: skip
        with torch.no_grad():
            for layer in range(self.num_layers):
                for sfx in self._suffixes(layer):
                    for part in ("ih", "hh"):
                        lin = getattr(self, f"{part}{sfx}")
                        getattr(rnn, f"weight_{part}{sfx}").copy_(lin.weight)
                        if self.bias:
                            getattr(rnn, f"bias_{part}{sfx}").copy_(lin.bias)
        return rnn.train(self.training)

    @property
    def _weight(self) -> torch.Tensor:
        raise AttributeError("QuantRNN has one weight per gate matrix: see ih_l*/hh_l*")

    def _direction(
        self, sfx: str, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, reverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One layer in one direction over ``x`` (batch, time, features)."""
        ih, hh = getattr(self, f"ih{sfx}"), getattr(self, f"hh{sfx}")
        steps = int(x.shape[1])
        gi = ih(x.reshape(-1, x.shape[-1])).reshape(-1, steps, ih.out_features)
        w_hh = hh.quant_weight()  # once, not per step: one int8 initializer in the file

        def project(h: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(hh.quant_input(h), w_hh, hh.bias)

        outs: list[torch.Tensor] = [h] * steps
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            if self.kind == "lstm":
                assert c is not None
                h, c = lstm_step(gi[:, t] + project(h), c, self.hidden_size)
            elif self.kind == "gru":
                h = gru_step(gi[:, t], project(h), h, self.hidden_size)
            else:
                pre = gi[:, t] + project(h)
                h = torch.relu(pre) if self.kind == "rnn_relu" else torch.tanh(pre)
            outs[t] = h
        return torch.stack(outs, 1), h, c

    def forward(self, input: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if isinstance(input, PackedSequence):
            raise TypeError(
                "QuantRNN takes padded tensors, not PackedSequence: pad the batch, or keep "
                "this layer in float with select: {<fqn>: null}"
            )
        x = self.quant_input(input)
        if self.mode == "export" and self.fused_export():
            return self._export_lstm(x, hx)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (batch, time, features) inside
        dirs = 2 if self.bidirectional else 1
        lstm = self.kind == "lstm"
        h0, c0 = (hx if lstm else (hx, None)) if hx is not None else (None, None)
        if h0 is None:
            h0 = x.new_zeros(self.num_layers * dirs, x.shape[0], self.hidden_size)
            c0 = h0 if lstm else None
        elif unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        hs: list[torch.Tensor] = []
        cs: list[torch.Tensor] = []
        for layer in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes(layer)):
                k = layer * dirs + d
                c_k = c0[k] if c0 is not None else None
                out, h, c = self._direction(sfx, x, h0[k], c_k, d == 1)
                outs.append(out)
                hs.append(h)
                if c is not None:
                    cs.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n, c_n = torch.stack(hs), torch.stack(cs) if lstm else None
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return out, ((h_n, c_n) if lstm else h_n)

    def fused_export(self) -> bool:
        """Whether export writes one ONNX ``LSTM`` node per layer (rewritten to ONNX
        Runtime's ``DynamicQuantizeLSTM``): an LSTM whose gate matrices all have uniform
        per-tensor or per-output-channel int8-representable weight grids (no SmoothQuant
        divisor). Otherwise the export unrolls the sequence, as the simulation does."""
        if self.kind != "lstm":
            return False
        for layer in range(self.num_layers):
            for sfx in self._suffixes(layer):
                for lin in (getattr(self, f"ih{sfx}"), getattr(self, f"hh{sfx}")):
                    if _weight_codes(lin) is None:
                        return False
        return True

    def _export_lstm(self, x: torch.Tensor, hx: Any) -> tuple[torch.Tensor, Any]:
        """Export mode: torch's own LSTM on the dequantized int8 weights, so that the
        TorchScript exporter writes one ``LSTM`` node per layer. The weights enter as
        constants and their grids are registered for the ONNX post-pass
        (:func:`edgeslim.export.recurrent.quantize_lstm`), which stores them as int8 ``W``/``R``
        of a ``com.microsoft.DynamicQuantizeLSTM``. ``x``/``h`` quantizers are not exported:
        that kernel quantizes them per call."""
        from edgeslim.export.recurrent import register_lstm_grid

        flat: list[torch.Tensor] = []  # torch's order: w_ih, w_hh[, b_ih, b_hh] per direction
        for layer in range(self.num_layers):
            grids: dict[str, list[tuple[Any, Any, Any]]] = {"ih": [], "hh": []}
            for sfx in self._suffixes(layer):
                for part in ("ih", "hh"):
                    lin = getattr(self, f"{part}{sfx}")
                    codes = _weight_codes(lin)
                    assert codes is not None
                    k, scale, zp = codes
                    grids[part].append(codes)
                    deq = ((k.astype(np.float32) - zp[:, None]) * scale[:, None]).astype(np.float32)
                    flat.append(torch.from_numpy(deq).to(x.device, x.dtype))
                if self.bias:
                    for part in ("ih", "hh"):
                        b = getattr(self, f"{part}{sfx}").bias.detach().cpu().numpy().copy()
                        flat.append(torch.from_numpy(b).to(x.device, x.dtype))
            for part in ("ih", "hh"):
                register_lstm_grid(grids[part], self.hidden_size)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0 if self.batch_first else 1)
        dirs = 2 if self.bidirectional else 1
        if hx is None:
            batch = x.shape[0] if self.batch_first else x.shape[1]
            shape = (self.num_layers * dirs, batch, self.hidden_size)
            h0 = torch.zeros(shape, dtype=x.dtype, device=x.device)
            c0 = h0
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        out, h_n, c_n = torch._VF.lstm(
            x, (h0, c0), flat, self.bias, self.num_layers, 0.0, False,
            self.bidirectional, self.batch_first,
        )  # fmt: skip
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def extra_repr(self) -> str:
        return (
            f"{self.kind}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, batch_first={self.batch_first}"
        )


RECURRENT_TO_QUANT: dict[type[nn.Module], Any] = {
    nn.LSTMCell: QuantLSTMCell,
    nn.GRUCell: QuantGRUCell,
    nn.RNNCell: QuantRNNCell,
    nn.LSTM: QuantRNN,
    nn.GRU: QuantRNN,
    nn.RNN: QuantRNN,
}
"""Float recurrent layer type -> its quantized twin (exact type)."""
