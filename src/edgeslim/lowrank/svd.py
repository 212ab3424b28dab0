"""Post-hoc SVD factorization: every eligible conv/linear becomes two smaller layers.

``factorize_(model, example_inputs, SVDConfig(macs_reduction=0.5))`` replaces, in place,
each plain ``nn.Linear`` and ungrouped ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` whose
truncated SVD saves MACs by a :class:`~edgeslim.lowrank.modules.LowRankLinear` /
``LowRankConv1d`` / ``LowRankConv2d`` / ``LowRankConv3d`` holding the two factors.
Ranks come from an energy threshold per layer, or are chosen so the whole model meets a
MACs reduction while losing the least energy (met, or a :class:`LowRankError` saying what
is reachable; see :mod:`edgeslim.lowrank.ranks`).
The report's MACs are measured on the result's layer table. Without fine-tuning the
accuracy drops with the energy removed; fine-tune afterwards (``train_classifier``, best
with :func:`edgeslim.distill.kd_loss` from the dense model) or use TRP, which trains the
weights to be low-rank first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from edgeslim.graph.attention import unfuse_encoder_layers
from edgeslim.graph.layers import layer_table, total_macs
from edgeslim.graph.swap import replace_submodule
from edgeslim.lowrank.modules import FQN_ATTR, LowRankError, WeightReadError, factorize_layer
from edgeslim.lowrank.ranks import (
    candidates,
    given_ranks,
    matches,
    ranks_at,
    ranks_for_target,
)
from edgeslim.lowrank.report import LayerRank, LowRankReport


@dataclass(frozen=True)
class SVDConfig:
    """How ranks are chosen. ``macs_reduction`` (a fraction of the whole model's MACs, in
    (0, 1)), when set, replaces the per-layer ``energy`` rule (the fraction of squared
    singular values each layer keeps). ``skip``: FQNs, globs or ``re:`` patterns left
    dense (e.g. the first conv). Ranks are rounded up to multiples of ``round_to`` (ONNX
    Runtime's conv kernels are fastest on multiples of 8)."""

    energy: float = 0.9
    macs_reduction: float | None = None
    skip: tuple[str, ...] = ()
    round_to: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise LowRankError(f"energy must be in (0, 1]; got {self.energy}")
        if self.macs_reduction is not None and not 0.0 < self.macs_reduction < 1.0:
            raise LowRankError(f"macs_reduction must be in (0, 1); got {self.macs_reduction}")
        if self.round_to < 1:
            raise LowRankError(f"round_to must be >= 1; got {self.round_to}")
        object.__setattr__(self, "skip", tuple(self.skip))  # a list from JSON/YAML


def factorize_(
    model: nn.Module,
    example_inputs: Sequence[Any],
    config: SVDConfig | None = None,
    method: str = "svd",
    ranks: Mapping[str, int] | None = None,
    calibration: Iterable[Any] | None = None,
) -> LowRankReport:
    """Factorize ``model``'s layers in place (see the module doc); returns the report.

    ``example_inputs`` (a tuple, one per model input) run the layer table before and after,
    so the MACs are those of that batch. ``method`` only labels the report (TRP ends here).
    ``ranks`` (``{fqn: rank}``, TRP's final ranks) replaces the config's rule: layers not in
    it, or whose rank saves no MACs, stay dense.
    ``calibration`` (input batches): ranks and factors are data-aware
    (:mod:`edgeslim.lowrank.whiten`: the truncation that loses the least output energy on
    these inputs, not the least weight energy); the report's energies are then output
    energies. Nothing is changed when the request cannot be met.
    """
    config = config if config is not None else SVDConfig()
    names = [n for n, _ in model.named_modules()]
    for pattern in config.skip:
        if not any(matches(n, pattern) for n in names):
            warnings.warn(f"factorize_: skip pattern {pattern!r} matches no layer", stacklevel=2)
    before_table = layer_table(model, *example_inputs)
    before = total_macs(before_table)
    cands, skipped = candidates(model, before_table, config.skip)
    if cands and calibration is not None:
        from edgeslim.lowrank.whiten import whiten, whitenings

        white = whitenings(model, cands, calibration)
        cands = [whiten(c, white[c.fqn]) for c in cands]
    if not cands:
        raise LowRankError(
            "no layer can be factorized: "
            + (
                "; ".join(f"{k}: {v}" for k, v in skipped.items())
                or "no nn.Linear/nn.Conv1d/nn.Conv2d/nn.Conv3d"
            )
        )
    target: float | None = None  # the MACs reduction the ranks were chosen for
    energy: float | None = None  # the per-layer energy they were chosen by
    read: dict[str, str] = {}  # layers whose weight the model reads around them: kept whole
    while True:
        usable = [c for c in cands if c.fqn not in read]
        if not usable:
            reasons = "; ".join(f"{k}: {v}" for k, v in read.items())
            raise LowRankError(f"no layer can be factorized: {reasons}")
        if ranks is not None:
            kept, dense = given_ranks(usable, ranks)
        elif config.macs_reduction is not None:
            target = config.macs_reduction
            try:
                kept, dense = ranks_for_target(usable, before, target, config.round_to)
            except LowRankError as exc:
                left = [f"{k}: {v}" for k, v in {**skipped, **read}.items()]
                if not left:
                    raise
                shown = left[:8] + ([f"... and {len(left) - 8} more"] if len(left) > 8 else [])
                raise LowRankError(f"{exc}. Left whole: {'; '.join(shown)}") from None
        else:
            energy = config.energy
            kept, dense = ranks_at(usable, energy, config.round_to)
        chosen = [c for c in usable if c.fqn in kept]
        for c in chosen:
            pair = factorize_layer(c.module, kept[c.fqn], c.svd)
            object.__setattr__(pair, FQN_ATTR, c.fqn)
            replace_submodule(model, c.fqn, pair)
        unfuse_encoder_layers(model)
        try:
            after_table = layer_table(model, *example_inputs)
            break
        except WeightReadError as exc:
            # Hugging Face's ViT family casts its input to `projection.weight.dtype`: that
            # layer stays whole, said in the report, and the ranks are chosen again
            if exc.fqn is None or exc.fqn not in kept:
                raise
            for c in chosen:
                replace_submodule(model, c.fqn, c.module)
            read[exc.fqn] = "kept whole: code around it reads its `weight`"
    skipped.update(dense)
    skipped.update(read)
    layers = [
        LayerRank(
            fqn=c.fqn,
            type=type(c.module).__name__,
            shape=c.shape,
            max_rank=c.max_rank,
            original_rank=c.numerical_rank(),
            kept_rank=kept[c.fqn],
            energy=round(c.energy_at(kept[c.fqn]), 6),
            macs_before=c.macs,
            macs_after=sum(r.macs for n, r in after_table.items() if n.startswith(c.fqn + ".")),
        )
        for c in chosen
    ]
    report = LowRankReport(
        method=method,
        layers=layers,
        skipped={n: skipped[n] for n in names if n in skipped},
        macs_before=before,
        macs_after=total_macs(after_table),
        requested_macs_reduction=target,
        energy=energy,
    )
    limit = before if target is None else (1 - target) * before
    if report.macs_after > limit:
        raise LowRankError(  # the prediction and the table disagree: a bug, not a user error
            f"factorization predicted at most {limit:,.0f} MACs but the layer table measures "
            f"{report.macs_after:,}; please report this"
        )
    return report
