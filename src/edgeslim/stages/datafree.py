"""Recipe stage ``datafree``: compress without data (:mod:`edgeslim.datafree`).

```yaml
- kind: datafree
  method: dfmpc        # rtn | dfq | dfmpc (quantize) | naive | merge | udfc (prune + quantize)
  low_bits: 2          # weight bits of the "low" layers (DF-MPC alternates low/high)
  high_bits: 6         # weight bits of the other layers; equal to low_bits: uniform
  prune_ratio: 0.0     # naive, merge, udfc: fraction of the MACs to remove (as macs_reduction)
  edge_bits: 8         # first conv and last linear
  granularity: channel # weight scales per output channel, or tensor (one per layer)
  act_bits: 8          # activation bits; null: weight-only
  act_ranges: statistics  # fixed ranges from the BN statistics (exportable); or dynamic
  criterion: l2        # which channels naive / merge / udfc remove (data-free criteria only)
  allow_target_miss: false  # true: keep a result more than 2 points off prune_ratio
```

The stage reads no data: the method sees the weights and the task's example input (for
shapes only), and the activation ranges of the returned fake-quant model are predicted from the
BN statistics (``act_ranges: statistics``, the default, so a QDQ export carries data-free
scales) or taken from each tensor as it flows (``dynamic``, torch only: a QDQ export would
freeze the ranges of the last batch). There is nothing to calibrate.

What the method did goes into the notes (the summary line, then one line per pair and
layer: equalized or why not, bits and why, channels removed) and, as data, into
``datafree.json`` in the stage's output directory (:class:`~edgeslim.datafree.DataFreeReport`).
A MACs target (measured) missed by more than 2 points fails the stage, naming requested vs
achieved, unless ``allow_target_miss: true`` (then a ``WARNING:`` note the record and the
report show); a method with nothing to act on fails the stage
(:class:`~edgeslim.datafree.NothingToCompressError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from edgeslim.recipe.schema import Stage, StageContext, register_stage

if TYPE_CHECKING:
    from edgeslim.datafree import DataFreeSpec

# criteria that score channels from activations or gradients: they need data
DATA_CRITERIA = ("taylor", "fluctuation")


def _allowed_methods() -> list[str]:
    from edgeslim.datafree import METHODS

    return list(METHODS)


def _pruning_methods() -> tuple[str, ...]:
    from edgeslim.datafree.methods import PRUNING_METHODS

    return tuple(PRUNING_METHODS)


def _allowed_criteria() -> tuple[str, ...]:
    from edgeslim.datafree.methods import PRUNE_CRITERIA

    return tuple(PRUNE_CRITERIA)


class DataFreeStage(Stage):
    """Data-free quantization (RTN, DFQ, DF-MPC) or pruning + quantization (naive, neuron
    merging, UDFC) of every Conv1d/2d/3d and Linear."""

    kind: Literal["datafree"] = "datafree"
    method: str = "dfmpc"
    low_bits: int = Field(4, ge=2, le=8)
    high_bits: int = Field(4, ge=2, le=8)
    prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    edge_bits: int = Field(8, ge=2, le=8)
    granularity: Literal["channel", "tensor"] = "channel"
    act_bits: int | None = Field(8, ge=2, le=8)
    act_ranges: Literal["statistics", "dynamic"] = "statistics"
    criterion: str = "l2"
    allow_target_miss: bool = False

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        allowed = _allowed_methods()
        if v not in allowed:
            raise ValueError(
                f"unknown data-free method {v!r}; allowed values: {', '.join(allowed)}"
            )
        return v

    @field_validator("criterion")
    @classmethod
    def _data_free_criterion(cls, v: str) -> str:
        allowed = _allowed_criteria()
        if v not in allowed:
            why = " (it needs data)" if v in DATA_CRITERIA else ""
            raise ValueError(
                f"{v!r} is not a data-free pruning criterion{why}; allowed values: "
                f"{', '.join(allowed)}"
            )
        return v

    @model_validator(mode="after")
    def _ratio_fits_method(self) -> DataFreeStage:
        pruning = _pruning_methods()
        if self.prune_ratio > 0 and self.method not in pruning:
            raise ValueError(
                f"prune_ratio {self.prune_ratio} needs a pruning method "
                f"({', '.join(pruning)}); {self.method!r} only quantizes"
            )
        stage_spec(self)  # the spec's own checks, at load time
        return self


def stage_spec(stage: DataFreeStage) -> DataFreeSpec:
    """The :class:`edgeslim.datafree.DataFreeSpec` of a stage (its checks raise
    ``DataFreeError``, a ``ValueError`` the recipe loader reports with the stage's path)."""
    from edgeslim.datafree import DataFreeSpec

    return DataFreeSpec(
        low_bits=stage.low_bits, high_bits=stage.high_bits, prune_ratio=stage.prune_ratio,
        edge_bits=stage.edge_bits, criterion=stage.criterion, granularity=stage.granularity,
    )  # fmt: skip


def _report_path(out: Path) -> Path:
    """``datafree.json``, or ``datafree.<k>.json`` for a later datafree stage."""
    out.mkdir(parents=True, exist_ok=True)
    path, k = out / "datafree.json", 2
    while path.exists():
        path, k = out / f"datafree.{k}.json", k + 1
    return path


def _check_target(stage: DataFreeStage, achieved: float, ctx: StageContext) -> None:
    """A MACs reduction more than 2 points off ``prune_ratio`` fails the stage, unless
    ``allow_target_miss`` (then a ``WARNING:`` note the report shows)."""
    from edgeslim.errors import PruneError
    from edgeslim.prune.config import MACS_TOLERANCE

    if abs(achieved - stage.prune_ratio) <= MACS_TOLERANCE:
        return
    text = (
        f"the datafree stage ({stage.method}) asked for -{stage.prune_ratio:.1%} MACs on "
        f"{ctx.model_name or 'the model'} and achieved -{achieved:.1%} (measured)"
    )
    if stage.allow_target_miss:
        ctx.notes.append(f"WARNING: prune target missed: {text}; kept (allow_target_miss)")
        return
    raise PruneError(
        f"{text}. Change prune_ratio, or set `allow_target_miss: true` on the stage to keep "
        "the result (the report then shows the miss)."
    )


def rebuild_datafree(model: nn.Module, stage: DataFreeStage, example: tuple[Any, ...]) -> nn.Module:
    """Re-run a data-free stage (it reads no data, so it repeats exactly on the same base
    weights): reload then loads the saved weights and ranges over the result."""
    from edgeslim.datafree import compress_datafree, quantized_model
    from edgeslim.graph import example_like

    x = example_like(example[0])
    result = compress_datafree(model, stage.method, stage_spec(stage), x)
    return quantized_model(
        result, stage.act_bits, stage.act_ranges, edges=stage.act_ranges == "statistics"
    ).eval()


@register_stage("datafree", DataFreeStage, data_used="none")
def run_datafree(model: nn.Module, stage: DataFreeStage, ctx: StageContext) -> nn.Module:
    from edgeslim.datafree import NothingToCompressError, compress_datafree, quantized_model
    from edgeslim.errors import TaskError
    from edgeslim.graph import example_like, layer_table, total_macs
    from edgeslim.inputs import example_args_for

    if ctx.task is not None:
        if len(ctx.task.example_inputs) != 1:
            raise TaskError(
                "the data-free methods handle single-input models today; this model takes "
                f"{len(ctx.task.example_inputs)} inputs (use a quantize stage with calibration)"
            )
        # a random tensor of the task's input shape and dtype: the methods read no sample
        example = example_like(ctx.task.example_inputs[0])
        input_range = ctx.task.input_range(0)
    else:
        example = example_args_for(ctx.model_name)[0]
        input_range = None
    macs_before = total_macs(layer_table(model, example))
    try:
        result = compress_datafree(model, stage.method, stage_spec(stage), example, input_range)
    except NothingToCompressError as exc:
        raise NothingToCompressError(
            f"stage datafree ({stage.method}) failed on {ctx.model_name or 'the model'}: {exc}"
        ) from exc
    bits = sorted(set(result.weight_bits.values()))
    report = result.report
    pruned = ""
    if stage.prune_ratio:
        achieved = 1.0 - total_macs(layer_table(result.model, example)) / max(macs_before, 1)
        pruned = f", MACs -{achieved:.1%} measured (requested -{stage.prune_ratio:.0%})"
        _check_target(stage, achieved, ctx)
    ctx.notes.append(
        f"datafree: {stage.method}, weights at {'/'.join(map(str, bits))} bits "
        f"(low {stage.low_bits}, high {stage.high_bits}, edges {stage.edge_bits}; one scale "
        f"per {'output channel' if stage.granularity == 'channel' else 'layer'}), "
        f"activations {'float' if stage.act_bits is None else f'{stage.act_bits}-bit'}"
        f"{'' if stage.act_bits is None else f' ({stage.act_ranges} ranges)'}"
        f"{pruned}; {len(report.changed)} layer(s) changed; {result.seconds:.1f} s, "
        "no data read"
    )
    path = _report_path(Path(ctx.out))
    path.write_text(json.dumps(report.to_dict(), indent=1))
    ctx.notes.append(f"datafree: per-layer report {path.name}")
    ctx.notes += [f"datafree: {n}" for n in result.notes]
    if stage.act_bits is not None and stage.act_ranges == "dynamic":
        ctx.notes.append(
            "datafree: activation ranges are dynamic in torch; a QDQ export (e.g. compress's "
            "model.onnx) fixes them at the ranges of the last batch the model ran on"
        )
    if stage.act_bits is not None and stage.act_ranges == "statistics" and input_range is None:
        ctx.notes.append(
            "datafree: the model input's range is not known, so the first layer's input "
            "quantizer assumes a standardised input (mean 0, std 1: +-6); a Task with "
            "input_ranges (the image tasks set it from their normalisation) gives the exact one"
        )
    model = quantized_model(
        result, stage.act_bits, stage.act_ranges, edges=stage.act_ranges == "statistics"
    ).eval()
    unknown = [f for f, r in result.input_ranges.items() if r is None]
    # the edge pass may still give one a range (a head after a mean, carried through)
    unknown = [f for f in unknown if not _input_quantized(model, f)]
    if stage.act_bits is not None and stage.act_ranges == "statistics" and unknown:
        ctx.notes.append(
            "datafree: no statistics for the inputs of "
            + ", ".join(unknown)
            + "; their activations stay float"
        )
    return model


def _input_quantized(model: nn.Module, fqn: str) -> bool:
    """Whether layer ``fqn`` reads a quantized input: its own input quantizer, or an edge
    quantizer before it with only ops between that the edge pass shares a grid through
    (:func:`~edgeslim.quant.edges.moves_values`: flatten, max pool, nearest upsampling)."""
    import torch.fx as fx

    from edgeslim.quant.edges import moves_values
    from edgeslim.quant.modules import ActQuant

    if getattr(model.get_submodule(fqn), "input_quant", None) is not None:
        return True
    if not isinstance(model, fx.GraphModule):
        return False
    for node in model.graph.nodes:
        if node.op == "call_module" and node.target == fqn and node.args:
            src = node.args[0]
            while isinstance(src, fx.Node):
                if src.op == "call_module" and isinstance(
                    model.get_submodule(str(src.target)), ActQuant
                ):
                    return True
                if not moves_values(model, src) or not src.args:
                    return False
                src = src.args[0]
    return False
