"""Fake-quant layers that keep the float layer's parameter names (FQNs stay stable).

``QuantConv2d`` / ``QuantLinear`` subclass the torch layers, so ``layer1.0.conv1.weight``
is still the latent float weight; they add ``weight_quantizer`` / ``input_quant``
submodules and estimators. Modes: ``observe`` (float forward, observers collect input
statistics), ``quant`` (fake-quant through the estimators; the default after prepare).
A layer's ``mode`` governs its weight; its input's :class:`ActQuant` has its own mode.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from edgeslim.quant.base import Quantizer
from edgeslim.quant.config import QuantConfig
from edgeslim.quant.estimators import estimate
from edgeslim.quant.observers import Observer
from edgeslim.quant.registries import ESTIMATORS, OBSERVERS, QUANTIZERS
from edgeslim.quant.spec import QuantSpec

Mode = Literal["observe", "quant", "float", "export"]
INT32_MAX = 2**31 - 1


def make_quantizer(spec: QuantSpec, is_weight: bool) -> Quantizer:
    q = QUANTIZERS.get(spec.quantizer)(spec, is_weight=is_weight)
    assert isinstance(q, Quantizer)
    return q


@torch.no_grad()
def calibrate_weight_quantizer(q: Quantizer, spec: QuantSpec, weight: torch.Tensor) -> None:
    """Set ``q``'s range from the weight itself with ``spec``'s observer (weights are known
    before any data is seen)."""
    w = weight.detach()
    obs = OBSERVERS.get(spec.observer)()
    obs.update(q.to_groups(w))
    q.init_range(w)
    if hasattr(q, "set_range"):
        obs.apply(q)
    q.calibrated.fill_(True)


@torch.no_grad()
def fake_quantized_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``weight`` rounded as a layer quantized with ``spec`` would round it (its quantizer,
    granularity and observer), without building the layer."""
    q = make_quantizer(spec, is_weight=True)
    calibrate_weight_quantizer(q, spec, weight)
    return q.quantize(weight.detach())


