"""Hardswish and hardsigmoid on integers: a gate on a fixed 8-bit grid, no float island.

ONNX Runtime has no integer kernel for ``HardSwish``/``HardSigmoid``: between two integer
convs, ``DQ -> HardSwish -> Q`` runs as four float passes (it splits HardSwish into
HardSigmoid and Mul). On the 28x28 MobileNetV3-small of the zoo those islands made the
int8 model barely faster than fp32 (1.03x at batch 1, 2 threads).

Both functions are a clipped affine map and a product::

    hardsigmoid(x) = relu6(x + 3) / 6        hardswish(x) = x * hardsigmoid(x)

so the gate is computed as ``relu6(x + 3)`` quantized to uint8 on the **fixed** range
``[0, 6]`` (scale 6/255, zero point 0: the quantizer's saturation *is* the clip), then
scaled by 1/6. Exported, that is ``Add(DQ(x), DQ(3)) -> Q`` (ONNX Runtime's
``QLinearAdd``) and, for hardswish, ``Mul(DQ(x), DQ(gate)) -> Q`` (``QLinearMul``); the
``/ 6`` folds into the gate's DequantizeLinear scale and the ``Clip`` into its Q (see
:mod:`edgeslim.export.qdq`). Measured on that model (ad hoc, interleaved with fp32, 2 threads,
batch 1): 1.03x -> 1.13x over fp32, and 1.14-1.16x with the squeeze-excite gates' ``+ 3``
folded into their conv's bias (:func:`fold_shift`); 1.27x in the committed
``benchmarks/operators`` run, on a slower state of the same machine.

Decision — the gate's grid is fixed, never calibrated: its range is known exactly, and 8
bits give it a step of 1/255 (at most half a step of error, the same as any 8-bit
activation), whatever the activation bit-width of the model.

A hardswish whose input quantizer feeds it alone needs no gate grid at all: that input
grid is aligned at calibration so that -3 is a code (:class:`ShiftGridActQuant`), and the
gate is then the input's own codes clipped at ``2k`` (export:
:func:`edgeslim.export.qdq.hardswish_on_codes`), one ``Clip`` where the fixed grid needs a
``QLinearAdd``. On the same model (ad hoc, one process, median of 5 interleaved rounds):
1.22x over fp32 against 1.16x for the fixed-grid gates, agreement with fp32 99.09%
against 99.29%.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from edgeslim.quant.modules import ActQuant
from edgeslim.quant.quantizers import UniformQuantizer
from edgeslim.quant.spec import QuantSpec

GATE_SPEC = QuantSpec(
    bits=8, granularity="tensor", symmetric=False, estimator="ste", observer="minmax"
)
SHIFT = 3.0  # hardsigmoid(x) = relu6(x + SHIFT) / RANGE
RANGE = 6.0


class FixedActQuant(ActQuant):
    """An activation quantizer on a fixed range ``[lo, hi]``: calibration leaves it alone
    (in ``observe`` mode it already quantizes, so later observers see deployed values)."""

    def __init__(self, lo: float, hi: float, spec: QuantSpec = GATE_SPEC) -> None:
        super().__init__(spec)
        q = self.quantizer
        assert isinstance(q, UniformQuantizer)
        q.set_range(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            estimator: Any = self.estimator
            out: torch.Tensor = estimator(self.quantizer, x)
            return out
        return super().forward(x)

    def finish_observing(self) -> None:
        self.observer = None
        self.mode = "quant"


def shift_grid_eligible(spec: QuantSpec) -> bool:
    """Whether an activation grid of ``spec`` can be aligned so that ``-SHIFT`` is a code:
    8-bit asymmetric (uint8) per-tensor uniform, the grid ONNX Runtime's kernels read."""
    return (
        spec.quantizer == "uniform"
        and spec.bits == 8
        and not spec.symmetric
        and spec.granularity == "tensor"
        and spec.observer != "dynamic"
    )


@torch.no_grad()
def align_to_shift(q: UniformQuantizer, shift: float = SHIFT) -> bool:
    """Set ``q``'s range to ``[-shift, hi']`` with ``-shift`` exactly on a code: zero point
    ``k`` and scale ``shift / k``, ``k`` the largest whose top code ``hi' = shift (qmax - k)
    / k`` still covers the calibrated top ``hi``. Returns whether it did: not when the step
    would grow by more than the rounding of ``k`` (a calibrated range whose bottom is
    above ``-shift``; see :class:`ShiftGridActQuant`).

    Below ``-shift`` hardswish is 0 and clipping its input there changes nothing; above,
    the grid keeps the calibrated range. Then ``x + shift`` is the codes themselves at zero
    point 0, so hardswish's gate ``relu6(x + shift) / 6`` is ``clip(codes, 0, 2k)`` read
    at scale ``s / 6``: no add, no requantization."""
    scale = float(q.scale.max())
    hi = float((q.qmax - q.zero_point.max()) * scale)
    k = min(int(q.qmax), max(1, math.floor(shift * q.qmax / (max(hi, 0.0) + shift))))
    if shift > scale * (k + 1) * (1 + 1e-6):  # coarser beyond k's rounding
        return False
    q.set_range(-shift, shift * (q.qmax - k) / k)
    return True


