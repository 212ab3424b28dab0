"""Recipe stage ``quantize``: prepare + PTQ calibration on the task's calibration data.

```yaml
- kind: quantize
  w_bits: 8
  a_bits: 8            # null: weight-only
  quantizer: uniform   # uniform | pow2 | binary | ternary | codebook
  estimator: ste       # how gradients pass the weights' rounding in a later finetune stage
  act_estimator: null  # the activations' (null: as estimator, but ste for aqe)
  granularity: channel
  calibration: 256     # calibration samples of the task used to set activation ranges
  bias_correction: false  # remove the mean output shift of rounded weights (same samples)
  select:              # per-layer overrides (FQN / glob / re: / type:Name); null keeps float
    fc: null
    "layer1.*": {w_bits: 4}   # the stage's own fields, or {weight: {...}, activation: {...}}
```

A selector that matches no layer of the model fails the stage, naming the layers (a typo
would otherwise quantize the layer it meant to keep float).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from torch import nn

from edgeslim.errors import RecipeError
from edgeslim.recipe.schema import Stage, StageContext, register_stage


class QuantizeStage(Stage):
    """Post-training quantization of every conv/linear (with per-layer overrides).

    ``reduce_range``: 8-bit weights use 7 bits of their int8 range (|k| <= 63), as ONNX
    Runtime's quantizer option of that name. Why: on x86 CPUs without VNNI, ONNX Runtime's
    int8 kernels add pairs of products in 16 bits and saturate, so a full-range file
    computes something else there (resnet20: 1% of argmaxes flipped, a MobileNetV3 far
    more; see :func:`edgeslim.runtime.machine.int8_sums_saturate`). Decision: off by
    default, as in ONNX Runtime (full range is exact on VNNI CPUs and Arm, and the records
    and benchmarks keep their meaning); ``compress`` warns when a file saturates here.
    ``reduce_range: auto`` decides by the CPU the recipe runs on (7 bits where its int8
    sums saturate), for a recipe that is measured where it will run; give ``true`` for a
    file meant for another x86 CPU without VNNI.

    ``act_estimator`` unset: the activations take ``estimator``, except a windowed one
    (``aqe``, whose surrogate sums 16 thresholds per element): with it on the activations
    too, a ternary resnet20 finetune stage (batch 128) held 8 GB and ran over 13 minutes
    before it was stopped, against 22 s with ``ste`` there (2026-12-05). AQE is a weight
    estimator (MINW-Net); the activations then use ``ste``.
    """

    kind: Literal["quantize"] = "quantize"
    w_bits: int = Field(8, ge=1, le=8)
    a_bits: int | None = Field(8, ge=1, le=8)
    quantizer: str = "uniform"
    estimator: str = "ste"
    act_estimator: str | None = None
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = Field(64, ge=1)
    weight_observer: str = "minmax"
    activation_observer: str = "percentile"
    calibration: int = Field(256, ge=1, le=100_000)
    bias_correction: bool = False
    reduce_range: bool | Literal["auto"] = False
    select: dict[str, dict[str, Any] | None] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_exist(self) -> QuantizeStage:
        """Unknown quantizer/estimator/observer names fail at load time, listing valid ones;
        so does ``reduce_range`` on a grid it cannot narrow."""
        if self.reduce_range is True and self.quantizer != "uniform":
            raise ValueError(
                f"reduce_range narrows the uniform int8 grid; quantizer {self.quantizer!r} has "
                "its own levels: set quantizer: uniform or reduce_range: false"
            )
        _refuse_float_levels(stage_config(self))
        for key, v in self.select.items():
            if v is None:
                continue
            try:  # an entry is validated as a stage of its own: name the entry
                _refuse_float_levels(select_config(self, key, v))
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                raise ValueError(f"select {key!r}: {field + ': ' if field else ''}{msg}") from None
            except ValueError as exc:
                raise ValueError(f"select {key!r}: {exc}") from None
        return self


# what a ``select`` entry may set in the stage's own terms (the rest of the stage applies)
SHORTHAND = ("w_bits", "a_bits", "quantizer", "estimator", "act_estimator", "granularity",
             "group_size", "weight_observer", "activation_observer", "reduce_range")  # fmt: skip


def select_config(stage: QuantizeStage, key: str, entry: dict[str, Any]) -> Any:
    """The :class:`~edgeslim.quant.QuantConfig` of one ``select`` entry: the stage's own
    fields (``{w_bits: 4}``: the stage with those changed) or a ``QuantConfig`` dict
    (``{weight: {...}, activation: {...}}``)."""
    from edgeslim.quant import QuantConfig

    keys = set(entry)
    if keys and keys <= set(SHORTHAND):
        fields = {**stage.model_dump(exclude={"select"}), **entry}
        return stage_config(QuantizeStage.model_validate(fields))
    if keys <= {"weight", "activation"}:
        return QuantConfig.from_dict(entry)
    unknown = sorted(keys - set(SHORTHAND) - {"weight", "activation"}) or sorted(keys)
    raise ValueError(
        f"select[{key!r}]: field(s) {unknown} not allowed; give the stage's own fields "
        f"({', '.join(SHORTHAND)}), or weight/activation specs, not both"
    )


def reduces_range(stage: QuantizeStage) -> bool:
    """Whether the stage's 8-bit weights go on 7 bits (stored as int8, |k| <= 63: no pair of
    products overflows a 16-bit sum); below 8 bits the grid is narrower already."""
    if stage.quantizer != "uniform" or stage.w_bits != 8:
        return False
    if stage.reduce_range == "auto":
        from edgeslim.runtime.machine import int8_sums_saturate

        return int8_sums_saturate()
    return stage.reduce_range


def _refuse_float_levels(config: Any) -> None:
    """A weight grid without int8 codes (:meth:`~edgeslim.quant.base.Quantizer.int8_scale`:
    a codebook, pow2 from 5 bits) under quantized activations cannot be exported: ONNX
    Runtime requantizes such float weights per tensor between QDQ pairs
    (:func:`edgeslim.export.qdq.refuse_float_weights_between_qdq` says the same at export)."""
    from edgeslim.quant.modules import make_quantizer

    weight = config.weight
    if weight is None or config.activation is None:
        return
    if make_quantizer(weight, is_weight=True).int8_scale() is None:
        raise ValueError(
            f"quantizer {weight.quantizer!r} at {weight.bits} bits has no int8 form, "
            "and ONNX Runtime requantizes such float weights per tensor between quantized "
            "activations: set a_bits: null (weight-only), or a quantizer int8 holds exactly "
            "(uniform, binary, ternary, pow2 up to 4 bits)"
        )


def activation_estimator(stage: QuantizeStage) -> str:
    """The activations' estimator: ``act_estimator``, else ``estimator`` unless it is
    windowed (``EstimatorBase.WINDOWED``: AQE), then ``ste``."""
    from edgeslim.quant.registries import ESTIMATORS

    if stage.act_estimator is not None:
        return stage.act_estimator
    windowed = stage.estimator in ESTIMATORS and getattr(
        ESTIMATORS.get(stage.estimator), "WINDOWED", False
    )
    return "ste" if windowed else stage.estimator


def stage_config(stage: QuantizeStage) -> Any:
    from edgeslim.quant import QuantConfig, QuantSpec

    bits = 7 if reduces_range(stage) else stage.w_bits
    weight = QuantSpec(
        quantizer=stage.quantizer, bits=bits, granularity=stage.granularity,
        group_size=stage.group_size, estimator=stage.estimator, observer=stage.weight_observer,
    )  # fmt: skip
    act = None
    if stage.a_bits is not None:
        act = QuantSpec(
            bits=stage.a_bits, granularity="tensor", symmetric=False,
            estimator=activation_estimator(stage), observer=stage.activation_observer,
        )  # fmt: skip
    return QuantConfig(weight, act)


def _unmatched(keys: list[str], model: nn.Module, name: str) -> str:
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d,
              nn.Conv3d, nn.Linear))]  # fmt: skip
    more = f", ... ({len(layers)} in all)" if len(layers) > 12 else ""
    return (
        f"quantize: select {', '.join(repr(k) for k in keys)} matches no layer of {name}; its "
        f"conv/linear layers: {', '.join(layers[:12])}{more} (FQNs, globs like 'layer1.*', "
        "'re:' patterns or 'type:Conv2d')"
    )


@register_stage("quantize", QuantizeStage, data_used="calibration")
def run_quantize(model: nn.Module, stage: QuantizeStage, ctx: StageContext) -> nn.Module:
    from edgeslim.quant import QuantConfig
    from edgeslim.quant.config import check_selectors
    from edgeslim.quant.ptq import ptq

    select: dict[Any, QuantConfig | None] = {
        k: None if v is None else select_config(stage, k, v) for k, v in stage.select.items()
    }
    unmatched = check_selectors(select, [n for n, _ in model.named_modules()])
    if unmatched:
        raise RecipeError(_unmatched(unmatched, model, ctx.model_name))
    from edgeslim.quant.modules import QuantMixin

    done = [n for n, m in model.named_modules() if isinstance(m, QuantMixin)]
    if done:  # ptq skips quantized layers: it would find nothing (or only the rest) to do
        raise RecipeError(
            f"quantize: {ctx.model_name} is already quantized by an earlier stage ({len(done)} "
            f"layers, e.g. {done[0]}): a datafree stage sets its own bits (low_bits, "
            "high_bits, act_bits), a search stage its policy's; drop this stage or the earlier "
            "one"
        )
    calib = None
    seen = 0
    if stage.a_bits is not None or stage.bias_correction:
        task = ctx.need_task("quantize")
        calib = task.calibration_batches(stage.calibration)
        seen = sum(int(b[0].shape[task.dims[0]]) for b in calib)
    quantized = ptq(
        model, stage_config(stage), calib, select=select, bias_correction=stage.bias_correction
    )
    where = f"; calibration on {seen} samples of {ctx.task.name}" if ctx.task and seen else ""
    reduced = ", 7-bit weight range (reduce_range)" if reduces_range(stage) else ""
    if (
        stage.reduce_range == "auto"
        and not reduced
        and (stage.quantizer, stage.w_bits) == ("uniform", 8)
    ):
        reduced = ", full 8-bit weights (reduce_range auto: this CPU's int8 sums do not saturate)"
    ctx.notes.append(
        f"quantize: W{stage.w_bits}A{stage.a_bits or 32} ({stage.quantizer}, "
        f"{stage.granularity}{reduced}){where}"
        f"{', bias-corrected' if stage.bias_correction else ''}"
    )
    if seen and seen < stage.calibration:
        ctx.notes.append(
            f"quantize: the task holds {seen} calibration samples, not {stage.calibration}"
        )
    return quantized


def rebuild_quantize(model: nn.Module, stage: QuantizeStage) -> nn.Module:
    """The structure :func:`~edgeslim.quant.ptq.ptq` gives (BN folded, fake-quant layers,
    edge quantizers) without calibration: reload then loads the calibrated ranges."""
    from edgeslim.quant import QuantConfig
    from edgeslim.quant.ptq import ptq_structure

    select: dict[Any, QuantConfig | None] = {
        k: None if v is None else select_config(stage, k, v) for k, v in stage.select.items()
    }
    return ptq_structure(model, stage_config(stage), select).eval()