class ActQuant(nn.Module):
    """Fake-quant of an activation tensor: a quantizer, its estimator and an observer.

    Used as a layer's input quantizer and as a quantizer on a graph edge (see
    :mod:`edgeslim.quant.edges`). Modes: ``observe`` (float, statistics collected),
    ``quant`` (through the estimator), ``export`` (QDQ ops), ``float``.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.quantizer = make_quantizer(spec, False)
        self.estimator: Any = ESTIMATORS.get(spec.estimator)()
        self.observer: Observer | None = None
        self.mode: Mode = "quant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if self.mode == "float" or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            # integer and boolean tensors are indices and masks (RoBERTa's position ids,
            # a product of an int mask and a cumsum), Python numbers are sizes: not
            # activations, never quantized
            return x
        if self.mode == "export":
            from edgeslim.export.qdq import qdq_activation

            return qdq_activation(q, x)
        if self.mode == "observe":
            if self.observer is None:
                self.observer = OBSERVERS.get(self.spec.observer)()
            self.observer.update(q.to_groups(x.detach()))
            return x
        if self.spec.observer == "dynamic":
            q.init_range(x.detach())  # the range of this very tensor (per tensor or token)
        elif not bool(q.calibrated.item()):
            raise RuntimeError(
                "activation quantizer used before calibration: run "
                "edgeslim.quant.calibrate(model, batches) first (PTQ, or before QAT)"
            )
        return estimate(self.estimator, q, x)

    def finish_observing(self) -> None:
        if self.observer is not None:
            self.observer.apply(self.quantizer)
            self.constrain_range()
            self.estimator.prepare(self.quantizer)  # LSQ/PACT: range now learnable
        self.observer = None
        self.mode = "quant"

    def constrain_range(self) -> None:
        """Adjust the observed range before it becomes final (a hook for subclasses whose
        grid must contain a given value; none here)."""

    def extra_repr(self) -> str:
        return f"{self.spec.quantizer}, bits={self.spec.bits}, mode={self.mode}"


class QuantMixin:
    """Shared state of the fake-quant layers.

    ``input_grid``: the quantizer whose grid the layer's input is on when that quantizer
    sits on a graph edge rather than in the layer (:func:`~edgeslim.quant.edges.
    quantize_edges` takes the layers' own over), kept in a tuple so that it is not
    registered as a submodule; it sets the grid of the bias (:meth:`quant_bias`).
    """

    qconfig: QuantConfig
    weight_quantizer: Quantizer | None
    input_quant: ActQuant | None
    mode: Mode
    input_grid: tuple[ActQuant] | None = None

    def _setup(self, qconfig: QuantConfig) -> None:
        self.qconfig = qconfig
        self.mode = "quant"
        self.weight_quantizer = None
        self.input_quant = None
        self.w_estimator: Any = None
        if qconfig.weight is not None:
            self.weight_quantizer = make_quantizer(qconfig.weight, True)
            self.w_estimator = ESTIMATORS.get(qconfig.weight.estimator)()
            self._init_weight_range()
            self.w_estimator.prepare(self.weight_quantizer)
        if qconfig.activation is not None:
            self.input_quant = ActQuant(qconfig.activation)
        # SmoothQuant divisor of the input channels (see edgeslim.quant.smooth); None = off
        if not hasattr(self, "smooth_scale"):
            self.register_buffer("smooth_scale", None)  # type: ignore[attr-defined]

    @property
    def _weight(self) -> torch.Tensor:
        w = getattr(self, "weight")  # noqa: B009  (provided by the torch layer class)
        assert isinstance(w, torch.Tensor)
        return w

    @torch.no_grad()
    def _store_weight(self, w: torch.Tensor) -> None:
        """Write ``w``, shaped as :attr:`_weight`, into the layer's own weight parameter."""
        self._weight.copy_(w)

    @torch.no_grad()
    def _init_weight_range(self) -> None:
        """Weights are known: calibrate their range now with the spec's observer."""
        assert self.weight_quantizer is not None and self.qconfig.weight is not None
        calibrate_weight_quantizer(self.weight_quantizer, self.qconfig.weight, self._weight)

    def quant_weight(self) -> torch.Tensor:
        if self.mode == "export" and self.weight_quantizer is not None:
            from edgeslim.export.qdq import qdq_weight

            return qdq_weight(self.weight_quantizer, self._weight)
        if self.weight_quantizer is None or self.mode != "quant":
            return self._weight
        return estimate(self.w_estimator, self.weight_quantizer, self._weight)

    def quant_bias(self) -> torch.Tensor | None:
        """The bias as an integer kernel adds it: rounded to the accumulator's grid
        ``scale(x) * scale(W)`` (per output channel; ``scale(W)`` is the scale the file
        stores, :meth:`~edgeslim.quant.quantizers.UniformQuantizer.int8_scale`).

        Why: ONNX Runtime's QLinearConv (and the QGemm the export writes for a linear) take
        an int32 bias on that grid, so with a float bias here the torch model and its int8
        file differ by the rounding, which 4-bit activation steps amplify (a 3-channel CNN
        at W4A4: 19 of 128 argmaxes differed between torch and ONNX Runtime; 0 with this).
        The rounding passes gradients straight through. Float (unchanged) while the input is
        float or observed, on a dynamic range (decided per tensor at run time), or with a
        non-uniform grid. In ``export`` mode the rounded bias is a Python-side constant: the
        file stores it (ops traced here would keep the bias from being a constant, which
        ONNX Runtime's fusion needs), so a conv ONNX Runtime runs in float adds it too.
        """
        bias: torch.Tensor | None = getattr(self, "bias", None)
        step = None if bias is None else self._accumulator_step(bias)
        if bias is None or step is None:
            return bias
        rounded = torch.round(bias / step) * step
        if self.mode == "export":
            return torch.tensor(rounded.detach().tolist(), dtype=bias.dtype)
        return bias + (rounded - bias).detach()

    def _accumulator_step(self, bias: torch.Tensor) -> torch.Tensor | None:
        from edgeslim.quant.quantizers import UniformQuantizer

        wq = self.weight_quantizer
        act = self.input_quant if self.input_quant is not None else (self.input_grid or (None,))[0]
        live = ("quant", "export")
        if self.mode not in live or act is None or act.mode not in live:
            return None
        aq = act.quantizer
        w_scale = None if wq is None or not bool(wq.calibrated) else wq.int8_scale()
        if (
            w_scale is None
            or not isinstance(aq, UniformQuantizer)
            or act.spec.observer == "dynamic"
            or aq.scale.numel() != 1
            or not bool(aq.calibrated)
            or w_scale.numel() not in (1, bias.numel())
        ):
            return None
        step = aq.scale.detach().reshape(()) * w_scale.detach().reshape(-1)
        step = step.clamp_min(torch.finfo(bias.dtype).tiny).to(bias.dtype)
        if bool((bias.detach().abs() / step > INT32_MAX).any()):
            return None  # not representable in int32: the export keeps it float too
        return step

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor | None = getattr(self, "smooth_scale", None)
        if scale is not None:
            x = x / scale
        return x if self.input_quant is None else self.input_quant(x)


def _copy_params(new: Any, old: Any) -> None:
    """Copy ``weight``/``bias`` of the float layer into its fresh twin (same device/dtype)."""
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if getattr(old, "bias", None) is not None and getattr(new, "bias", None) is not None:
            new.bias.copy_(old.bias)
    new.train(old.training)


class _QuantConvNd(QuantMixin):
    """Shared ``from_float``/``forward`` of ``QuantConv{1,2,3}d`` (weights ``(out, in/g, *k)``:
    per-output-channel quantization is along axis 0, as ONNX's QLinearConv expects)."""

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, qconfig: QuantConfig) -> Any:
        new = cls(  # type: ignore[call-arg]
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.dilation, conv.groups, conv.bias is not None,
            conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        _copy_params(new, conv)
        new._setup(qconfig)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv: Any = self
        out = conv._conv_forward(self.quant_input(x), self.quant_weight(), self.quant_bias())
        assert isinstance(out, torch.Tensor)
        return out


class QuantConv1d(_QuantConvNd, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weight and input (ONNX Runtime: QLinearConv)."""


class QuantConv2d(_QuantConvNd, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input (ONNX Runtime: QLinearConv)."""


class QuantConv3d(_QuantConvNd, nn.Conv3d):
    """``nn.Conv3d`` with fake-quantized weight and input (ONNX Runtime: QLinearConv)."""


def out_major(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A transposed conv's weight ``(in, out/g, *k)`` as ``(out, in/g, *k)``: one row per
    output channel, so per-channel quantization (axis 0) follows the output channels."""
    cin, opg, *k = w.shape
    return w.reshape(groups, cin // groups, opg, *k).transpose(1, 2).reshape(groups * opg, -1, *k)


def in_major(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`out_major`."""
    cout, ipg, *k = w.shape
    return w.reshape(groups, cout // groups, ipg, *k).transpose(1, 2).reshape(groups * ipg, -1, *k)


class _QuantConvTransposeNd(QuantMixin):
    """Shared code of ``QuantConvTranspose{1,2}d``.

    The weight is quantized per *output* channel: the quantizer sees it through
    :func:`out_major` (torch stores it as ``(in, out/groups, *k)``), so ``qdq_weight`` keeps
    its axis-0 convention; the export writes ``int8 -> DequantizeLinear -> Reshape/Transpose
    -> ConvTranspose``. ONNX Runtime (1.32, CPU) has no QDQ fusion for ConvTranspose: it runs
    in float on dequantized weights (int8 storage only); see docs/quantization.md.
    """

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvTransposeNd, qconfig: QuantConfig) -> Any:
        new = cls(  # type: ignore[call-arg]
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            conv.padding, conv.output_padding, conv.groups, conv.bias is not None,
            conv.dilation, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        _copy_params(new, conv)
        new._setup(qconfig)
        return new

    @property
    def _weight(self) -> torch.Tensor:
        return out_major(getattr(self, "weight"), getattr(self, "groups"))  # noqa: B009

    @torch.no_grad()
    def _store_weight(self, w: torch.Tensor) -> None:
        getattr(self, "weight").copy_(in_major(w, getattr(self, "groups")))  # noqa: B009

    def quant_weight(self) -> torch.Tensor:
        return in_major(super().quant_weight(), getattr(self, "groups"))  # noqa: B009

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        conv: Any = self
        nd = len(conv.kernel_size)
        pad = conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size, nd, conv.dilation
        )
        fn = nn.functional.conv_transpose1d if nd == 1 else nn.functional.conv_transpose2d
        if nd == 3:
            fn = nn.functional.conv_transpose3d
        out = fn(
            self.quant_input(x), self.quant_weight(), conv.bias, conv.stride, conv.padding,
            pad, conv.groups, conv.dilation,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out


class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with fake-quantized weight (per output channel) and input."""


class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with fake-quantized weight (per output channel) and input."""


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    @classmethod
    def from_float(cls, linear: nn.Linear, qconfig: QuantConfig) -> QuantLinear:
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )  # fmt: skip
        _copy_params(new, linear)
        new._setup(qconfig)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a 2-D input exports as Gemm, whose bias the export stores as int32 on the
        # accumulator grid; a 3-D one as MatMul + a float Add (a float bias there)
        bias = self.quant_bias() if x.dim() == 2 else self.bias
        return nn.functional.linear(self.quant_input(x), self.quant_weight(), bias)


FLOAT_TO_QUANT: dict[type[nn.Module], Any] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
"""Float layer type -> its fake-quant twin (exact type; recurrent twins are registered by
:mod:`edgeslim.quant.recurrent`)."""