class ShiftGridActQuant(ActQuant):
    """The input quantizer of a hardswish read by it alone: its calibrated range is aligned
    (:func:`align_to_shift`) so that the gate runs on the input's own codes, unless that
    would coarsen its step.

    Decision — never coarser: on the zoo's MobileNetV3-small (ad hoc, 10,000 test images,
    W8A8 in ONNX Runtime) aligning every hardswish input gave 98.97% agreement with fp32
    against 99.29% for the fixed-grid gates: 18 of 19 grids got 7-25% finer, but the
    classifier's, calibrated on ``[-1.65, 2.68]``, 32% coarser. That one keeps the
    fixed-grid gate."""

    def constrain_range(self) -> None:
        q = self.quantizer
        assert isinstance(q, UniformQuantizer)
        align_to_shift(q)


def on_shift_grid(q: UniformQuantizer, shift: float = SHIFT) -> bool:
    """Whether ``-shift`` is a code of ``q`` (zero point times scale equals ``shift``)."""
    zp, scale = float(q.zero_point.max()), float(q.scale.max())
    return zp > 0 and math.isclose(zp * scale, shift, rel_tol=1e-5)


class IntegerGate(nn.Module):
    """An activation whose gate is quantized on the fixed 8-bit grid of ``[0, top]``; the
    edge pass quantizes its input like an add's."""

    def __init__(self, top: float) -> None:
        super().__init__()
        self.gate = FixedActQuant(0.0, top)


class _Relu6Gate(IntegerGate):
    """The gate ``relu6(x + shift)`` on the fixed 8-bit grid of ``[0, 6]``, times 1/6.

    ``shift`` is 0 once the ``+ 3`` has been folded into the bias of the layer that feeds
    a hardsigmoid alone (:func:`fold_shift`): the gate's quantizer is then that layer's
    output quantizer, and ONNX Runtime runs the gate inside the ``QLinearConv``/``QGemm``
    (a squeeze-excite gate costs no extra node).
    """

    def __init__(self) -> None:
        super().__init__(RANGE)
        self.shift = SHIFT

    def hardsigmoid(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x + self.shift if self.shift else x
        return self.gate(torch.nn.functional.relu6(shifted)) * (1.0 / RANGE)


class IntegerHardsigmoid(_Relu6Gate):
    """``hardsigmoid`` with its output on the 8-bit grid of ``[0, 1]`` (step 1/255)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hardsigmoid(x)


class IntegerHardswish(_Relu6Gate):
    """``x * hardsigmoid(x)`` with the gate on the 8-bit grid (see module doc).

    When its input quantizer (``input_grid``, set by the edge pass) has ``-3`` on a code,
    the gate is exact on the input's own grid: the plain ``hardswish`` of the quantized
    input is what ONNX Runtime computes (export writes it as a ``Clip`` on the codes and
    one ``QLinearMul``)."""

    def __init__(self) -> None:
        super().__init__()
        # a tuple, so the quantizer (a module of the graph already) is not registered twice
        self.input_grid: tuple[ActQuant, ...] = ()

    @property
    def on_codes(self) -> bool:
        """Whether the gate runs on its input's codes (see class doc)."""
        if not self.input_grid:
            return False
        q = self.input_grid[0].quantizer
        return isinstance(q, UniformQuantizer) and bool(q.calibrated) and on_shift_grid(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_codes:
            return torch.nn.functional.hardswish(x)
        return x * self.hardsigmoid(x)


@torch.no_grad()
def fold_shift(gate: IntegerHardsigmoid, producer: nn.Module) -> bool:
    """Move a hardsigmoid's ``+ 3`` into ``producer``'s bias (a conv or linear read by the
    gate alone): ``relu6(W x + b + 3) / 6``. Returns whether it did (a layer without a bias
    keeps the shift in the gate; hardswish reads its input twice, so it never folds)."""
    bias = getattr(producer, "bias", None)
    if not gate.shift or not isinstance(bias, torch.Tensor):
        return False
    bias.add_(gate.shift)
    gate.shift = 0.0
    return True


class IntegerSiLU(IntegerGate):
    """SiLU (swish, EfficientNet's and YOLO's activation) as ``x * sigmoid(x)`` with the
    sigmoid on the fixed 8-bit grid of ``[0, 1]`` (step 1/255, error at most 1/510 of
    ``x``). Exported ``DQ -> Sigmoid -> Q`` and ``Mul(DQ(x), DQ(gate)) -> Q``, which ONNX
    Runtime runs as ``QLinearSigmoid`` (a 256-entry table) and ``QLinearMul``; a float
    ``x * sigmoid(x)`` would be three float passes between two integer convs."""

    def __init__(self) -> None:
        super().__init__(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(torch.sigmoid(x))


def integer_gate(module_or_function: object) -> IntegerGate | None:
    """The integer replacement of a hardswish/hardsigmoid/SiLU module or function, else
    None."""
    f = torch.nn.functional
    if isinstance(module_or_function, nn.Hardswish) or module_or_function is f.hardswish:
        return IntegerHardswish()
    if isinstance(module_or_function, nn.Hardsigmoid) or module_or_function is f.hardsigmoid:
        return IntegerHardsigmoid()
    if isinstance(module_or_function, nn.SiLU) or module_or_function is f.silu:
        return IntegerSiLU()
    return None
