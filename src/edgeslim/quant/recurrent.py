"""Quantized recurrent layers: cells (LSTMCell, GRUCell, RNNCell) and sequences (LSTM, GRU, RNN).

Every twin is built from two :class:`QuantLinear` per layer and direction, ``ih`` (input ->
gates) and ``hh`` (hidden -> gates), and the gate math written with plain slicing (``chunk``
fails the ONNX export with dynamic shapes: ``unsafe_chunk, unknown dimension size``). The
matmuls are then ordinary quantized linears: in the QDQ export each is ``DQ -> Gemm``, which
ONNX Runtime runs as an integer ``QGemm``; the gate nonlinearities stay in float. With
quantization off the twins compute what torch's layers compute (to 1e-5).

Decision for ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (:class:`QuantRNN`): the sequence is unrolled,
one input projection over all ``batch * time`` rows and one quantized ``hh`` matmul per
step. This gives integer kernels for LSTM *and* GRU with one piece of code, and the torch
simulation is exactly what the file computes (static QDQ on ``x`` and ``h``, int8 weights).
ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` was the alternative for LSTM: it keeps
the sequence length free, but quantizes activations dynamically (a different scheme from the
calibrated one simulated here), needs the exported ``LSTM`` node rewritten with its weights
matched back to the module, and has no GRU counterpart. Unrolling fixes the sequence length
in the file; the exported input shapes fix it already (only the batch axis is dynamic), and
the batch stays dynamic (the projections reshape with ``-1``). Long sequences make long
graphs (about 15 nodes per step and direction).

FQN mapping (the float names still read as attributes, ``rnn.weight_ih_l0`` works):
``cell.weight_ih -> cell.ih.weight``, ``cell.bias_hh -> cell.hh.bias``,
``rnn.weight_ih_l1_reverse -> rnn.ih_l1_reverse.weight``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from edgeslim.quant.config import QuantConfig
from edgeslim.quant.modules import ActQuant, QuantLinear, QuantMixin

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
    def why_not(rnn: nn.Module) -> str | None:
        """Why this layer cannot be quantized (None when it can)."""
        if getattr(rnn, "proj_size", 0):
            return "LSTM with proj_size > 0 has no quantized twin"
        return None

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: 2 if self.bidirectional else 1]

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
