"""Recipe stage ``search``: let :mod:`edgeslim.search` pick per-layer bits and keep ratios.

```yaml
- kind: search
  constraints: ["size<=0.2x", "latency<=0.6x"]   # any of size, macs, bops, memory, latency
  max_drop: 1.0           # points of the task's validation metric (null: no accuracy limit)
  strategy: evolutionary  # random | evolutionary | abc | reinforce | envelope_ddpg | greedy |
                          # dp | accuracy_aware
  options: {}             # the strategy's own, e.g. {population: 12} or {preference: [0.7, 0.3]}
  budget: 40              # policies measured at most
  seed: 0
  w_bits: [4, 6, 8]       # weight-bit choices of every quantizable layer
  a_bits: [8]             # activation-bit choices (null: float activations)
  keep: [0.5, 0.75, 1.0]  # keep-ratio choices of every prunable channel group
  round_to: 8             # kept widths in multiples of it (1: free widths)
  criterion: l1           # importance criterion that ranks channels
  skip: []                # layers (FQNs or globs) whose channels are never cut
  exclude: []             # layers kept float and not searched
  finetune_epochs: 0      # short fine-tune of each measured policy (0: scored as cut)
  depth: false            # also remove residual branches whole (pair with fine-tuning)
  reconstruct: null       # refit pruned layers by least squares before scoring (null: where it can)
  policy: null            # a saved policy (policy.json of `edgeslim search`) to apply, no search
```

The stage returns the chosen policy applied (pruned, quantized, calibrated, and fine-tuned
as it was scored when ``finetune_epochs`` is set). A search that
finds no policy meeting the constraints fails the stage with the closest policy named:
never an infeasible model passed on as the result. ``options`` are checked by name when the
recipe is read (an unknown one is refused with the strategy's options listed), their values
when the strategy is built, before anything is measured. A latency limit is met as measured: the
best candidates are exported and timed whole (:mod:`edgeslim.search.verify`). Written to
the stage's folder: ``search.policy.json`` (the policy), ``search.json`` (every evaluation),
``search.journal.jsonl`` and ``model.plan.search.json``: the policy's structure (prune plan
with its kept channels, branches removed, quantization configs), which ``edgeslim.load`` and
``--from`` replay before loading the weights (:mod:`edgeslim.search.rebuild`).

With ``policy`` (a path; a relative one is read from the working directory, as the command
line's paths are, since a recipe may be a dict with no file of its own), nothing is
searched: the saved policy is applied (and fine-tuned as
``finetune_epochs`` says) in the space the stage's choices make, which must be the choices
the search ran with (bits, keep ratios, ``round_to``, ``criterion``, ``skip``,
``exclude``); the structure the search saved beside the policy (``policy.structure.json``)
is compared with the one it gives here, and a difference (other choices cut other
channels) is refused. ``constraints`` and ``max_drop`` are refused with it: the search that
chose the policy checked them, and the compress record states what the model achieves.

A model quantized already (an earlier quantize or search stage, or one reloaded with
``--from``) is refused: the search chooses every layer's bits itself.

Decision: a compress run writes into a temporary folder that it renames at the end, so an
interrupted compress does not resume its search; for a long search use ``edgeslim search``
(resumable), then a stage that applies its ``policy``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from edgeslim.artifacts import free_plan_path
from edgeslim.errors import EdgeslimError
from edgeslim.jsonfile import save_text
from edgeslim.recipe.schema import Stage, StageContext, register_stage
from edgeslim.runtime.machine import KERNEL_BLOCK
from edgeslim.search.choices import SpaceChoices


def _strategies() -> list[str]:
    from edgeslim.search.strategies import STRATEGIES

    return list(STRATEGIES.names())


def _int8() -> list[int | None]:
    return [8]


class SearchStage(Stage):
    """Search bits and keep ratios under constraints, then apply the chosen policy."""

    kind: Literal["search"] = "search"
    constraints: list[str] = Field(default_factory=list)
    max_drop: float | None = Field(None, ge=0.0)
    strategy: str = "evolutionary"
    options: dict[str, Any] = Field(default_factory=dict)
    budget: int = Field(40, ge=1)
    seed: int = 0
    w_bits: list[int] = Field(default_factory=lambda: [4, 6, 8], min_length=1)
    a_bits: list[int | None] = Field(default_factory=lambda: _int8(), min_length=1)
    keep: list[float] = Field(default_factory=lambda: [0.5, 0.75, 1.0], min_length=1)
    finetune_epochs: int = Field(0, ge=0)
    depth: bool = False
    reconstruct: bool | None = None
    round_to: int = Field(KERNEL_BLOCK, ge=1, le=256)  # kept widths in multiples of it
    criterion: str = "l1"
    skip: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    policy: str | None = None  # a saved policy to apply instead of searching

    def choices(self) -> SpaceChoices:
        """The space this stage searches (or applies its ``policy`` in)."""
        return SpaceChoices(
            w_bits=tuple(self.w_bits), a_bits=tuple(self.a_bits), keep=tuple(self.keep),
            criterion=self.criterion, round_to=self.round_to, skip=self.skip,
            exclude=self.exclude, depth=self.depth, reconstruct=self.reconstruct,
        )  # fmt: skip

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str) -> str:
        from edgeslim.prune.importance import check_criterion

        return check_criterion(v)  # a ValueError naming the registered criteria

    @field_validator("constraints")
    @classmethod
    def _parse(cls, v: list[str]) -> list[str]:
        from edgeslim.search.constraints import Constraints

        return Constraints.parse(v).to_list()  # a ConstraintError names what is allowed

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        allowed = _strategies()
        if v not in allowed:
            raise ValueError(f"allowed values: {', '.join(allowed)}")
        return v

    @model_validator(mode="after")
    def _options(self) -> SearchStage:
        from edgeslim.search.strategies import check_options

        check_options(self.strategy, self.options)  # a ValueError: pydantic names the stage
        if self.policy is not None and (self.constraints or self.max_drop is not None):
            raise ValueError(
                "policy: a saved policy is applied as it is, its search checked the "
                "constraints; leave constraints and max_drop out (or policy, to search)"
            )
        if self.policy is None and not self.constraints and self.max_drop is None:
            raise ValueError(
                "give constraints (e.g. ['size<=0.25x']) or max_drop to search, or a saved "
                "policy to apply"
            )
        return self

    @field_validator("w_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        from edgeslim.quant.spec import BITS

        if any(b not in BITS for b in v):
            raise ValueError("weight bits must be in 1..8")
        return v

    @field_validator("a_bits")
    @classmethod
    def _act_bits(cls, v: list[int | None]) -> list[int | None]:
        from edgeslim.quant.spec import BITS

        if any(b is not None and b not in BITS for b in v):
            raise ValueError("activation bits must be in 1..8, or null (float)")
        return v

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < k <= 1.0 for k in v):
            raise ValueError("keep ratios must be in (0, 1]")
        return v


@register_stage("search", SearchStage, data_used="calibration")
def run_search_stage(model: nn.Module, stage: SearchStage, ctx: StageContext) -> nn.Module:
    from edgeslim.search.command import search_task
    from edgeslim.search.constraints import Constraints

    task = ctx.need_task("search")
    _refuse_quantized(model)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if stage.policy is not None:
        return _apply_saved(model, stage, ctx)
    space, evaluator, latency, result = search_task(
        model.eval(), task, Constraints.parse(stage.constraints, stage.max_drop),
        strategy=stage.strategy, budget=stage.budget, seed=stage.seed,
        choices=stage.choices(), finetune_epochs=stage.finetune_epochs, quick=ctx.quick,
        options=stage.options,
        journal=ctx.out / "search.journal.jsonl",
    )  # fmt: skip
    (ctx.out / "search.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    if result.policy is None:
        raise EdgeslimError(f"stage search: {result.message}")
    _save(space, result.policy, ctx)
    best = result.best
    assert best is not None
    checks = "; ".join(str(c) for c in best.result.checks)
    ctx.notes.append(
        f"search ({stage.strategy}, {result.measured} measured of budget {stage.budget}): "
        f"policy {result.policy.id}: {checks}"
    )
    if latency is not None and latency.anchors:
        ctx.notes.append(f"search: latency table anchors (ms, measured): {latency.anchors}")
    measured = result.notes.get("latency_measured")
    if measured:
        row = next(c for c in measured["candidates"] if c["policy"] == measured["chosen"])
        ctx.notes.append(
            f"search: policy {row['policy']} timed whole: {row['measured_ratio']}x fp32 "
            f"(rounds p10-p90 {row['ratio_p10']}-{row['ratio_p90']}; table "
            f"{row['predicted_ratio']}x)"
        )
    return evaluator.prepare(result.policy)  # fine-tuned as it was scored


def _save(space: Any, policy: Any, ctx: StageContext) -> None:
    """The policy, and its structure: what a reload replays before loading the weights
    (:mod:`edgeslim.search.rebuild`)."""
    from edgeslim.search.command import structure_path

    text = json.dumps(space.structure(policy), indent=1)
    save_text(free_plan_path(ctx.out, "model.plan.search"), text)
    # beside the policy too, for a later stage that applies it (check_structure)
    save_text(structure_path(policy.save(ctx.out / "search.policy.json")), text)


def _apply_saved(model: nn.Module, stage: SearchStage, ctx: StageContext) -> nn.Module:
    """``stage.policy`` applied in the space of the stage's choices (see module doc)."""
    from pathlib import Path

    from edgeslim.search.command import check_structure, finetune_config
    from edgeslim.search.evaluate import Evaluator
    from edgeslim.search.policy import load_policy

    task = ctx.need_task("search")
    finetune = finetune_config(task, stage.finetune_epochs)
    path = Path(stage.policy or "")
    space = stage.choices().build(model.eval(), task, stage.seed)
    policy = load_policy(path, space)
    check_structure(path, space.structure(policy))
    _save(space, policy, ctx)
    ctx.notes.append(
        f"search: policy {policy.id} ({policy.describe()}) applied from {path}, not searched"
    )
    return Evaluator(space, finetune=finetune).prepare(policy)


def _refuse_quantized(model: nn.Module) -> None:
    """A search chooses every layer's bits itself: a model quantized already (by an earlier
    quantize or search stage, or reloaded with ``--from``) is refused, naming its layers."""
    from edgeslim.quant.api import quant_layers

    done = list(quant_layers(model))
    if done:
        shown = ", ".join(done[:4]) + (f" and {len(done) - 4} more" if len(done) > 4 else "")
        raise EdgeslimError(
            f"stage search: the model is quantized already ({shown}); a search chooses each "
            "layer's bits itself, so put it before any quantize stage and use one search "
            "stage per recipe (prune or fine-tune stages may come before it)"
        )
